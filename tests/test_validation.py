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


def test_every_valid_encoding_is_accepted_as_the_same_chunks():
    steps = [[1.0, 2.0], [3.0, 4.0]]
    expected = Chunk("a", 0, np.array(steps, np.float32))
    encodings = {
        "dictionary ids (a pandas categorical)": {"sequence_id": pa.array(["a"]).dictionary_encode()},
        "large_string ids": {"sequence_id": pa.array(["a"], pa.large_string())},
        "uint8 chunk_index": {"chunk_index": pa.array([0], pa.uint8())},
        "uint64 chunk_index": {"chunk_index": pa.array([0], pa.uint64())},
        "null-typed is_last": {"is_last": pa.nulls(1)},
        "float16 features": {"features": pa.array([steps], pa.list_(pa.list_(pa.float16())))},
        "int32 features": {"features": pa.array([steps], pa.list_(pa.list_(pa.int32())))},
        "large and fixed-size lists": {"features": pa.array(
            [steps], pa.large_list(pa.list_(pa.float64(), 2)))},
    }
    for name, columns in encodings.items():
        table = pa.table({"sequence_id": ["a"], "chunk_index": [0],
                          "features": pa.array([steps], pa.list_(pa.list_(pa.float64()))),
                          **columns})
        assert v.schema_problem(table.schema) is None, name
        (chunk,), letters = validate(table)
        assert not letters and chunk.sequence_id == "a" and chunk.digest == expected.digest, name


def test_values_arrow_cannot_convert_are_dead_letters_not_errors():
    ids = pa.array([b"\xff\xfe", b"ok", b"ok", b"ok"], pa.binary()).view(pa.string())
    table = pa.table({
        "sequence_id": ids,
        "chunk_index": pa.array([0, 2**63, 2**64 - 1, 1], pa.uint64()),
        "features": pa.array([[[1, 2]]] * 3 + [[[2**24 + 1, -(2**40)]]],
                             pa.list_(pa.list_(pa.int64())))})
    chunks, letters = validate(table)
    assert [(d.row, d.reason, d.chunk_index) for d in letters] == [
        (0, v.INVALID_SEQUENCE_ID, 0), (1, v.INVALID_CHUNK_INDEX, None),
        (2, v.INVALID_CHUNK_INDEX, None)]
    assert "\\xff\\xfe" in json.loads(letters[0].record)["sequence_id"]
    # Integers become the nearest float32, as Keras would feed them.
    (chunk,) = chunks
    np.testing.assert_array_equal(chunk.features, [[2.0**24, -(2.0**40)]])
    assert validate(pa.table({"sequence_id": ["a"], "chunk_index": [0], "features": pa.array(
        [[[1e300, 0.0]]], pa.list_(pa.list_(pa.float64())))}))[1][0].reason == v.NON_FINITE


def test_token_ids_are_checked_before_float32_could_round_them():
    table = pa.table({"sequence_id": ["a", "b", "c"], "chunk_index": [0, 0, 0],
                      "features": pa.array([[[2**24]], [[2**24 + 1]], [[2**25]]],
                                           pa.list_(pa.list_(pa.int64())))})
    chunks, letters = v.validate_chunks(table, "in.parquet", input_dim=1,
                                        vocabulary=2**25)
    assert [c.sequence_id for c in chunks] == ["a"]
    assert [(d.sequence_id, d.reason) for d in letters] == [("b", v.INVALID_TOKEN_ID),
                                                            ("c", v.INVALID_TOKEN_ID)]


def test_a_schema_that_cannot_hold_the_contract_is_named_once():
    features = pa.array([[[1.0, 2.0]]])
    cases = {
        "column sequence_id appears more than once": pa.Table.from_arrays(
            [pa.array(["a"]), pa.array(["b"]), pa.array([0]), features],
            names=["sequence_id", "sequence_id", "chunk_index", "features"]),
        "column sequence_id is list<item: string>, expected a string": pa.table(
            {"sequence_id": [["a"]], "chunk_index": [0], "features": features}),
        "column sequence_id is struct<a: int64>, expected a string": pa.table(
            {"sequence_id": [{"a": 1}], "chunk_index": [0], "features": features}),
        "column chunk_index is double, expected an integer type": pa.table(
            {"sequence_id": ["a"], "chunk_index": [0.0], "features": features}),
        "column features is list<item: double>, expected a list of lists": pa.table(
            {"sequence_id": ["a"], "chunk_index": [0], "features": [[1.0, 2.0]]}),
    }
    for message, table in cases.items():
        reason, said = v.schema_problem(table.schema)
        assert reason == v.WRONG_TYPE and said.startswith(message), said
        _, letters = validate(table)  # records of a PCollection: each row its letter
        assert [d.reason for d in letters] == [v.WRONG_TYPE]


def test_files_that_cannot_be_read_or_cannot_hold_the_contract_are_rejected_whole(tmp_path):
    import os
    import threading

    import pyarrow.parquet as pq

    from transforms.dofns import ReadParquetBatches

    good = chunks_to_table([Chunk("a", 0, np.ones((2, 2), np.float32))])
    sink = pa.BufferOutputStream()
    pq.write_table(good, sink)
    parquet = sink.getvalue().to_pybytes()
    files = {"empty.parquet": b"", "text.parquet": b"not parquet " * 20,
             "magic_only.parquet": b"PAR1PAR1", "truncated.parquet": parquet[:-20]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    os.mkfifo(tmp_path / "fifo.parquet")  # opening it would wait for a writer forever
    pq.write_table(pa.table({"sequence_id": list(range(5)), "chunk_index": [0] * 5,
                             "features": [[[1.0, 2.0]]] * 5}), tmp_path / "int_ids.parquet")
    pq.write_table(good, tmp_path / "good.parquet")

    def read(name):
        got = []
        reader = threading.Thread(target=lambda: got.extend(
            ReadParquetBatches().process(str(tmp_path / name))), daemon=True)
        reader.start()
        reader.join(timeout=30)
        assert not reader.is_alive(), f"reading {name} hangs"
        return got

    for name in [*files, "fifo.parquet"]:
        (rejected,) = read(name)
        assert isinstance(rejected, v.RejectedFile), name
        assert (rejected.letter.reason, rejected.rows) == (v.UNREADABLE_FILE, None), name
        assert rejected.letter.source == str(tmp_path / name) in rejected.letter.message
    assert "not a regular file" in read("fifo.parquet")[0].letter.message
    (wrong,) = read("int_ids.parquet")
    assert (wrong.letter.reason, wrong.rows) == (v.WRONG_SCHEMA, 5)
    assert "column sequence_id is int64, expected a string" in wrong.letter.message
    assert json.loads(wrong.letter.record) == {"file": str(tmp_path / "int_ids.parquet"),
                                               "rows": 5}
    (rows,) = read("good.parquet")
    assert rows.table.equals(good) and rows.first_row == 0
