"""One seqcarry run: plan it, build the Beam pipeline, run it, report.

The job commits itself (its last step, :mod:`transforms.commit`); the launcher plans,
submits, waits and prints the report the job wrote. ``run(argv)`` is the entry point
(as in Beam's wordcount): seqcarry's own options are parsed here, and every other
``--flag`` goes to Beam's ``PipelineOptions``.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (FlinkRunnerOptions, PipelineOptions,
                                                  StandardOptions)
from apache_beam.runners.runner import PipelineState

import storage
from pipeline.options import (ArgumentParser, InputError, JobFailedError, RunConfig,
                              add_run_arguments, check_engine_options,
                              flink_master_unreachable, refuse_unknown)
from transforms.carry import CarryPlan, CarryState, plan_carry
from transforms.dofns import ReadChunkFiles
from transforms.session import METRICS_NAMESPACE

_LOG = logging.getLogger("seqcarry")
RUNNER_ALIASES = {None: "FnApiRunner", "DirectRunner": "FnApiRunner",
                  "DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}
# How Beam's portable runners (Flink, Prism, a job service) report a failed job, and
# the errors of seqcarry's that a worker's traceback in that report may end with.
RUNNER_JOB_FAILED = re.compile(r"Pipeline \S+ failed in state \w+")
PYTHON_ERROR = re.compile(r"(?P<kind>[A-Za-z_][\w.]*(Error|Exception|File|Location)): "
                          r"(?P<message>.*)")
WORKER_ERRORS = {"StateConflictError": storage.StateConflictError,
                 **dict.fromkeys(("StorageError", "IntegrityError", "UnreadableFile"),
                                 storage.StorageError),
                 **dict.fromkeys(("InputError", "ContractError", "ModelError",
                                  "UnsupportedLocation"), InputError)}


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A ``seqcarry run``: its input files (from one listing) and the plan of the
    :class:`~transforms.carry.CarryState` that carries them."""
    config: RunConfig
    carry: CarryPlan
    chunk_files: tuple[str, ...]
    input_bytes: int  # the input files' total size, from the listing

    @property
    def run_id(self) -> str:
        return self.carry.run_id

    @property
    def attempt(self) -> str:
        return self.carry.attempt


def plan_run(config: RunConfig) -> RunPlan:
    """Plan a run from small metadata only: the input listing (names and sizes), and
    ``CURRENT``, the parent manifest and the model (:func:`plan_carry`). The job reads
    the inputs and sizes its work itself."""
    carry = plan_carry(
        config.model, config.state, config.outputs, config.run_id,
        batch_size=config.batch_size, window_steps=config.window_steps,
        allow_non_finite=config.allow_non_finite, reset_state=config.reset_state,
        expire_after_runs=config.expire_after_runs,
        expire_after_days=config.expire_after_days, max_layers=config.max_layers,
        keep=config.keep, orphan_grace_hours=config.orphan_grace_hours,
        max_rejected_fraction=config.max_rejected_fraction,
        model_options=config.model_options(), outputs_at=config.outputs_at, xla=config.xla)
    listed = {url: size for pattern in config.chunks for url, size in storage.list_files(pattern)}
    if not listed:  # a day without new data: the run still commits (and expires)
        _LOG.warning("event=no_input run_id=%s: no file matches --chunks %s; the run commits "
                     "an empty layer", carry.run_id, " ".join(config.chunks))
    input_bytes = sum(listed.values())
    _LOG.info("event=listed run_id=%s files=%d bytes=%d", carry.run_id, len(listed),
              input_bytes)
    return RunPlan(config, carry, tuple(sorted(listed)), input_bytes)


def build(pipeline: beam.Pipeline, plan: RunPlan) -> dict[str, beam.PCollection]:
    """Add one run's transforms to ``pipeline``: Parquet in, :class:`CarryState`, which
    writes the outputs and commits as its last step; returns its PCollections."""
    return (pipeline
            | "ChunkFiles" >> beam.Create(plan.chunk_files)
            | "ReadChunkFiles" >> ReadChunkFiles()
            | "CarryState" >> CarryState(plan=plan.carry))


def run_job(config: RunConfig, beam_args: Sequence[str] = ()) -> dict:
    """Run once: plan, then run the job, which reads, computes, writes and commits.
    Returns the run report the job wrote (with Beam's metrics, where the runner has
    them); with ``--no-wait``, what was submitted and where its report will be."""
    check_paths_reach_workers(config, beam_args)
    plan = plan_run(config)
    return execute(plan, beam_args)


# Runners whose workers run on other machines: they cannot read the launcher's disk.
REMOTE_RUNNERS = ("DataflowRunner",)


def check_paths_reach_workers(config: RunConfig, beam_args: Sequence[str]) -> None:
    """Refuse local paths for a runner whose workers run elsewhere (an InputError:
    the job would fail on its workers, or commit nothing, long after submission)."""
    runner = pipeline_options(config, beam_args).view_as(StandardOptions).runner
    if runner not in REMOTE_RUNNERS:
        return
    named = [("--model", config.model), *(("--chunks", path) for path in config.chunks),
             ("--state", config.state), ("--outputs", config.outputs),
             ("--model-architecture", config.model_architecture)]
    local = [f"{option} {path}" for option, path in named if path and "://" not in path]
    if local:
        raise InputError(f"{runner}'s workers cannot read this machine's files: "
                         f"{', '.join(local)}; use gs:// paths")


def pipeline_options(config: RunConfig, beam_args: Sequence[str] = ()) -> PipelineOptions:
    """Beam's options from the command line, with seqcarry's among them.

    ``DirectRunner`` (also Beam's default) runs on Beam's ``FnApiRunner``: the local
    runner the DirectRunner ends up on anyway, without first trying to download the
    Prism runner from the internet (which fails offline, and elsewhere silently swaps
    the runner). ``--runner=PrismRunner`` still asks for Prism explicitly.
    ``DaskRunner``, which Beam only knows by its full name, is accepted as is.
    """
    options = config.pipeline_options(beam_args)
    standard = options.view_as(StandardOptions)
    standard.runner = RUNNER_ALIASES.get(standard.runner, standard.runner)
    check_engine_options(options)
    return options


def job_failure(plan: RunPlan, options: PipelineOptions,
                error: Exception) -> Exception | None:
    """What a portable runner's "Pipeline ... failed" means, in one line. A seqcarry
    error a worker raised (its traceback is in the message) is that error again, with
    its exit code; any other Python error is a bug (None: the failure stands). A Flink
    job that failed while ``--flink_master`` does not answer is bad input; anything else on
    the engine (a lost TaskManager) is a failed job, :class:`JobFailedError`."""
    message = RUNNER_JOB_FAILED.sub("", str(error), count=1).lstrip(": ")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in message:
        raised = [match for line in lines if (match := PYTHON_ERROR.match(line))]
        kind = raised[-1]["kind"].rsplit(".", 1)[-1] if raised else ""
        return (WORKER_ERRORS[kind](raised[-1]["message"]) if kind in WORKER_ERRORS
                else None)
    runner = options.view_as(StandardOptions).runner or ""
    if "Flink" in runner:  # a job server that could not submit: is the cluster there?
        unreachable = flink_master_unreachable(
            options.view_as(FlinkRunnerOptions).flink_master or "")
        if unreachable:
            return InputError(unreachable)
    parent = plan.carry.parent_pointer
    return JobFailedError(
        f"the {runner} job of run {plan.run_id} attempt {plan.attempt} failed and "
        f"committed nothing (the state is still {parent.run_id if parent else 'empty'}); "
        f"the runner said: {lines[0][:500] if lines else type(error).__name__}")


def execute(plan: RunPlan, beam_args: Sequence[str] = ()) -> dict:
    """Submit the job; unless ``--no-wait``, wait for it and return its report."""
    options = pipeline_options(plan.config, beam_args)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, plan)
    store = storage.StateStore(plan.config.state)
    result = None
    try:
        result = pipeline.run()  # the in-process runner runs the whole job here
        if plan.config.no_wait:
            return {"run_id": plan.run_id, "attempt": plan.attempt, "submitted": True,
                    "report": store.report_url(plan.run_id, plan.attempt)}
        with ProgressWatcher(result):
            result.wait_until_finish()
    except Exception as error:
        outcome = outcome_of_failure(plan, store, error)
        if outcome is None and RUNNER_JOB_FAILED.match(str(error)):
            outcome = job_failure(plan, options, error)
        if outcome is None:
            raise
        raise outcome from error
    finally:
        client = getattr(result, "client", None)  # the DaskRunner leaves it open
        if client is not None:
            client.close()
        if not plan.config.no_wait:
            try:  # the job removed it if it committed; a failure here must not hide why
                store.remove_staging(plan.run_id, plan.attempt)
            except storage.StorageError as error:
                _LOG.warning("event=staging_left url=%s reason=%s",
                             store.staging_url(plan.run_id, plan.attempt), error)
    report = store.report(plan.run_id, plan.attempt)
    if not report:  # a job that ends must have committed: anything else is a bug
        raise RuntimeError(f"the job of run {plan.run_id} attempt {plan.attempt} finished "
                           "without committing or writing its report")
    return report | {"metrics": beam_metrics(result)}


def outcome_of_failure(plan: RunPlan, store: storage.StateStore,
                       error: Exception) -> Exception | None:
    """What a failed job means for the state, told truly from CURRENT: committed
    anyway (it failed after its swap), moved by another run or attempt (a conflict),
    or unchanged (None: the job's own error stands)."""
    try:
        now = store.current()
    except storage.StorageError as error:
        return error
    where = now.snapshot if now else None
    done = store.committed_attempt(plan.run_id)  # committed, maybe with more on top
    parent_pointer = plan.carry.parent_pointer
    if where == (plan.run_id, plan.attempt) or (done and done.attempt == plan.attempt):
        return storage.StorageError(
            f"run {plan.run_id} attempt {plan.attempt} was committed (the state is this "
            f"run's), but its job failed after the commit: {str(error).splitlines()[-1]}")
    if where != (parent_pointer.snapshot if parent_pointer else None):
        moved = f"{now.run_id} (attempt {now.attempt})" if now else "empty"
        parent = parent_pointer.run_id if parent_pointer else "empty"
        return storage.StateConflictError(
            f"state moved from {parent} to {moved} while run {plan.run_id} attempt "
            f"{plan.attempt} was running; this attempt was not committed, and the "
            f"committed state is {moved}'s")
    return None


def beam_metrics(result: beam.runners.runner.PipelineResult,
                 attempted: bool = False) -> dict[str, Any]:
    """The run's counters and distributions in seqcarry's namespace ({} where the
    runner cannot report metrics, like the DaskRunner; the counts in the report come
    from the manifest on every runner). ``attempted``: the values so far, asked again
    of the runner (while the job runs, most runners have no committed values yet)."""
    try:
        queried = _metrics_of(result, attempted).query(
            MetricsFilter().with_namespace(METRICS_NAMESPACE))
    except NotImplementedError:
        return {}
    metrics: dict[str, Any] = {}
    for counter in queried["counters"]:
        name = counter.key.metric.name
        # Runners report committed values, attempted ones or both: so far, the larger.
        value = (max(counter.attempted or 0, counter.committed or 0) if attempted
                 else counter.committed or 0)
        metrics[name] = metrics.get(name, 0) + value
    for distribution in queried["distributions"]:
        value = distribution.attempted if attempted else distribution.committed
        if value is not None and value.count:
            metrics[distribution.key.metric.name] = {
                "count": value.count, "mean": round(value.mean, 3), "min": value.min,
                "max": value.max}
    return metrics


def _metrics_of(result: beam.runners.runner.PipelineResult, fresh: bool):
    job_service = getattr(result, "_job_service", None)
    if fresh and job_service is not None:
        # Beam's portable result keeps the first answer of metrics() for good: ask its
        # job service again for the values so far.
        import grpc
        from apache_beam.portability.api import beam_job_api_pb2
        from apache_beam.runners.portability.portable_runner import PortableMetrics

        ask = job_service.GetJobMetrics
        # A remote job service gets a deadline; Beam's embedded one is a local object.
        deadline = ({"timeout": METRICS_TIMEOUT_SECONDS}
                    if isinstance(ask, grpc.UnaryUnaryMultiCallable) else {})
        return PortableMetrics(ask(
            beam_job_api_pb2.GetJobMetricsRequest(job_id=result._job_id), **deadline))
    return result.metrics()


# A job service that does not answer must not hold up the launcher.
METRICS_TIMEOUT_SECONDS = 30
# What a progress line shows, from the job's counters.
PROGRESS_COUNTERS = ("chunks_read", "chunks_processed", "steps_processed", "chunks_rejected")


class ProgressWatcher:
    """While the launcher waits for a job on a runner that reports metrics as it runs
    (Flink, Dataflow, Prism and other portable runners), log its counters every
    ``every_seconds`` as ``event=progress chunks_read=...``, when they moved. Jobs that
    ran within ``pipeline.run()`` (Beam's in-process runners) are over already."""

    def __init__(self, result: beam.runners.runner.PipelineResult, every_seconds: float = 10.0):
        self._result = result
        self._every = every_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="seqcarry-progress",
                                        daemon=True)

    def __enter__(self) -> "ProgressWatcher":
        if not PipelineState.is_terminal(self._result.state):
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread.is_alive():  # a daemon: one stuck in a call is left behind
            self._thread.join(timeout=METRICS_TIMEOUT_SECONDS)

    def _watch(self) -> None:
        last: dict[str, Any] = {}
        while not self._stop.wait(self._every):
            try:
                metrics = beam_metrics(self._result, attempted=True)
            except Exception as error:  # progress is best effort: the job's outcome is not
                _LOG.debug("event=progress_unavailable reason=%s", error)
                continue
            shown = {name: metrics[name] for name in PROGRESS_COUNTERS if name in metrics}
            if shown and shown != last:
                _LOG.info("event=progress %s", " ".join(f"{k}={v}" for k, v in shown.items()))
                last = shown


def summary_line(report: dict) -> str:
    """The one line that ends every ``seqcarry run``: ``ok``, or ``warn`` when chunks
    were rejected (errors end with ``seqcarry: error: ...`` instead)."""
    if report.get("submitted"):
        return (f"seqcarry: ok: run {report['run_id']} attempt {report['attempt']} submitted; "
                f"it commits itself and writes its report to {report['report']}")
    files_rejected = report.get("files_rejected", 0)
    rejected = report["chunks_rejected"] + report.get("pending_rejected", 0) + files_rejected
    reasons = ", ".join(f"{count} {reason}"
                        for reason, count in report["chunks_rejected_by_reason"].items())
    file_reasons = ", ".join(f"{count} {reason}" for reason, count
                             in report.get("files_rejected_by_reason", {}).items())
    letters = report.get("dead_letters") or []
    where = f"; dead letters in {letters[0].rsplit('/', 1)[0]}" if letters else ""
    return (f"seqcarry: {'warn' if rejected else 'ok'}: run {report['run_id']} committed: "
            f"{report['chunks_read']} chunks read, {report['chunks_processed']} processed, "
            f"{report['chunks_deferred']} deferred, {report['chunks_skipped_duplicate']} "
            f"skipped as duplicates, {report['chunks_rejected']} rejected"
            + (f" ({reasons})" if reasons else "")
            + (f", {files_rejected} input file{'s' if files_rejected != 1 else ''} rejected "
               f"whole ({file_reasons})"
               if files_rejected else "")
            + (f", {report['pending_rejected']} pending rejected"
               if report.get("pending_rejected") else "")
            + (where if rejected else "")
            + f"; {report['steps_processed']} steps in {report['seconds']} s")


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``seqcarry run`` arguments and run once. Arguments seqcarry does not know
    go to Beam; one that Beam does not know either is an :class:`InputError`."""
    parser = ArgumentParser(prog="seqcarry run")
    add_run_arguments(parser)
    known, beam_args = parser.parse_known_args(argv)
    refuse_unknown(beam_args, parser, beam=True)
    return run_job(RunConfig(**vars(known)), beam_args)
