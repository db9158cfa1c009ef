"""Generated input for the fuzz test: good chunk files in any valid encoding, mixed with
damaged files, files of the wrong schema and files of bad records, each with what the
run must make of it.

Bad data never uses a good sequence's id, so the good sequences can be checked
exactly against the whole-sequence oracle whatever happens to the rest.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import Chunk, chunks_to_table
from schemas import validation as v

MATRIX64 = pa.list_(pa.list_(pa.float64()))


@dataclasses.dataclass
class Expected:
    """What a run must make of one input file: rejected whole with ``file_reason``,
    or its rows read, ``row_reasons`` giving the dead-letter reason of each bad row;
    ``anything`` for a damaged file (any of the two, as long as it is accounted for)."""
    file_reason: str | None = None
    rows: int | None = None
    row_reasons: dict[int, str] = dataclasses.field(default_factory=dict)
    anything: bool = False


def encode_good(table: pa.Table, rng: np.random.Generator) -> pa.Table:
    """The same chunks in a random valid encoding (values unchanged)."""
    columns = dict(zip(table.column_names, table.columns))
    ids = columns["sequence_id"]
    columns["sequence_id"] = [ids, ids.cast(pa.large_string()),
                              ids.dictionary_encode()][rng.integers(3)]
    columns["chunk_index"] = columns["chunk_index"].cast(
        [pa.int64(), pa.uint32(), pa.int16(), pa.uint64()][rng.integers(4)])
    features = columns["features"]
    width = len(features[0][0]) if len(features) else 1
    columns["features"] = features.cast([
        pa.list_(pa.list_(pa.float32())), MATRIX64,
        pa.large_list(pa.list_(pa.float64(), width)),
    ][rng.integers(3)])
    choice = rng.integers(3)
    if choice == 0:
        del columns["is_last"]
    elif choice == 1 and not pa.compute.any(columns["is_last"]).as_py():
        columns["is_last"] = pa.nulls(len(table))  # Arrow's null type: all unknown
    return pa.table(columns)


def _junk_rows(rng: np.random.Generator, rows: int, width: int) -> list[tuple]:
    return [(f"junk-{rng.integers(1000)}", int(rng.integers(0, 5)),
             rng.normal(size=(int(rng.integers(1, 4)), width)).tolist())
            for _ in range(rows)]


def _rows_table(rows: list[tuple]) -> pa.Table:
    return pa.table({"sequence_id": [r[0] for r in rows],
                     "chunk_index": pa.array([r[1] for r in rows], pa.int64()),
                     "features": pa.array([r[2] for r in rows], MATRIX64)})


# One defect per row, and the reason it must be rejected with.
def _bad_row(rng: np.random.Generator, width: int) -> tuple[dict, str]:
    steps = rng.normal(size=(2, width)).tolist()
    kinds = [
        ({"sequence_id": None}, v.MISSING_SEQUENCE_ID),
        ({"sequence_id": ""}, v.MISSING_SEQUENCE_ID),
        ({"sequence_id": b"\xff\xfejunk"}, v.INVALID_SEQUENCE_ID),
        ({"chunk_index": None}, v.INVALID_CHUNK_INDEX),
        ({"chunk_index": -int(rng.integers(1, 10))}, v.INVALID_CHUNK_INDEX),
        ({"chunk_index": 2**63 + int(rng.integers(100))}, v.INVALID_CHUNK_INDEX),
        ({"features": None}, v.EMPTY_FEATURES),
        ({"features": []}, v.EMPTY_FEATURES),
        ({"features": [steps[0], None]}, v.NULL_VALUES),
        ({"features": [[None] + steps[0][1:]]}, v.NULL_VALUES),
        ({"features": [steps[0], steps[1][:-1] or [1.0, 2.0]]}, v.RAGGED_FEATURES),
        ({"features": [steps[0] + [1.0]]}, v.WRONG_INPUT_WIDTH),
        ({"features": [[float("nan")] + steps[0][1:]]}, v.NON_FINITE),
        ({"features": [[float("-inf")] + steps[0][1:]]}, v.NON_FINITE),
        ({"features": [[1e300] + steps[0][1:]]}, v.NON_FINITE),  # beyond float32
    ]
    change, reason = kinds[rng.integers(len(kinds))]
    row = {"sequence_id": f"junk-{rng.integers(1000)}", "chunk_index": 0,
           "features": steps, **change}
    return row, reason


def bad_records(rng: np.random.Generator, width: int) -> tuple[pa.Table, Expected]:
    """A file of the right schema whose rows are bad ones mixed with valid junk."""
    rows, expected = [], Expected()
    for number in range(int(rng.integers(1, 12))):
        if rng.random() < 0.6:
            row, reason = _bad_row(rng, width)
            expected.row_reasons[number] = reason
        else:
            (row,) = [dict(zip(("sequence_id", "chunk_index", "features"), r))
                      for r in _junk_rows(rng, 1, width)]
        rows.append(row)
    ids = pa.array([r["sequence_id"].encode() if isinstance(r["sequence_id"], str)
                    else r["sequence_id"] for r in rows], pa.binary()).view(pa.string())
    table = pa.table({"sequence_id": ids,
                      "chunk_index": pa.array([None if r["chunk_index"] is None
                                               else r["chunk_index"] % 2**64 for r in rows],
                                              pa.uint64()),
                      "features": pa.array([r["features"] for r in rows], MATRIX64)})
    if all(r["chunk_index"] is None or 0 <= r["chunk_index"] < 2**63 for r in rows):
        table = table.set_column(1, "chunk_index", table.column(1).cast(pa.int64()))
    else:  # uint64 holds 2**63 and above, and negatives wrap to them too
        for number, row in enumerate(rows):
            if row["chunk_index"] is not None and row["chunk_index"] < 0:
                expected.row_reasons.setdefault(number, v.INVALID_CHUNK_INDEX)
    return table, expected


_WRONG_TYPES = [
    pa.array([1], pa.int64()), pa.array([1.5]), pa.array(["x"]), pa.array([b"x"]),
    pa.array([["x"]]), pa.array([{"a": 1}]), pa.array([True]), pa.nulls(1),
    pa.array([[1.0, 2.0]]), pa.array([[["x"]]]),
]


def wrong_schema(rng: np.random.Generator, width: int) -> tuple[pa.Table, Expected]:
    """A table whose columns cannot hold the contract (at least one problem)."""
    rows = int(rng.integers(1, 6))
    good = _rows_table(_junk_rows(rng, rows, width))
    columns: dict[str, pa.Array] = {}
    broken = False
    for name in ("sequence_id", "chunk_index", "features", "is_last"):
        choice = rng.integers(4)
        if choice == 0 and name != "is_last":  # missing
            broken = True
            continue
        if choice == 1:
            wrong = _WRONG_TYPES[rng.integers(len(_WRONG_TYPES))]
            column = pa.concat_arrays([wrong] * rows)
            if v.COLUMN_TYPES[name][0](column.type):
                column = pa.array([None] * rows, pa.struct([("z", pa.int8())]))
            columns[name] = column
            broken = True
        elif name in good.column_names:
            columns[name] = good.column(name)
    if not broken:
        columns["chunk_index"] = pa.array([0.5] * rows)
    names, arrays = list(columns), list(columns.values())
    if rng.random() < 0.2 and names:  # a duplicate column name
        names.append(names[0])
        arrays.append(arrays[0])
    if rng.random() < 0.5:
        names.append("extra")
        arrays.append(pa.array(range(rows)))
    if not arrays:
        names, arrays = ["other"], [pa.array(range(rows))]
    table = pa.Table.from_arrays(arrays, names=names)
    assert v.schema_problem(table.schema) is not None
    return table, Expected(file_reason=v.WRONG_SCHEMA, rows=rows)


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def damaged(rng: np.random.Generator, width: int) -> tuple[bytes, Expected]:
    """Bytes that are no Parquet file, or a junk file cut short or with bytes changed."""
    data = table_bytes(_rows_table(_junk_rows(rng, int(rng.integers(1, 20)), width)))
    kind = rng.integers(6)
    if kind == 0:
        return b"", Expected(file_reason=v.UNREADABLE_FILE)
    if kind == 1:
        return rng.bytes(int(rng.integers(1, 4000))), Expected(file_reason=v.UNREADABLE_FILE)
    if kind == 2:
        return b"PAR1" + rng.bytes(int(rng.integers(0, 64))) + b"PAR1", Expected(
            file_reason=v.UNREADABLE_FILE)
    if kind == 3:
        return data[:int(rng.integers(0, len(data) - 8))], Expected(
            file_reason=v.UNREADABLE_FILE)  # the footer is gone
    changed = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        changed[int(rng.integers(len(changed)))] = int(rng.integers(256))
    return bytes(changed), Expected(anything=True)


def write_bad_files(directory: str, count: int, width: int, rng: np.random.Generator
                    ) -> dict[str, Expected]:
    """``count`` bad input files in ``directory`` (and a FIFO); returns each file's
    expected fate by path."""
    os.makedirs(directory, exist_ok=True)
    expected: dict[str, Expected] = {}
    fifo = os.path.join(directory, "fifo.parquet")
    os.mkfifo(fifo)
    expected[fifo] = Expected(file_reason=v.UNREADABLE_FILE)
    for number in range(count - 1):
        path = os.path.join(directory, f"bad-{number:04d}.parquet")
        kind = rng.integers(3)
        if kind == 0:
            data, expected[path] = damaged(rng, width)
            with open(path, "wb") as handle:
                handle.write(data)
            continue
        table, expected[path] = (wrong_schema if kind == 1 else bad_records)(rng, width)
        pq.write_table(table, path)
    return expected


def write_good_files(directory: str, chunks: list[Chunk], rng: np.random.Generator) -> None:
    """Good chunks over a few files, each file in its own valid encoding."""
    os.makedirs(directory, exist_ok=True)
    order = rng.permutation(len(chunks))
    for number, part in enumerate(np.array_split(order, 3)):
        if len(part):
            table = chunks_to_table([chunks[i] for i in part])
            pq.write_table(encode_good(table, rng),
                           os.path.join(directory, f"good-{number}.parquet"))
