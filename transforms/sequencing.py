"""Per-sequence planning and batched execution: pure functions the DoFns wrap.

:func:`plan_sequence` decides, for one sequence, which of this run's chunks are
applied now (a contiguous run of indexes from the carried ``next_chunk_index``) and
which are held out (and why), so a chunk out of order never touches the state.

:func:`run_batch` runs many sequences' planned work together through the
:class:`~transforms.kernel.StepKernel` and turns the padded result back into
per-chunk outputs and new carried states.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Iterable, Sequence

import numpy as np

from schemas import CarriedState, Chunk, ChunkOutput

# Why a chunk was held out of this run (a report counter per reason).
HELD_OUT_GAP = "gap"                      # an earlier chunk of its sequence is missing
HELD_OUT_ALREADY_APPLIED = "already_applied"  # its index is below next_chunk_index
HELD_OUT_REPEATED = "repeated_in_run"     # the same index appears twice in this run
HELD_OUT_REASONS = (HELD_OUT_GAP, HELD_OUT_ALREADY_APPLIED, HELD_OUT_REPEATED)


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

    Exactly one of ``work`` (chunks to apply) and ``unchanged`` (state kept as is) is set.
    """
    work: SequenceWork | None
    unchanged: CarriedState | None
    held_out: tuple[tuple[Chunk, str], ...]


def plan_sequence(sequence_id: str, carried: CarriedState | None, chunks: Iterable[Chunk],
                  zero_state: tuple[np.ndarray, ...], model_fingerprint: str) -> SequencePlan:
    """Order one sequence's new chunks and split them into applied and held out.

    A sequence without carried state starts at chunk 0 from ``zero_state``.
    """
    if carried is None:
        carried = CarriedState(sequence_id, 0, 0, zero_state, model_fingerprint)
    expected = carried.next_chunk_index
    applied: list[Chunk] = []
    held_out: list[tuple[Chunk, str]] = []
    seen: set[int] = set()
    for chunk in sorted(chunks, key=lambda c: c.chunk_index):
        if chunk.chunk_index in seen:
            held_out.append((chunk, HELD_OUT_REPEATED))
        elif chunk.chunk_index < carried.next_chunk_index:
            held_out.append((chunk, HELD_OUT_ALREADY_APPLIED))
        elif chunk.chunk_index == expected:
            applied.append(chunk)
            expected += 1
        else:
            held_out.append((chunk, HELD_OUT_GAP))
        seen.add(chunk.chunk_index)
    if applied:
        return SequencePlan(SequenceWork(carried, tuple(applied)), None, tuple(held_out))
    return SequencePlan(None, carried, tuple(held_out))


def stable_bucket(sequence_id: str, buckets: int) -> int:
    """A bucket for ``sequence_id`` that is the same in every process and every run."""
    return zlib.crc32(sequence_id.encode("utf-8")) % max(1, buckets)


def split_into_batches(works: Sequence[SequenceWork],
                       batch_size: int) -> list[list[SequenceWork]]:
    """Deterministic batches of at most ``batch_size``, of similar lengths, evenly sized.

    Sorting by length keeps padding small; the order is fixed by (steps, sequence_id)
    so a retried bundle computes exactly the same batches.
    """
    if not works:
        return []
    ordered = sorted(works, key=lambda w: (-w.steps, w.carried.sequence_id))
    count = -(-len(ordered) // batch_size)
    bounds = [round(i * len(ordered) / count) for i in range(count + 1)]
    return [ordered[bounds[i]:bounds[i + 1]] for i in range(count)]


@dataclasses.dataclass(frozen=True, eq=False)
class BatchResult:
    outputs: list[ChunkOutput]
    states: list[CarriedState]
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

    chunk_outputs, states = [], []
    for row, work in enumerate(works):
        start = 0
        for chunk in work.chunks:
            chunk_outputs.append(ChunkOutput(chunk.sequence_id, chunk.chunk_index,
                                             outputs[row, start:start + chunk.steps].copy()))
            start += chunk.steps
        states.append(CarriedState(
            work.carried.sequence_id, work.chunks[-1].chunk_index + 1,
            work.carried.steps_seen + int(lengths[row]),
            tuple(part[row].copy() for part in final), stack.fingerprint))
    return BatchResult(chunk_outputs, states, int(lengths.sum()))
