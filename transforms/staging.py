"""Chunk features parked in files while a run shuffles the chunks.

A run groups chunks by bucket (a stable hash of their sequence id) to join them with
their carried states and run them in batches. Runners that keep shuffled data in
memory (the DirectRunner's FnApiRunner does) would then hold every feature of the
run at once. So the reader writes the features of each input file to a staging file
(Arrow IPC), one record batch per bucket, and the chunks are shuffled without them;
the DoFn of a bucket reads back only its own record batches. Memory then follows the bucket size, not
the size of the input, and the shuffle moves small records.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable, Sequence

import pyarrow as pa

from pipeline import storage
from schemas import Chunk, matrices_from_array, matrix_array


def stage(chunks: Sequence[Chunk], url: str,
          bucket_of: Callable[[str], int]) -> list[tuple[int, Chunk]]:
    """Write the features of ``chunks`` to ``url`` and return ``(bucket, chunk)`` pairs
    whose chunks hold, instead of features, where they are."""
    by_bucket = collections.defaultdict(list)
    for chunk in chunks:
        by_bucket[bucket_of(chunk.sequence_id)].append(chunk)
    buckets = sorted(by_bucket)
    if buckets:
        storage.write_batches(url, [
            pa.record_batch({"features": matrix_array([c.features for c in by_bucket[b]])})
            for b in buckets])
    return [(bucket, dataclasses.replace(chunk, features=None, staged=(url, group, row)))
            for group, bucket in enumerate(buckets)
            for row, chunk in enumerate(by_bucket[bucket])]


def unstage(chunks: Iterable[Chunk]) -> list[Chunk]:
    """``chunks`` with their features read back (each record batch read once)."""
    chunks = list(chunks)
    groups = {}
    for chunk in chunks:
        if chunk.staged is not None and chunk.staged[:2] not in groups:
            url, group, _ = chunk.staged
            groups[url, group] = matrices_from_array(
                storage.read_batch(url, group).column("features"), f"{url} features")
    return [chunk if chunk.staged is None else dataclasses.replace(
                chunk, features=groups[chunk.staged[:2]][chunk.staged[2]], staged=None)
            for chunk in chunks]
