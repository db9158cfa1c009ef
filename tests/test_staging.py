"""Chunks staged while references to them are shuffled: round trip, row ranges per
bucket, and how a run's work is split into buckets."""
import numpy as np

from schemas import Chunk
from transforms.sequencing import (BUCKET_BYTES, ROWS_PER_STATE_FILE, STATES_PER_BUCKET,
                                   RunSizing, size_run)
from transforms.staging import BATCH_ROWS, slices, stage, unstage


def test_staged_chunks_come_back_bit_for_bit_and_a_bucket_reads_only_its_rows(tmp_path):
    rng = np.random.default_rng(0)
    # More rows than a record batch, so ranges cross batch boundaries.
    chunks = [Chunk(f"s{i % 97}", i, rng.normal(size=(1 + i % 5, 3)).astype(np.float32),
                    is_last=i == 3, arrived_in_run="r1", source="in.parquet", row=i)
              for i in range(3 * BATCH_ROWS + 17)]
    folder = str(tmp_path / "staging")
    staged = stage(chunks, folder)
    assert list(staged.hashes) == sorted(staged.hashes)
    # The same chunks in another order: the same file (named by content) and hashes.
    again = stage(list(reversed(chunks)), folder)
    assert again.url == staged.url and (again.hashes == staged.hashes).all()

    original = {(c.sequence_id, c.chunk_index): c for c in chunks}
    sizing = RunSizing(sequences=97, buckets=5, shards=1)
    ranges = slices(staged, sizing.buckets)
    assert [bucket for bucket, _ in ranges] == sorted({sizing.bucket(c.sequence_id)
                                                       for c in chunks})
    seen = []
    for bucket, staged_slice in ranges:
        restored = unstage([staged_slice])
        assert {sizing.bucket(c.sequence_id) for c in restored} == {bucket}
        assert sorted(c.chunk_index for c in restored) == [
            c.chunk_index for c in chunks if sizing.bucket(c.sequence_id) == bucket]
        for chunk in restored:
            before = original[chunk.sequence_id, chunk.chunk_index]
            np.testing.assert_array_equal(chunk.features, before.features)
            assert (chunk.digest, chunk.steps, chunk.is_last, chunk.arrived_in_run,
                    chunk.source, chunk.row) == (before.digest, before.steps, before.is_last,
                                                 "r1", "in.parquet", before.row)
        seen += restored
    assert len(seen) == len(chunks)


def test_buckets_hold_whole_batches_within_the_memory_bound():
    assert size_run(0, 0, 256, 0) == RunSizing(0, 1, 1)
    # Small sequences: four full batches per bucket.
    assert size_run(2048, 2048 * 1000, 256, 0).buckets == 2
    # Large sequences: fewer per bucket, still whole batches, never over the bound.
    per_sequence = BUCKET_BYTES // 300
    assert size_run(2048, 2048 * per_sequence, 256, 0).buckets == -(-2048 // 256)
    # Huge sequences: fewer than a batch per bucket.
    assert size_run(10, 10 * BUCKET_BYTES, 256, 0).buckets == 10
    # A compacting run over a big snapshot spreads its states too, over more files.
    big = size_run(10, 1000, 256, 3 * STATES_PER_BUCKET)
    assert big.buckets == 3 and big.shards == -(-(3 * STATES_PER_BUCKET + 10)
                                                 // ROWS_PER_STATE_FILE)


def test_buckets_are_equal_ranges_of_the_hash_space_and_stable():
    sizing = RunSizing(sequences=10_000, buckets=7, shards=1)
    counts = np.bincount([sizing.bucket(f"id-{i}") for i in range(10_000)], minlength=7)
    assert len(counts) == 7 and counts.min() > 10_000 / 7 * 0.85
    assert RunSizing(1, 1, 1).bucket("anything") == 0


def test_files_kept_out_of_the_page_cache_are_written_whole_in_pieces(tmp_path, monkeypatch):
    """Staging files and outputs go to disk piece by piece (each dropped from the page
    cache once flushed): the bytes and the content name are those of an ordinary
    write, and no temporary file is left."""
    import hashlib
    import os

    import pyarrow as pa

    import storage
    from storage import files

    monkeypatch.setattr(files, "UNCACHED_PIECE_BYTES", 4096)  # many pieces, one partial
    data = np.random.default_rng(1).bytes(10 * 4096 + 123)
    for durable in (True, False):
        url = str(tmp_path / f"durable-{durable}" / "part.bin")
        storage.write_bytes(url, data, durable=durable, cache=False)
        assert storage.read_bytes(url) == data
        assert os.listdir(os.path.dirname(url)) == ["part.bin"]

    table = pa.table({"values": np.arange(20_000, dtype=np.float32)})
    folder = str(tmp_path / "ipc")
    url = storage.write_ipc_named_by_content(folder, table, 1024, cache=False)
    on_disk = storage.read_bytes(url)
    assert os.path.basename(url) == hashlib.sha256(on_disk).hexdigest()[:32] + ".arrow"
    assert storage.write_ipc_named_by_content(folder, table, 1024) == url
    assert os.listdir(folder) == [os.path.basename(url)]
    rows = storage.read_ipc_rows(url, 1000, 3100, 1024, cache=False)
    assert rows.column("values").to_pylist() == list(range(1000, 3100))
