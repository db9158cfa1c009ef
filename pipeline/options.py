"""seqcarry's own options. Light on purpose: no Beam or TensorFlow import, so
``seqcarry --help`` answers at once."""
from __future__ import annotations

import argparse
import dataclasses


class InputError(ValueError):
    """The run's inputs cannot be used as given (no files, wrong model for the state...)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What one run reads and writes (the ``seqcarry run`` options)."""
    model: str
    chunks: str
    state: str
    outputs: str
    run_id: str | None = None
    batch_size: int = 256
    window_steps: int = 256
    keep: int | None = None
    allow_non_finite: bool = False
    reset_state: bool = False
    expire_after_runs: int | None = None
    expire_after_days: float | None = None
    max_layers: int = 8


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """seqcarry's own ``run`` options (everything else is passed to Beam)."""
    parser.add_argument("--model", required=True,
                        help="model file: a Keras 3 .keras file of stacked "
                             "LSTM(return_sequences=True) layers, optionally followed by Dense")
    parser.add_argument("--chunks", required=True,
                        help="input chunk Parquet files: a file, a directory or a glob "
                             "(quote it so the shell does not expand it)")
    parser.add_argument("--state", required=True,
                        help="state directory: CURRENT, snapshots/ and runs/ live here; "
                             "created on the first run")
    parser.add_argument("--outputs", required=True,
                        help="directory for per-step outputs, written under <outputs>/<run_id>/")
    parser.add_argument("--run-id", dest="run_id", default=None,
                        help="name of this run (default: UTC time, e.g. 20261125T101500123456Z)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=256,
                        help="sequences run together in one batched computation (default 256)")
    parser.add_argument("--window-steps", dest="window_steps", type=int, default=256,
                        help="time steps per compiled call; bounds memory (default 256)")
    parser.add_argument("--keep", type=int, default=None, metavar="N",
                        help="after committing, delete all but the N newest committed "
                             "snapshots (default: keep all)")
    parser.add_argument("--allow-non-finite", dest="allow_non_finite", action="store_true",
                        help="accept NaN and infinite feature values (rejected by default)")
    parser.add_argument("--reset-state", dest="reset_state", action="store_true",
                        help="the model changed on purpose: restart the recurrent state of "
                             "every sequence written by another model from zeros (chunk "
                             "numbering continues)")
    parser.add_argument("--expire-after-runs", dest="expire_after_runs", type=int,
                        default=None, metavar="N",
                        help="end sequences that received no chunk in the last N runs: their "
                             "final state is reported and later chunks are rejected")
    parser.add_argument("--expire-after-days", dest="expire_after_days", type=float,
                        default=None, metavar="D",
                        help="end sequences that received no chunk for D days (as above)")
    parser.add_argument("--max-layers", dest="max_layers", type=int, default=8, metavar="N",
                        help="a run reads and rewrites only the sequences it has chunks for, "
                             "adding a layer of state files to the snapshot; when the "
                             "snapshot has N layers, the run compacts it: reads and rewrites "
                             "every sequence into one layer (default 8; 1 compacts every "
                             "run). --reset-state and --expire-after-* always compact")
