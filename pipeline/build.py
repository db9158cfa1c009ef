"""One seqcarry run: plan it, build the Beam pipeline, run it, report.

The job commits itself (its last step, :mod:`transforms.commit`); the launcher plans,
submits, waits and prints the report the job wrote. ``run(argv)`` is the entry point
(as in Beam's wordcount): seqcarry's own options are parsed here, and every other
``--flag`` goes to Beam's ``PipelineOptions``.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import time
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

import storage
from pipeline.options import (ArgumentParser, InputError, RunConfig, add_run_arguments,
                              check_retention, checked_run_id, refuse_unknown)
from schemas.manifest import new_attempt_id
from transforms.commit import CommitRun, CommitTarget
from transforms.dofns import (LEDGER, PENDING_FILE, SMALL_OUTPUT_SHARDS, STATE_FILE,
                              ApplyChunks, ReadChunkFile, ReadSnapshotFile, WriteDeadLetters,
                              WriteFinalStates, WriteManifest, WriteOutputPart,
                              WriteSnapshotShard, split)
from transforms.model import ModelError, RecurrentStack, load_model
from transforms.session import METRICS_NAMESPACE
from transforms.sequencing import Planner, stable_bucket

_LOG = logging.getLogger("seqcarry")
ROWS_PER_STATE_FILE = 100_000
# Bounds on what one bucket holds in memory (see bucket_count).
BUCKET_BYTES = 256 * 2**20
STATES_PER_BUCKET = 200_000
RUNNER_ALIASES = {None: "FnApiRunner", "DirectRunner": "FnApiRunner",
                  "DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A run's inputs, fixed before the pipeline is built."""
    config: RunConfig
    run_id: str
    attempt: str  # this submission of the run: every file it writes is below its own
    parent_pointer: storage.CommitRecord | None  # CURRENT as read: the commit swaps from it
    parent: storage.Manifest | None
    stack: RecurrentStack
    chunk_files: tuple[str, ...]
    chunk_rows: int  # rows of the chunk files (before validation)
    state_shards: int
    planner: Planner
    compact: bool  # read and rewrite every sequence, not only the touched ones
    buckets: int  # units of work: sequences joined, planned and run together
    planned_at: float  # time.time() when planning began

    def commit_target(self) -> CommitTarget:
        return CommitTarget(self.config.state, self.config.outputs, self.run_id,
                            self.attempt, self.parent_pointer, self.planned_at,
                            self.config.keep, self.config.orphan_grace_hours * 3600)


def plan_run(config: RunConfig) -> RunPlan:
    """Check the inputs and decide everything the pipeline needs to be built."""
    started_at = time.time()  # the report's seconds count from here
    if min(config.batch_size, config.window_steps, config.max_layers) < 1:
        raise InputError("--batch-size, --window-steps and --max-layers must be at least 1")
    if (config.expire_after_runs is not None and config.expire_after_runs < 1
            or config.expire_after_days is not None and config.expire_after_days <= 0):
        raise InputError("--expire-after-runs must be at least 1 and --expire-after-days "
                         "more than 0")
    check_retention(config.keep, config.orphan_grace_hours)
    store = storage.StateStore(config.state)  # refuses a --state without atomic swaps
    storage.check_location(config.state, "--state")
    storage.check_location(config.outputs, "--outputs")
    stack = load_model(config.model, config.model_options())
    run_id = checked_run_id(config.run_id)
    pointer = store.current()
    parent = store.manifest_of(pointer) if pointer else None
    if parent and parent.model_fingerprint != stack.fingerprint and not config.reset_state:
        raise ModelError(
            f"the state in {config.state} was written by model {parent.model_fingerprint}, "
            f"but {config.model} is {stack.fingerprint}; use the model that wrote the state, "
            "or pass --reset-state to restart every sequence's state from zeros")
    chunk_files = sorted({url for pattern in config.chunks
                          for url in storage.expand_glob(pattern)})
    if not chunk_files:
        raise InputError(f"no Parquet files match --chunks {' '.join(config.chunks)}")
    sizes = [storage.parquet_size(url) for url in chunk_files]
    input_rows, input_bytes = sum(rows for rows, _ in sizes), sum(size for _, size in sizes)
    live = parent.sequences if parent else 0
    # Expiry and --reset-state concern every sequence, so they need a full read.
    compact = bool(parent is None or parent.layers >= config.max_layers or config.reset_state
                   or config.expire_after_runs or config.expire_after_days
                   or parent.predates_layers)
    shards = max(1, -(-((live if compact else 0) + input_rows) // ROWS_PER_STATE_FILE))
    buckets = bucket_count(len(storage.distinct_values(chunk_files, "sequence_id")),
                           input_bytes, config.batch_size, live if compact else 0)
    planner = Planner(
        run_id=run_id, run_number=parent.run_number + 1 if parent else 1,
        started_at=int(time.time()), zero_state=stack.zero_state(),
        model_fingerprint=stack.fingerprint, reset_state=config.reset_state,
        expire_after_runs=config.expire_after_runs,
        expire_after_seconds=(math.ceil(config.expire_after_days * 86400)
                              if config.expire_after_days else None))
    store.check_run_id_free(run_id)
    attempt = new_attempt_id()
    _LOG.info("event=planned run_id=%s attempt=%s parent=%s files=%d chunks=%d "
              "sequences=%d pending=%d layers=%d compact=%s buckets=%d", run_id, attempt,
              parent.run_id if parent else None, len(chunk_files), input_rows, live,
              parent.pending_chunks if parent else 0, parent.layers if parent else 0,
              compact, buckets)
    return RunPlan(config, run_id, attempt, pointer, parent, stack, tuple(chunk_files),
                   input_rows, shards, planner, compact, buckets, started_at)


def bucket_count(sequences: int, input_bytes: int, batch_size: int,
                 snapshot_rows: int) -> int:
    """How many buckets a run's work is split into.

    A bucket's chunks are read into memory together and run as full batches: about
    four batches each, fewer sequences where their features would exceed
    :data:`BUCKET_BYTES`, and no more than :data:`STATES_PER_BUCKET` snapshot rows
    (for a compacting run, which reads every state).
    """
    bytes_per_sequence = input_bytes / max(1, sequences)
    per_bucket = min(4 * batch_size, int(BUCKET_BYTES // max(1.0, bytes_per_sequence)))
    if per_bucket >= batch_size:
        per_bucket -= per_bucket % batch_size  # whole batches
    return max(1, -(-sequences // max(1, per_bucket)), -(-snapshot_rows // STATES_PER_BUCKET))


def build(pipeline: beam.Pipeline, plan: RunPlan) -> None:
    """Add one run's transforms to ``pipeline``; it ends by committing the run."""
    config, stack, attempt = plan.config, plan.stack, plan.attempt
    chunks = split(
        pipeline
        | "ChunkFiles" >> beam.Create(plan.chunk_files)
        | "SpreadChunkFiles" >> beam.Reshuffle()
        | "ReadChunks" >> beam.ParDo(ReadChunkFile(
            stack.input_dim, config.allow_non_finite, plan.run_id,
            storage.StateStore(config.state).staging_url(plan.run_id, attempt), plan.buckets,
            stack.vocabulary)),
        ("chunks", "touched", "dead_letters", LEDGER), "Read")
    snapshot_files = ([(STATE_FILE, r) for r in plan.parent.state_files]
                      + [(PENDING_FILE, r) for r in plan.parent.pending_files]
                      if plan.parent else [])
    # An incremental run reads only the rows of the sequences it has chunks for.
    touched = () if plan.compact else (beam.pvalue.AsList(chunks["touched"]),)
    snapshot = split(
        pipeline
        | "SnapshotFiles" >> beam.Create(snapshot_files)
        | "SpreadSnapshotFiles" >> beam.Reshuffle()
        | "ReadSnapshot" >> beam.ParDo(ReadSnapshotFile(stack.state_names, plan.buckets),
                                       *touched),
        ("states", "pending"), "Snapshot")
    applied = (
        {"chunks": chunks["chunks"], "states": snapshot["states"],
         "pending": snapshot["pending"]}
        | "ApplyChunks" >> ApplyChunks(
            config.model, plan.planner, config.batch_size, config.window_steps,
            plan.chunk_rows + (plan.parent.pending_chunks if plan.parent else 0),
            config.model_options()))
    shards = plan.state_shards
    snapshot_written = (
        {"states": applied["states"] | "ShardStates" >> beam.Map(_shard_of, shards),
         "pending": applied["pending"] | "ShardPending" >> beam.Map(_shard_of, shards)}
        | "GroupSnapshotShards" >> beam.CoGroupByKey()
        | "WriteSnapshot" >> beam.ParDo(WriteSnapshotShard(
            config.state, plan.run_id, attempt, plan.planner.run_number, shards,
            stack.state_names)))
    outputs_written = applied["outputs"] | "WriteOutputs" >> beam.ParDo(
        WriteOutputPart(config.outputs, plan.run_id, attempt))
    dead_letters_written = (
        (chunks["dead_letters"], applied["dead_letters"])
        | "AllDeadLetters" >> beam.Flatten()
        | "ShardDeadLetters" >> beam.Map(lambda d: (stable_bucket(
            f"{d.source}:{d.sequence_id}", SMALL_OUTPUT_SHARDS), d))
        | "GroupDeadLetters" >> beam.GroupByKey()
        | "WriteDeadLetters" >> beam.ParDo(WriteDeadLetters(config.outputs, plan.run_id, attempt)))
    final_states_written = (
        applied["ended"]
        | "ShardEnded" >> beam.Map(lambda pair: (stable_bucket(
            pair[0].sequence_id, SMALL_OUTPUT_SHARDS), pair))
        | "GroupEnded" >> beam.GroupByKey()
        | "WriteFinalStates" >> beam.ParDo(WriteFinalStates(
            config.outputs, plan.run_id, attempt, stack.state_names)))
    # The manifest depends on every write through the ledger, and the commit is the
    # last transform: Beam's DaskRunner computes only the graph behind the last one.
    _ = (
        (chunks[LEDGER], applied["ledger"], snapshot_written, outputs_written,
         dead_letters_written, final_states_written)
        | "Ledger" >> beam.Flatten()
        | "OneKey" >> beam.Map(lambda entry: (None, entry))
        | "GatherLedger" >> beam.GroupByKey()
        | "WriteManifest" >> beam.ParDo(WriteManifest(
            config.state, plan.run_id, attempt, plan.planner.run_number,
            datetime.datetime.fromtimestamp(plan.planned_at, datetime.timezone.utc)
            .isoformat(), plan.parent, not plan.compact, stack.fingerprint,
            stack.state_names))
        | "Commit" >> beam.ParDo(CommitRun(plan.commit_target())))


def _shard_of(item, shards: int):
    return stable_bucket(item.sequence_id, shards), item


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
    return options


def execute(plan: RunPlan, beam_args: Sequence[str] = ()) -> dict:
    """Submit the job; unless ``--no-wait``, wait for it and return its report."""
    pipeline = beam.Pipeline(options=pipeline_options(plan.config, beam_args))
    build(pipeline, plan)
    store = storage.StateStore(plan.config.state)
    result = None
    try:
        result = pipeline.run()  # the in-process runner runs the whole job here
        if plan.config.no_wait:
            return {"run_id": plan.run_id, "attempt": plan.attempt, "submitted": True,
                    "report": store.report_url(plan.run_id, plan.attempt)}
        result.wait_until_finish()
    except Exception as error:
        outcome = outcome_of_failure(plan, store, error)
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
    return store.report(plan.run_id, plan.attempt) | {"metrics": beam_metrics(result)}


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
    if where == (plan.run_id, plan.attempt) or (done and done.attempt == plan.attempt):
        return storage.StorageError(
            f"run {plan.run_id} attempt {plan.attempt} was committed (the state is this "
            f"run's), but its job failed after the commit: {str(error).splitlines()[-1]}")
    if where != (plan.parent_pointer.snapshot if plan.parent_pointer else None):
        moved = f"{now.run_id} (attempt {now.attempt})" if now else "empty"
        parent = plan.parent_pointer.run_id if plan.parent_pointer else "empty"
        return storage.StateConflictError(
            f"state moved from {parent} to {moved} while run {plan.run_id} attempt "
            f"{plan.attempt} was running; this attempt was not committed, and the "
            f"committed state is {moved}'s")
    return None


def beam_metrics(result: beam.runners.runner.PipelineResult) -> dict[str, Any]:
    """The run's counters and distributions in seqcarry's namespace ({} where the
    runner cannot report metrics, like the DaskRunner; the counts in the report come
    from the manifest on every runner)."""
    try:
        queried = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    except NotImplementedError:
        return {}
    metrics: dict[str, Any] = {}
    for counter in queried["counters"]:
        name = counter.key.metric.name
        metrics[name] = metrics.get(name, 0) + counter.committed
    for distribution in queried["distributions"]:
        value = distribution.committed
        if value is not None and value.count:
            metrics[distribution.key.metric.name] = {
                "count": value.count, "mean": round(value.mean, 3), "min": value.min,
                "max": value.max}
    return metrics


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``seqcarry run`` arguments and run once. Arguments seqcarry does not know
    go to Beam; one that Beam does not know either is an :class:`InputError`."""
    parser = ArgumentParser(prog="seqcarry run")
    add_run_arguments(parser)
    known, beam_args = parser.parse_known_args(argv)
    refuse_unknown(beam_args, parser, beam=True)
    return run_job(RunConfig(**vars(known)), beam_args)
