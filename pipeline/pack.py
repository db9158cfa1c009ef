"""Writing chunk files from long-format data (``seqcarry pack``).

People keep sequences in *long format*: one row per step, with a sequence id, an order
column (a time or step number) and one column per feature. :func:`pack` turns such a
table (pyarrow or pandas) into chunks of the data contract (:data:`CHUNK_SCHEMA`);
:func:`pack_files` does the same from Parquet or CSV files and writes chunk Parquet
files. With ``state``, each sequence's chunks continue its numbering in the committed
snapshot, so the new steps append to what earlier runs applied.

The rules:

* steps are sorted by (sequence, order column); an order value twice within a sequence
  is an :class:`InputError` naming the sequence;
* each sequence is cut into chunks of ``chunk_steps`` steps (its last chunk shorter);
* its first ``chunk_index`` is 0, or, with ``state``, the index after the last one the
  committed snapshot knows: its ``next_chunk_index``, or later when chunks of it wait
  there as pending (after a gap), so that no index the state knows is ever reused;
* a sequence that ended in the state (closed by ``is_last`` or expiry) is an
  :class:`InputError`: a run would reject all its chunks (``sequence_closed``);
* features become float32 [steps, width], columns in the order given (default: every
  numeric column other than the sequence, order and last columns, in table order);
* a null in a feature column is an :class:`InputError` naming the column and the
  sequence (a run would reject the chunk as ``null_values``); NaN and infinity are
  kept as they are (a run rejects them as ``non_finite`` unless ``--allow-non-finite``);
* with ``last_column`` (bool), a sequence whose last step has it true ends there: its
  last chunk gets ``is_last`` (true on any other step is an :class:`InputError`).

Everything is vectorized (one sort, then offsets): no Python loop per step or chunk.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import re
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

import storage
from schemas import CHUNK_SCHEMA, InputError
from schemas.validation import decoded_type
from storage.files import filesystem, read_buffer, storage_errors

_LOG = logging.getLogger("seqcarry")

DEFAULT_ROWS_PER_FILE = 10_000
_CSV_CODECS = {".csv.gz": "gzip", ".csv.bz2": "bz2", ".csv.zst": "zstd"}
_CSV_SUFFIXES = (".csv", *_CSV_CODECS)
# What a CSV cell may hold for "no value" ("NaN" is not one: it stays a float NaN).
_CSV_NULLS = ["", "NA", "N/A", "NULL", "null", "None"]
_MAX_LIST_VALUES = 2**31 - 1  # list<...> has int32 offsets


@dataclasses.dataclass(frozen=True)
class Packed:
    """What :func:`pack_table` made: the chunks, and what went into them."""
    table: pa.Table                       # CHUNK_SCHEMA, sorted by sequence and chunk
    feature_columns: tuple[str, ...]      # the columns of ``features``, in order
    sequences: int
    steps: int
    first_chunk_index: dict[str, int]     # sequences that continue the state's numbering
    sequences_ended: int                  # sequences whose last chunk has is_last
    snapshot: str | None                  # the committed snapshot read (None: none read)

    def summary(self) -> dict[str, Any]:
        return {"sequences": self.sequences, "chunks": self.table.num_rows,
                "steps": self.steps, "feature_columns": list(self.feature_columns),
                "input_width": len(self.feature_columns),
                "sequences_ended": self.sequences_ended, "state_snapshot": self.snapshot,
                "first_chunk_index": self.first_chunk_index}


def pack(data: "pa.Table | Any", *, chunk_steps: int, sequence_column: str = "sequence_id",
         order_column: str = "t", feature_columns: Sequence[str] | None = None,
         last_column: str | None = None, state: str | None = None) -> pa.Table:
    """Chunks of the data contract (:data:`schemas.CHUNK_SCHEMA`) from long-format data.

    ``data`` is a ``pyarrow.Table`` or a ``pandas.DataFrame`` (a named index, e.g.
    after ``set_index(["sequence_id", "t"])``, counts as columns) with one row per
    step: ``sequence_column`` (string or integer ids), ``order_column`` (any sortable
    type: the steps' order within their sequence) and the feature columns (default:
    every other numeric column, in table order; this order is the model's input order).
    Each sequence is cut into chunks of ``chunk_steps`` steps, the last one shorter.
    With ``state`` (a state directory or URL), chunk numbering continues from its
    committed snapshot (see the module's docstring); otherwise every sequence starts at
    chunk 0. Raises :class:`InputError` for data that cannot be packed; storage errors
    reading ``state`` are :class:`storage.StorageError`.

    Returns a table sorted by ``sequence_id`` and ``chunk_index``; write it with
    ``pyarrow.parquet.write_table`` (or use :func:`pack_files`).
    """
    return pack_table(data, chunk_steps=chunk_steps, sequence_column=sequence_column,
                      order_column=order_column, feature_columns=feature_columns,
                      last_column=last_column, state=state).table


def pack_table(data: "pa.Table | Any", *, chunk_steps: int,
               sequence_column: str = "sequence_id", order_column: str = "t",
               feature_columns: Sequence[str] | None = None, last_column: str | None = None,
               state: str | None = None) -> Packed:
    """:func:`pack`, also returning what went into the chunks (:class:`Packed`)."""
    table = _as_table(data)
    if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, (int, np.integer)) \
            or chunk_steps < 1:
        raise InputError(f"chunk_steps must be a whole number >= 1, not {chunk_steps!r}")
    chunk_steps = int(chunk_steps)
    features = _check_columns(table.schema, sequence_column, order_column, feature_columns,
                              last_column)
    if table.num_rows == 0:
        return Packed(CHUNK_SCHEMA.empty_table(), features, 0, 0, {}, 0, None)

    ids = _sequence_ids(table.column(sequence_column), sequence_column)
    order = table.column(order_column)
    if pa.types.is_dictionary(order.type):
        order = order.cast(order.type.value_type)
    _refuse_nulls(order, order_column, ids, "an order value")
    for name in features:  # before sorting: ids are in the table's row order here
        _refuse_nulls(table.column(name), name, ids, "a feature value")
    if pa.types.is_floating(order.type) and pc.any(pc.is_nan(order)).as_py():
        row = int(np.flatnonzero(pc.is_nan(order).to_numpy(zero_copy_only=False))[0])
        raise InputError(f"order column {order_column!r} is NaN in sequence "
                         f"{ids[row].as_py()!r}")

    # One sort; everything after it is offsets into the sorted rows.
    try:
        sorting = pc.sort_indices(pa.table({"id": ids, "order": order}),
                                  sort_keys=[("id", "ascending"), ("order", "ascending")])
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
        raise InputError(f"order column {order_column!r} is {order.type}, which cannot be "
                         "sorted") from error
    ids = ids.take(sorting)
    order = order.take(sorting).combine_chunks()
    rows = len(ids)
    new_sequence = np.ones(rows, bool)
    new_sequence[1:] = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    twice = ~new_sequence[1:] & pc.equal(order[1:], order[:-1]).to_numpy(zero_copy_only=False)
    if twice.any():
        row = int(np.flatnonzero(twice)[0]) + 1
        raise InputError(f"sequence {ids[row].as_py()!r} has {order_column} "
                         f"{order[row].as_py()!r} more than once: each step needs its own "
                         "order value")

    starts = np.flatnonzero(new_sequence)
    lengths = np.diff(np.append(starts, rows))
    position = np.arange(rows) - np.repeat(starts, lengths)
    chunk_starts = np.flatnonzero(position % chunk_steps == 0)
    chunk_ends = np.append(chunk_starts[1:], rows)
    sequence_of_chunk = np.repeat(np.arange(len(starts)), -(-lengths // chunk_steps))
    sequence_ids = ids.take(pa.array(starts))

    first, snapshot = np.zeros(len(starts), np.int64), None
    if state is not None:
        first, snapshot = _first_chunk_indexes(state, sequence_ids)
    chunk_index = first[sequence_of_chunk] + position[chunk_starts] // chunk_steps

    is_last = np.zeros(len(chunk_starts), bool)
    if last_column is not None:
        flags = _last_flags(table.column(last_column), last_column, sorting)
        ends = np.zeros(rows, bool)
        ends[np.append(starts[1:], rows) - 1] = True
        early = flags & ~ends
        if early.any():
            row = int(np.flatnonzero(early)[0])
            raise InputError(
                f"sequence {ids[row].as_py()!r}: {last_column} is true at {order_column} "
                f"{order[row].as_py()!r}, but later steps follow it (only its last step "
                "may end a sequence)")
        is_last = flags[chunk_ends - 1]

    if chunk_steps * len(features) > _MAX_LIST_VALUES:
        raise InputError(f"chunks of {chunk_steps} steps of {len(features)} features hold "
                         f"more than {_MAX_LIST_VALUES} values: use a smaller chunk_steps")
    matrix = np.empty((rows, len(features)), np.float32)
    taken = sorting.to_numpy()
    for number, name in enumerate(features):
        matrix[:, number] = _numbers(table.column(name))[taken]

    chunks = pa.Table.from_arrays(
        [ids.take(pa.array(chunk_starts)).cast(pa.string()),
         pa.array(chunk_index, pa.int64()),
         _matrices(matrix, chunk_starts, rows),
         pa.array(is_last, pa.bool_())], schema=CHUNK_SCHEMA)
    continued = np.flatnonzero(first)
    return Packed(chunks, features, len(starts), rows,
                  {sequence_ids[int(i)].as_py(): int(first[i]) for i in continued},
                  int(is_last.sum()), snapshot)


def pack_files(inputs: Sequence[str] | str, output: str, *, chunk_steps: int,
               sequence_column: str = "sequence_id", order_column: str = "t",
               feature_columns: Sequence[str] | None = None, last_column: str | None = None,
               state: str | None = None,
               rows_per_file: int = DEFAULT_ROWS_PER_FILE) -> dict[str, Any]:
    """Pack long-format Parquet or CSV files into chunk Parquet files in ``output``.

    ``inputs``: files, folders (every ``*.parquet`` and ``*.csv`` below them) or globs,
    local or URLs (``gs://...``); a name ending in ``.csv`` (or ``.csv.gz``, ``.bz2``,
    ``.zst``) is read as CSV with a header line, any other as Parquet. All of them are
    read into memory and packed together, as :func:`pack` does (pass all new steps of a
    sequence in one call). The chunks go to new files
    ``output/pack-<UTC time>-<n>.parquet`` of at most ``rows_per_file`` chunks each,
    each written whole or not at all; no existing file is touched.

    Returns a summary: ``files`` written, ``sequences``, ``chunks``, ``steps``,
    ``feature_columns`` (in ``features`` order), ``input_width``, ``sequences_ended``,
    ``state_snapshot`` (the committed snapshot the numbering continues from, if any) and
    ``first_chunk_index`` of every sequence that does not start at 0.
    """
    if isinstance(rows_per_file, bool) or not isinstance(rows_per_file, (int, np.integer)) \
            or rows_per_file < 1:
        raise InputError(f"rows_per_file must be a whole number >= 1, not {rows_per_file!r}")
    files = _input_files([inputs] if isinstance(inputs, str) else list(inputs))
    table = _read_inputs(files, sequence_column, order_column, feature_columns, last_column)
    packed = pack_table(table, chunk_steps=chunk_steps, sequence_column=sequence_column,
                        order_column=order_column, feature_columns=feature_columns,
                        last_column=last_column, state=state)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    written = []
    for number, start in enumerate(range(0, packed.table.num_rows, int(rows_per_file))):
        url = storage.join(output, f"pack-{stamp}-{number:05d}.parquet")
        storage.write_table(url, packed.table.slice(start, int(rows_per_file)))
        written.append(url)
    return {"inputs": len(files), "files": written, **packed.summary()}


# -- reading --

def _as_table(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if type(data).__module__.split(".")[0] == "pandas" and hasattr(data, "columns"):
        try:  # a named index (set_index) becomes columns, an unnamed one is dropped
            table = pa.Table.from_pandas(data, preserve_index=None)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            raise InputError(f"cannot convert the DataFrame to Arrow: {error}") from error
        return table.drop_columns([name for name in table.column_names
                                   if re.fullmatch(r"__index_level_\d+__", name)])
    raise InputError(f"expected a pyarrow.Table or a pandas.DataFrame, not "
                     f"{type(data).__name__}")


def _input_files(inputs: Sequence[str]) -> list[str]:
    if not inputs:
        raise InputError("no input given")
    found: list[str] = []
    for pattern in inputs:
        fs, path = filesystem(pattern)
        with storage_errors(pattern, "list"):
            folder = fs.isdir(path)
        if folder:
            matches = [name for suffix in (".parquet",) + _CSV_SUFFIXES
                       for name, _ in storage.list_files(
                           storage.join(pattern, "**", "*" + suffix))]
        else:
            matches = [name for name, _ in storage.list_files(pattern)]
        if not matches:
            raise InputError(f"input {pattern}: no file matches")
        found += matches
    return list(dict.fromkeys(found))


def _is_csv(url: str) -> bool:
    return url.lower().endswith(_CSV_SUFFIXES)


def _read_inputs(files: Sequence[str], sequence_column: str, order_column: str,
                 feature_columns: Sequence[str] | None, last_column: str | None) -> pa.Table:
    """The files' rows, with only the columns packing needs, in one table."""
    tables, chosen = [], None
    for url in files:
        table = _read_file(url, sequence_column)
        try:
            features = _check_columns(table.schema, sequence_column, order_column,
                                      feature_columns, last_column)
        except InputError as error:
            raise InputError(f"{url}: {error}") from None
        if chosen is None:
            chosen = (url, features)
        elif features != chosen[1]:
            raise InputError(f"{url} has feature columns {', '.join(features)} but "
                             f"{chosen[0]} has {', '.join(chosen[1])}; name them with "
                             "--features")
        names = [sequence_column, order_column, *features] + (
            [last_column] if last_column else [])
        tables.append(table.select(list(dict.fromkeys(names))))
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise InputError(f"the input files' columns have types that do not go together: "
                         f"{error}") from error


def _read_file(url: str, sequence_column: str) -> pa.Table:
    # Read into memory Arrow allocates (storage.files.read_buffer), never through a
    # Python file object: buffers holding Python bytes can abort the process at exit.
    data = pa.BufferReader(read_buffer(url))
    kind = "CSV" if _is_csv(url) else "Parquet"
    try:
        if kind == "Parquet":
            return pq.ParquetFile(data).read()
        codec = next((codec for suffix, codec in _CSV_CODECS.items()
                      if url.lower().endswith(suffix)), None)
        return pacsv.read_csv(
            pa.CompressedInputStream(data, codec) if codec else data,
            convert_options=pacsv.ConvertOptions(
                column_types={sequence_column: pa.string()}, null_values=_CSV_NULLS,
                strings_can_be_null=True))
    except (pa.ArrowException, OSError, ValueError) as error:
        raise InputError(f"{url} is not a readable {kind} file: "
                         f"{str(error).splitlines()[0]}") from error


# -- checking --

def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _check_columns(schema: pa.Schema, sequence_column: str, order_column: str,
                   feature_columns: Sequence[str] | None,
                   last_column: str | None) -> tuple[str, ...]:
    """The feature columns, after checking that every named column is there once."""
    names = schema.names
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InputError(f"column(s) {', '.join(twice)} appear more than once")
    roles = [(sequence_column, "sequence column"), (order_column, "order column")]
    if last_column is not None:
        roles.append((last_column, "last column"))
    if isinstance(feature_columns, str):
        raise InputError("feature_columns is a list of column names, not one string")
    for name in feature_columns or ():
        roles.append((name, "feature column"))
    for name, role in roles:
        if name not in names:
            raise InputError(f"{role} {name!r} not found; the columns are "
                             f"{', '.join(names) or 'none'}")
    sequence_kind = decoded_type(schema.field(sequence_column).type)
    if not (pa.types.is_string(sequence_kind) or pa.types.is_large_string(sequence_kind)
            or pa.types.is_integer(sequence_kind)):
        raise InputError(f"sequence column {sequence_column!r} is {sequence_kind}; it must "
                         "hold strings or integers")
    if feature_columns is None:
        features = tuple(field.name for field in schema
                         if field.name not in (sequence_column, order_column, last_column)
                         and _numeric(decoded_type(field.type)))
        if not features:
            raise InputError(f"no numeric feature column besides {sequence_column!r} and "
                             f"{order_column!r}; the columns are {', '.join(names)}")
        return features
    features = tuple(feature_columns)
    if not features:
        raise InputError("feature_columns is empty: name at least one column")
    if len(set(features)) < len(features):
        raise InputError(f"a feature column is named twice: {', '.join(features)}")
    for name in features:
        kind = decoded_type(schema.field(name).type)
        if not _numeric(kind):
            raise InputError(f"feature column {name!r} is {kind}, not a number type")
    return features


def _sequence_ids(column: pa.ChunkedArray, name: str) -> pa.Array:
    """The ids as one plain string array (integer or dictionary ids cast; their type
    was checked by :func:`_check_columns`)."""
    if column.null_count:
        row = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
        raise InputError(f"sequence column {name!r} is null in row {row}")
    ids = column.cast(pa.string()).combine_chunks()
    empty = pc.equal(pc.utf8_length(ids), 0)
    if pc.any(empty).as_py():
        row = int(np.flatnonzero(empty.to_numpy(zero_copy_only=False))[0])
        raise InputError(f"sequence column {name!r} is empty in row {row} (a run rejects "
                         "empty ids as missing_sequence_id)")
    return ids


def _refuse_nulls(column: pa.ChunkedArray, name: str, ids: pa.Array, what: str) -> None:
    """An InputError naming the column and the first sequence with a null in it (``ids``
    in the column's row order)."""
    if not column.null_count:
        return
    row = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
    raise InputError(f"column {name!r} has null values ({column.null_count}; the first in "
                     f"sequence {ids[row].as_py()!r}): every step needs {what}"
                     + (" (a run would reject the chunk as null_values)"
                        if what == "a feature value" else ""))


def _numbers(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as numpy (float32 happens on assignment: a float64 beyond its
    range becomes infinity, which a run rejects as non_finite)."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column.to_numpy()


def _last_flags(column: pa.ChunkedArray, name: str, sorting: pa.Array) -> np.ndarray:
    kind = decoded_type(column.type)
    if not (pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind)):
        raise InputError(f"last column {name!r} is {kind}; it must be bool (or 0/1)")
    flags = pc.fill_null(column.cast(pa.bool_()), False).take(sorting)
    return flags.to_numpy(zero_copy_only=False).astype(bool)


def _matrices(matrix: np.ndarray, chunk_starts: np.ndarray, rows: int) -> pa.ChunkedArray:
    """``list<list<float32>>`` of the chunks ``matrix[start:end]``, from offsets alone
    (in pieces of fewer than 2^31 values, list<>'s offsets being int32)."""
    width = matrix.shape[1]
    bounds = np.append(chunk_starts, rows)
    rows_per_piece = max(1, _MAX_LIST_VALUES // max(1, width))
    pieces, first = [], 0
    while first < len(chunk_starts):
        last = max(first + 1, int(np.searchsorted(bounds, bounds[first] + rows_per_piece,
                                                  side="right")) - 1)
        last = min(last, len(chunk_starts))
        low, high = int(bounds[first]), int(bounds[last])
        outer = (bounds[first:last + 1] - low).astype(np.int32)
        inner = (np.arange(high - low + 1, dtype=np.int64) * width).astype(np.int32)
        values = pa.array(matrix[low:high].reshape(-1))
        pieces.append(pa.ListArray.from_arrays(
            pa.array(outer), pa.ListArray.from_arrays(pa.array(inner), values)))
        first = last
    return pa.chunked_array(pieces, CHUNK_SCHEMA.field("features").type)


# -- the state's numbering --

def _first_chunk_indexes(state: str, sequence_ids: pa.Array) -> tuple[np.ndarray, str | None]:
    """Each sequence's first new chunk index from ``state``'s committed snapshot: the
    index after the last one it knows (applied or pending). Decodes only the
    ``sequence_id``, ``next_chunk_index``, ``closed`` (and pending ``chunk_index``)
    columns of the snapshot's files, never state vectors; reads no outputs."""
    manifest = storage.StateStore(state).committed()
    if manifest is None:
        _LOG.warning("event=pack_no_state state=%s: no committed snapshot there; every "
                     "sequence starts at chunk 0", state)
        return np.zeros(len(sequence_ids), np.int64), None
    pieces = []
    for record in manifest.state_files:
        table = _snapshot_columns(record, ["sequence_id", "next_chunk_index", "closed"],
                                  sequence_ids)
        pieces.append(pa.table({
            "sequence_id": table["sequence_id"].cast(pa.string()),
            "layer": pa.array(np.full(table.num_rows, record.layer or 0, np.int64)),
            "next": table["next_chunk_index"].cast(pa.int64()),
            "closed": table["closed"].cast(pa.bool_()),
            "pending": pa.array(np.zeros(table.num_rows, bool))}))
    for record in manifest.pending_files:
        table = _snapshot_columns(record, ["sequence_id", "chunk_index"], sequence_ids)
        pieces.append(pa.table({
            "sequence_id": table["sequence_id"].cast(pa.string()),
            "layer": pa.array(np.full(table.num_rows, record.layer or 0, np.int64)),
            "next": pc.add(table["chunk_index"].cast(pa.int64()), 1),
            "closed": pa.array(np.zeros(table.num_rows, bool)),
            "pending": pa.array(np.ones(table.num_rows, bool))}))
    first = np.zeros(len(sequence_ids), np.int64)
    if not pieces:
        return first, manifest.run_id
    rows = pa.concat_tables(pieces)
    # A sequence's version is the newest layer that holds it (schemas.manifest).
    newest = rows.group_by("sequence_id").aggregate([("layer", "max")])
    rows = rows.join(newest, "sequence_id")
    rows = rows.filter(pc.equal(rows["layer"], rows["layer_max"]))
    known = rows.group_by("sequence_id").aggregate(
        [("next", "max"), ("closed", "any"), ("pending", "any")])
    where = pc.index_in(sequence_ids, value_set=known["sequence_id"].combine_chunks())
    found = np.flatnonzero(pc.is_valid(where).to_numpy(zero_copy_only=False))
    positions = where.take(pa.array(found)).to_numpy()
    closed = known["closed_any"].to_numpy()[positions]
    if closed.any():
        names = [sequence_ids[int(i)].as_py() for i in found[closed]]
        raise InputError(
            f"{len(names)} sequence(s) ended in the committed snapshot {manifest.run_id} of "
            f"{state} ({', '.join(map(repr, names[:5]))}{', ...' if len(names) > 5 else ''}): "
            "a run would reject their chunks as sequence_closed; drop their rows or give "
            "them new sequence ids")
    first[found] = known["next_max"].to_numpy()[positions]
    waiting = found[known["pending_any"].to_numpy()[positions]]
    if len(waiting):
        _LOG.warning("event=pack_after_pending sequences=%d first=%r: chunks of these "
                     "sequences wait in the snapshot for an earlier chunk (a gap); the new "
                     "chunks are numbered after them and will wait too", len(waiting),
                     sequence_ids[int(waiting[0])].as_py())
    return first, manifest.run_id


def _snapshot_columns(record: storage.FileRecord, columns: list[str],
                      sequence_ids: pa.Array) -> pa.Table:
    """Some columns of one snapshot file (checked against its manifest record), rows of
    ``sequence_ids`` only; the other columns, state vectors included, are not decoded."""
    table = storage.read_table(record.path, record, columns)
    return table.filter(pc.is_in(table["sequence_id"].cast(pa.string()),
                                 value_set=sequence_ids))
