"""The data contract: Arrow round trips and clear errors for files that break it."""
import numpy as np
import pyarrow as pa
import pytest

from schemas import (CHUNK_SCHEMA, CarriedState, Chunk, ContractError, chunks_from_table,
                     chunks_to_table, state_schema, states_from_table, states_to_table)


def test_chunks_round_trip_with_different_step_counts():
    rng = np.random.default_rng(0)
    chunks = [Chunk(f"s{i}", i, rng.normal(size=(steps, 3)).astype(np.float32))
              for i, steps in enumerate([1, 5, 2])]
    table = chunks_to_table(chunks)
    assert table.schema.equals(CHUNK_SCHEMA)
    back = chunks_from_table(table.slice(1), "t")  # a sliced table keeps its offsets right
    assert [(c.sequence_id, c.chunk_index) for c in back] == [("s1", 1), ("s2", 2)]
    for got, want in zip(back, chunks[1:]):
        np.testing.assert_array_equal(got.features, want.features)


def test_compatible_types_are_cast_and_extra_columns_ignored():
    table = pa.table({"sequence_id": ["a"], "chunk_index": pa.array([0], pa.int32()),
                      "features": pa.array([[[1.0, 2.0]]], pa.list_(pa.list_(pa.float64()))),
                      "note": ["x"]})
    (chunk,) = chunks_from_table(table, "t")
    assert chunk.features.dtype == np.float32 and chunk.features.shape == (1, 2)


def test_missing_column_is_named():
    table = pa.table({"sequence_id": ["a"], "features": [[[1.0]]]})
    with pytest.raises(ContractError, match="missing column.*chunk_index"):
        chunks_from_table(table, "f.parquet")


def test_ragged_inner_rows_are_refused():
    table = pa.table({"sequence_id": ["a"], "chunk_index": [0],
                      "features": [[[1.0, 2.0], [3.0]]]})
    with pytest.raises(ContractError, match="inner lists of different lengths"):
        chunks_from_table(table, "f.parquet")


def test_states_round_trip():
    names = ("layer0_h", "layer0_c")
    states = [CarriedState(f"s{i}", i + 1, 10 * i,
                           (np.full(4, i, np.float32), np.arange(4, dtype=np.float32)), "fp")
              for i in range(3)]
    table = states_to_table(states, names)
    assert table.schema.equals(state_schema(names))
    back = states_from_table(table, names, "t")
    for got, want in zip(back, states):
        assert (got.sequence_id, got.next_chunk_index, got.steps_seen, got.model_fingerprint) \
            == (want.sequence_id, want.next_chunk_index, want.steps_seen, "fp")
        for a, b in zip(got.tensors, want.tensors):
            np.testing.assert_array_equal(a, b)
