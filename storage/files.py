"""File IO for every seqcarry file, through fsspec (local paths, ``gs://`` through
gcsfs, and other fsspec URLs), with a filesystem's permanent errors turned into one
clear :class:`StorageError` (the role Beam's ``filesystems.py`` plays for Beam).

Every write is all or nothing: readers see a file whole or not at all.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import tempfile
import uuid
from typing import Any, Callable, Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from schemas.manifest import FileRecord


class StorageError(RuntimeError):
    """A file or directory cannot be read or written, or holds something unexpected."""


class UnreadableFile(StorageError):
    """An input file that is not readable Parquet (damaged, empty, another format)."""


class IntegrityError(StorageError):
    """A snapshot file does not match its manifest (truncated, altered or missing)."""



def join(base: str, *parts: str) -> str:
    """Join URL/path parts with '/', whatever the filesystem."""
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    # No listings cache: other processes write here too, and a stale listing must
    # never hide a snapshot file or CURRENT.
    return fsspec.core.url_to_fs(url, use_listings_cache=False)


def is_gcs(fs: fsspec.AbstractFileSystem) -> bool:
    return "gs" in fs.protocol


@contextlib.contextmanager
def storage_errors(url: str, doing: str) -> Iterator[None]:
    """Turn a filesystem's permanent errors into one clear StorageError.

    Transient ones (HTTP 408/429/5xx, connection resets) never get here on ``gs://``:
    gcsfs retries them with exponential backoff (6 tries) first.
    """
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as error:
        raise StorageError(f"cannot {doing} {url}: it does not exist (check the bucket "
                           "and path)") from error
    except OSError as error:  # e.g. gcsfs' "Forbidden" for HTTP 403
        raise StorageError(f"cannot {doing} {url}: {str(error).splitlines()[0]}") from error


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL that names ``path`` on ``fs`` (a plain path for local files)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def list_files(pattern: str) -> list[tuple[str, int]]:
    """Files matching ``pattern`` (a path, directory or glob) with their sizes in bytes,
    sorted, from one listing: no file is opened (on an object store, a few paginated
    list requests however many files there are)."""
    fs, path = filesystem(pattern)
    with storage_errors(pattern, "list"):
        if fs.isdir(path):
            path = join(path, "**", "*.parquet")
        found = fs.glob(path, detail=True)
    return sorted((url_of(fs, name), int(info.get("size") or 0))
                  for name, info in found.items() if info.get("type") != "directory")


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with storage_errors(url, "look up"):
        return fs.exists(path)


def check_location(url: str, option: str) -> None:
    """Fail fast, naming ``option``, if ``url``'s bucket does not exist."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return
    root = path.split("/", 1)[0]
    with storage_errors(url, "reach"):
        if not fs.exists(root):
            raise StorageError(f"{option} {url}: bucket {root} does not exist")


def remove_tree(url: str) -> None:
    """Delete ``url`` and everything below it, if it exists."""
    fs, path = filesystem(url)
    with storage_errors(url, "delete"):
        if isinstance(fs, LocalFileSystem):
            if fs.exists(path):
                fs.rm(path, recursive=True)
            return
        # Object by object: an object store's recursive rm expands the path as a glob,
        # so a path with '[' or ']' would delete nothing.
        for name in fs.find(path):
            fs.rm_file(name)


def remove_file(url: str) -> None:
    """Delete one file if it exists."""
    fs, path = filesystem(url)
    with storage_errors(url, "delete"):
        if fs.exists(path):
            fs.rm_file(path)


def read_bytes(url: str) -> bytes:
    return _read(url, lambda handle: handle.read())


def read_buffer(url: str) -> pa.Buffer:
    """The bytes of ``url`` in memory Arrow allocated, for pyarrow to read.

    Not ``pa.BufferReader(<bytes>)``: such a buffer holds a Python object, and
    ``pq.read_table`` tears its scan down on an Arrow thread after returning. When that
    thread drops the last reference while the interpreter shuts down, it needs the GIL,
    CPython ends it inside a C++ destructor, and the process aborts after printing its
    result ("terminate called without an active exception", exit 134; about 1 call in
    50 under load; apache/arrow#33975). Memory Arrow owns is freed without Python.
    """
    def into_buffer(handle) -> pa.Buffer:
        size = getattr(handle, "size", None)
        if size is None:  # a file object that does not know its size: one copy
            data = handle.read()
            buffer = pa.allocate_buffer(len(data))
            memoryview(buffer)[:] = data
            return buffer
        buffer, filled = pa.allocate_buffer(size), 0
        with memoryview(buffer) as view:
            while filled < size and (count := handle.readinto(view[filled:])):
                filled += count
        return buffer if filled == size else buffer.slice(0, filled)
    return _read(url, into_buffer)


def _read(url: str, reader: Callable[[Any], Any]) -> Any:
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as handle:
            return reader(handle)
    except FileNotFoundError as error:
        raise StorageError(f"{url} does not exist") from error
    except OSError as error:
        raise StorageError(f"cannot read {url}: {str(error).splitlines()[0]}") from error


def local_copy(url: str) -> str:
    """A local path holding the file or directory at ``url`` (the path itself for
    local ones)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return path
    target = os.path.join(tempfile.mkdtemp(prefix="seqcarry-"),
                          os.path.basename(path.rstrip("/")))
    with storage_errors(url, "download"):
        if fs.isdir(path):
            for name in fs.find(path):  # every object below it, at its relative place
                local = os.path.join(target, os.path.relpath(name, path.rstrip("/")))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get(name, local)
        else:
            fs.get(path, target)
    return target


def local_copy_checkpoint(url: str) -> str:
    """A local prefix holding the TensorFlow checkpoint whose prefix is ``url``
    (``url.index``, ``url.data-*``; the prefix itself for a local one)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return path
    target = os.path.join(tempfile.mkdtemp(prefix="seqcarry-"), os.path.basename(path))
    with storage_errors(url, "download"):
        for name in fs.glob(glob.escape(path) + ".*"):
            fs.get(name, target + name[len(path):])
    return target


def write_bytes(url: str, data: bytes | pa.Buffer, durable: bool = True,
                cache: bool = True) -> None:
    """Write ``data`` so that readers see either nothing or all of it; ``durable``
    also flushes it, and the directory entry, to disk before returning (local files).
    ``cache=False`` keeps a local file out of the page cache (see :class:`_LocalWriter`):
    for files this machine reads once later or never. A failed write (disk full,
    read-only folder) leaves no temporary file behind."""
    fs, path = filesystem(url)
    if not isinstance(fs, LocalFileSystem):
        with storage_errors(url, "write"), fs.open(path, "wb") as handle:
            handle.write(data)  # an object appears whole when closed
        return
    with _local_file(url, path, durable) as temporary, \
            _LocalWriter(temporary, cache, durable) as out:
        out.write(data)


# A local file written without the page cache goes to disk in pieces of this size.
UNCACHED_PIECE_BYTES = 16 * 2**20


class _LocalWriter(io.RawIOBase):
    """A local file being written, flushed to disk when closed if ``durable``, and
    kept out of the page cache with ``cache=False``: every :data:`UNCACHED_PIECE_BYTES`
    are flushed to disk and dropped from the cache. Staging files and outputs are read
    once (by a bucket's bundle) or not at all by this machine; cached, they would hold a
    run's data in memory a second time, which staging exists to avoid. Where a
    hypervisor lends a machine its memory page by page (the machines seqcarry is
    developed on), filling fresh cache pages also costs ten times what writing to disk
    does, and dropped pages are reused warm. With a ``hasher``, every byte written also
    goes to it."""

    def __init__(self, path: str, cache: bool = True, durable: bool = False, hasher=None):
        super().__init__()
        self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._drop = not cache and hasattr(os, "posix_fadvise")  # Linux, not macOS
        self._durable = durable
        self._hasher = hasher
        self._unsynced = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        with memoryview(data) as whole, whole.cast("B") as view:
            if self._hasher is not None:
                self._hasher.update(view)
            for start in range(0, len(view), UNCACHED_PIECE_BYTES):
                piece = view[start:start + UNCACHED_PIECE_BYTES]
                self._unsynced += len(piece)
                while piece:
                    piece = piece[os.write(self._descriptor, piece):]
                if self._drop and self._unsynced >= UNCACHED_PIECE_BYTES:
                    self._drop_written()
            return len(view)

    def _drop_written(self) -> None:
        os.fdatasync(self._descriptor)  # only pages on disk can be dropped
        os.posix_fadvise(self._descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        self._unsynced = 0

    def close(self) -> None:
        if not self.closed:
            try:
                if self._durable:
                    os.fsync(self._descriptor)
                if self._drop and self._unsynced:
                    self._drop_written()
            finally:
                os.close(self._descriptor)
        super().close()


@contextlib.contextmanager
def _local_file(url: str, path: str, durable: bool) -> Iterator[str]:
    """A temporary path to write ``path``'s content to, renamed to ``path`` when the
    block ends (the rename flushed to disk with ``durable``), removed if it fails."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with storage_errors(url, "write"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            yield temporary
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            raise
        if durable:
            _fsync_directory(os.path.dirname(path))


def _fsync_directory(path: str) -> None:
    """Make a rename in ``path`` durable (POSIX needs the directory synced too)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def list_names(url: str) -> tuple[list[str], list[str]]:
    """The names of the folders and of the files directly in ``url`` (both empty if it
    does not exist). Names, not a glob: paths with ``[``, ``]`` or ``*`` list as well."""
    fs, path = filesystem(url)
    with storage_errors(url, "list"):
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return [], []
    folders = sorted(os.path.basename(e["name"].rstrip("/")) for e in entries
                     if e["type"] == "directory")
    files = sorted(os.path.basename(e["name"]) for e in entries if e["type"] != "directory")
    return folders, files


def json_bytes(payload: Any) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()


def parse_json(url: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IntegrityError(f"{url} is not valid JSON: {error}") from error


def write_json(url: str, payload: Any) -> None:
    write_bytes(url, json_bytes(payload))


def read_json(url: str) -> Any:
    return parse_json(url, read_bytes(url))


def write_table(url: str, table: pa.Table, layer: int | None = None,
                cache: bool = True) -> FileRecord:
    """Write ``table`` as Parquet to ``url`` (all or nothing; ``cache``: see
    :func:`write_bytes`) and describe what was written."""
    buffer = io.BytesIO()
    # Dictionaries only for ids: float columns never repeat, and trying costs a third
    # of the write.
    pq.write_table(table, buffer, use_dictionary=[
        field.name for field in table.schema if pa.types.is_string(field.type)])
    data = buffer.getvalue()
    write_bytes(url, data, cache=cache)
    return FileRecord(url, table.num_rows, hashlib.sha256(data).hexdigest(), layer)


def read_table(url: str, expected: FileRecord | None = None,
               columns: Sequence[str] | None = None) -> pa.Table:
    """Read a Parquet file (only ``columns``, if given: the others are not decoded);
    with ``expected``, first check its sha256 and row count."""
    data = _read_checked(url, expected)
    try:
        table = pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise StorageError(f"{url} is not a readable Parquet file: {error}") from error
    if expected is not None:
        _check_rows(url, expected, table.num_rows)
    return table


# Rows decoded at a time by read_table_rows, and bytes hashed at a time.
FILTER_BATCH_ROWS = 8192
HASH_PIECE_BYTES = 8 * 2**20


def read_table_rows(url: str, expected: FileRecord, column: str,
                    values: Sequence[str]) -> pa.Table:
    """The rows of a Parquet file whose ``column`` holds one of ``values``, after the
    checks of :func:`read_table` (sha256, rows). Record batches are decoded and filtered
    one at a time, so memory holds the rows kept, not the file's: a local file is hashed
    a piece at a time, then decoded from its pages (a snapshot file never changes once
    written); an object store's is read into memory once."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        def hashed(handle) -> tuple[str, int]:
            hasher, size, piece = hashlib.sha256(), 0, bytearray(HASH_PIECE_BYTES)
            with memoryview(piece) as view:
                while count := handle.readinto(view):
                    hasher.update(view[:count])
                    size += count
            return hasher.hexdigest(), size
        _check_digest(url, expected, *_read(url, hashed))
        source = path
    else:
        source = pa.BufferReader(_read_checked(url, expected))
    wanted = pa.array(sorted(values), pa.string())
    try:
        parquet = pq.ParquetFile(source)
        _check_rows(url, expected, parquet.metadata.num_rows)
        kept = [batch.filter(pc.is_in(batch[column], value_set=wanted))
                for batch in parquet.iter_batches(batch_size=FILTER_BATCH_ROWS)]
        return pa.Table.from_batches(kept, parquet.schema_arrow)
    except (pa.ArrowInvalid, OSError) as error:
        raise StorageError(f"{url} is not a readable Parquet file: {error}") from error


def _read_checked(url: str, expected: FileRecord | None) -> pa.Buffer:
    """The bytes of ``url``, checked against ``expected``'s sha256 if given."""
    data = read_buffer(url)
    if expected is not None:
        _check_digest(url, expected, hashlib.sha256(data).hexdigest(), len(data))
    return data


def _check_digest(url: str, expected: FileRecord, digest: str, size: int) -> None:
    if digest != expected.sha256:
        raise IntegrityError(
            f"{url} is damaged: its sha256 is {digest}, the "
            f"manifest says {expected.sha256} ({size} bytes read); nothing was changed")


def _check_rows(url: str, expected: FileRecord, rows: int) -> None:
    if rows != expected.rows:
        raise IntegrityError(f"{url} has {rows} rows, the manifest says {expected.rows}")


# What pyarrow raises for a file that is not (valid) Parquet: its own errors, OSErrors
# without an errno (pyarrow's for damaged data; one with an errno, or a connection or
# timeout error, is the storage's), and a damaged footer's names that are not UTF-8
# (UnicodeDecodeError, a ValueError).
_PARQUET_ERRORS = (pa.ArrowException, OSError, ValueError)


class ParquetInput:
    """An input Parquet file, read in batches: ``with ParquetInput(url) as parquet:``
    reads its footer (``parquet.schema``, ``parquet.rows``), and :meth:`batches` its rows.

    Whatever makes the file unreadable is an :class:`UnreadableFile`, raised by the
    ``with`` or by :meth:`batches`, never for errors of the code that consumes the rows:
    not Parquet, damaged, gone, not readable by us, or not a regular file (a FIFO would
    block the reader forever).
    """

    def __init__(self, url: str):
        self.url = url
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "ParquetInput":
        fs, path = filesystem(self.url)
        with self._unreadable():
            if isinstance(fs, LocalFileSystem) and fs.info(path)["type"] != "file":
                raise UnreadableFile(f"{self.url} is not a regular file")
            handle = self._stack.enter_context(fs.open(path, "rb"))
            self._parquet = pq.ParquetFile(handle)
            self.schema = self._parquet.schema_arrow
            str(self.schema)  # decodes every name now: a damaged footer's may not be UTF-8
            self.rows = self._parquet.metadata.num_rows
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()

    def batches(self, batch_bytes: int) -> Iterator[tuple[int, pa.Table]]:
        """The rows in batches of about ``batch_bytes`` (uncompressed), each with the
        number of its first row: never the whole file in memory."""
        metadata = self._parquet.metadata
        size = sum(metadata.row_group(group).total_byte_size
                   for group in range(metadata.num_row_groups))
        batch_rows = max(1, int(batch_bytes * metadata.num_rows // max(1, size)))
        first_row = 0
        with self._unreadable():
            for batch in self._parquet.iter_batches(batch_size=batch_rows):
                yield first_row, pa.Table.from_batches([batch])
                first_row += batch.num_rows

    @contextlib.contextmanager
    def _unreadable(self) -> Iterator[None]:
        try:
            yield
        except UnreadableFile:
            self._stack.close()
            raise
        except (FileNotFoundError, PermissionError, IsADirectoryError) as error:
            self._stack.close()
            raise UnreadableFile(f"{self.url} cannot be read: {error.strerror or error}"
                                 ) from error
        except _PARQUET_ERRORS as error:
            self._stack.close()
            if isinstance(error, (ConnectionError, TimeoutError)) or getattr(
                    error, "errno", None):  # the storage failed, not the file: retry it
                raise StorageError(f"cannot read {self.url}: "
                                   f"{str(error).splitlines()[0]}") from error
            raise UnreadableFile(f"{self.url} is not a readable Parquet file: "
                                 f"{str(error).splitlines()[0]}") from error


def write_ipc_named_by_content(folder: str, table: pa.Table, batch_rows: int,
                               cache: bool = True) -> str:
    """Write ``table`` as an Arrow IPC file in record batches of ``batch_rows`` rows
    (the last one fewer, so :func:`read_ipc_rows` reads a row range without the rest)
    into ``folder``, named by the sha256 of its bytes: writing the same table again
    rewrites the same file. Returns its URL. IPC costs nothing to encode or decode: for
    transient files. A local file is streamed to disk (``cache``: see
    :func:`write_bytes`); an object store's is made in memory first, to name it."""
    batches = table.combine_chunks().to_batches(max_chunksize=batch_rows)
    fs, local_folder = filesystem(folder)
    if not isinstance(fs, LocalFileSystem):
        sink = pa.BufferOutputStream()
        _write_ipc(sink, table.schema, batches)
        data = sink.getvalue()
        url = join(folder, hashlib.sha256(data).hexdigest()[:32] + ".arrow")
        write_bytes(url, data, durable=False)
        return url
    # Written under a name of its own, then renamed to its content's once hashed.
    unnamed = os.path.join(local_folder, f"unnamed-{uuid.uuid4().hex}.arrow")
    hasher = hashlib.sha256()
    with _local_file(folder, unnamed, durable=False) as temporary, \
            _LocalWriter(temporary, cache, hasher=hasher) as out:
        _write_ipc(pa.PythonFile(out, mode="w"), table.schema, batches)
    name = hasher.hexdigest()[:32] + ".arrow"
    with storage_errors(folder, "write"):
        os.replace(unnamed, os.path.join(local_folder, name))
    return join(folder, name)


def _write_ipc(sink, schema: pa.Schema, batches: Sequence[pa.RecordBatch]) -> None:
    with pa.ipc.new_file(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)


def read_ipc_rows(url: str, start: int, stop: int, batch_rows: int,
                  cache: bool = True) -> pa.Table:
    """Rows ``[start, stop)`` of an IPC file made by :func:`write_ipc_named_by_content`,
    reading only the record batches that hold them; with ``cache=False``, a local
    file's pages are dropped from the page cache afterwards (see :func:`write_bytes`)."""
    fs, path = filesystem(url)
    with storage_errors(url, "read"), fs.open(path, "rb") as handle:
        reader = pa.ipc.open_file(handle)
        first, last = start // batch_rows, (stop - 1) // batch_rows
        table = pa.Table.from_batches(
            [reader.get_batch(index) for index in range(first, last + 1)], reader.schema)
        if not cache and isinstance(fs, LocalFileSystem) and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return table.slice(start - first * batch_rows, stop - start)
