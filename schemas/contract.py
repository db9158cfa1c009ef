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
import functools
import hashlib
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

_MATRIX = pa.list_(pa.list_(pa.float32()))
_VECTOR = pa.list_(pa.float32())

CHUNK_SCHEMA = pa.schema([
    pa.field("sequence_id", pa.string(), nullable=False),
    pa.field("chunk_index", pa.int64(), nullable=False),
    pa.field("features", _MATRIX, nullable=False),
    pa.field("is_last", pa.bool_(), nullable=True),
])
"""Input chunks: one row per chunk of one sequence, ``features`` [steps, input_dim].
``is_last`` is optional in input files (missing or null means False)."""

PENDING_SCHEMA = pa.schema(list(CHUNK_SCHEMA) + [
    pa.field("arrived_in_run", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("row", pa.int64(), nullable=True),
])
"""Deferred chunks kept in a snapshot until the chunks before them arrive, with the
run, file and row they came from."""

DEAD_LETTER_SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("row", pa.int64(), nullable=True),
    pa.field("sequence_id", pa.string(), nullable=True),
    pa.field("chunk_index", pa.int64(), nullable=True),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
    pa.field("record", pa.string(), nullable=False),
])
"""Rejected input: where it came from, a stable reason code, a message for people, and
the original record as JSON (NaN and Infinity written as such)."""

OUTPUT_SCHEMA = pa.schema([
    pa.field("sequence_id", pa.string(), nullable=False),
    pa.field("chunk_index", pa.int64(), nullable=False),
    pa.field("steps", pa.int64(), nullable=False),
    pa.field("outputs", _MATRIX, nullable=False),
])
"""Model outputs: one row per applied chunk of ``steps`` steps, ``outputs``
[steps, output_dim] (``--outputs-at every``) or [1, output_dim], the output at the
chunk's last step (``last``). Files written before ``steps`` existed hold every step's
output (:func:`with_steps`)."""

OUTPUTS_AT = ("every", "last")
"""Which steps of an applied chunk a run writes outputs for (``--outputs-at``)."""

XLA_MODES = ("auto", "on", "off")
"""Which buckets a run compiles with XLA (``--xla``): those whose work is large enough
to pay for the compile, every one, or none (see :func:`transforms.sequencing.uses_xla`)."""


def state_schema(state_names: Sequence[str], final: bool = False) -> pa.Schema:
    """Schema of a state snapshot file for a model whose carried state has these parts.

    One row per sequence; one ``list<float32>`` column per state part (``layer0_h``,
    ``layer0_c``, ...), in the model's order. ``applied_digests`` holds 8-byte digests of
    the last applied chunks (to tell an exact duplicate from a conflicting one);
    a ``closed`` row is a tombstone of an ended sequence (its state parts are empty).
    With ``final``, the schema of the final states a run reports, with ``end_reason``.
    """
    return pa.schema(
        [pa.field("sequence_id", pa.string(), nullable=False),
         pa.field("next_chunk_index", pa.int64(), nullable=False),
         pa.field("steps_seen", pa.int64(), nullable=False)]
        + [pa.field(name, _VECTOR, nullable=False) for name in state_names]
        + [pa.field("model_fingerprint", pa.string(), nullable=False),
           pa.field("applied_digests", pa.binary(), nullable=False),
           pa.field("closed", pa.bool_(), nullable=False),
           pa.field("last_run_number", pa.int64(), nullable=False),
           pa.field("last_touched_at", pa.timestamp("s", tz="UTC"), nullable=False)]
        + ([pa.field("end_reason", pa.string(), nullable=False)] if final else [])
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Chunk:
    """One chunk of one sequence: ``features`` is float32 [steps, input_dim].

    ``source`` and ``row`` say where it was read (input file, row);
    ``arrived_in_run`` which run read it.
    """
    sequence_id: str
    chunk_index: int
    features: np.ndarray
    is_last: bool = False
    arrived_in_run: str = ""
    source: str = ""
    row: int | None = None

    @property
    def steps(self) -> int:
        return int(self.features.shape[0])

    @functools.cached_property
    def digest(self) -> bytes:
        """8 bytes identifying the content (features and is_last): they tell an exact
        duplicate from a conflicting one. Computed when first needed."""
        digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
        digest.update(np.asarray(self.features.shape, np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.features, np.float32))
        digest.update(b"\x01" if self.is_last else b"\x00")
        return digest.digest()


DIGEST_BYTES = 8


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
    applied_digests: bytes = b""  # digests of chunks [next - len/8, next), oldest first
    closed: bool = False
    last_run_number: int = 0
    last_touched_at: int = 0  # seconds since the epoch, UTC

    def applied_digest(self, chunk_index: int) -> bytes | None:
        """The digest of applied chunk ``chunk_index``, if still remembered."""
        back = self.next_chunk_index - chunk_index
        if back < 1 or back * DIGEST_BYTES > len(self.applied_digests):
            return None
        end = len(self.applied_digests) - (back - 1) * DIGEST_BYTES
        return self.applied_digests[end - DIGEST_BYTES:end]


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkOutput:
    """The model's outputs for one applied chunk of ``steps`` steps: float32
    [steps, output_dim], or [1, output_dim] at its last step (see :data:`OUTPUT_SCHEMA`).
    ``steps`` defaults to one output per step."""
    sequence_id: str
    chunk_index: int
    outputs: np.ndarray
    steps: int | None = None

    def __post_init__(self):
        if self.steps is None:
            object.__setattr__(self, "steps", len(self.outputs))


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """An input record that was not applied, and why (``reason`` is a stable code)."""
    source: str
    row: int | None
    sequence_id: str | None
    chunk_index: int | None
    reason: str
    message: str
    record: str


class InputError(ValueError):
    """A run's inputs cannot be used as given (no files, a bad option value, the wrong
    model for the state...): the user's to fix, exit code 2."""


class ContractError(ValueError):
    """A file does not follow the data contract (missing column, wrong type, bad shape)."""


def matrix_array(matrices: Sequence[np.ndarray]) -> pa.Array:
    """``list<list<float32>>`` array from 2-D arrays (each row its own shape)."""
    if not matrices:
        return pa.array([], type=_MATRIX)
    rows = np.fromiter((m.shape[0] for m in matrices), dtype=np.int64, count=len(matrices))
    widths = np.fromiter((m.shape[1] for m in matrices), dtype=np.int64, count=len(matrices))
    outer_offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    inner_offsets = np.concatenate([[0], np.cumsum(np.repeat(widths, rows))]).astype(np.int32)
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
    steps = np.diff(outer)
    step_widths = np.diff(inner)
    widths = np.where(steps > 0, step_widths[np.minimum(outer[:-1], len(step_widths) - 1)]
                      if len(step_widths) else 0, 0)
    ragged = rows_flagged(
        step_widths[outer[0]:outer[-1]] != np.repeat(widths, steps), outer - outer[0])
    if ragged.any():
        raise ContractError(f"{what}: row {np.flatnonzero(ragged)[0]} has inner lists of "
                            "different lengths")
    starts = inner[outer]
    return [values[starts[row]:starts[row + 1]].reshape(steps[row], widths[row])
            for row in range(len(column))]


def rows_flagged(flags: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Which rows hold a set flag, row r holding ``flags[bounds[r]:bounds[r + 1]]``
    (a bool per row): checks over a whole column at once, without a loop per row."""
    return rows_holding(np.flatnonzero(flags), bounds)


def rows_holding(positions: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Which rows hold one of ``positions``, row r holding ``[bounds[r], bounds[r + 1])``
    (a bool per row)."""
    rows = np.zeros(len(bounds) - 1, bool)
    rows[np.searchsorted(bounds, positions, side="right") - 1] = True
    return rows


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


def chunks_to_table(chunks: Sequence[Chunk], pending: bool = False) -> pa.Table:
    """Table following :data:`CHUNK_SCHEMA` (or :data:`PENDING_SCHEMA` with ``pending``)."""
    columns = [pa.array([c.sequence_id for c in chunks], pa.string()),
               pa.array([c.chunk_index for c in chunks], pa.int64()),
               matrix_array([c.features for c in chunks]),
               pa.array([c.is_last for c in chunks], pa.bool_())]
    if pending:
        columns += [pa.array([c.arrived_in_run for c in chunks], pa.string()),
                    pa.array([c.source for c in chunks], pa.string()),
                    pa.array([c.row for c in chunks], pa.int64())]
    return pa.Table.from_arrays(columns, schema=PENDING_SCHEMA if pending else CHUNK_SCHEMA)


def chunks_from_table(table: pa.Table, source: str, pending: bool = False) -> list[Chunk]:
    """Inverse of :func:`chunks_to_table`, for files seqcarry wrote (input files go
    through :func:`schemas.validation.validate_chunks`)."""
    table = conform(table, PENDING_SCHEMA if pending else CHUNK_SCHEMA, source)
    features = matrices_from_array(table.column("features"), f"{source} column features")
    provenance = ([table.column(name).to_pylist() for name in ("arrived_in_run", "source", "row")]
                  if pending else [[""] * table.num_rows, [source] * table.num_rows,
                                   list(range(table.num_rows))])
    return [Chunk(sequence_id, int(chunk_index), matrix, bool(is_last), run, origin, row)
            for sequence_id, chunk_index, matrix, is_last, run, origin, row in zip(
                table.column("sequence_id").to_pylist(),
                table.column("chunk_index").to_pylist(), features,
                table.column("is_last").to_pylist(), *provenance)]


def outputs_to_table(outputs: Sequence[ChunkOutput]) -> pa.Table:
    """Table following :data:`OUTPUT_SCHEMA`."""
    return pa.Table.from_arrays(
        [pa.array([o.sequence_id for o in outputs], pa.string()),
         pa.array([o.chunk_index for o in outputs], pa.int64()),
         pa.array([o.steps for o in outputs], pa.int64()),
         matrix_array([o.outputs for o in outputs])], schema=OUTPUT_SCHEMA)


def with_steps(table: pa.Table) -> pa.Table:
    """An outputs table with its ``steps`` column: files written before it existed
    hold one output per step, so their chunks' steps are their outputs' lengths."""
    if "steps" in table.column_names or "outputs" not in table.column_names:
        return table
    steps = pa.compute.list_value_length(table.column("outputs")).cast(pa.int64())
    return table.add_column(table.column_names.index("outputs"),
                            OUTPUT_SCHEMA.field("steps"), steps)


def outputs_from_table(table: pa.Table, source: str) -> list[ChunkOutput]:
    """Inverse of :func:`outputs_to_table` (reads files without ``steps`` too)."""
    table = conform(with_steps(table), OUTPUT_SCHEMA, source)
    matrices = matrices_from_array(table.column("outputs"), f"{source} column outputs")
    return [ChunkOutput(sequence_id, int(chunk_index), matrix, int(steps))
            for sequence_id, chunk_index, steps, matrix in zip(
                table.column("sequence_id").to_pylist(),
                table.column("chunk_index").to_pylist(),
                table.column("steps").to_pylist(), matrices)]


def dead_letters_to_table(letters: Sequence[DeadLetter]) -> pa.Table:
    """Table following :data:`DEAD_LETTER_SCHEMA`."""
    return pa.Table.from_pylist([dataclasses.asdict(d) for d in letters],
                                schema=DEAD_LETTER_SCHEMA)


def states_to_table(states: Sequence[CarriedState], state_names: Sequence[str],
                    end_reasons: Sequence[str] | None = None) -> pa.Table:
    """Table following :func:`state_schema` for these state parts (the final-state
    schema when ``end_reasons`` are given, one per state)."""
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
    columns += [pa.array([s.model_fingerprint for s in states], pa.string()),
                pa.array([s.applied_digests for s in states], pa.binary()),
                pa.array([s.closed for s in states], pa.bool_()),
                pa.array([s.last_run_number for s in states], pa.int64()),
                pa.array([s.last_touched_at for s in states], pa.timestamp("s", tz="UTC"))]
    if end_reasons is not None:
        columns.append(pa.array(list(end_reasons), pa.string()))
    return pa.Table.from_arrays(columns, schema=state_schema(state_names,
                                                             final=end_reasons is not None))


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
    columns = [table.column(name).to_pylist() for name in (
        "sequence_id", "next_chunk_index", "steps_seen", "model_fingerprint",
        "applied_digests", "closed", "last_run_number")]
    touched = table.column("last_touched_at").cast(pa.int64()).to_pylist()
    return [CarriedState(sequence_id, int(next_index), int(steps),
                         tuple(part[row] for part in parts), fingerprint, digests, bool(closed),
                         int(run_number), int(touched[row]))
            for row, (sequence_id, next_index, steps, fingerprint, digests, closed,
                      run_number) in enumerate(zip(*columns))]
