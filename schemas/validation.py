"""Validation of input chunk records: every row of an input file becomes either a
:class:`~schemas.contract.Chunk` or a :class:`~schemas.contract.DeadLetter` with a
stable reason code. Nothing here raises on bad data, so no bad record stops a run
and none reaches the model.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from schemas.contract import Chunk, DeadLetter, rows_flagged, rows_holding

# Stable reason codes of records rejected when read (see README, "Input accounting").
MISSING_COLUMN = "missing_column"          # a record lacks a required column
WRONG_TYPE = "wrong_type"                  # a record's column has a type that cannot hold it
MISSING_SEQUENCE_ID = "missing_sequence_id"  # null or empty sequence_id
INVALID_SEQUENCE_ID = "invalid_sequence_id"  # sequence_id is not valid UTF-8
INVALID_CHUNK_INDEX = "invalid_chunk_index"  # null, negative or >= 2**63 chunk_index
EMPTY_FEATURES = "empty_features"          # null features, or zero steps
NULL_VALUES = "null_values"                # a null step or a null value inside features
RAGGED_FEATURES = "ragged_features"        # steps of different widths
WRONG_INPUT_WIDTH = "wrong_input_width"    # width differs from the model's input width
NON_FINITE = "non_finite"                  # NaN or +-Inf, also after float32 (unless allowed)
INVALID_TOKEN_ID = "invalid_token_id"      # an Embedding model's id is not whole or in range
READ_REASONS = (MISSING_COLUMN, WRONG_TYPE, MISSING_SEQUENCE_ID, INVALID_SEQUENCE_ID,
                INVALID_CHUNK_INDEX, EMPTY_FEATURES, NULL_VALUES, RAGGED_FEATURES,
                WRONG_INPUT_WIDTH, NON_FINITE, INVALID_TOKEN_ID)
# Reasons of input files rejected whole: one dead letter for the file (rows of a damaged
# file read before the damage are kept).
UNREADABLE_FILE = "unreadable_file"        # not Parquet, damaged, empty, not a regular file
WRONG_SCHEMA = "wrong_schema"              # its columns cannot hold the data contract
FILE_REASONS = (UNREADABLE_FILE, WRONG_SCHEMA)

def record_json(record: dict) -> str:
    """A record as JSON for a dead letter: lossless for floats, NaN/Infinity kept."""
    return json.dumps(record, default=str, allow_nan=True)


# Where records come from when the element that held them does not say (a user's
# PCollection of dicts or tables): dead letters name this as their source.
UNNAMED_SOURCE = "pcollection"


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkRows:
    """Chunk records read together: a table with the columns of
    :data:`~schemas.contract.CHUNK_SCHEMA` (as any types: they are validated), where
    they were read, the number of the table's first row there (None if unknown), and
    the milliseconds reading them took (counted in the run report's read stage)."""
    table: pa.Table
    source: str = UNNAMED_SOURCE
    first_row: int | None = 0
    read_ms: int = 0


@dataclasses.dataclass(frozen=True)
class RejectedFile:
    """An input file rejected whole: its dead letter, and the rows it holds as its
    footer says (None when it cannot be read at all)."""
    letter: DeadLetter
    rows: int | None = None


def as_chunk_rows(element: Any) -> ChunkRows | RejectedFile | DeadLetter:
    """One element of a PCollection of chunk records as :class:`ChunkRows`: a
    ``ChunkRows``, an Arrow table or record batch, or one record as a dict (what Beam's
    ``ReadFromParquet`` yields). A rejected file stays one; anything else, or a dict
    Arrow cannot hold, becomes a dead letter."""
    if isinstance(element, (ChunkRows, RejectedFile)):
        return element
    if isinstance(element, pa.RecordBatch):
        element = pa.Table.from_batches([element])
    if isinstance(element, pa.Table):
        return ChunkRows(element, UNNAMED_SOURCE, None)
    if isinstance(element, dict):
        record = {key: value.tolist() if isinstance(value, np.ndarray) else value
                  for key, value in element.items()}
        try:
            return ChunkRows(pa.Table.from_pylist([record]), UNNAMED_SOURCE, None)
        except (pa.ArrowException, TypeError, ValueError) as error:
            message = f"the record's values cannot be read as columns: {error}"
    else:
        message = (f"a chunk record must be a dict, an Arrow table or a record batch, not "
                   f"{type(element).__name__}")
        record = {"element": repr(element)[:10_000]}
    return DeadLetter(UNNAMED_SOURCE, None, None, None, WRONG_TYPE, message,
                      record_json(record))


def rejected_file(url: str, reason: str, message: str, rows: int | None = None
                  ) -> RejectedFile:
    """An input file rejected whole (``reason`` one of :data:`FILE_REASONS`)."""
    return RejectedFile(DeadLetter(url, None, None, None, reason, message,
                                   record_json({"file": url, "rows": rows})), rows)


def chunk_dead_letter(chunk: Chunk, reason: str, message: str) -> DeadLetter:
    """The dead letter of a valid chunk rejected later (duplicate, closed sequence)."""
    return DeadLetter(chunk.source, chunk.row, chunk.sequence_id, chunk.chunk_index, reason,
                      message, record_json({
                          "sequence_id": chunk.sequence_id, "chunk_index": chunk.chunk_index,
                          "features": chunk.features.tolist(), "is_last": chunk.is_last}))


def _is_list(data_type: pa.DataType) -> bool:
    return (pa.types.is_list(data_type) or pa.types.is_large_list(data_type)
            or pa.types.is_fixed_size_list(data_type))


def decoded_type(data_type: pa.DataType) -> pa.DataType:
    """The type of a column's values: a dictionary-encoded column's value type."""
    return data_type.value_type if pa.types.is_dictionary(data_type) else data_type


# What each column of the contract accepts (any encoding Arrow decodes to it), and how
# a message names it.
COLUMN_TYPES: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "sequence_id": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
                    "a string"),
    "chunk_index": (pa.types.is_integer, "an integer type"),
    "features": (lambda t: (_is_list(t) and _is_list(t.value_type)
                            and (pa.types.is_floating(t.value_type.value_type)
                                 or pa.types.is_integer(t.value_type.value_type))),
                 "a list of lists of numbers (list<list<float32>>)"),
    "is_last": (lambda t: pa.types.is_boolean(t) or pa.types.is_null(t), "bool"),
}
REQUIRED_COLUMNS = ("sequence_id", "chunk_index", "features")


def schema_problem(schema: pa.Schema) -> tuple[str, str] | None:
    """Why chunk records of this schema cannot hold the contract, as ``(reason,
    message)`` (:data:`MISSING_COLUMN` or :data:`WRONG_TYPE`); None if they can."""
    for name in COLUMN_TYPES:
        if schema.get_all_field_indices(name)[1:]:
            return WRONG_TYPE, f"column {name} appears more than once"
    missing = [name for name in REQUIRED_COLUMNS if name not in schema.names]
    if missing:
        return MISSING_COLUMN, (f"missing column(s) {', '.join(missing)}; found "
                                f"{', '.join(schema.names) or 'none'}")
    for name, (accepts, expected) in COLUMN_TYPES.items():
        if name in schema.names and not accepts(decoded_type(schema.field(name).type)):
            return WRONG_TYPE, (f"column {name} is {schema.field(name).type}, expected "
                                f"{expected}")
    return None


def _ids_if_readable(table: pa.Table) -> list[str | None]:
    """The sequence ids of records whose schema is wrong, for their dead letters, where
    one text column holds them."""
    fields = table.schema.get_all_field_indices("sequence_id")
    if len(fields) != 1 or not COLUMN_TYPES["sequence_id"][0](
            decoded_type(table.schema.field(fields[0]).type)):
        return [None] * table.num_rows
    return [value if isinstance(value, str) else None
            for value in _texts(table.column(fields[0]))]


def _texts(column: pa.ChunkedArray) -> list[str | bytes | None]:
    """A string column's values; a value that is not valid UTF-8 stays bytes."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        values = column.cast(pa.large_binary()).to_pylist()
    return [value.decode("utf-8") if value is not None and _is_utf8(value) else value
            for value in values]


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _row_record(table: pa.Table, row: int) -> str:
    """Row ``row`` as JSON for its dead letter; bytes that are not UTF-8 escaped."""
    one = table.slice(row, 1)
    try:
        return record_json(one.to_pylist()[0])
    except UnicodeDecodeError:
        text_columns = [COLUMN_TYPES["sequence_id"][0](decoded_type(f.type))
                        for f in one.schema]
        record = {name: (column.cast(pa.large_binary())[0].as_py().decode(
                             "utf-8", "backslashreplace") if text and column[0].is_valid
                         else column[0].as_py())
                  for name, column, text in zip(one.column_names, one.columns, text_columns)}
        return record_json(record)


def _rows_with_nulls(array: pa.Array, bounds: np.ndarray) -> np.ndarray:
    """Which rows hold a null of ``array`` (see :func:`rows_flagged`); without a null
    in it, no per-value flags are made."""
    if not array.null_count:
        return np.zeros(len(bounds) - 1, bool)
    return rows_flagged(array.is_null().to_numpy(zero_copy_only=False), bounds)


# Values checked at once: the check's temporary arrays stay small and are reused.
CHECK_BLOCK_VALUES = 2**20


def _rows_failing(values: np.ndarray, bounds: np.ndarray, passes) -> np.ndarray:
    """Which rows hold a value for which ``passes`` (a numpy ufunc) is False, checked
    a block of values at a time (a whole batch's flags would be as large as its values)."""
    failing = [start + np.flatnonzero(~passes(values[start:start + CHECK_BLOCK_VALUES]))
               for start in range(0, len(values), CHECK_BLOCK_VALUES)]
    return rows_holding(np.concatenate(failing) if failing else np.zeros(0, np.int64),
                        bounds)


def validate_chunks(table: pa.Table, source: str, input_dim: int,
                    allow_non_finite: bool = False, arrived_in_run: str = "",
                    vocabulary: int | None = None, first_row: int | None = 0
                    ) -> tuple[list[Chunk], list[DeadLetter]]:
    """Split rows of chunk records into valid chunks and dead letters.

    Each row gets the first problem found, checked in the order of
    :data:`READ_REASONS`. ``source`` names the file in every dead letter, and each row
    is numbered from ``first_row`` (None: rows are not numbered). Features of any
    numeric type become float32 (the nearest value, as Keras would feed them); one
    beyond float32's range is non-finite. With a ``vocabulary`` (a model that starts
    with an embedding), every value must be a token id: a whole number in
    [0, vocabulary), checked before the conversion.
    """
    rows = table.num_rows
    problems: list[tuple[str, str] | None] = [None] * rows

    def reject(row: int, reason: str, message: str) -> None:
        if problems[row] is None:
            problems[row] = (reason, message)

    whole_table = schema_problem(table.schema)
    if whole_table is not None:
        ids = _ids_if_readable(table)
        letters = [DeadLetter(source, None if first_row is None else first_row + row,
                              ids[row] or None, None, *whole_table, _row_record(table, row))
                   for row in range(rows)]
        return [], letters
    columns = {name: table.column(name) for name in COLUMN_TYPES if name in table.column_names}
    for name, column in columns.items():
        if pa.types.is_dictionary(column.type):
            columns[name] = column.cast(column.type.value_type)

    ids = _texts(columns["sequence_id"])
    indexes = columns["chunk_index"].to_pylist()
    is_last = (columns["is_last"].to_pylist() if "is_last" in columns else [False] * rows)
    for row in range(rows):
        if not ids[row]:
            reject(row, MISSING_SEQUENCE_ID, "sequence_id is null or empty")
        elif isinstance(ids[row], bytes):
            reject(row, INVALID_SEQUENCE_ID, f"sequence_id {ids[row]!r} is not valid UTF-8")
        if indexes[row] is None or not 0 <= indexes[row] < 2**63:
            reject(row, INVALID_CHUNK_INDEX, f"chunk_index is {indexes[row]}; it must be an "
                                             "integer in [0, 2**63)")

    features = columns["features"]
    value_type = decoded_type(features.type).value_type.value_type
    matrix = features.cast(pa.list_(pa.list_(value_type))).combine_chunks()
    outer = matrix.offsets.to_numpy()
    inner = matrix.values.offsets.to_numpy()
    values = matrix.values.values.to_numpy(zero_copy_only=False)
    # Each check runs over the whole table at once, as a count per row of the steps
    # or values that fail it; only rows that fail are looked at one by one.
    value_bounds = inner[outer]  # row r's values are [value_bounds[r], value_bounds[r+1])
    widths = np.diff(inner)
    empty = matrix.is_null().to_numpy(zero_copy_only=False) | (np.diff(outer) == 0)
    has_null = (_rows_with_nulls(matrix.values, outer)
                | _rows_with_nulls(matrix.values.values, value_bounds))
    off_width = rows_flagged(widths != input_dim, outer)
    with np.errstate(invalid="ignore", over="ignore"):
        floats = values.astype(np.float32, copy=False)
        non_finite = (np.zeros(rows, bool) if allow_non_finite
                      else _rows_failing(floats, value_bounds, np.isfinite))
        # Ids are checked as given, and must also survive float32 (2**24 and above may not).
        not_token = (np.zeros(rows, bool) if vocabulary is None else rows_flagged(
            (values != np.floor(values)) | (values < 0) | (values >= vocabulary)
            | (floats != values), value_bounds))
    for row in np.flatnonzero(empty | has_null | off_width | non_finite | not_token):
        row_widths = widths[outer[row]:outer[row + 1]]
        if empty[row]:
            reject(row, EMPTY_FEATURES, "features is null or has no steps")
        elif has_null[row]:
            reject(row, NULL_VALUES, "features holds a null step or value")
        elif (row_widths != row_widths[0]).any():
            reject(row, RAGGED_FEATURES, f"features steps have different widths "
                                         f"({sorted(set(row_widths.tolist()))})")
        elif off_width[row]:
            reject(row, WRONG_INPUT_WIDTH, f"features has width {row_widths[0]}; the "
                                           f"model takes {input_dim}")
        elif non_finite[row]:
            reject(row, NON_FINITE, "features holds NaN or infinite values (or values "
                                    "beyond float32's range)")
        else:
            reject(row, INVALID_TOKEN_ID, "features holds a value that is not a token "
                                          f"id of the model (a whole number in [0, "
                                          f"{vocabulary}))")

    chunks, letters = [], []
    for row in range(rows):
        number = None if first_row is None else first_row + row
        if problems[row] is None:
            chunks.append(Chunk(ids[row], int(indexes[row]),
                                floats[value_bounds[row]:value_bounds[row + 1]].reshape(
                                    -1, input_dim),
                                bool(is_last[row]), arrived_in_run, source, number))
        else:
            reason, message = problems[row]
            index = (indexes[row] if indexes[row] is not None and 0 <= indexes[row] < 2**63
                     else None)
            sequence_id = ids[row] if isinstance(ids[row], str) and ids[row] else None
            letters.append(DeadLetter(source, number, sequence_id, index, reason, message,
                                      _row_record(table, row)))
    return chunks, letters
