"""seqcarry's transforms: model loading and TF math (no Beam), and the Beam DoFns."""
