"""Chunks parked in files while a run groups them by bucket.

A run groups chunks by bucket (a range of :func:`~transforms.sequencing.id_hash`
values) to join them with their carried states and run them in batches. Runners that
keep shuffled data in memory (the DirectRunner's FnApiRunner does) would then hold every
chunk of the run at once, and every chunk would pay the runner's per-element cost
(encoding, size sampling) several times. So each batch of validated chunks is written
to a staging file (Arrow IPC) sorted by the hash of its sequence ids, and only
references are shuffled: the file with its sorted hashes (:class:`StagedChunks`), and
once the run's bucket count is known (it depends on every input's sequences), a row
range per bucket (:func:`slices`). The DoFn of a bucket reads back its own ranges.
Memory then follows the bucket size, not the size of the input.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

import storage
from schemas import Chunk, chunks_from_table, chunks_to_table
from transforms.sequencing import bucket_of, id_hash

# Rows per record batch of a staging file: a bucket's read skips the batches of others.
BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True, eq=False)
class StagedChunks:
    """A staging file and the sorted :func:`~transforms.sequencing.id_hash` of each of
    its rows' sequence ids."""
    url: str
    hashes: np.ndarray


StagedSlice = tuple[str, int, int]
"""Rows ``[start, stop)`` of a staging file: one bucket's chunks from it."""


def stage(chunks: Sequence[Chunk], folder: str) -> StagedChunks:
    """Write ``chunks`` to a file in ``folder``, sorted by the hash of their sequence
    ids. The file is named by its content, so a retried bundle rewrites the same file."""
    hashes = np.array([id_hash(chunk.sequence_id) for chunk in chunks], np.uint32)
    order = sorted(range(len(chunks)), key=lambda i: (
        hashes[i], chunks[i].sequence_id, chunks[i].chunk_index, chunks[i].source,
        chunks[i].row if chunks[i].row is not None else -1))
    # The pending-chunk schema keeps each chunk's run, input file and row. Each file
    # is read once, a bucket's rows at a time: it is kept out of the page cache.
    url = storage.write_ipc_named_by_content(
        folder, chunks_to_table([chunks[i] for i in order], pending=True), BATCH_ROWS,
        cache=False)
    return StagedChunks(url, hashes[order])


def slices(staged: StagedChunks, buckets: int) -> list[tuple[int, StagedSlice]]:
    """Each bucket that has rows in ``staged``, with their row range."""
    of_rows = bucket_of(staged.hashes, buckets)
    present, starts = np.unique(of_rows, return_index=True)
    stops = list(starts[1:]) + [len(of_rows)]
    return [(int(bucket), (staged.url, int(start), int(stop)))
            for bucket, start, stop in zip(present, starts, stops)]


def unstage(ranges: Iterable[StagedSlice]) -> list[Chunk]:
    """The chunks of staged row ranges, read back."""
    return [chunk for url, start, stop in ranges
            for chunk in chunks_from_table(
                storage.read_ipc_rows(url, start, stop, BATCH_ROWS, cache=False), url,
                pending=True)]
