"""Chunks shuffled without their features: staging round trip, and how a run's work
is split into buckets."""
import numpy as np
import pytest

from pipeline import storage
from pipeline.build import BUCKET_BYTES, STATES_PER_BUCKET, bucket_count
from schemas import Chunk
from transforms.staging import stage, unstage


def test_staged_chunks_come_back_bit_for_bit_and_a_bucket_reads_only_its_batch(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [Chunk(f"s{i % 7}", i, rng.normal(size=(1 + i % 5, 3)).astype(np.float32),
                    is_last=i == 3) for i in range(40)]
    url = str(tmp_path / "staging" / "file.arrow")
    keyed = stage(chunks, url, lambda sequence_id: int(sequence_id[1:]) % 3)

    assert sorted(bucket for bucket, _ in keyed) == sorted(
        int(c.sequence_id[1:]) % 3 for c in chunks)
    for bucket, staged in keyed:
        assert staged.features is None and staged.staged[0] == url
    original = {(c.sequence_id, c.chunk_index): c for c in chunks}
    for bucket in range(3):
        mine = [staged for b, staged in keyed if b == bucket]
        assert {staged.staged[1] for staged in mine} == {bucket}  # one batch per bucket
        for restored in unstage(mine):
            before = original[restored.sequence_id, restored.chunk_index]
            np.testing.assert_array_equal(restored.features, before.features)
            assert (restored.digest, restored.steps, restored.is_last, restored.staged) == (
                before.digest, before.steps, before.is_last, None)
    assert storage.read_batch(url, 1).num_rows == sum(b == 1 for b, _ in keyed)


def test_a_chunk_without_features_must_say_where_they_are():
    with pytest.raises(ValueError, match="where they are staged"):
        Chunk("s", 0, None)


def test_buckets_hold_whole_batches_within_the_memory_bound():
    assert bucket_count(0, 0, 256, 0) == 1
    # Small sequences: four full batches per bucket.
    assert bucket_count(2048, 2048 * 1000, 256, 0) == 2
    # Large sequences: fewer per bucket, still whole batches, never over the bound.
    per_sequence = BUCKET_BYTES // 300
    buckets = bucket_count(2048, 2048 * per_sequence, 256, 0)
    assert buckets == -(-2048 // 256)
    # Huge sequences: fewer than a batch per bucket.
    assert bucket_count(10, 10 * BUCKET_BYTES, 256, 0) == 10
    # A compacting run over a big snapshot spreads its states too.
    assert bucket_count(10, 1000, 256, 3 * STATES_PER_BUCKET) == 3
