"""seqcarry's own options. Light on purpose: no Beam or TensorFlow import, so
``seqcarry --help`` answers at once."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from transforms.model import ModelOptions


class InputError(ValueError):
    """The run's inputs cannot be used as given (no files, wrong model for the state...)."""


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def checked_run_id(run_id: str | None, prefix: str = "") -> str:
    """``run_id`` if it is a valid name, or ``prefix`` + the UTC time when None."""
    run_id = run_id or prefix + datetime.datetime.now(
        datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    if not _RUN_ID.match(run_id):
        raise InputError(f"--run-id {run_id!r} must be letters, digits, '.', '_' or '-' "
                         "(at most 128, starting with a letter or digit)")
    return run_id


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
    orphan_grace_hours: float = 24.0
    no_wait: bool = False
    allow_non_finite: bool = False
    reset_state: bool = False
    expire_after_runs: int | None = None
    expire_after_days: float | None = None
    max_layers: int = 8
    model_architecture: str | None = None
    tf1_scopes: Sequence[str] = ()
    tf1_forget_bias: float = 1.0

    def model_options(self) -> "ModelOptions":
        """How to read ``model`` beyond what auto-detection sees (travels to workers)."""
        return model_options(self)


def model_options(values: "RunConfig | argparse.Namespace") -> "ModelOptions":
    """The :class:`~transforms.model.ModelOptions` of parsed model options."""
    from transforms.model import ModelOptions

    return ModelOptions.from_arguments(values.model_architecture, values.tf1_scopes,
                                       values.tf1_forget_bias)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and what may be needed to read it (``run``, ``inspect-model``...)."""
    parser.add_argument("--model", required=True,
                        help="the model, format detected: a Keras 3 .keras file, a "
                             "SavedModel directory with a 'step' signature, or a checkpoint "
                             "prefix (model.ckpt for model.ckpt.index + .data-*) of "
                             "tf.train.Checkpoint or of TF1 tf.train.Saver (README, 'Models')")
    add_model_options(parser)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options that say how to read a model, beside wherever the model is named."""
    parser.add_argument("--model-architecture", dest="model_architecture", default=None,
                        metavar="FILE",
                        help="for a tf.train.Checkpoint: the Keras architecture, as a "
                             ".keras file (its weights are ignored) or a JSON file of "
                             "model.to_json()")
    parser.add_argument("--tf1-scope", dest="tf1_scopes", action="append", default=[],
                        metavar="OLD=NEW",
                        help="for a TF1 checkpoint: read variables named OLD/... as "
                             "NEW/... (repeatable), e.g. encoder/rnn=rnn to pick one of "
                             "several RNNs, or encoder/my_cell=rnn/basic_lstm_cell for a "
                             "renamed cell")
    parser.add_argument("--tf1-forget-bias", dest="tf1_forget_bias", type=float,
                        default=1.0, metavar="B",
                        help="for a TF1 checkpoint: the forget_bias its LSTM cells were "
                             "built with (not stored in checkpoints; default 1.0, TF1's)")


def add_orphan_grace_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--orphan-grace-hours", dest="orphan_grace_hours", type=float,
                        default=24.0, metavar="H",
                        help="files of attempts that never committed are removed only once "
                             "older than H hours, so a job still running keeps its files "
                             "(default 24; make it longer than your longest run)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """seqcarry's own ``run`` options (everything else is passed to Beam)."""
    add_model_arguments(parser)
    parser.add_argument("--chunks", required=True,
                        help="input chunk Parquet files: a file, a directory or a glob "
                             "(quote it so the shell does not expand it)")
    parser.add_argument("--state", required=True,
                        help="state directory (local or gs://): CURRENT, log/, snapshots/ "
                             "and staging/ live here; created on the first run")
    parser.add_argument("--outputs", required=True,
                        help="directory for per-step outputs, written under "
                             "<outputs>/<run_id>/<attempt>/")
    parser.add_argument("--run-id", dest="run_id", default=None,
                        help="name of this run (default: UTC time, e.g. 20261125T101500123456Z)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=256,
                        help="sequences run together in one batched computation (default 256)")
    parser.add_argument("--window-steps", dest="window_steps", type=int, default=256,
                        help="time steps per compiled call; bounds memory (default 256)")
    parser.add_argument("--keep", type=int, default=None, metavar="N",
                        help="after committing, keep the snapshots of the N most recent "
                             "commits (N >= 1) and remove the others, and the files of "
                             "attempts that never committed (see --orphan-grace-hours); "
                             "default: keep all")
    add_orphan_grace_argument(parser)
    parser.add_argument("--no-wait", dest="no_wait", action="store_true",
                        help="submit the job and exit without waiting: the job commits by "
                             "itself; its report appears at the printed URL (for runners "
                             "that run without the submitting process, e.g. Dataflow)")
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
