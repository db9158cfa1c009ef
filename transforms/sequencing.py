"""Per-sequence planning and batched execution: pure functions the DoFns wrap.

:class:`Planner` decides, for one sequence, what happens to every chunk read in this
run (applied now, deferred until a missing earlier chunk arrives, skipped as an exact
duplicate, or rejected with a reason) and which pending chunks can now be applied.
A chunk is never applied out of order, so nothing out of order touches the state.

:func:`run_continuous` runs many sequences' planned work through the
:class:`~transforms.kernel.StepKernel` on a fixed number of batch rows, window by
window, a finished sequence's row taken by the next waiting one (continuous
batching), and turns the results back into per-chunk outputs and new carried states.
"""
from __future__ import annotations

import collections
import dataclasses
import zlib
from typing import Iterable, Iterator, Sequence

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


@dataclasses.dataclass(frozen=True, eq=False)
class BatchResult:
    """Per-chunk outputs; every sequence's new state (a tombstone for one that
    reached its last chunk); the final states of those that ended; and the steps the
    model computed (whichever outputs were kept)."""
    outputs: list[ChunkOutput]
    states: list[CarriedState]
    ended: list[CarriedState]
    steps: int
    xla: bool = False  # whether its windows ran XLA-compiled


class _Feed:
    """One running sequence of a batch: its chunks fed window by window, without
    concatenating them, and the outputs kept so far: every step's, or with
    ``last_only`` each chunk's last step's (the others are never held)."""

    def __init__(self, work: SequenceWork, last_only: bool = False):
        self.work = work
        self.last_only = last_only
        self.remaining = work.steps
        self._pieces = [chunk.features for chunk in work.chunks]
        self._next, self._offset = 0, 0
        self._chunk_ends = np.cumsum([chunk.steps for chunk in work.chunks])
        self._recorded = 0  # steps whose outputs were offered to keep()
        self.outputs: list[np.ndarray] = []

    def take_into(self, window: np.ndarray) -> None:
        """Copy the next ``len(window)`` steps of features into ``window`` (a row of
        the batch's window: a window across chunks is never concatenated first)."""
        filled = 0
        while filled < len(window):
            piece = self._pieces[self._next][self._offset:
                                             self._offset + len(window) - filled]
            window[filled:filled + len(piece)] = piece
            filled += len(piece)
            self._offset += len(piece)
            if self._offset == len(self._pieces[self._next]):
                self._next, self._offset = self._next + 1, 0
        self.remaining -= filled

    def keep(self, outputs: np.ndarray) -> None:
        """Keep what is wanted of the outputs [steps, width] of the steps just run."""
        start, self._recorded = self._recorded, self._recorded + len(outputs)
        if not self.last_only:
            self.outputs.append(outputs.copy())
            return
        lasts = self._chunk_ends[(self._chunk_ends > start)
                                 & (self._chunk_ends <= self._recorded)] - 1
        self.outputs.append(outputs[lasts - start])  # indexing by an array copies


def _finished(feed: _Feed, final: Sequence[np.ndarray], fingerprint: str
              ) -> tuple[list[ChunkOutput], CarriedState, bool]:
    """A sequence whose steps have all run: its per-chunk outputs, its new carried
    state, and whether it ended (then the state is its final one)."""
    work = feed.work
    outputs = np.concatenate(feed.outputs)
    chunk_outputs, start = [], 0
    for chunk in work.chunks:
        kept = 1 if feed.last_only else chunk.steps
        chunk_outputs.append(ChunkOutput(chunk.sequence_id, chunk.chunk_index,
                                         outputs[start:start + kept], chunk.steps))
        start += kept
    digests = work.carried.applied_digests + b"".join(c.digest for c in work.chunks)
    state = dataclasses.replace(
        work.carried, next_chunk_index=work.chunks[-1].chunk_index + 1,
        steps_seen=work.carried.steps_seen + work.steps,
        tensors=tuple(np.array(part) for part in final), model_fingerprint=fingerprint,
        applied_digests=digests[-DIGEST_WINDOW * DIGEST_BYTES:])
    return chunk_outputs, state, bool(work.chunks[-1].is_last)


def _batch_result(done: list[tuple[list[ChunkOutput], CarriedState, bool]],
                  xla: bool) -> BatchResult:
    outputs, states, ended = [], [], []
    for chunk_outputs, state, last in done:
        outputs += chunk_outputs
        if last:
            ended.append(state)
            state = tombstone(state)
        states.append(state)
    return BatchResult(outputs, states, ended, sum(output.steps for output in outputs), xla)


# Fewer rows is a new shape for XLA to compile (about a second for an LSTM(128) here):
# the batch shrinks only when that saves at least this many row-steps of computation
# (about half a second's worth), e.g. not for the last few sequences of a bucket.
SHRINK_MIN_ROW_STEPS = 2**19


def _batch_rows(rows: int, running: int, steps_left: int) -> int:
    """The rows of the next window, from those of the last one: halved while half
    still holds the ``running`` sequences, if that saves enough computation over the
    ``steps_left`` steps of the longest. Decided from the work alone, so a retried
    bundle runs the same shapes and computes the same bits."""
    target = rows
    while target // 2 >= running:
        target //= 2
    return target if (rows - target) * steps_left >= SHRINK_MIN_ROW_STEPS else rows


def batch_capacity(steps: Sequence[int], slots: int, padded_rows) -> int:
    """How many sequences of ``steps`` run at once, at most ``slots``: no more than
    keep the longest one busy. On R rows, continuous batching finishes the work in
    about max(longest, total / R) steps, so rows beyond total / longest shorten
    nothing; they only add padding, and maybe a shape to compile (about a second). The
    count is rounded up to the rows the kernel pads it to anyway (``padded_rows``), so
    a long sequence's short neighbours ride in rows it would run regardless."""
    if not steps:
        return 1
    return max(1, min(slots, padded_rows(-(-sum(steps) // max(steps)))))


# XLA compiles a shape in 0.3 to 0.5 s more than a plain tf.function traces it (here,
# for LSTMs), and then runs a window 0.9 to 4.3x as fast: over a few windows the compile
# costs more than it saves. Works expected to run fewer windows than this run plain.
XLA_MIN_WINDOWS = 12


def uses_xla(steps: Sequence[int], rows: int, window_steps: int) -> bool:
    """Whether continuous batching asks for XLA for works of ``steps`` on ``rows`` rows:
    if they run at least :data:`XLA_MIN_WINDOWS` windows, the longest sequence's or
    the total spread over every row, whichever is more. Decided from the work alone,
    so a retried bundle takes the same path and computes the same bits."""
    if not steps:
        return False
    windows = max(-(-max(steps) // window_steps), -(-sum(steps) // (rows * window_steps)))
    return windows >= XLA_MIN_WINDOWS


def run_continuous(kernel, works: Sequence[SequenceWork], slots: int,
                   last_only: bool = False) -> Iterator[BatchResult]:
    """Run ``works`` through ``kernel`` (a StepKernel) on ``slots`` batch rows, one
    window of ``kernel.window_steps`` at a time: continuous batching, as Triton's
    sequence batcher and LLM servers do. A row whose sequence has run all its steps
    takes the next waiting sequence (with its own carried state) at the next window;
    once none waits, the batch shrinks to the rows still running (by halves, so few
    shapes are compiled; see :func:`_batch_rows`). The batch holds no more sequences
    than keep the longest one busy (:func:`batch_capacity`). So one long sequence
    among many short ones costs about what it costs alone, and no array holds more
    than one window of the batch.

    Sequences start longest first, in an order fixed by (steps, sequence_id), so a
    retried bundle computes exactly the same bits. Small works run plain, large ones
    XLA-compiled (:func:`uses_xla`; all of them with ``kernel.xla_for_small_works``).
    Yields a :class:`BatchResult` each time ``slots`` sequences have finished, and one
    for the rest. With ``last_only`` (``--outputs-at last``), each chunk's output is
    the one at its last step only.
    """
    stack = kernel.stack
    waiting = collections.deque(sorted(works, key=lambda w: (-w.steps, w.carried.sequence_id)))
    steps = [work.steps for work in works]
    capacity = batch_capacity(steps, slots, kernel.padded_rows)
    xla = kernel.xla_for_small_works or uses_xla(steps, capacity, kernel.window_steps)
    rows = min(capacity, len(waiting))
    running: list[_Feed] = []
    states = [np.zeros((0, size), np.float32) for size in stack.state_sizes]
    done: list[tuple[list[ChunkOutput], CarriedState, bool]] = []
    while waiting or running:
        joining = [_Feed(waiting.popleft(), last_only)
                   for _ in range(min(len(waiting), capacity - len(running)))]
        if joining:
            running += joining
            states = [np.concatenate([part, np.stack([feed.work.carried.tensors[index]
                                                      for feed in joining])])
                      for index, part in enumerate(states)]
        steps_left = max(feed.remaining for feed in running)
        lengths = np.minimum([feed.remaining for feed in running], kernel.window_steps)
        inputs = np.zeros((len(running), int(lengths.max()), stack.input_dim), np.float32)
        for row, feed in enumerate(running):
            feed.take_into(inputs[row, :lengths[row]])
        rows = _batch_rows(rows, len(running), steps_left)
        outputs, states = kernel.run_window(inputs, lengths, states, rows, xla)
        still = []
        for row, feed in enumerate(running):
            feed.keep(outputs[row, :lengths[row]])
            if feed.remaining:
                still.append(row)
            else:
                done.append(_finished(feed, [part[row] for part in states],
                                      stack.fingerprint))
        running = [running[row] for row in still]
        states = [part[still] for part in states]
        if len(done) >= slots:
            yield _batch_result(done, xla and kernel.xla)  # decided by its windows
            done = []
    if done:
        yield _batch_result(done, xla and kernel.xla)


def run_batch(kernel, works: Sequence[SequenceWork]) -> BatchResult:
    """Run ``works`` (at least one) through ``kernel`` on up to ``len(works)`` rows,
    as one result; see :func:`run_continuous`."""
    (result,) = run_continuous(kernel, works, len(works))
    return result
