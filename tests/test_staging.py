"""Chunks staged while references to them are shuffled: round trip, and how a run's
work is split into buckets."""
import numpy as np
from pipeline.build import BUCKET_BYTES, STATES_PER_BUCKET, bucket_count
from schemas import Chunk
from transforms.staging import stage, unstage


def test_staged_chunks_come_back_bit_for_bit_and_a_bucket_reads_only_its_batch(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [Chunk(f"s{i % 7}", i, rng.normal(size=(1 + i % 5, 3)).astype(np.float32),
                    is_last=i == 3, arrived_in_run="r1", source="in.parquet", row=i)
              for i in range(40)]
    url = str(tmp_path / "staging" / "file.arrow")
    keyed = stage(chunks, url, lambda sequence_id: int(sequence_id[1:]) % 3)

    assert keyed == [(bucket, (url, bucket)) for bucket in range(3)]  # a batch per bucket
    original = {(c.sequence_id, c.chunk_index): c for c in chunks}
    for bucket, staged in keyed:
        restored = unstage([staged])
        assert sorted(c.chunk_index for c in restored) == [
            c.chunk_index for c in chunks if int(c.sequence_id[1:]) % 3 == bucket]
        for chunk in restored:
            before = original[chunk.sequence_id, chunk.chunk_index]
            np.testing.assert_array_equal(chunk.features, before.features)
            assert (chunk.digest, chunk.steps, chunk.is_last, chunk.arrived_in_run,
                    chunk.source, chunk.row) == (before.digest, before.steps, before.is_last,
                                                 "r1", "in.parquet", before.row)
    assert stage([], url + ".empty", lambda sequence_id: 0) == []


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
