"""Beam DoFns and composite PTransforms of a seqcarry run.

Each DoFn is a thin wrapper around a pure function (:mod:`schemas`,
:mod:`transforms.sequencing`, :mod:`pipeline.storage`). Nothing is emitted from
``finish_bundle`` (Beam's DaskRunner drops such outputs), and every file is written
under a name fixed by its content's key, so a retried bundle rewrites its own file.

Besides data, the stages emit *ledger* entries ``(kind, payload)``: counts and the
files they wrote. The last stage gathers them into the run's manifest, so the run
report never depends on a runner's support for querying metrics.
"""
from __future__ import annotations

import collections
import datetime
from typing import Iterable, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from pipeline import storage
from schemas import (CarriedState, ChunkOutput, ContractError, chunks_from_table,
                     outputs_to_table, states_from_table, states_to_table)
from transforms.sequencing import plan_sequence, split_into_batches, stable_bucket
from transforms.session import METRICS_NAMESPACE, LoadedModel

LEDGER = "ledger"
COUNTS, STATE_FILE, OUTPUT_FILE, HELD_OUT = "counts", "state_file", "output_file", "held_out"


def _ledger(kind: str, payload) -> beam.pvalue.TaggedOutput:
    """A ledger entry on the ``ledger`` output of a DoFn that also emits data."""
    return beam.pvalue.TaggedOutput(LEDGER, (kind, payload))


def _count(name: str, value: int) -> None:
    Metrics.counter(METRICS_NAMESPACE, name).inc(value)


class ReadChunkFile(beam.DoFn):
    """A chunk file's URL -> ``(sequence_id, Chunk)`` for each of its rows."""

    def __init__(self, input_dim: int):
        self._input_dim = input_dim

    def process(self, url: str):
        chunks = chunks_from_table(storage.read_table(url), url)
        for chunk in chunks:
            if chunk.steps == 0 or chunk.features.shape[1] != self._input_dim:
                raise ContractError(
                    f"{url}: chunk {chunk.chunk_index} of sequence {chunk.sequence_id!r} has "
                    f"features of shape {list(chunk.features.shape)}; the model needs "
                    f"[steps >= 1, {self._input_dim}]")
            yield chunk.sequence_id, chunk
        _count("chunks_read", len(chunks))
        yield _ledger(COUNTS, {"chunks_read": len(chunks),
                               "steps_read": sum(c.steps for c in chunks)})


class ReadStateFile(beam.DoFn):
    """A snapshot file's record -> ``(sequence_id, CarriedState)`` for each of its rows,
    after checking the file against its manifest record (sha256, rows)."""

    def __init__(self, state_names: Sequence[str]):
        self._state_names = tuple(state_names)

    def process(self, record: storage.FileRecord):
        table = storage.read_table(record.path, record)
        for state in states_from_table(table, self._state_names, record.path):
            yield state.sequence_id, state


class PlanSequence(beam.DoFn):
    """``(sequence_id, {'chunks', 'states'})`` -> work to apply now (main output),
    unchanged states (``unchanged``) and held-out chunks (ledger)."""

    def __init__(self, zero_state, model_fingerprint: str):
        self._zero_state = zero_state
        self._fingerprint = model_fingerprint

    def process(self, element):
        sequence_id, grouped = element
        carried = list(grouped["states"])
        if len(carried) > 1:
            raise ContractError(f"the snapshot holds {len(carried)} states for sequence "
                                f"{sequence_id!r}; it must hold at most one")
        plan = plan_sequence(sequence_id, carried[0] if carried else None, grouped["chunks"],
                             self._zero_state, self._fingerprint)
        for chunk, reason in plan.held_out:
            _count(f"chunks_held_out_{reason}", 1)
            yield _ledger(HELD_OUT, (chunk.sequence_id, chunk.chunk_index, reason))
        if plan.work is not None:
            yield plan.work
        else:
            yield beam.pvalue.TaggedOutput("unchanged", plan.unchanged)


class RunBatches(beam.DoFn):
    """``(bucket, [SequenceWork])`` -> new states (main output), per-batch outputs
    ``(part, [ChunkOutput])`` (``outputs``) and counts (ledger).

    The model is loaded once per process through Beam's ``Shared``; each bundle opens
    a session on it.
    """

    def __init__(self, model_path: str, batch_size: int, window_steps: int):
        self._model_path = model_path
        self._batch_size = batch_size
        self._window_steps = window_steps
        self._shared = shared.Shared()
        self._model: LoadedModel | None = None
        self._session = None

    def setup(self):
        self._model = self._shared.acquire(
            lambda: LoadedModel(self._model_path, self._window_steps),
            tag=f"{self._model_path}:{self._window_steps}")

    def start_bundle(self):
        self._session = self._model.open_session()

    def process(self, element):
        bucket, works = element
        for number, batch in enumerate(split_into_batches(list(works), self._batch_size)):
            result = self._session.run(batch)
            storage.fault_point("mid_compute")
            yield beam.pvalue.TaggedOutput("outputs", (f"{bucket:05d}-{number:04d}",
                                                       result.outputs))
            yield from result.states
            _count("chunks_processed", len(result.outputs))
            _count("sequences_touched", len(batch))
            yield _ledger(COUNTS, {"chunks_processed": len(result.outputs),
                                   "sequences_touched": len(batch),
                                   "steps_processed": result.steps, "batches": 1})

    def finish_bundle(self):
        self._session.close()
        self._session = None


class WriteOutputPart(beam.DoFn):
    """``(part, [ChunkOutput])`` -> one Parquet file; emits its ledger entry."""

    def __init__(self, outputs_url: str, run_id: str):
        self._outputs_url = outputs_url
        self._run_id = run_id

    def process(self, element: tuple[str, Sequence[ChunkOutput]]):
        part, outputs = element
        ordered = sorted(outputs, key=lambda o: (o.sequence_id, o.chunk_index))
        url = storage.outputs_part_url(self._outputs_url, self._run_id, part)
        yield OUTPUT_FILE, storage.write_table(url, outputs_to_table(ordered))


class WriteStateShard(beam.DoFn):
    """``(shard, [CarriedState])`` -> one snapshot file; emits its ledger entry."""

    def __init__(self, state_url: str, run_id: str, shards: int, state_names: Sequence[str]):
        self._store = storage.StateStore(state_url)
        self._run_id = run_id
        self._shards = shards
        self._state_names = tuple(state_names)

    def process(self, element: tuple[int, Iterable[CarriedState]]):
        shard, states = element
        ordered = sorted(states, key=lambda s: s.sequence_id)
        url = self._store.state_file_url(self._run_id, shard, self._shards)
        yield STATE_FILE, storage.write_table(url, states_to_table(ordered, self._state_names))
        storage.fault_point("after_state_file")


class WriteManifest(beam.DoFn):
    """All ledger entries -> the run's manifest (not yet committed)."""

    def __init__(self, state_url: str, run_id: str, parent: str | None,
                 model_fingerprint: str, state_names: Sequence[str]):
        self._state_url = state_url
        self._run_id = run_id
        self._parent = parent
        self._fingerprint = model_fingerprint
        self._state_names = tuple(state_names)

    def process(self, element):
        _, entries = element
        counts: collections.Counter = collections.Counter()
        files = collections.defaultdict(list)
        for kind, payload in entries:
            if kind == COUNTS:
                counts.update(payload)
            elif kind == HELD_OUT:
                counts[f"chunks_held_out_{payload[2]}"] += 1
                counts["chunks_held_out"] += 1
            else:
                files[kind].append(payload)
        manifest = storage.Manifest(
            run_id=self._run_id, parent=self._parent,
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            model_fingerprint=self._fingerprint, state_names=self._state_names,
            state_files=tuple(sorted(files[STATE_FILE], key=lambda r: r.path)),
            output_files=tuple(sorted(files[OUTPUT_FILE], key=lambda r: r.path)),
            counts=dict(counts))
        storage.StateStore(self._state_url).write_manifest(manifest)
        storage.fault_point("after_manifest")
        yield manifest.run_id


class ApplyChunks(beam.PTransform):
    """Join chunks with carried states, order them, and run the model in batches.

    Input: ``{'chunks': (sequence_id, Chunk), 'states': (sequence_id, CarriedState)}``.
    Output: ``{'states': every live CarriedState after this run,
    'outputs': (part, [ChunkOutput]), 'ledger': ledger entries}``.
    """

    def __init__(self, model_path: str, zero_state, model_fingerprint: str,
                 batch_size: int, window_steps: int):
        super().__init__()
        self._model_path = model_path
        self._zero_state = zero_state
        self._fingerprint = model_fingerprint
        self._batch_size = batch_size
        self._window_steps = window_steps

    def expand(self, inputs):
        planned = (
            inputs
            | "JoinWithState" >> beam.CoGroupByKey()
            | "PlanSequences" >> beam.ParDo(
                PlanSequence(self._zero_state, self._fingerprint)).with_outputs(
                    "unchanged", LEDGER, main="work"))
        # Deterministic buckets sized from the exact number of sequences with work,
        # about four batches each, so batches come out full and evenly sized.
        work_count = planned.work | "CountWork" >> beam.combiners.Count.Globally()
        batch_size = self._batch_size
        computed = (
            planned.work
            | "AssignBuckets" >> beam.Map(
                lambda work, count: (stable_bucket(
                    work.carried.sequence_id, -(-count // (4 * batch_size))), work),
                count=beam.pvalue.AsSingleton(work_count, default_value=0))
            | "GroupIntoBuckets" >> beam.GroupByKey()
            | "RunBatches" >> beam.ParDo(RunBatches(
                self._model_path, self._batch_size, self._window_steps)).with_outputs(
                    "outputs", LEDGER, main="states"))
        states = ((computed.states, planned.unchanged)
                  | "AllLiveStates" >> beam.Flatten())
        ledger = ((planned[LEDGER], computed[LEDGER]) | "ApplyLedger" >> beam.Flatten())
        return {"states": states, "outputs": computed.outputs, "ledger": ledger}
