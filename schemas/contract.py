"""The data contract: Arrow schemas of every file seqcarry reads or writes, the
in-memory records they hold, and conversions between the two.

Nothing here imports Beam or TensorFlow: these are plain data shapes.

Matrices (a chunk's ``features`` [steps, input_dim], its ``outputs``
[steps, output_dim]) are stored as ``list<list<float32>>``; state vectors as
``list<float32>``. Conversions go through Arrow offsets and numpy, never through
Python lists of floats, so large chunks stay cheap.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1

_MATRIX = pa.list_(pa.list_(pa.float32()))
_VECTOR = pa.list_(pa.float32())

CHUNK_SCHEMA = pa.schema([
    pa.field("sequence_id", pa.string(), nullable=False),
    pa.field("chunk_index", pa.int64(), nullable=False),
    pa.field("features", _MATRIX, nullable=False),
])
"""Input chunks: one row per chunk of one sequence, ``features`` [steps, input_dim]."""

OUTPUT_SCHEMA = pa.schema([
    pa.field("sequence_id", pa.string(), nullable=False),
    pa.field("chunk_index", pa.int64(), nullable=False),
    pa.field("outputs", _MATRIX, nullable=False),
])
"""Per-step model outputs: one row per applied chunk, ``outputs`` [steps, output_dim]."""


def state_schema(state_names: Sequence[str]) -> pa.Schema:
    """Schema of a state snapshot file for a model whose carried state has these parts.

    One row per live sequence; one ``list<float32>`` column per state part
    (``layer0_h``, ``layer0_c``, ...), in the model's order.
    """
    return pa.schema(
        [pa.field("sequence_id", pa.string(), nullable=False),
         pa.field("next_chunk_index", pa.int64(), nullable=False),
         pa.field("steps_seen", pa.int64(), nullable=False)]
        + [pa.field(name, _VECTOR, nullable=False) for name in state_names]
        + [pa.field("model_fingerprint", pa.string(), nullable=False)]
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Chunk:
    """One chunk of one sequence: ``features`` is float32 [steps, input_dim]."""
    sequence_id: str
    chunk_index: int
    features: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.features.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class CarriedState:
    """A sequence's recurrent state after ``steps_seen`` steps.

    ``tensors`` holds one float32 vector per state part of the model, in the
    model's ``state_names`` order. ``next_chunk_index`` is the chunk that must be
    applied next.
    """
    sequence_id: str
    next_chunk_index: int
    steps_seen: int
    tensors: tuple[np.ndarray, ...]
    model_fingerprint: str


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkOutput:
    """The model's per-step outputs for one applied chunk: float32 [steps, output_dim]."""
    sequence_id: str
    chunk_index: int
    outputs: np.ndarray


class ContractError(ValueError):
    """A file does not follow the data contract (missing column, wrong type, bad shape)."""


def matrix_array(matrices: Sequence[np.ndarray]) -> pa.Array:
    """``list<list<float32>>`` array from 2-D arrays that share their second dimension."""
    if not matrices:
        return pa.array([], type=_MATRIX)
    width = int(matrices[0].shape[1])
    rows = np.fromiter((m.shape[0] for m in matrices), dtype=np.int64, count=len(matrices))
    outer_offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    inner_offsets = (np.arange(outer_offsets[-1] + 1, dtype=np.int64) * width).astype(np.int32)
    values = pa.array(np.concatenate([np.asarray(m, np.float32).reshape(-1) for m in matrices]))
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), values)
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner)


def matrices_from_array(column: pa.Array | pa.ChunkedArray, what: str) -> list[np.ndarray]:
    """Inverse of :func:`matrix_array`: one float32 [rows, width] array per row.

    Raises :class:`ContractError` for a row whose inner lists differ in length or
    that holds nulls; ``what`` names the column in that message.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count or column.values.null_count or column.values.values.null_count:
        raise ContractError(f"{what}: null values are not allowed")
    outer = column.offsets.to_numpy()
    inner = column.values.offsets.to_numpy()
    values = column.values.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    matrices = []
    for row in range(len(column)):
        first, last = outer[row], outer[row + 1]
        row_lengths = np.diff(inner[first:last + 1])
        width = int(row_lengths[0]) if len(row_lengths) else 0
        if np.any(row_lengths != width):
            raise ContractError(f"{what}: row {row} has inner lists of different lengths")
        matrices.append(values[inner[first]:inner[last]].reshape(last - first, width))
    return matrices


def conform(table: pa.Table, schema: pa.Schema, source: str) -> pa.Table:
    """Select and cast ``table``'s columns to ``schema``, or say clearly what is wrong."""
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ContractError(
            f"{source}: missing column(s) {', '.join(missing)}; "
            f"expected {', '.join(schema.names)}, found {', '.join(table.column_names)}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
        raise ContractError(f"{source}: columns do not match the expected schema "
                            f"{schema}: {error}") from error


def _per_chunk_to_table(records, schema: pa.Schema) -> pa.Table:
    """Rows of (sequence_id, chunk_index, matrix) records: chunks or outputs."""
    matrix_column = schema.names[2]
    return pa.Table.from_arrays(
        [pa.array([r.sequence_id for r in records], pa.string()),
         pa.array([r.chunk_index for r in records], pa.int64()),
         matrix_array([getattr(r, matrix_column) for r in records])], schema=schema)


def _per_chunk_from_table(table: pa.Table, schema: pa.Schema, record_type, source: str):
    """Inverse of :func:`_per_chunk_to_table`, building ``record_type`` objects."""
    table = conform(table, schema, source)
    matrix_column = schema.names[2]
    matrices = matrices_from_array(table.column(matrix_column),
                                   f"{source} column {matrix_column}")
    return [record_type(sequence_id, int(chunk_index), matrix)
            for sequence_id, chunk_index, matrix in zip(
                table.column("sequence_id").to_pylist(),
                table.column("chunk_index").to_pylist(), matrices)]


def chunks_from_table(table: pa.Table, source: str) -> list[Chunk]:
    """Chunks from a table that follows :data:`CHUNK_SCHEMA` (extra columns ignored)."""
    return _per_chunk_from_table(table, CHUNK_SCHEMA, Chunk, source)


def chunks_to_table(chunks: Sequence[Chunk]) -> pa.Table:
    """Table following :data:`CHUNK_SCHEMA` (used by the demo and tests to write inputs)."""
    return _per_chunk_to_table(chunks, CHUNK_SCHEMA)


def outputs_to_table(outputs: Sequence[ChunkOutput]) -> pa.Table:
    """Table following :data:`OUTPUT_SCHEMA`."""
    return _per_chunk_to_table(outputs, OUTPUT_SCHEMA)


def outputs_from_table(table: pa.Table, source: str) -> list[ChunkOutput]:
    """Inverse of :func:`outputs_to_table`."""
    return _per_chunk_from_table(table, OUTPUT_SCHEMA, ChunkOutput, source)


def states_to_table(states: Sequence[CarriedState], state_names: Sequence[str]) -> pa.Table:
    """Table following :func:`state_schema` for these state parts."""
    columns = [
        pa.array([s.sequence_id for s in states], pa.string()),
        pa.array([s.next_chunk_index for s in states], pa.int64()),
        pa.array([s.steps_seen for s in states], pa.int64()),
    ]
    for part, _ in enumerate(state_names):
        vectors = [s.tensors[part] for s in states]
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in vectors])]).astype(np.int32)
        values = (np.concatenate(vectors).astype(np.float32) if vectors
                  else np.zeros(0, np.float32))
        columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)))
    columns.append(pa.array([s.model_fingerprint for s in states], pa.string()))
    return pa.Table.from_arrays(columns, schema=state_schema(state_names))


def states_from_table(table: pa.Table, state_names: Sequence[str],
                      source: str) -> list[CarriedState]:
    """Inverse of :func:`states_to_table`."""
    table = conform(table, state_schema(state_names), source)
    parts = []
    for name in state_names:
        column = table.column(name).combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False)
        parts.append([values[offsets[i]:offsets[i + 1]] for i in range(len(column))])
    return [CarriedState(sequence_id, int(next_index), int(steps),
                         tuple(part[row] for part in parts), fingerprint)
            for row, (sequence_id, next_index, steps, fingerprint) in enumerate(zip(
                table.column("sequence_id").to_pylist(),
                table.column("next_chunk_index").to_pylist(),
                table.column("steps_seen").to_pylist(),
                table.column("model_fingerprint").to_pylist()))]
