"""``python -m pipeline`` is the ``seqcarry`` command."""
from pipeline.cli import entry_point

entry_point()
