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

from schemas.contract import Chunk, DeadLetter, rows_flagged

# Stable reason codes of records rejected when read (see README, "Input accounting").
MISSING_COLUMN = "missing_column"          # the file lacks a required column
WRONG_TYPE = "wrong_type"                  # a column has a type that cannot hold the data
MISSING_SEQUENCE_ID = "missing_sequence_id"  # null or empty sequence_id
INVALID_CHUNK_INDEX = "invalid_chunk_index"  # null or negative chunk_index
EMPTY_FEATURES = "empty_features"          # null features, or zero steps
NULL_VALUES = "null_values"                # a null step or a null value inside features
RAGGED_FEATURES = "ragged_features"        # steps of different widths
WRONG_INPUT_WIDTH = "wrong_input_width"    # width differs from the model's input width
NON_FINITE = "non_finite"                  # NaN or +-Inf (unless allowed)
INVALID_TOKEN_ID = "invalid_token_id"      # an Embedding model's id is not whole or in range
UNREADABLE_FILE = "unreadable_file"        # not Parquet, damaged or empty: the file as one
READ_REASONS = (MISSING_COLUMN, WRONG_TYPE, MISSING_SEQUENCE_ID, INVALID_CHUNK_INDEX,
                EMPTY_FEATURES, NULL_VALUES, RAGGED_FEATURES, WRONG_INPUT_WIDTH, NON_FINITE,
                INVALID_TOKEN_ID, UNREADABLE_FILE)

_FLOAT32_MATRIX = pa.list_(pa.list_(pa.float32()))


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
    they were read, and the number of the table's first row there (None if unknown)."""
    table: pa.Table
    source: str = UNNAMED_SOURCE
    first_row: int | None = 0


def as_chunk_rows(element: Any) -> ChunkRows | DeadLetter:
    """One element of a PCollection of chunk records as :class:`ChunkRows`: a
    ``ChunkRows``, an Arrow table or record batch, or one record as a dict (what Beam's
    ``ReadFromParquet`` yields). A dead letter (an unreadable file) stays one; anything
    else, or a dict Arrow cannot hold, becomes one."""
    if isinstance(element, (ChunkRows, DeadLetter)):
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


def file_dead_letter(url: str, message: str) -> DeadLetter:
    """The dead letter of an input file that cannot be read as Parquet (its rows are
    unknown: it counts as one record read and rejected)."""
    return DeadLetter(url, None, None, None, UNREADABLE_FILE, message,
                      record_json({"file": url}))


def chunk_dead_letter(chunk: Chunk, reason: str, message: str) -> DeadLetter:
    """The dead letter of a valid chunk rejected later (duplicate, closed sequence)."""
    return DeadLetter(chunk.source, chunk.row, chunk.sequence_id, chunk.chunk_index, reason,
                      message, record_json({
                          "sequence_id": chunk.sequence_id, "chunk_index": chunk.chunk_index,
                          "features": chunk.features.tolist(), "is_last": chunk.is_last}))


def _is_numeric_matrix(data_type: pa.DataType) -> bool:
    def is_list(t):
        return pa.types.is_list(t) or pa.types.is_large_list(t)
    return (is_list(data_type) and is_list(data_type.value_type)
            and (pa.types.is_floating(data_type.value_type.value_type)
                 or pa.types.is_integer(data_type.value_type.value_type)))


def validate_chunks(table: pa.Table, source: str, input_dim: int,
                    allow_non_finite: bool = False, arrived_in_run: str = "",
                    vocabulary: int | None = None, first_row: int | None = 0
                    ) -> tuple[list[Chunk], list[DeadLetter]]:
    """Split rows of an input file into valid chunks and dead letters.

    Each row gets the first problem found, checked in the order of
    :data:`READ_REASONS`. ``source`` names the file in every dead letter, and each row
    is numbered from ``first_row`` (None: rows are not numbered). With a
    ``vocabulary`` (a model that starts with an embedding), every value must be a
    token id: a whole number in [0, vocabulary).
    """
    rows = table.num_rows
    problems: list[tuple[str, str] | None] = [None] * rows

    def reject(row: int, reason: str, message: str) -> None:
        if problems[row] is None:
            problems[row] = (reason, message)

    def reject_all(reason: str, message: str) -> None:
        for row in range(rows):
            reject(row, reason, message)

    def column(name: str, accepts: Callable[[pa.DataType], bool], expected: str):
        if name not in table.column_names:
            return None
        data_type = table.schema.field(name).type
        if not accepts(data_type):
            reject_all(WRONG_TYPE, f"column {name} is {data_type}, expected {expected}")
            return None
        return table.column(name)

    missing = [n for n in ("sequence_id", "chunk_index", "features")
               if n not in table.column_names]
    if missing:
        reject_all(MISSING_COLUMN, f"missing column(s) {', '.join(missing)}; found "
                                   f"{', '.join(table.column_names) or 'none'}")
    ids = column("sequence_id", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
                 "string")
    indexes = column("chunk_index", pa.types.is_integer, "int64")
    features = column("features", _is_numeric_matrix, "list<list<float32>>")
    is_last = column("is_last", pa.types.is_boolean, "bool")

    ids = ids.to_pylist() if ids is not None else [None] * rows
    indexes = indexes.to_pylist() if indexes is not None else [None] * rows
    is_last = is_last.to_pylist() if is_last is not None else [False] * rows
    for row in range(rows):
        if not ids[row]:
            reject(row, MISSING_SEQUENCE_ID, "sequence_id is null or empty")
        if indexes[row] is None or indexes[row] < 0:
            reject(row, INVALID_CHUNK_INDEX, f"chunk_index is {indexes[row]}; it must be an "
                                             "integer >= 0")

    matrices: list[np.ndarray | None] = [None] * rows
    if features is not None:
        matrix = features.cast(_FLOAT32_MATRIX).combine_chunks()
        outer = matrix.offsets.to_numpy()
        inner = matrix.values.offsets.to_numpy()
        values = matrix.values.values.to_numpy(zero_copy_only=False)
        # Each check runs over the whole file at once, as a count per row of the steps
        # or values that fail it; only rows that fail are looked at one by one.
        value_bounds = inner[outer]  # row r's values are [value_bounds[r], value_bounds[r+1])
        widths = np.diff(inner)
        empty = matrix.is_null().to_numpy(zero_copy_only=False) | (np.diff(outer) == 0)
        has_null = (rows_flagged(matrix.values.is_null().to_numpy(zero_copy_only=False),
                                  outer)
                    | rows_flagged(matrix.values.values.is_null().to_numpy(
                        zero_copy_only=False), value_bounds))
        off_width = rows_flagged(widths != input_dim, outer)
        with np.errstate(invalid="ignore"):
            non_finite = (np.zeros(rows, bool) if allow_non_finite
                          else rows_flagged(~np.isfinite(values), value_bounds))
            not_token = (np.zeros(rows, bool) if vocabulary is None else rows_flagged(
                (values != np.floor(values)) | (values < 0) | (values >= vocabulary),
                value_bounds))
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
                reject(row, NON_FINITE, "features holds NaN or infinite values")
            else:
                reject(row, INVALID_TOKEN_ID, "features holds a value that is not a token "
                                              f"id of the model (a whole number in [0, "
                                              f"{vocabulary}))")
        for row in range(rows):
            if problems[row] is None:
                matrices[row] = values[value_bounds[row]:value_bounds[row + 1]].reshape(
                    -1, input_dim)

    chunks, letters = [], []
    for row in range(rows):
        number = None if first_row is None else first_row + row
        if problems[row] is None:
            chunks.append(Chunk(ids[row], int(indexes[row]), matrices[row],
                                bool(is_last[row]), arrived_in_run, source, number))
        else:
            reason, message = problems[row]
            index = indexes[row] if isinstance(indexes[row], int) else None
            letters.append(DeadLetter(source, number, ids[row] or None, index, reason, message,
                                      record_json(table.slice(row, 1).to_pylist()[0])))
    return chunks, letters
