"""Chunks parked in files while a run groups them by bucket.

A run groups chunks by bucket (a stable hash of their sequence id) to join them with
their carried states and run them in batches. Runners that keep shuffled data in
memory (the DirectRunner's FnApiRunner does) would then hold every chunk of the run
at once, and every chunk would pay the runner's per-element cost (encoding, size
sampling) several times. So the reader writes the chunks of each input file to a
staging file (Arrow IPC), one record batch per bucket, and only ``(file, batch)``
references are shuffled; the DoFn of a bucket reads back its own record batches.
Memory then follows the bucket size, not the size of the input.
"""
from __future__ import annotations

import collections
from typing import Callable, Iterable, Sequence

import storage
from schemas import Chunk, chunks_from_table, chunks_to_table

StagedBatch = tuple[str, int]
"""Where a bucket's chunks from one input file wait: (staging file, record batch)."""


def stage(chunks: Sequence[Chunk], url: str,
          bucket_of: Callable[[str], int]) -> list[tuple[int, StagedBatch]]:
    """Write ``chunks`` to ``url``, a record batch per bucket; returns each bucket with
    where its batch is."""
    by_bucket = collections.defaultdict(list)
    for chunk in chunks:
        by_bucket[bucket_of(chunk.sequence_id)].append(chunk)
    buckets = sorted(by_bucket)
    if buckets:
        # The pending-chunk schema keeps each chunk's run, input file and row.
        storage.write_tables(url, [chunks_to_table(by_bucket[bucket], pending=True)
                                   for bucket in buckets])
    return [(bucket, (url, batch)) for batch, bucket in enumerate(buckets)]


def unstage(batches: Iterable[StagedBatch]) -> list[Chunk]:
    """The chunks of staged batches, read back."""
    return [chunk for url, batch in batches
            for chunk in chunks_from_table(storage.read_table_at(url, batch), url,
                                           pending=True)]
