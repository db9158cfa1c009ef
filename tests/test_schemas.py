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
    assert [c.is_last for c in back] == [False, False]


def test_pending_chunks_round_trip_with_their_provenance():
    chunks = [Chunk("a", 4, np.ones((2, 3), np.float32), True, "run-1", "in.parquet", 7)]
    (back,) = chunks_from_table(chunks_to_table(chunks, pending=True), "t", pending=True)
    assert (back.is_last, back.arrived_in_run, back.source, back.row) == \
        (True, "run-1", "in.parquet", 7)
    assert back.digest == chunks[0].digest != Chunk("a", 4, np.ones((2, 3)), False).digest


def test_missing_column_is_named():
    table = pa.table({"sequence_id": ["a"], "features": [[[1.0]]]})
    with pytest.raises(ContractError, match="missing column.*chunk_index"):
        chunks_from_table(table, "f.parquet")


def test_a_matrix_with_steps_of_different_widths_is_named_by_row():
    table = chunks_to_table([Chunk("a", 0, np.ones((2, 3), np.float32))]).set_column(
        2, "features", pa.array([[[1.0, 2.0], [3.0]]], pa.list_(pa.list_(pa.float32()))))
    ok = chunks_to_table([Chunk("b", 0, np.ones((1, 1), np.float32))])
    with pytest.raises(ContractError, match="f.parquet column features: row 1 has inner "
                                            "lists of different lengths"):
        chunks_from_table(pa.concat_tables([ok, table.cast(ok.schema)]), "f.parquet")


def test_states_round_trip():
    names = ("layer0_h", "layer0_c")
    states = [CarriedState(f"s{i}", i + 1, 10 * i,
                           (np.full(4, i, np.float32), np.arange(4, dtype=np.float32)), "fp",
                           bytes([i]) * 8 * i, i == 2, 3 + i, 1_700_000_000 + i)
              for i in range(3)]
    table = states_to_table(states, names)
    assert table.schema.equals(state_schema(names))
    back = states_from_table(table, names, "t")
    for got, want in zip(back, states):
        fields = ("sequence_id", "next_chunk_index", "steps_seen", "model_fingerprint",
                  "applied_digests", "closed", "last_run_number", "last_touched_at")
        assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
        for a, b in zip(got.tensors, want.tensors):
            np.testing.assert_array_equal(a, b)
