"""Per-sequence planning and batched execution: pure functions the DoFns wrap.

:class:`Planner` decides, for one sequence, what happens to every chunk read in this
run (applied now, deferred until a missing earlier chunk arrives, skipped as an exact
duplicate, or rejected with a reason) and which pending chunks can now be applied.
A chunk is never applied out of order, so nothing out of order touches the state.

:func:`run_batch` runs many sequences' planned work together through the
:class:`~transforms.kernel.StepKernel` and turns the padded result back into
per-chunk outputs and new carried states.
"""
from __future__ import annotations

import collections
import dataclasses
import zlib
from typing import Iterable, Sequence

import numpy as np

from schemas import DIGEST_BYTES, CarriedState, Chunk, ChunkOutput

# What happens to a chunk read in this run: the report's categories.
PROCESSED, DEFERRED, SKIPPED = "chunks_processed", "chunks_deferred", "chunks_skipped_duplicate"
REJECTED = "chunks_rejected"  # counted as chunks_rejected_<reason> too
# Reasons decided per sequence (read-time reasons are in schemas.validation).
CONFLICTING_DUPLICATE = "conflicting_duplicate"    # same index, different content
DUPLICATE_UNVERIFIABLE = "duplicate_unverifiable"  # applied too long ago to compare
SEQUENCE_CLOSED = "sequence_closed"                # after is_last, or after expiry
PLAN_REASONS = (CONFLICTING_DUPLICATE, DUPLICATE_UNVERIFIABLE, SEQUENCE_CLOSED)
# Why a sequence's final state is reported.
END_IS_LAST, END_EXPIRED = "is_last", "expired"
# Applied chunks whose content digest is remembered, per sequence.
DIGEST_WINDOW = 1024


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceWork:
    """Chunks to apply now to one sequence, contiguous and in index order."""
    carried: CarriedState
    chunks: tuple[Chunk, ...]

    @property
    def steps(self) -> int:
        return sum(chunk.steps for chunk in self.chunks)


@dataclasses.dataclass(frozen=True, eq=False)
class SequencePlan:
    """What happens to one sequence in this run.

    At most one of ``work`` (chunks to apply) and ``unchanged`` (state kept without
    compute) is set; neither for a sequence whose every chunk was rejected and that
    had no state. ``pending`` is what the new snapshot keeps deferred; ``rejected`` holds
    (chunk, reason, message) for dead letters; ``ended`` a final state to report.
    ``counts`` counts this run's chunks per category, plus ``pending_applied`` and
    ``pending_rejected`` for chunks deferred by earlier runs.
    """
    work: SequenceWork | None
    unchanged: CarriedState | None
    pending: tuple[Chunk, ...]
    rejected: tuple[tuple[Chunk, str, str], ...]
    ended: tuple[CarriedState, str] | None
    counts: dict[str, int]


def tombstone(state: CarriedState) -> CarriedState:
    """A closed sequence's row: no recurrent state, bookkeeping kept (late duplicates)."""
    return dataclasses.replace(state, closed=True,
                               tensors=tuple(np.zeros(0, np.float32) for _ in state.tensors))


@dataclasses.dataclass(frozen=True)
class Planner:
    """The per-sequence rules of one run (picklable; used inside a Beam DoFn).

    ``reset_state``: carried state written by another model restarts from zeros.
    ``expire_after_runs`` / ``expire_after_seconds``: a sequence with no chunk for that
    long is ended: its final state is reported and it is closed.
    """
    run_id: str
    run_number: int
    started_at: int
    zero_state: tuple[np.ndarray, ...]
    model_fingerprint: str
    reset_state: bool = False
    expire_after_runs: int | None = None
    expire_after_seconds: int | None = None

    def plan(self, sequence_id: str, carried: CarriedState | None,
             pending: Iterable[Chunk], new: Iterable[Chunk]) -> SequencePlan:
        new = sorted(new, key=lambda c: (c.chunk_index, c.digest))
        counts: collections.Counter = collections.Counter()
        rejected: list[tuple[Chunk, str, str]] = []

        def reject(chunk: Chunk, reason: str, message: str, fresh: bool = True) -> None:
            rejected.append((chunk, reason, message))
            if fresh:
                counts[REJECTED] += 1
                counts[f"{REJECTED}_{reason}"] += 1
            else:
                counts["pending_rejected"] += 1

        known_before = carried is not None
        if carried is None:
            carried = CarriedState(sequence_id, 0, 0, self.zero_state, self.model_fingerprint)
        elif (self.reset_state and not carried.closed
              and carried.model_fingerprint != self.model_fingerprint):
            carried = dataclasses.replace(carried, tensors=self.zero_state,
                                          model_fingerprint=self.model_fingerprint)
        if carried.closed:
            for chunk in new:
                if carried.applied_digest(chunk.chunk_index) == chunk.digest:
                    counts[SKIPPED] += 1
                else:
                    reject(chunk, SEQUENCE_CLOSED, f"sequence {sequence_id!r} is closed")
            return SequencePlan(None, carried, (), tuple(rejected), None, dict(+counts))

        candidates = {chunk.chunk_index: chunk for chunk in pending}
        fresh: set[int] = set()  # ids of this run's chunks among the candidates
        for index, group in _by_index(new):
            if index < carried.next_chunk_index:
                known = carried.applied_digest(index)
                for chunk in group:
                    if known == chunk.digest:
                        counts[SKIPPED] += 1
                    elif known is None:
                        reject(chunk, DUPLICATE_UNVERIFIABLE, f"chunk {index} was applied "
                               f"more than {DIGEST_WINDOW} chunks ago; cannot compare")
                    else:
                        reject(chunk, CONFLICTING_DUPLICATE, f"chunk {index} was already "
                               "applied with different content")
            elif index in candidates:
                for chunk in group:
                    if chunk.digest == candidates[index].digest:
                        counts[SKIPPED] += 1
                    else:
                        reject(chunk, CONFLICTING_DUPLICATE, f"chunk {index} is already "
                               "pending with different content")
            elif len({chunk.digest for chunk in group}) > 1:
                for chunk in group:
                    reject(chunk, CONFLICTING_DUPLICATE, f"chunk {index} arrived "
                           f"{len(group)} times in this run with different contents")
            else:
                candidates[index] = group[0]
                fresh.add(id(group[0]))
                counts[SKIPPED] += len(group) - 1

        applied: list[Chunk] = []
        while carried.next_chunk_index + len(applied) in candidates:
            applied.append(candidates.pop(carried.next_chunk_index + len(applied)))
            if applied[-1].is_last:
                break
        for chunk in applied:
            counts[PROCESSED if id(chunk) in fresh else "pending_applied"] += 1
        left = [candidates[index] for index in sorted(candidates)]
        closes = bool(applied) and applied[-1].is_last
        if closes:
            for chunk in left:
                reject(chunk, SEQUENCE_CLOSED, f"chunk {chunk.chunk_index} comes after the "
                       f"last chunk {applied[-1].chunk_index}", fresh=id(chunk) in fresh)
            left = []
        counts[DEFERRED] += sum(id(chunk) in fresh for chunk in left)

        if fresh:  # a chunk arrived: the sequence is not idle
            carried = dataclasses.replace(carried, last_run_number=self.run_number,
                                          last_touched_at=self.started_at)
        if applied:
            return SequencePlan(SequenceWork(carried, tuple(applied)), None, tuple(left),
                                tuple(rejected), None, dict(+counts))
        if not known_before and not left:
            carried = None  # every chunk of a new sequence was rejected: no state row
        ended = None
        if carried is not None and not fresh and self._idle(carried):
            ended = (carried, END_EXPIRED)
            for chunk in left:
                reject(chunk, SEQUENCE_CLOSED, "sequence expired", fresh=False)
            carried, left = tombstone(carried), []
        return SequencePlan(None, carried, tuple(left), tuple(rejected), ended, dict(+counts))

    def _idle(self, state: CarriedState) -> bool:
        idle_runs = self.run_number - state.last_run_number
        idle_seconds = self.started_at - state.last_touched_at
        return bool((self.expire_after_runs and idle_runs >= self.expire_after_runs)
                    or (self.expire_after_seconds and idle_seconds >= self.expire_after_seconds))


def _by_index(chunks: Sequence[Chunk]) -> list[tuple[int, list[Chunk]]]:
    groups: dict[int, list[Chunk]] = collections.defaultdict(list)
    for chunk in chunks:
        groups[chunk.chunk_index].append(chunk)
    return sorted(groups.items())


def id_hash(sequence_id: str) -> int:
    """A 32-bit hash of ``sequence_id``, the same in every process and every run."""
    return zlib.crc32(sequence_id.encode("utf-8"))


def stable_bucket(sequence_id: str, buckets: int) -> int:
    """``sequence_id``'s shard among ``buckets`` by :func:`id_hash` modulo: how snapshot
    files are sharded (their names say so: keep it) and small outputs spread."""
    return id_hash(sequence_id) % max(1, buckets)


def bucket_of(hashes: int | np.ndarray, buckets: int) -> int | np.ndarray:
    """A run's unit of work for :func:`id_hash` values: equal ranges of the hash space,
    so rows sorted by hash fall into contiguous runs of buckets (see
    :mod:`transforms.staging`)."""
    if isinstance(hashes, np.ndarray):
        return ((hashes.astype(np.uint64) * np.uint64(buckets)) >> np.uint64(32)).astype(
            np.int64)
    return (int(hashes) * buckets) >> 32  # a Python int: a numpy scalar could wrap


# Bounds on what one bucket holds in memory (see size_run).
BUCKET_BYTES = 256 * 2**20
STATES_PER_BUCKET = 200_000
ROWS_PER_STATE_FILE = 100_000


@dataclasses.dataclass(frozen=True)
class RunSizing:
    """How a run's work is split, decided inside the job once the sequences of every
    input are counted (:func:`size_run`)."""
    sequences: int  # distinct sequences with valid chunks in this run
    buckets: int  # units of work: sequences joined, planned and run together
    shards: int  # files of each kind in the snapshot layer the run writes

    def bucket(self, sequence_id: str) -> int:
        return int(bucket_of(id_hash(sequence_id), self.buckets))


def size_run(sequences: int, feature_bytes: int, batch_size: int,
             snapshot_rows: int) -> RunSizing:
    """Split a run of ``sequences`` (holding ``feature_bytes`` of features) that reads
    ``snapshot_rows`` carried states (all of them for a compacting run, else 0).

    A bucket's chunks are read into memory together and run as full batches: about
    four batches each, fewer sequences where their features would exceed
    :data:`BUCKET_BYTES`, and no more than :data:`STATES_PER_BUCKET` snapshot rows.
    """
    bytes_per_sequence = feature_bytes / max(1, sequences)
    per_bucket = min(4 * batch_size, int(BUCKET_BYTES // max(1.0, bytes_per_sequence)))
    if per_bucket >= batch_size:
        per_bucket -= per_bucket % batch_size  # whole batches
    buckets = max(1, -(-sequences // max(1, per_bucket)),
                  -(-snapshot_rows // STATES_PER_BUCKET))
    shards = max(1, -(-(snapshot_rows + sequences) // ROWS_PER_STATE_FILE))
    return RunSizing(sequences, buckets, shards)


def split_into_batches(works: Sequence[SequenceWork],
                       batch_size: int) -> list[list[SequenceWork]]:
    """Deterministic batches of similar lengths: full batches of ``batch_size``, then
    the rest (the kernel compiles for few batch shapes, so full ones waste nothing).

    Sorting by length keeps padding small; the order is fixed by (steps, sequence_id)
    so a retried bundle computes exactly the same batches.
    """
    ordered = sorted(works, key=lambda w: (-w.steps, w.carried.sequence_id))
    return [ordered[start:start + batch_size] for start in range(0, len(ordered), batch_size)]


@dataclasses.dataclass(frozen=True, eq=False)
class BatchResult:
    """Per-chunk outputs; every sequence's new state (a tombstone for one that
    reached its last chunk); and the final states of those that ended."""
    outputs: list[ChunkOutput]
    states: list[CarriedState]
    ended: list[CarriedState]
    steps: int


def run_batch(kernel, works: Sequence[SequenceWork]) -> BatchResult:
    """Run one batch of sequences together through ``kernel`` (a StepKernel).

    Each sequence's chunks are concatenated, rows are right-padded to the longest,
    and each sequence's new state is taken at its own last real step.
    """
    stack = kernel.stack
    lengths = np.array([work.steps for work in works], np.int64)
    inputs = np.zeros((len(works), int(lengths.max()), stack.input_dim), np.float32)
    for row, work in enumerate(works):
        inputs[row, :lengths[row]] = np.concatenate([c.features for c in work.chunks])
    initial = [np.stack([work.carried.tensors[part] for work in works])
               for part in range(len(stack.state_sizes))]
    outputs, final = kernel.run(inputs, lengths, initial)

    chunk_outputs, states, ended = [], [], []
    for row, work in enumerate(works):
        start = 0
        for chunk in work.chunks:
            chunk_outputs.append(ChunkOutput(chunk.sequence_id, chunk.chunk_index,
                                             outputs[row, start:start + chunk.steps].copy()))
            start += chunk.steps
        digests = work.carried.applied_digests + b"".join(c.digest for c in work.chunks)
        state = dataclasses.replace(
            work.carried, next_chunk_index=work.chunks[-1].chunk_index + 1,
            steps_seen=work.carried.steps_seen + int(lengths[row]),
            tensors=tuple(part[row].copy() for part in final),
            model_fingerprint=stack.fingerprint,
            applied_digests=digests[-DIGEST_WINDOW * DIGEST_BYTES:])
        if work.chunks[-1].is_last:
            ended.append(state)
            state = tombstone(state)
        states.append(state)
    return BatchResult(chunk_outputs, states, ended, int(lengths.sum()))
