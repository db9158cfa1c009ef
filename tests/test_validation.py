"""Every input row becomes a chunk or a dead letter with the right reason code."""
import json
import math

import numpy as np
import pyarrow as pa

from schemas import chunks_to_table
from schemas import validation as v
from schemas.contract import Chunk


def validate(table, **options):
    return v.validate_chunks(table, "in.parquet", input_dim=2, **options)


def rows(*records, is_last=None):
    columns = {"sequence_id": [r[0] for r in records], "chunk_index": [r[1] for r in records],
               "features": pa.array([r[2] for r in records],
                                    pa.list_(pa.list_(pa.float64())))}
    if is_last is not None:
        columns["is_last"] = is_last
    return pa.table(columns)


def test_each_bad_row_gets_its_reason_and_good_rows_become_chunks():
    table = rows(("ok", 0, [[1.0, 2.0], [3.0, 4.0]]),
                 (None, 1, [[1.0, 2.0]]),
                 ("", 1, [[1.0, 2.0]]),
                 ("a", -1, [[1.0, 2.0]]),
                 ("a", None, [[1.0, 2.0]]),
                 ("a", 2, []),
                 ("a", 3, None),
                 ("a", 4, [[1.0, None]]),
                 ("a", 5, [[1.0, 2.0], [3.0]]),
                 ("a", 6, [[1.0, 2.0, 3.0]]),
                 ("a", 7, [[math.nan, 1.0]]),
                 ("a", 8, [[math.inf, 1.0]]),
                 is_last=[True, False, False, False, False, False, False, False, False, False,
                          False, None])
    chunks, letters = validate(table, arrived_in_run="r1")
    assert [(c.sequence_id, c.chunk_index, c.is_last, c.arrived_in_run, c.row)
            for c in chunks] == [("ok", 0, True, "r1", 0)]
    np.testing.assert_array_equal(chunks[0].features, [[1, 2], [3, 4]])
    assert [(d.row, d.reason) for d in letters] == [
        (1, v.MISSING_SEQUENCE_ID), (2, v.MISSING_SEQUENCE_ID), (3, v.INVALID_CHUNK_INDEX),
        (4, v.INVALID_CHUNK_INDEX), (5, v.EMPTY_FEATURES), (6, v.EMPTY_FEATURES),
        (7, v.NULL_VALUES), (8, v.RAGGED_FEATURES), (9, v.WRONG_INPUT_WIDTH),
        (10, v.NON_FINITE), (11, v.NON_FINITE)]
    assert all(d.source == "in.parquet" and d.message for d in letters)
    ragged = next(d for d in letters if d.reason == v.RAGGED_FEATURES)
    assert (ragged.sequence_id, ragged.chunk_index) == ("a", 5)
    assert json.loads(ragged.record)["features"] == [[1.0, 2.0], [3.0]]
    assert json.loads(letters[9].record)["features"][0][0] != 1.0  # NaN survives as NaN


def test_non_finite_values_are_accepted_when_allowed():
    chunks, letters = validate(rows(("a", 0, [[math.nan, 1.0]])), allow_non_finite=True)
    assert len(chunks) == 1 and not letters and np.isnan(chunks[0].features[0, 0])


def test_a_missing_or_mistyped_column_rejects_every_row_of_the_file():
    _, letters = validate(pa.table({"sequence_id": ["a", "b"], "features": [[[1.0, 2.0]]] * 2}))
    assert {d.reason for d in letters} == {v.MISSING_COLUMN} and len(letters) == 2
    assert "chunk_index" in letters[0].message
    mistyped = pa.table({"sequence_id": ["a"], "chunk_index": ["zero"],
                         "features": [[[1.0, 2.0]]]})
    (letter,) = validate(mistyped)[1]
    assert letter.reason == v.WRONG_TYPE and "chunk_index is string" in letter.message
    numeric_ids = pa.table({"sequence_id": [7], "chunk_index": [0], "features": [[[1.0, 2.0]]]})
    assert validate(numeric_ids)[1][0].reason == v.WRONG_TYPE


def test_written_chunks_validate_back_to_themselves():
    chunk = Chunk("a", 3, np.arange(6, dtype=np.float32).reshape(3, 2), True)
    (back,), letters = validate(chunks_to_table([chunk]))
    assert not letters and back.digest == chunk.digest


def test_good_rows_between_bad_ones_keep_their_own_steps():
    # Checks run over the whole file at once: each row must see only its own values.
    good = [[[1.0, 2.0]], [[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], [[9.0, 10.0]] * 2]
    table = pa.concat_tables([
        rows(("a", 0, good[0]), ("a", 1, [[1.0, None]]), ("a", 2, [])),
        rows(("b", 0, [[1.0], [2.0, 3.0]]), ("b", 1, good[1]), ("b", 2, [[math.nan, 0.0]])),
        rows(("c", 0, [[1.0, 2.0, 3.0]] * 2), ("c", 1, good[2]))])
    chunks, letters = validate(table)
    assert [(c.sequence_id, c.chunk_index, c.row) for c in chunks] == [
        ("a", 0, 0), ("b", 1, 4), ("c", 1, 7)]
    for chunk, expected in zip(chunks, good):
        np.testing.assert_array_equal(chunk.features, expected)
    assert [d.reason for d in letters] == [v.NULL_VALUES, v.EMPTY_FEATURES,
                                           v.RAGGED_FEATURES, v.NON_FINITE,
                                           v.WRONG_INPUT_WIDTH]
