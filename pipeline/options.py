"""seqcarry's options: the ``seqcarry run`` options as a Beam ``PipelineOptions``
subclass (:class:`SeqcarryOptions`, so they travel with the job and are visible among
its options on every runner), the frozen :class:`RunConfig` a run is planned from, and
strict command lines: every option takes its documented dash spelling and Beam's
underscore habit (``--batch-size`` and ``--batch_size``), and an argument that neither
seqcarry nor the installed Beam knows is refused (:func:`refuse_unknown`), never
dropped. No TensorFlow import, so ``seqcarry --help`` answers at once."""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import os
import socket
import urllib.parse
from typing import TYPE_CHECKING, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from schemas.contract import OUTPUTS_AT, XLA_MODES, InputError

if TYPE_CHECKING:
    from transforms.models import ModelOptions


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What one run reads and writes (the ``seqcarry run`` options). ``chunks`` takes
    one path or glob, or several."""
    model: str
    chunks: str | Sequence[str]
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
    max_rejected_fraction: float | None = None
    outputs_at: str = "auto"
    xla: str = "auto"
    model_architecture: str | None = None
    tf1_scopes: Sequence[str] = ()
    tf1_forget_bias: float = 1.0

    def __post_init__(self):
        chunks = (self.chunks,) if isinstance(self.chunks, str) else tuple(self.chunks)
        # Local paths made absolute: an engine's workers do not run in this directory.
        object.__setattr__(self, "chunks", tuple(map(_absolute, chunks)))
        for name in ("model", "state", "outputs", "model_architecture"):
            if getattr(self, name):
                object.__setattr__(self, name, _absolute(getattr(self, name)))
        object.__setattr__(self, "tf1_scopes", tuple(self.tf1_scopes))

    def model_options(self) -> "ModelOptions":
        """How to read ``model`` beyond what auto-detection sees (travels to workers)."""
        return model_options(self)

    def pipeline_options(self, beam_args: Sequence[str] = ()) -> PipelineOptions:
        """Beam's options for this run: ``beam_args`` plus this config, so seqcarry's
        options are among the job's options (``view_as(SeqcarryOptions)``)."""
        values = dataclasses.asdict(self)
        values.update(chunks=list(self.chunks), tf1_scopes=list(self.tf1_scopes))
        return PipelineOptions(list(beam_args), **values)

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "RunConfig":
        """The config of parsed pipeline options (:class:`SeqcarryOptions`); a missing
        required option is an :class:`InputError`."""
        values = options.view_as(SeqcarryOptions).get_all_options(current_only=True)
        missing = [f"--{name}" for name in REQUIRED_RUN_OPTIONS if not values.get(name)]
        if missing:
            raise InputError(f"{', '.join(missing)} required")
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls)
                      if values.get(field.name) is not None})


def _absolute(location: str) -> str:
    return location if "://" in location else os.path.abspath(location)


def model_options(values: "RunConfig | argparse.Namespace") -> "ModelOptions":
    """The :class:`~transforms.models.ModelOptions` of parsed model options."""
    from transforms.models import ModelOptions

    return ModelOptions.from_arguments(values.model_architecture, values.tf1_scopes,
                                       values.tf1_forget_bias)


REQUIRED_RUN_OPTIONS = ("model", "chunks", "state", "outputs")


def spellings(flag: str) -> tuple[str, ...]:
    """``flag`` and its underscore spelling (Beam's habit), e.g. ``--batch-size`` and
    ``--batch_size``; help shows the first only (:class:`HelpFormatter`)."""
    underscored = "--" + flag[2:].replace("-", "_")
    return (flag,) if underscored == flag or not flag.startswith("--") else (flag, underscored)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option by its documented dash spelling only."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = copy.copy(action)
        shown.option_strings = [string for string in action.option_strings
                                if string.replace("_", "-") == string
                                or string.replace("_", "-") not in action.option_strings]
        return super()._format_action_invocation(shown)


class ArgumentParser(argparse.ArgumentParser):
    """seqcarry's command lines: no abbreviations, every ``--dash-option`` also takes
    its ``--underscore_option`` spelling, help shows the dash one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *flags: str, **kwargs):
        named = [name for flag in flags for name in spellings(flag)]
        return super().add_argument(*dict.fromkeys(named), **kwargs)


def option_strings(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every option string ``parser`` takes -> the spelling to suggest for it."""
    return {string: action.option_strings[0] for action in parser._actions
            for string in action.option_strings}


def _beam_parser() -> argparse.ArgumentParser:
    """A parser of every option the installed Beam knows (runner-specific ones too),
    built as Beam builds it when it reads a pipeline's options."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    with contextlib.suppress(ImportError):  # registers DaskOptions, when dask is there
        import apache_beam.runners.dask.dask_runner  # noqa: F401
    parser = _BeamArgumentParser(allow_abbrev=False)
    classes = {str(cls): cls for cls in PipelineOptions.__subclasses__()}
    for cls in classes.values():
        cls._add_argparse_args(parser)
    return parser


def refuse_unknown(arguments: Sequence[str], parser: argparse.ArgumentParser,
                   beam: bool = False) -> None:
    """Raise :class:`InputError` naming the first of ``arguments`` (what ``parser``
    left over) that nothing knows, with a "did you mean" where one is close. With
    ``beam``, Beam's pipeline options are known too (they go to Beam)."""
    known = option_strings(parser)
    leftover = list(arguments)
    if beam and leftover:
        beam_parser = _beam_parser()
        _, leftover = beam_parser.parse_known_args(leftover)
        known = option_strings(beam_parser) | known
    if not leftover:
        return
    flags = [argument for argument in leftover if argument.startswith("-")]
    if not flags:
        raise InputError(f"unexpected argument {leftover[0]!r} (quote a glob given to "
                         "--chunks, or list every file after it)")
    name = flags[0].split("=", 1)[0]
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    raise InputError(f"unknown option {name}" + (f"; did you mean {known[close[0]]}?"
                                                   if close else ""))


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--model`` and what may be needed to read it (``run``, ``inspect-model``...)."""
    parser.add_argument("--model", required=required,
                        help="the model, format detected: a Keras 3 .keras file, a "
                             "SavedModel directory with a 'step' signature, or a checkpoint "
                             "prefix (model.ckpt for model.ckpt.index + .data-*) of "
                             "tf.train.Checkpoint or of TF1 tf.train.Saver (README, 'Models')")
    add_model_options(parser)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options that say how to read a model, beside wherever the model is named."""
    parser.add_argument(*spellings("--model-architecture"), dest="model_architecture", default=None,
                        metavar="FILE",
                        help="for a tf.train.Checkpoint: the Keras architecture, as a "
                             ".keras file (its weights are ignored) or a JSON file of "
                             "model.to_json()")
    parser.add_argument(*spellings("--tf1-scope"), dest="tf1_scopes", action="append", default=[],
                        metavar="OLD=NEW",
                        help="for a TF1 checkpoint: read variables named OLD/... as "
                             "NEW/... (repeatable), e.g. encoder/rnn=rnn to pick one of "
                             "several RNNs, or encoder/my_cell=rnn/basic_lstm_cell for a "
                             "renamed cell")
    parser.add_argument(*spellings("--tf1-forget-bias"), dest="tf1_forget_bias", type=float,
                        default=1.0, metavar="B",
                        help="for a TF1 checkpoint: the forget_bias its LSTM cells were "
                             "built with (not stored in checkpoints; default 1.0, TF1's)")


def add_orphan_grace_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(*spellings("--orphan-grace-hours"), dest="orphan_grace_hours", type=float,
                        default=24.0, metavar="H",
                        help="files of attempts that never committed are removed only once "
                             "older than H hours, so a job still running keeps its files "
                             "(default 24; make it longer than your longest run)")


def add_run_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """seqcarry's own ``run`` options (everything else is passed to Beam).
    ``required=False`` for Beam's parser, which reads every job's options."""
    add_model_arguments(parser, required)
    parser.add_argument("--chunks", required=required, nargs="+", metavar="PATH",
                        help="input chunk Parquet files: files, directories or globs, one "
                             "or several (a glob the shell expanded reads every file)")
    parser.add_argument("--state", required=required,
                        help="state directory (local or gs://): CURRENT, log/, snapshots/ "
                             "and staging/ live here; created on the first run")
    parser.add_argument("--outputs", required=required,
                        help="directory for per-step outputs, written under "
                             "<outputs>/<run_id>/<attempt>/")
    parser.add_argument(*spellings("--outputs-at"), dest="outputs_at", default="auto",
                        choices=("auto", *OUTPUTS_AT),
                        help="which outputs each applied chunk writes: 'every' step's "
                             "(outputs [steps, width]) or only its 'last' step's "
                             "([1, width]: for a classifier, what it says if the sequence "
                             "ended there; the state is carried all the same). Default "
                             "auto: every for a model with per-step outputs, last for one "
                             "whose last recurrent layer has return_sequences=False")
    parser.add_argument("--xla", default="auto", choices=XLA_MODES,
                        help="compile the model with XLA: 'auto' for buckets whose work "
                             "runs at least 12 windows, where XLA's faster windows pay for "
                             "its compile (0.3 to 0.5 s a shape on a CPU), 'on' for every "
                             "bucket (e.g. on GPUs), 'off' for none (plain tf.function, "
                             "results within float32 rounding). Default auto; a worker's "
                             "SEQCARRY_XLA=1 or 0 overrides auto there")
    parser.add_argument(*spellings("--run-id"), dest="run_id", default=None,
                        help="name of this run (default: UTC time, e.g. 20261125T101500123456Z)")
    parser.add_argument(*spellings("--batch-size"), dest="batch_size", type=int, default=256,
                        help="batch rows: sequences computed together; a row whose "
                             "sequence ends takes the next one (default 256)")
    parser.add_argument(*spellings("--window-steps"), dest="window_steps", type=int, default=256,
                        help="time steps per compiled call; bounds memory (default 256)")
    parser.add_argument("--keep", type=int, default=None, metavar="N",
                        help="after committing, keep the snapshots of the N most recent "
                             "commits (N >= 1) and remove the others, and the files of "
                             "attempts that never committed (see --orphan-grace-hours); "
                             "default: keep all")
    add_orphan_grace_argument(parser)
    parser.add_argument(*spellings("--no-wait"), dest="no_wait", action="store_true",
                        help="submit the job and exit without waiting: the job commits by "
                             "itself; its report appears at the printed URL (for runners "
                             "that run without the submitting process, e.g. Dataflow)")
    parser.add_argument(*spellings("--allow-non-finite"), dest="allow_non_finite", action="store_true",
                        help="accept NaN and infinite feature values (rejected by default)")
    parser.add_argument(*spellings("--reset-state"), dest="reset_state", action="store_true",
                        help="the model changed on purpose: restart the recurrent state of "
                             "every sequence written by another model from zeros (chunk "
                             "numbering continues)")
    parser.add_argument(*spellings("--expire-after-runs"), dest="expire_after_runs", type=int,
                        default=None, metavar="N",
                        help="end sequences that received no chunk in the last N runs: their "
                             "final state is reported and later chunks are rejected")
    parser.add_argument(*spellings("--expire-after-days"), dest="expire_after_days", type=float,
                        default=None, metavar="D",
                        help="end sequences that received no chunk for D days (as above)")
    parser.add_argument(*spellings("--max-layers"), dest="max_layers", type=int, default=8, metavar="N",
                        help="a run reads and rewrites only the sequences it has chunks for, "
                             "adding a layer of state files to the snapshot; when the "
                             "snapshot has N layers, the run compacts it: reads and rewrites "
                             "every sequence into one layer (default 8; 1 compacts every "
                             "run). --reset-state and --expire-after-* always compact")
    parser.add_argument(*spellings("--max-rejected-fraction"), dest="max_rejected_fraction",
                        type=float, default=None, metavar="F",
                        help="fail the run without committing (exit 2) when more than this "
                             "share of its input is rejected, 0 to 1: rejected chunks and "
                             "the rows of files rejected whole, over everything read; the "
                             "dead letters are kept (default: commit whatever was rejected)")


class SeqcarryOptions(PipelineOptions):
    """``seqcarry run``'s options as Beam pipeline options: they travel with the job
    (Dataflow lists them among its options; a Flex Template can take them as
    parameters), in either spelling."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        add_run_arguments(parser, required=False)


class JobFailedError(RuntimeError):
    """The runner's job failed (a lost worker, an engine error) and nothing of it was
    committed: the state is still the parent's, and a rerun continues from there."""


def check_engine_options(options: PipelineOptions) -> None:
    """Refuse, before anything is submitted, the engine options Beam would only fail on
    with a ValueError deep in the runner: a ``--flink_job_server_jar`` or
    ``--prism_location`` that is not there, and a ``--flink_master`` that nothing
    answers at when this machine starts the job server itself (no ``--job_endpoint``).
    """
    from apache_beam.options.pipeline_options import (FlinkRunnerOptions, PortableOptions,
                                                      PrismRunnerOptions, StandardOptions)

    runner = options.view_as(StandardOptions).runner or ""
    flink = options.view_as(FlinkRunnerOptions)
    local_files = {"--flink_job_server_jar": flink.flink_job_server_jar,
                   "--prism_location": options.view_as(PrismRunnerOptions).prism_location}
    for flag, location in local_files.items():
        if location and not urllib.parse.urlparse(location).scheme and not os.path.isfile(
                location):
            raise InputError(f"{flag} {location}: no such file")
    if "Flink" in runner and not options.view_as(PortableOptions).job_endpoint:
        unreachable = flink_master_unreachable(flink.flink_master or "")
        if unreachable:
            raise InputError(unreachable)


def flink_master_unreachable(master: str) -> str | None:
    """Why nothing answers at ``--flink_master`` (None: something does, or it is one of
    Beam's own choices, ``[auto]`` and ``[local]``)."""
    if master.startswith("["):
        return None
    address = urllib.parse.urlparse(master if "://" in master else "http://" + master)
    try:
        with socket.create_connection((address.hostname or "", address.port or 8081),
                                      timeout=5):
            return None
    except (OSError, ValueError) as error:
        return (f"--flink_master {master}: no Flink cluster answers there ({error}); "
                "is it up (`make flink-up`)?")
