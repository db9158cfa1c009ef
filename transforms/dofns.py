"""Beam DoFns and composite PTransforms of a seqcarry run.

Each DoFn is a thin wrapper around a pure function (:mod:`schemas`,
:mod:`transforms.sequencing`, :mod:`storage`). Every file is written under a
name fixed by its content's key, so a retried bundle rewrites its own file.

Two habits keep the pipeline correct on Beam's DaskRunner as well: nothing is emitted
from ``finish_bundle`` (the DaskRunner drops such outputs), and no DoFn has tagged
outputs (the DaskRunner hands every output of a multi-output ParDo to every
consumer). A DoFn with several kinds of output emits ``(tag, value)`` envelopes on its
one output, and :func:`split` routes them.

Besides data, the stages emit *ledger* entries ``(kind, payload)``: counts and the
files they wrote. The last stage gathers them into the run's manifest, so the run
report never depends on a runner's support for querying metrics.
"""
from __future__ import annotations

import collections
import itertools
import time
from typing import Iterable, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

import storage
from schemas import (CarriedState, Chunk, DeadLetter, chunks_from_table,
                     chunks_to_table, dead_letters_to_table, outputs_to_table,
                     states_from_table, states_to_table)
from schemas.manifest import shard_of_file
from schemas.validation import (UNREADABLE_FILE, WRONG_SCHEMA, ChunkRows, RejectedFile,
                                as_chunk_rows, chunk_dead_letter, rejected_file,
                                schema_problem, validate_chunks)
from transforms.sequencing import END_IS_LAST, REJECTED, Planner, RunSizing, stable_bucket
from transforms import staging
from transforms.models import ModelOptions
from transforms.kernel import xla_setting
from transforms.session import METRICS_NAMESPACE, LoadedModel

LEDGER = "ledger"
COUNTS = "counts"
# Kinds of files a run writes; each is a list of records in the manifest.
STATE_FILE, PENDING_FILE, OUTPUT_FILE = "state_files", "pending_files", "output_files"
DEAD_LETTER_FILE, FINAL_STATE_FILE = "dead_letter_files", "final_state_files"
FILE_KINDS = (STATE_FILE, PENDING_FILE, OUTPUT_FILE, DEAD_LETTER_FILE, FINAL_STATE_FILE)
# Dead letters and final states are rare: a few files per run are enough.
SMALL_OUTPUT_SHARDS = 4
# Input rows are read in batches of about this many bytes (uncompressed).
READ_BATCH_BYTES = 64 * 2**20
# An element with at least this many valid chunks is staged (see transforms.staging);
# fewer (e.g. one record from a user's source) travel as Chunks themselves.
STAGE_AT_ROWS = 16


def split(envelopes: beam.PCollection, tags: Sequence[str],
          label: str) -> dict[str, beam.PCollection]:
    """Route ``(tag, value)`` envelopes to one PCollection of values per tag."""
    return {tag: envelopes | f"{label}:{tag}" >> beam.FlatMap(_values_tagged, tag)
            for tag in tags}


def _values_tagged(envelope: tuple[str, object], tag: str):
    if envelope[0] == tag:
        yield envelope[1]


def _ms_since(started: float) -> int:
    """Milliseconds since ``started``: stages add theirs to the counts as ``ms_<stage>``,
    summed over workers, so every run's report says where its time went."""
    return int((time.perf_counter() - started) * 1000)


def _counts(counts: dict[str, int]) -> tuple[str, dict[str, int]]:
    """A ledger entry of counts for the report, also kept as Beam metrics counters.
    DoFns with several kinds of output yield it in a ``ledger`` envelope."""
    for name, value in counts.items():
        Metrics.counter(METRICS_NAMESPACE, name).inc(value)
    return COUNTS, counts


class ReadParquetBatches(beam.DoFn):
    """An input file's URL -> its rows as :class:`~schemas.validation.ChunkRows`, in
    batches of about :data:`READ_BATCH_BYTES`, never the whole file at once; or a
    :class:`~schemas.validation.RejectedFile` for a file that cannot be read or whose
    schema cannot hold the contract (then none of its rows, or none after the damage)."""

    def process(self, url: str):
        started = time.perf_counter()
        try:
            with storage.ParquetInput(url) as parquet:
                problem = schema_problem(parquet.schema)
                if problem is not None:
                    yield rejected_file(url, WRONG_SCHEMA, f"{url}: {problem[1]}",
                                        parquet.rows)
                    return
                for first_row, table in parquet.batches(READ_BATCH_BYTES):
                    yield ChunkRows(table, url, first_row, _ms_since(started))
                    started = time.perf_counter()
        except storage.UnreadableFile as error:
            # Rows already read went on; the file is one dead letter, not a failed job.
            yield rejected_file(url, UNREADABLE_FILE, str(error))


class ReadChunkFiles(beam.PTransform):
    """Parquet file URLs -> :class:`~schemas.validation.ChunkRows` (what
    :class:`~transforms.carry.CarryState` takes), the files spread over workers."""

    def expand(self, urls):
        return (urls
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadBatches" >> beam.ParDo(ReadParquetBatches()))


class ValidateChunks(beam.DoFn):
    """Chunk records (see :func:`~schemas.validation.as_chunk_rows`) -> envelopes:
    ``staged`` :class:`~transforms.staging.StagedChunks` (the valid rows of a large
    element, parked in a staging file) or ``loose`` Chunks (those of a small one),
    ``ids`` (the distinct sequence ids of the valid rows), ``feature_bytes``,
    ``dead_letters`` for each invalid row or rejected file, and counts (``ledger``)."""

    def __init__(self, input_dim: int, allow_non_finite: bool, run_id: str,
                 staging_url: str, vocabulary: int | None = None):
        self._input_dim = input_dim
        self._allow_non_finite = allow_non_finite
        self._run_id = run_id
        self._staging_url = staging_url
        self._vocabulary = vocabulary

    def process(self, element):
        started = time.perf_counter()
        counts = collections.Counter()
        rows = as_chunk_rows(element)
        if isinstance(rows, RejectedFile):
            chunks, letters = [], []
            yield "dead_letters", rows.letter
            counts.update({"files_rejected": 1, f"files_rejected_{rows.letter.reason}": 1,
                           "chunks_in_rejected_files": rows.rows or 0})
        elif isinstance(rows, DeadLetter):
            chunks, letters = [], [rows]
        else:
            chunks, letters = validate_chunks(rows.table, rows.source, self._input_dim,
                                              self._allow_non_finite, self._run_id,
                                              self._vocabulary, rows.first_row)
        if len(chunks) >= STAGE_AT_ROWS:
            yield "staged", staging.stage(chunks, self._staging_url)
        else:
            for chunk in chunks:
                yield "loose", chunk
        for sequence_id in sorted({chunk.sequence_id for chunk in chunks}):
            yield "ids", sequence_id
        yield "feature_bytes", sum(chunk.features.nbytes for chunk in chunks)
        counts.update({"chunks_read": len(chunks) + len(letters),
                       "ms_read": _ms_since(started)
                       + (rows.read_ms if isinstance(rows, ChunkRows) else 0)})
        for letter in letters:
            yield "dead_letters", letter
            counts[REJECTED] += 1
            counts[f"{REJECTED}_{letter.reason}"] += 1
        yield LEDGER, _counts(dict(counts))


class RouteIds(beam.DoFn):
    """A sequence id -> ``(path, id)`` for each snapshot file that may hold its rows:
    in a layer of N files, the file of its :func:`stable_bucket` among N (the files'
    names say which); every file whose name does not say (older snapshots)."""

    def __init__(self, files: Sequence[storage.FileRecord]):
        self._by_shard = collections.defaultdict(list)  # (shard, shards) -> paths
        self._unsharded = []
        for record in files:
            shard = shard_of_file(record.path)
            if shard is None:
                self._unsharded.append(record.path)
            else:
                self._by_shard[shard].append(record.path)
        self._layouts = sorted({shards for _, shards in self._by_shard})

    def process(self, sequence_id: str):
        for shards in self._layouts:
            for path in self._by_shard.get((stable_bucket(sequence_id, shards), shards), ()):
                yield path, sequence_id
        for path in self._unsharded:
            yield path, sequence_id


class ReadSnapshotFile(beam.DoFn):
    """``(kind, record, ids)`` of a snapshot file -> envelopes: ``states`` ``(bucket,
    (layer, CarriedState))`` from state files, ``pending`` ``(bucket, (layer, Chunk))``
    from pending files, after checking the file against its manifest record (sha256,
    rows). ``ids`` (the sequences this run has chunks for, routed to this file by
    :class:`RouteIds`) limits the rows read; None reads every row."""

    def __init__(self, state_names: Sequence[str]):
        self._state_names = tuple(state_names)

    def process(self, element: tuple[str, storage.FileRecord, Sequence[str] | None],
                sizing: RunSizing):
        started = time.perf_counter()
        kind, record, ids = element
        # Filtered in Arrow as decoded: rows of untouched sequences are never held
        # together, nor become Python objects.
        table = (storage.read_table(record.path, record) if ids is None
                 else storage.read_table_rows(record.path, record, "sequence_id", ids))
        if kind == PENDING_FILE:
            rows = [("pending", chunk) for chunk in
                    chunks_from_table(table, record.path, pending=True)]
        else:
            rows = [("states", state) for state in
                    states_from_table(table, self._state_names, record.path)]
        elapsed = _ms_since(started)
        for tag, row in rows:
            yield tag, (sizing.bucket(row.sequence_id), (record.layer, row))
        yield LEDGER, _counts({"ms_read_snapshot": elapsed})


def plan_sequence(planner: Planner, sequence_id: str, chunks: Sequence[Chunk],
                  states: Sequence[tuple[int, CarriedState]],
                  pending: Sequence[tuple[int, Chunk]], counts: collections.Counter):
    """Plan one sequence from this run's chunks and its layered snapshot rows; yields
    envelopes (``work`` to run, or its new ``states`` when nothing runs; ``pending``,
    ``dead_letters``, ``ended``) and adds to ``counts``."""
    layer, carried = storage.newest_layer(states)
    if len(carried) > 1:
        raise storage.IntegrityError(
            f"layer {layer} of the snapshot holds {len(carried)} states for sequence "
            f"{sequence_id!r}; it must hold at most one")
    if layer is None:
        _, waiting = storage.newest_layer(pending)
    else:  # older layers' pending rows were superseded with the state
        waiting = [chunk for version, chunk in pending if version == layer]
    previous = carried[0] if carried else None
    if previous is not None:
        counts["previous_closed" if previous.closed else "previous_live"] += 1
    counts["previous_pending"] += len(waiting)
    plan = planner.plan(sequence_id, previous, waiting, chunks)
    counts.update(plan.counts)
    for chunk, reason, message in plan.rejected:
        yield "dead_letters", chunk_dead_letter(chunk, reason, message)
    for chunk in plan.pending:
        yield "pending", chunk
    if plan.ended:
        yield "ended", plan.ended
    if plan.work is not None:
        yield "work", plan.work
    elif plan.unchanged is not None:
        yield "states", plan.unchanged


class PlanAndRunBucket(beam.DoFn):
    """``(bucket, {'chunks', 'states', 'pending'})`` -> envelopes: every sequence's new
    ``states``, ``pending`` chunks, per-batch ``outputs`` ``(part, outputs table)``,
    ``dead_letters``, ``ended`` ``(final state, reason)``, and counts (``ledger``).

    Plans each sequence of the bucket (:class:`~transforms.sequencing.Planner`), then
    runs the work in batches. The model is loaded once per process through Beam's
    ``Shared``; each bundle opens a session on it. ``outputs_at`` (``every`` or
    ``last``) says which steps of each chunk get an output; ``xla`` (``auto``, ``on``
    or ``off``, see :data:`~schemas.contract.XLA_MODES`) which buckets run
    XLA-compiled.
    """

    def __init__(self, model_path: str, planner: Planner, batch_size: int,
                 window_steps: int, model_options: ModelOptions = ModelOptions(),
                 model_fingerprint: str | None = None, outputs_at: str = "every",
                 xla: str = "auto"):
        self._model_path = model_path
        self._model_options = model_options
        self._model_fingerprint = model_fingerprint
        self._planner = planner
        self._batch_size = batch_size
        self._window_steps = window_steps
        self._last_only = outputs_at == "last"
        self._xla_mode = xla
        self._shared = shared.Shared()
        self._model: LoadedModel | None = None
        self._session = None

    def setup(self):
        xla = xla_setting(self._xla_mode)  # on the worker: its SEQCARRY_XLA counts
        self._model = self._shared.acquire(
            lambda: LoadedModel(self._model_path, self._window_steps, self._model_options,
                                self._model_fingerprint, xla),
            tag=f"{self._model_path}:{self._model_options}:{self._window_steps}:"
                f"{self._model_fingerprint}:{xla}")

    def start_bundle(self):
        self._session = self._model.open_session()

    def process(self, element):
        started = time.perf_counter()
        bucket, grouped = element
        rows = collections.defaultdict(lambda: ([], [], []))
        loose = [item for item in grouped["chunks"] if isinstance(item, Chunk)]
        staged = [item for item in grouped["chunks"] if not isinstance(item, Chunk)]
        for chunk in loose + staging.unstage(staged):
            rows[chunk.sequence_id][0].append(chunk)
        for layer, state in grouped["states"]:
            rows[state.sequence_id][1].append((layer, state))
        for layer, chunk in grouped["pending"]:
            rows[chunk.sequence_id][2].append((layer, chunk))
        counts: collections.Counter = collections.Counter()
        works, planned = [], []
        for sequence_id in sorted(rows):
            for tag, value in plan_sequence(self._planner, sequence_id, *rows[sequence_id],
                                            counts):
                if tag == "work":
                    works.append(value)
                else:
                    planned.append((tag, value))
                if tag == "ended":
                    counts[f"sequences_ended_{value[1]}"] += 1
        counts["ms_plan"] = _ms_since(started)
        yield from planned
        # Yields nothing for no works.
        results = self._session.run(works, self._batch_size, self._last_only)
        for number in itertools.count():
            started = time.perf_counter()
            result = next(results, None)
            counts["ms_compute"] += _ms_since(started)
            if result is None:
                break
            storage.fault_point("mid_compute")
            # A table, not objects: the runner encodes and size-samples it cheaply.
            yield "outputs", (f"{bucket:05d}-{number:04d}", outputs_to_table(sorted(
                result.outputs, key=lambda o: (o.sequence_id, o.chunk_index))))
            for state in result.states:
                yield "states", state
            for state in result.ended:
                yield "ended", (state, END_IS_LAST)
            counts[f"sequences_ended_{END_IS_LAST}"] += len(result.ended)
            counts.update({"sequences_touched": len(result.states),
                           "steps_processed": result.steps,
                           "batches": 1,
                           "batches_xla" if result.xla else "batches_plain": 1})
        yield LEDGER, _counts(dict(+counts))

    def finish_bundle(self):
        self._session.close()
        self._session = None


class _WriteRunFile(beam.DoFn):
    """Base of the DoFns that write one Parquet file per element in the attempt's
    folder of their ``kind`` under ``--outputs``, named by the element's key."""

    kind = "outputs"  # a key of schemas.manifest.RUN_FILE_TREES

    def __init__(self, outputs_url: str, run_id: str, attempt: str):
        self._outputs_url = outputs_url
        self._run_id = run_id
        self._attempt = attempt

    def _write(self, kind: str, part: str, table, started: float):
        """Write ``table``; the ledger entries of the file and of the time taken since
        ``started``."""
        url = storage.run_file_url(self._outputs_url, self._run_id, self._attempt,
                                   self.kind, part)
        # Not kept in this machine's page cache: a run does not read these files back.
        record = storage.write_table(url, table, cache=False)
        return [(kind, record), _counts({"ms_write": _ms_since(started)})]


class WriteOutputPart(_WriteRunFile):
    """``(part, outputs table)`` -> one Parquet file; emits its ledger entries."""

    def process(self, element: tuple[str, pa.Table]):
        started = time.perf_counter()
        part, outputs = element
        yield from self._write(OUTPUT_FILE, part, outputs, started)


class WriteSnapshotShard(beam.DoFn):
    """``(shard, {'states', 'pending'})`` -> the shard's state file and pending file
    (each only if it has rows); emits their ledger entries."""

    def __init__(self, state_url: str, run_id: str, attempt: str, layer: int,
                 state_names: Sequence[str]):
        self._store = storage.StateStore(state_url)
        self._run_id = run_id
        self._attempt = attempt
        self._layer = layer
        self._state_names = tuple(state_names)

    def process(self, element, sizing: RunSizing):
        started = time.perf_counter()
        shard, grouped = element
        states = sorted(grouped["states"], key=lambda s: s.sequence_id)
        pending = sorted(grouped["pending"], key=lambda c: (c.sequence_id, c.chunk_index))
        closed = sum(state.closed for state in states)
        if states:
            url = self._store.snapshot_file_url(self._run_id, self._attempt, "state", shard,
                                               sizing.shards)
            yield STATE_FILE, storage.write_table(
                url, states_to_table(states, self._state_names), self._layer)
            storage.fault_point("after_state_file")
        if pending:
            url = self._store.snapshot_file_url(self._run_id, self._attempt, "pending", shard,
                                               sizing.shards)
            yield PENDING_FILE, storage.write_table(
                url, chunks_to_table(pending, pending=True), self._layer)
        yield _counts({"written_live": len(states) - closed, "written_closed": closed,
                       "written_pending": len(pending), "ms_write": _ms_since(started)})


class WriteDeadLetters(_WriteRunFile):
    """``(shard, [DeadLetter])`` -> ``_dead_letters/<run_id>/<attempt>/part-*.parquet``."""

    kind = "dead_letters"

    def process(self, element: tuple[int, Iterable[DeadLetter]]):
        started = time.perf_counter()
        shard, letters = element
        ordered = sorted(letters, key=lambda d: (d.source, d.row if d.row is not None else -1,
                                                 d.sequence_id or "", d.chunk_index or -1,
                                                 d.reason))
        yield from self._write(DEAD_LETTER_FILE, f"{shard:05d}",
                               dead_letters_to_table(ordered), started)


class WriteFinalStates(_WriteRunFile):
    """``(shard, [(CarriedState, end_reason)])`` ->
    ``_final_states/<run_id>/<attempt>/part-*.parquet``."""

    kind = "final_states"

    def __init__(self, outputs_url: str, run_id: str, attempt: str,
                 state_names: Sequence[str]):
        super().__init__(outputs_url, run_id, attempt)
        self._state_names = tuple(state_names)

    def process(self, element):
        started = time.perf_counter()
        shard, ended = element
        ordered = sorted(ended, key=lambda pair: pair[0].sequence_id)
        table = states_to_table([state for state, _ in ordered], self._state_names,
                                end_reasons=[reason for _, reason in ordered])
        yield from self._write(FINAL_STATE_FILE, f"{shard:05d}", table, started)


class GatherLedger(beam.CombineFn):
    """Ledger entries -> one list: the counts summed into one entry (added up where
    they are made, so a run of millions of records does not send millions of entries
    to one worker), then every file record."""

    def create_accumulator(self) -> tuple[collections.Counter, list]:
        return collections.Counter(), []

    def add_input(self, accumulator, entry):
        kind, payload = entry
        if kind == COUNTS:
            accumulator[0].update(payload)
        else:
            accumulator[1].append(entry)
        return accumulator

    def merge_accumulators(self, accumulators):
        counts, files = self.create_accumulator()
        for more_counts, more_files in accumulators:
            counts.update(more_counts)
            files.extend(more_files)
        return counts, files

    def extract_output(self, accumulator) -> list:
        counts, files = accumulator
        return [(COUNTS, dict(counts))] + files


class WriteManifest(beam.DoFn):
    """The gathered ledger (see :class:`GatherLedger`) -> the attempt's manifest (not
    yet committed); emits it.

    ``parent`` is the manifest the run started from (None for the first run) and
    ``inherit`` whether the new snapshot keeps the parent's layers (see
    :class:`~schemas.manifest.Manifest`) or replaces them (a compacting run);
    ``outputs_at`` which outputs the run wrote (``--outputs-at``). Every field comes
    from the plan or the ledger, so a retry writes the same bytes.
    """

    def __init__(self, state_url: str, run_id: str, attempt: str, run_number: int,
                 created_at: str, parent: storage.Manifest | None, inherit: bool,
                 model_fingerprint: str, state_names: Sequence[str],
                 outputs_at: str | None = None):
        self._state_url = state_url
        self._run_id = run_id
        self._attempt = attempt
        self._run_number = run_number
        self._created_at = created_at
        self._parent = parent
        self._inherit = inherit
        self._fingerprint = model_fingerprint
        self._state_names = tuple(state_names)
        self._outputs_at = outputs_at

    def process(self, entries: list):
        counts: collections.Counter = collections.Counter()
        files = collections.defaultdict(list)
        if self._parent is not None and self._inherit:
            files[STATE_FILE] += self._parent.state_files
            files[PENDING_FILE] += self._parent.pending_files
        for kind, payload in entries:
            if kind == COUNTS:
                counts.update(payload)
            else:
                files[kind].append(payload)
        # The snapshot's totals: the parent's, with every sequence this run read
        # replaced by what it wrote; a compacting run wrote every sequence.
        before = self._parent.counts if self._parent and self._inherit else {}
        for total, part in (("sequences_live", "live"), ("sequences_closed", "closed"),
                            ("chunks_pending_total", "pending")):
            written = counts[f"written_{part}"]
            counts[total] = (before[total] - counts[f"previous_{part}"] + written
                             if total in before else written)
        manifest = storage.Manifest(
            run_id=self._run_id, run_number=self._run_number,
            parent=self._parent.run_id if self._parent else None,
            created_at=self._created_at,
            model_fingerprint=self._fingerprint, state_names=self._state_names,
            counts=dict(counts),
            **{kind: tuple(sorted(files[kind], key=lambda r: (r.layer or 0, r.path)))
               for kind in FILE_KINDS},
            attempt=self._attempt,
            parent_attempt=self._parent.attempt if self._parent else None,
            outputs_at=self._outputs_at)
        storage.StateStore(self._state_url).write_manifest(manifest)
        storage.fault_point("after_manifest")
        yield manifest


class ApplyChunks(beam.PTransform):
    """Join chunks with carried states and pending chunks by bucket, plan every
    sequence, and run the model in batches.

    Input: ``{'chunks', 'states', 'pending'}``, each keyed by bucket
    (:meth:`~transforms.sequencing.RunSizing.bucket` of the sequence id); ``chunks``
    holds staged slices and loose Chunks.
    Output: ``{'states': the new CarriedState of every sequence read or touched,
    'pending': Chunks still deferred, 'outputs': (part, outputs table),
    'dead_letters', 'ended': (CarriedState, end_reason), 'ledger'}``.
    """

    def __init__(self, model_path: str, planner: Planner, batch_size: int,
                 window_steps: int, model_options: ModelOptions = ModelOptions(),
                 model_fingerprint: str | None = None, outputs_at: str = "every",
                 xla: str = "auto"):
        super().__init__()
        self._run = PlanAndRunBucket(model_path, planner, batch_size, window_steps,
                                     model_options, model_fingerprint, outputs_at, xla)

    def expand(self, inputs):
        return split(
            inputs
            | "JoinByBucket" >> beam.CoGroupByKey()
            | "PlanAndRun" >> beam.ParDo(self._run),
            ("states", "pending", "outputs", "dead_letters", "ended", LEDGER), "Applied")
