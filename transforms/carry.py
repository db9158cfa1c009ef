"""``CarryState``: seqcarry as one Beam transform.

``chunks | CarryState(model=..., state=..., run_id=...)`` takes chunk records from any
source (dicts as Beam's ``ReadFromParquet`` or ``ReadFromBigQuery`` yield them, Arrow
tables or record batches, or :class:`~schemas.validation.ChunkRows`), joins each
sequence with its carried state from the last committed snapshot, runs the model, and
commits the new snapshot as its last step. It returns the per-step outputs, the dead
letters, the final states of sequences that ended, and the run report as PCollections.

Planning is split between the two sides of a Beam job. When the transform is built,
:func:`plan_carry` reads only small metadata (``CURRENT``, the parent manifest, the
model) and fixes the run's id, attempt and per-sequence rules (:class:`CarryPlan`).
Everything that depends on the data is computed by the job: it counts the run's
distinct sequences to size its buckets and snapshot files
(:class:`~transforms.sequencing.RunSizing`, a singleton side input), and routes the
ids of the sequences it touches to the snapshot files that can hold them, a join by
file, so each file's reader filters by its own ids only.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import time
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.transforms import window

import storage
from schemas.contract import OUTPUTS_AT, XLA_MODES, InputError
from schemas.manifest import checked_run_id, new_attempt_id
from transforms import staging
from transforms.commit import CommitRun, CommitTarget
from transforms.dofns import (LEDGER, PENDING_FILE, SMALL_OUTPUT_SHARDS, STATE_FILE,
                              ApplyChunks, GatherLedger, ReadSnapshotFile, RouteIds, ValidateChunks,
                              WriteDeadLetters, WriteFinalStates, WriteManifest,
                              WriteOutputPart, WriteSnapshotShard, split)
from transforms.models import ModelError, ModelOptions, RecurrentStack, load_model
from transforms.sequencing import Planner, RunSizing, size_run, stable_bucket

_LOG = logging.getLogger("seqcarry")


@dataclasses.dataclass(frozen=True)
class CarryPlan:
    """One run's frozen context, fixed when the pipeline is built from small metadata
    only (see :func:`plan_carry`); every DoFn of the run gets what it needs from it."""
    model: str
    model_options: ModelOptions
    state: str
    outputs: str | None  # where the run writes its files; None: only PCollections
    run_id: str
    attempt: str  # this submission of the run: every file it writes is below its own
    parent_pointer: storage.CommitRecord | None  # CURRENT as read: the commit swaps from it
    parent: storage.Manifest | None
    stack: RecurrentStack
    planner: Planner
    compact: bool  # read and rewrite every sequence, not only the touched ones
    planned_at: float  # time.time() when planning began
    batch_size: int = 256
    window_steps: int = 256
    allow_non_finite: bool = False
    keep: int | None = None
    orphan_grace_hours: float = 24.0
    max_rejected_fraction: float | None = None
    outputs_at: str = "every"  # one of OUTPUTS_AT ("auto" resolved for the model)
    xla: str = "auto"  # one of XLA_MODES

    def commit_target(self) -> CommitTarget:
        return CommitTarget(self.state, self.outputs, self.run_id, self.attempt,
                            self.parent_pointer, self.planned_at, self.keep,
                            self.orphan_grace_hours * 3600, self.max_rejected_fraction)

    @property
    def snapshot_files(self) -> list[tuple[str, storage.FileRecord]]:
        """The parent snapshot's data files, each with its kind."""
        if self.parent is None:
            return []
        return ([(STATE_FILE, r) for r in self.parent.state_files]
                + [(PENDING_FILE, r) for r in self.parent.pending_files])


def plan_carry(model: str, state: str, outputs: str | None = None,
               run_id: str | None = None, *, batch_size: int = 256,
               window_steps: int = 256, allow_non_finite: bool = False,
               reset_state: bool = False, expire_after_runs: int | None = None,
               expire_after_days: float | None = None, max_layers: int = 8,
               keep: int | None = None, orphan_grace_hours: float = 24.0,
               max_rejected_fraction: float | None = None,
               model_options: ModelOptions | None = None,
               outputs_at: str = "auto", xla: str = "auto") -> CarryPlan:
    """Check a run's options and fix its plan from ``CURRENT``, the parent manifest and
    the model (no input is read here). The options are those of ``seqcarry run``."""
    planned_at = time.time()  # the report's seconds count from here
    if min(batch_size, window_steps, max_layers) < 1:
        raise InputError("--batch-size, --window-steps and --max-layers must be at least 1")
    if (expire_after_runs is not None and expire_after_runs < 1
            or expire_after_days is not None and not 0 < expire_after_days < math.inf):
        raise InputError("--expire-after-runs must be at least 1 and --expire-after-days "
                         "a number of days above 0")
    if max_rejected_fraction is not None and not 0 <= max_rejected_fraction <= 1:
        raise InputError(f"--max-rejected-fraction must be between 0 and 1, not "
                         f"{max_rejected_fraction}")
    if outputs_at not in ("auto", *OUTPUTS_AT):
        raise InputError(f"--outputs-at {outputs_at!r}: give one of auto, "
                         f"{', '.join(OUTPUTS_AT)}")
    if xla not in XLA_MODES:
        raise InputError(f"--xla {xla!r}: give one of {', '.join(XLA_MODES)}")
    storage.check_retention(keep, orphan_grace_hours)
    store = storage.StateStore(state)  # refuses a --state without atomic swaps
    storage.check_location(state, "--state")
    if outputs is not None:
        storage.check_location(outputs, "--outputs")
    model_options = model_options or ModelOptions()
    stack = load_model(model, model_options)
    run_id = checked_run_id(run_id)
    pointer = store.current()
    parent = store.manifest_of(pointer) if pointer else None
    if parent and parent.model_fingerprint != stack.fingerprint and not reset_state:
        raise ModelError(
            f"the state in {state} was written by model {parent.model_fingerprint}, "
            f"but {model} is {stack.fingerprint}; use the model that wrote the state, "
            "or pass --reset-state to restart every sequence's state from zeros")
    # Expiry and --reset-state concern every sequence, so they need a full read.
    compact = bool(parent is None or parent.layers >= max_layers or reset_state
                   or expire_after_runs or expire_after_days or parent.predates_layers)
    planner = Planner(
        run_id=run_id, run_number=parent.run_number + 1 if parent else 1,
        started_at=int(planned_at), zero_state=stack.zero_state(),
        model_fingerprint=stack.fingerprint, reset_state=reset_state,
        expire_after_runs=expire_after_runs,
        expire_after_seconds=(math.ceil(expire_after_days * 86400)
                              if expire_after_days else None))
    store.check_run_id_free(run_id)
    attempt = new_attempt_id()
    if outputs_at == "auto":  # a classifier's output is meant for the sequence's end
        outputs_at = "every" if stack.sequence_output else "last"
    _LOG.info("event=planned run_id=%s attempt=%s parent=%s sequences=%d pending=%d "
              "layers=%d compact=%s outputs_at=%s", run_id, attempt,
              parent.run_id if parent else None, parent.sequences if parent else 0,
              parent.pending_chunks if parent else 0, parent.layers if parent else 0,
              compact, outputs_at)
    return CarryPlan(model, model_options, state, outputs, run_id, attempt, pointer, parent,
                     stack, planner, compact, planned_at, batch_size, window_steps,
                     allow_non_finite, keep, orphan_grace_hours, max_rejected_fraction,
                     outputs_at, xla)


class CarryState(beam.PTransform):
    """Chunk records -> ``{'outputs', 'dead_letters', 'final_states', 'report'}``.

    - ``outputs``: Arrow tables of :data:`~schemas.contract.OUTPUT_SCHEMA` (one row per
      applied chunk: ``sequence_id``, ``chunk_index``, ``steps``, ``outputs``
      [steps, width], or [1, width] at the chunk's last step with ``outputs_at="last"``);
      ``beam.FlatMap(pa.Table.to_pylist)`` makes records of them.
    - ``dead_letters``: dicts of :data:`~schemas.contract.DEAD_LETTER_SCHEMA`, a reason
      each, for records rejected when read or when planned.
    - ``final_states``: dicts ``sequence_id``, ``end_reason``, ``steps_seen``,
      ``next_chunk_index``, ``state`` (the state tensors by name, as lists).
    - ``report``: one dict, the run report, once the run is committed.

    Built with the options of ``seqcarry run`` (see :func:`plan_carry`), or from a
    ``plan``. With ``outputs`` (a folder), the run also writes its outputs, dead letters
    and final states there as Parquet, and commits only once they are written; without
    it, the commit does not wait for whatever sinks the caller attaches.
    """

    def __init__(self, model: str | None = None, state: str | None = None,
                 outputs: str | None = None, run_id: str | None = None, *,
                 plan: CarryPlan | None = None, **options: Any):
        super().__init__()
        if plan is None:
            if model is None or state is None:
                raise InputError("CarryState needs a model and a state folder (or a plan)")
            plan = plan_carry(model, state, outputs, run_id, **options)
        self.plan = plan

    def expand(self, records):
        plan, stack = self.plan, self.plan.stack
        store = storage.StateStore(plan.state)
        if "Dask" in str(records.pipeline.options.view_as(StandardOptions).runner):
            _LOG.warning("event=dask_commit_last run_id=%s: Beam's DaskRunner computes only "
                         "the graph behind the last transform applied; apply nothing after "
                         "CarryState, or its commit does not run", plan.run_id)
        # One run is one commit: whatever windows the records had, they are one batch.
        records = records | "OneWindow" >> beam.WindowInto(window.GlobalWindows())
        read = split(records | "Validate" >> beam.ParDo(ValidateChunks(
            stack.input_dim, plan.allow_non_finite, plan.run_id,
            store.staging_url(plan.run_id, plan.attempt), stack.vocabulary)),
            ("staged", "loose", "ids", "feature_bytes", "dead_letters", LEDGER), "Read")
        ids = read["ids"] | "DistinctIds" >> beam.Distinct()
        sizing = beam.pvalue.AsSingleton(self._sizing(ids, read["feature_bytes"]))
        chunks = (
            (read["staged"] | "SliceByBucket" >> beam.FlatMap(
                lambda staged, run: staging.slices(staged, run.buckets), sizing),
             read["loose"] | "KeyByBucket" >> beam.Map(
                lambda chunk, run: (run.bucket(chunk.sequence_id), chunk), sizing))
            | "AllChunks" >> beam.Flatten())
        snapshot = split(self._snapshot_files(records.pipeline, ids)
                         | "ReadSnapshot" >> beam.ParDo(ReadSnapshotFile(stack.state_names),
                                                        sizing),
                         ("states", "pending"), "Snapshot")
        applied = (
            {"chunks": chunks, "states": snapshot["states"], "pending": snapshot["pending"]}
            | "ApplyChunks" >> ApplyChunks(plan.model, plan.planner, plan.batch_size,
                                           plan.window_steps, plan.model_options,
                                           stack.fingerprint, plan.outputs_at, plan.xla))
        dead_letters = ((read["dead_letters"], applied["dead_letters"])
                        | "AllDeadLetters" >> beam.Flatten())
        results = {
            "outputs": applied["outputs"] | "OutputTables" >> beam.Map(lambda part: part[1]),
            "dead_letters": dead_letters | "DeadLetterRecords" >> beam.Map(
                dataclasses.asdict),
            "final_states": applied["ended"] | "FinalStateRecords" >> beam.Map(
                _final_state_record, stack.state_names),
        }
        ledger = [read[LEDGER], applied[LEDGER], self._write_snapshot(applied, sizing)]
        if plan.outputs is not None:
            ledger += self._write_outputs(applied, dead_letters)
        # The manifest depends on every write through the ledger (gathered even when
        # empty: a run with no input still commits), and the commit is applied last:
        # Beam's DaskRunner computes only the graph behind the last one.
        results["report"] = (
            ledger
            | "Ledger" >> beam.Flatten()
            | "GatherLedger" >> beam.CombineGlobally(GatherLedger())
            | "WriteManifest" >> beam.ParDo(WriteManifest(
                plan.state, plan.run_id, plan.attempt, plan.planner.run_number,
                datetime.datetime.fromtimestamp(plan.planned_at, datetime.timezone.utc)
                .isoformat(), plan.parent, not plan.compact, stack.fingerprint,
                stack.state_names, plan.outputs_at))
            | "Commit" >> beam.ParDo(CommitRun(plan.commit_target())))
        return results

    def _sizing(self, ids, feature_bytes):
        """The run's :class:`RunSizing`, from its distinct sequences and their bytes."""
        plan = self.plan
        batch_size = plan.batch_size
        snapshot_rows = plan.parent.sequences if plan.compact and plan.parent else 0
        return (
            (ids | "CountSequences" >> beam.Map(lambda _: (1, 0)),
             feature_bytes | "CountBytes" >> beam.Map(lambda size: (0, size)))
            | "SizingInputs" >> beam.Flatten()
            | "SumSizingInputs" >> beam.CombineGlobally(_sum_pairs)
            | "SizeRun" >> beam.Map(lambda totals: size_run(
                *totals, batch_size=batch_size, snapshot_rows=snapshot_rows)))

    def _snapshot_files(self, pipeline, ids):
        """``(kind, record, ids)`` of each parent snapshot file to read: every file with
        every row for a compacting run; else each file with the touched ids it may hold
        (files that hold none are not read)."""
        files = self.plan.snapshot_files
        listed = pipeline | "SnapshotFiles" >> beam.Create(files)
        if self.plan.compact:
            return (listed | "SpreadSnapshotFiles" >> beam.Reshuffle()
                    | "WholeFiles" >> beam.MapTuple(lambda kind, record: (kind, record, None)))
        routed = ids | "RouteIds" >> beam.ParDo(RouteIds([record for _, record in files]))
        return (
            {"file": listed | "KeyByPath" >> beam.MapTuple(
                lambda kind, record: (record.path, (kind, record))),
             "ids": routed}
            | "JoinIdsToFiles" >> beam.CoGroupByKey()
            | "FilesWithIds" >> beam.FlatMap(_file_with_ids))

    def _write_snapshot(self, applied, sizing):
        plan = self.plan
        return (
            {"states": applied["states"] | "ShardStates" >> beam.Map(_shard_of, sizing),
             "pending": applied["pending"] | "ShardPending" >> beam.Map(_shard_of, sizing)}
            | "GroupSnapshotShards" >> beam.CoGroupByKey()
            | "WriteSnapshot" >> beam.ParDo(WriteSnapshotShard(
                plan.state, plan.run_id, plan.attempt, plan.planner.run_number,
                plan.stack.state_names), sizing))

    def _write_outputs(self, applied, dead_letters):
        plan = self.plan
        outputs = applied["outputs"] | "WriteOutputs" >> beam.ParDo(
            WriteOutputPart(plan.outputs, plan.run_id, plan.attempt))
        letters = (
            dead_letters
            | "ShardDeadLetters" >> beam.Map(lambda d: (stable_bucket(
                f"{d.source}:{d.sequence_id}", SMALL_OUTPUT_SHARDS), d))
            | "GroupDeadLetters" >> beam.GroupByKey()
            | "WriteDeadLetters" >> beam.ParDo(WriteDeadLetters(plan.outputs, plan.run_id,
                                                                plan.attempt)))
        final_states = (
            applied["ended"]
            | "ShardEnded" >> beam.Map(lambda pair: (stable_bucket(
                pair[0].sequence_id, SMALL_OUTPUT_SHARDS), pair))
            | "GroupEnded" >> beam.GroupByKey()
            | "WriteFinalStates" >> beam.ParDo(WriteFinalStates(
                plan.outputs, plan.run_id, plan.attempt, plan.stack.state_names)))
        return [outputs, letters, final_states]


def _sum_pairs(pairs) -> tuple[int, int]:
    sequences = feature_bytes = 0
    for count, size in pairs:
        sequences += count
        feature_bytes += size
    return sequences, feature_bytes


def _shard_of(item, sizing: RunSizing):
    return stable_bucket(item.sequence_id, sizing.shards), item


def _file_with_ids(joined):
    _, grouped = joined
    if grouped["ids"]:
        for kind, record in grouped["file"]:
            yield kind, record, sorted(grouped["ids"])


def _final_state_record(ended, state_names) -> dict:
    state, reason = ended
    return {"sequence_id": state.sequence_id, "end_reason": reason,
            "steps_seen": state.steps_seen, "next_chunk_index": state.next_chunk_index,
            "state": {name: tensor.tolist()
                      for name, tensor in zip(state_names, state.tensors)}}
