"""All storage access and the commit protocol, through fsspec (local paths, ``gs://``
through gcsfs, and other fsspec URLs).

Layout under ``--state``::

    CURRENT                              the commit pointer (JSON: run id, manifest sha256)
    snapshots/<run_id>/state-*.parquet   carried state of the sequences <run_id> touched
    snapshots/<run_id>/pending-*.parquet their deferred chunks, waiting for earlier ones
    snapshots/<run_id>/manifest.json     files (rows, sha256), parent, fingerprint, counts
    staging/<run_id>/                    chunk features while <run_id> runs
    runs/<run_id>/report.json            the run report

and under ``--outputs``: ``<run_id>/part-*.parquet`` (per-step outputs),
``<run_id>/dead_letters/`` and ``<run_id>/final_states/``.

The protocol: a run writes only under names that belong to its own run id (a retried
bundle rewrites its own file, never adds a copy), then its manifest, and only then
swaps ``CURRENT`` from the snapshot it started from to its own, with a
compare-and-swap: a generation precondition on ``gs://``, a lock plus atomic rename on
local disk. ``CURRENT`` holds the manifest's sha256 and the manifest holds every
file's, so everything a run reads from a snapshot is checked. Snapshots share
unchanged files with their parents (see :class:`Manifest`).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import fcntl
import glob
import hashlib
import io
import json
import os
import signal
import tempfile
import uuid
from typing import Any, Iterable, Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


class StorageError(RuntimeError):
    """A file or directory cannot be read or written, or holds something unexpected."""


class IntegrityError(StorageError):
    """A snapshot file does not match its manifest (truncated, altered or missing)."""


class StateConflictError(RuntimeError):
    """The committed state moved while this run was running, or the run id is taken."""


def join(base: str, *parts: str) -> str:
    """Join URL/path parts with '/', whatever the filesystem."""
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    # No listings cache: other processes write here too, and a stale listing must
    # never hide a snapshot file or CURRENT.
    return fsspec.core.url_to_fs(url, use_listings_cache=False)


def _is_gcs(fs: fsspec.AbstractFileSystem) -> bool:
    return "gs" in fs.protocol


@contextlib.contextmanager
def _storage_errors(url: str, doing: str) -> Iterator[None]:
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


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL that names ``path`` on ``fs`` (a plain path for local files)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def expand_glob(pattern: str) -> list[str]:
    """Files matching ``pattern`` (a path, directory or glob), sorted."""
    fs, path = _fs(pattern)
    with _storage_errors(pattern, "list"):
        if fs.isdir(path):
            path = join(path, "**", "*.parquet")
        return sorted(_url(fs, p) for p in fs.glob(path) if not fs.isdir(p))


def exists(url: str) -> bool:
    fs, path = _fs(url)
    with _storage_errors(url, "look up"):
        return fs.exists(path)


def check_location(url: str, option: str) -> None:
    """Fail fast, naming ``option``, if ``url``'s bucket does not exist."""
    fs, path = _fs(url)
    if isinstance(fs, LocalFileSystem):
        return
    root = path.split("/", 1)[0]
    with _storage_errors(url, "reach"):
        if not fs.exists(root):
            raise StorageError(f"{option} {url}: bucket {root} does not exist")


def remove_tree(url: str) -> None:
    """Delete ``url`` and everything below it, if it exists."""
    fs, path = _fs(url)
    with _storage_errors(url, "delete"):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def remove_file(url: str) -> None:
    """Delete one file if it exists."""
    fs, path = _fs(url)
    with _storage_errors(url, "delete"):
        if fs.exists(path):
            fs.rm_file(path)


def read_bytes(url: str) -> bytes:
    fs, path = _fs(url)
    try:
        with fs.open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as error:
        raise StorageError(f"{url} does not exist") from error
    except OSError as error:
        raise StorageError(f"cannot read {url}: {str(error).splitlines()[0]}") from error


def local_copy(url: str) -> str:
    """A local path holding the file or directory at ``url`` (the path itself for
    local ones)."""
    fs, path = _fs(url)
    if isinstance(fs, LocalFileSystem):
        return path
    target = os.path.join(tempfile.mkdtemp(prefix="seqcarry-"),
                          os.path.basename(path.rstrip("/")))
    with _storage_errors(url, "download"):
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
    fs, path = _fs(url)
    if isinstance(fs, LocalFileSystem):
        return path
    target = os.path.join(tempfile.mkdtemp(prefix="seqcarry-"), os.path.basename(path))
    with _storage_errors(url, "download"):
        for name in fs.glob(glob.escape(path) + ".*"):
            fs.get(name, target + name[len(path):])
    return target


def _write_bytes(url: str, data: bytes | pa.Buffer, durable: bool = True) -> None:
    """Write ``data`` so that readers see either nothing or all of it; ``durable``
    also flushes it to disk before it appears (local files)."""
    fs, path = _fs(url)
    if not isinstance(fs, LocalFileSystem):
        with _storage_errors(url, "write"), fs.open(path, "wb") as handle:
            handle.write(data)  # an object appears whole when closed
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(temporary, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temporary, path)


def _json_bytes(payload: Any) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()


def _parse_json(url: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IntegrityError(f"{url} is not valid JSON: {error}") from error


def write_json(url: str, payload: Any) -> None:
    _write_bytes(url, _json_bytes(payload))


def read_json(url: str) -> Any:
    return _parse_json(url, read_bytes(url))


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """A written data file: where, how many rows, and the sha256 of its bytes.

    ``layer`` is set on snapshot files: the run number of the run that wrote it (see
    :class:`Manifest`).
    """
    path: str
    rows: int
    sha256: str
    layer: int | None = None


def write_table(url: str, table: pa.Table, layer: int | None = None) -> FileRecord:
    """Write ``table`` as Parquet to ``url`` (all or nothing) and describe what was written."""
    buffer = io.BytesIO()
    # Dictionaries only for ids: float columns never repeat, and trying costs a third
    # of the write.
    pq.write_table(table, buffer, use_dictionary=[
        field.name for field in table.schema if pa.types.is_string(field.type)])
    data = buffer.getvalue()
    _write_bytes(url, data)
    return FileRecord(url, table.num_rows, hashlib.sha256(data).hexdigest(), layer)


def read_table(url: str, expected: FileRecord | None = None) -> pa.Table:
    """Read a Parquet file; with ``expected``, first check its sha256 and row count."""
    data = read_bytes(url)
    digest = hashlib.sha256(data).hexdigest() if expected is not None else None
    if expected is not None and digest != expected.sha256:
        raise IntegrityError(
            f"{url} is damaged: its sha256 is {digest}, the "
            f"manifest says {expected.sha256} ({len(data)} bytes read); nothing was changed")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as error:
        raise StorageError(f"{url} is not a readable Parquet file: {error}") from error
    if expected is not None and table.num_rows != expected.rows:
        raise IntegrityError(f"{url} has {table.num_rows} rows, the manifest says "
                             f"{expected.rows}")
    return table


def parquet_size(url: str) -> tuple[int, int]:
    """Rows and uncompressed bytes of a Parquet file, from its footer only."""
    fs, path = _fs(url)
    with fs.open(path, "rb") as handle:
        metadata = pq.ParquetFile(handle).metadata
    return metadata.num_rows, sum(metadata.row_group(group).total_byte_size
                                  for group in range(metadata.num_row_groups))


def distinct_values(urls: Sequence[str], column: str) -> set:
    """The distinct values of ``column`` over Parquet files (files without it add none)."""
    values = set()
    for url in urls:
        fs, path = _fs(url)
        with _storage_errors(url, "read"), fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            if column in parquet.schema_arrow.names:
                values.update(parquet.read(columns=[column]).column(column).to_pylist())
    return values


def write_tables(url: str, tables: Sequence[pa.Table]) -> None:
    """Write ``tables`` (one schema) as one Arrow IPC file, a record batch each, so that
    :func:`read_table_at` can read any one of them alone. For transient files: IPC
    costs nothing to encode or decode, and they are not synced to disk (a crash loses
    the run using them)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, tables[0].schema) as writer:
        for table in tables:
            writer.write_batch(table.combine_chunks().to_batches()[0])
    _write_bytes(url, sink.getvalue(), durable=False)


def read_table_at(url: str, index: int) -> pa.Table:
    """Table ``index`` of an Arrow IPC file written by :func:`write_tables`."""
    fs, path = _fs(url)
    with _storage_errors(url, "read"), fs.open(path, "rb") as handle:
        return pa.Table.from_batches([pa.ipc.open_file(handle).get_batch(index)])


# --- fault points: a testing hook to prove that a run dying anywhere is harmless ----

FAULT_ENV = "SEQCARRY_FAULT"
FAULT_STAGES = ("mid_compute", "after_state_file", "after_manifest", "before_commit",
                "after_commit")


class InjectedFault(RuntimeError):
    """Raised at a fault point when ``SEQCARRY_FAULT=<stage>:raise``."""


def fault_point(stage: str) -> None:
    """Die here if ``SEQCARRY_FAULT`` names this stage: ``<stage>`` or ``<stage>:kill``
    sends SIGKILL to this process, ``<stage>:raise`` raises :class:`InjectedFault`."""
    name, _, action = os.environ.get(FAULT_ENV, "").partition(":")
    if name != stage:
        return
    if action == "raise":
        raise InjectedFault(f"injected fault at {stage}")
    os.kill(os.getpid(), signal.SIGKILL)


# --- snapshots, manifests and the commit pointer -----------------------------------

SNAPSHOT_FILE_KINDS = ("state_files", "pending_files")  # a snapshot's own data files


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a snapshot holds; written before ``CURRENT`` is moved to it.

    A snapshot is *layered*, as table formats such as Iceberg and Delta Lake are: its
    state and pending files are immutable and may have been written by earlier runs.
    A run writes only the sequences it touched, in files of a new layer (numbered by
    its run number), and lists them after its parent's files; a compacting run writes
    every sequence into one new layer and lists nothing older. A sequence's state is
    its row in the newest layer that has one (see :func:`newest_layer`), and its
    pending chunks are the pending rows of that same layer.

    ``counts`` holds the run's tallies and the snapshot's totals
    (``sequences_live``, ``sequences_closed``, ``chunks_pending_total``).
    """
    run_id: str
    run_number: int  # 1 for the first run on a state, parent's + 1 after
    parent: str | None
    created_at: str
    model_fingerprint: str
    state_names: tuple[str, ...]
    counts: dict[str, int]
    state_files: tuple[FileRecord, ...]
    pending_files: tuple[FileRecord, ...]
    output_files: tuple[FileRecord, ...]
    dead_letter_files: tuple[FileRecord, ...]
    final_state_files: tuple[FileRecord, ...]

    @property
    def sequences(self) -> int:
        """Sequences with a state: live ones and tombstones of closed ones."""
        return self.counts.get("sequences_live", 0) + self.counts.get("sequences_closed", 0)

    @property
    def pending_chunks(self) -> int:
        return self.counts.get("chunks_pending_total", 0)

    @property
    def layers(self) -> int:
        """How many runs wrote the snapshot's state files."""
        return len({record.layer for record in self.state_files + self.pending_files})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def predates_layers(self) -> bool:
        """Written before snapshots were layered: its files are layer 0 and its counts
        may lack the snapshot's totals, so the next run compacts it."""
        return any(record.layer == 0 for record in self.state_files + self.pending_files)

    @classmethod
    def from_json(cls, payload: dict) -> "Manifest":
        fields = dict(payload, state_names=tuple(payload["state_names"]))
        for field in dataclasses.fields(cls):
            if field.name.endswith("_files"):
                fields[field.name] = tuple(FileRecord(**record)
                                           for record in payload[field.name])
        for kind in SNAPSHOT_FILE_KINDS:  # files written before layers existed: layer 0
            fields[kind] = tuple(dataclasses.replace(record, layer=record.layer or 0)
                                 for record in fields[kind])
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Pointer:
    """What ``CURRENT`` said when read: the committed run and its manifest's sha256.

    ``token`` identifies that exact version of ``CURRENT`` for the compare-and-swap
    (the object generation on GCS, the file's bytes elsewhere).
    """
    run_id: str
    manifest_sha256: str
    token: Any = dataclasses.field(compare=False, repr=False)


RETIRED = "RETIRED"  # marks a snapshot removed by --keep whose files may still be shared
# A manifest's "layout": its snapshot files are named relative to the state root.
# Manifests without one (written before) name them as --state was typed then.
RELATIVE_LAYOUT = "relative-to-state"


class StateStore:
    """The versioned state under one ``--state`` URL."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._current_url = join(self.url, "CURRENT")

    # -- locations --
    def snapshot_url(self, run_id: str) -> str:
        return join(self.url, "snapshots", run_id)

    def snapshot_file_url(self, run_id: str, kind: str, shard: int, shards: int) -> str:
        """A snapshot data file: ``kind`` is ``state`` or ``pending``."""
        return join(self.snapshot_url(run_id), f"{kind}-{shard:05d}-of-{shards:05d}.parquet")

    def staging_url(self, run_id: str) -> str:
        """Where a running run parks chunk features (removed when it ends)."""
        return join(self.url, "staging", run_id)

    def manifest_url(self, run_id: str) -> str:
        return join(self.snapshot_url(run_id), "manifest.json")

    def report_url(self, run_id: str) -> str:
        return join(self.url, "runs", run_id, "report.json")

    # -- reading --
    def current(self) -> Pointer | None:
        """The committed snapshot, or None before the first commit."""
        data, token = _read_pointer(self._current_url)
        if data is None:
            return None
        payload = _parse_json(self._current_url, data)
        return Pointer(payload["run_id"], payload["manifest_sha256"], token)

    def manifest(self, run_id: str, sha256: str | None = None) -> Manifest:
        """A snapshot's manifest; with ``sha256``, checked against it first."""
        url = self.manifest_url(run_id)
        data = read_bytes(url)
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"{url} is damaged: its sha256 does not match the one "
                                 f"recorded in {self._current_url}")
        payload = _parse_json(url, data)
        if payload.pop("layout", None) == RELATIVE_LAYOUT:
            for kind in SNAPSHOT_FILE_KINDS:
                payload[kind] = [record | {"path": self._resolve(record["path"])}
                                 for record in payload[kind]]
        return Manifest.from_json(payload)

    def committed(self) -> Manifest | None:
        """The manifest CURRENT names, checked, or None before the first commit."""
        pointer = self.current()
        return self.manifest(pointer.run_id, pointer.manifest_sha256) if pointer else None

    def history(self) -> list[Manifest]:
        """Committed snapshots, newest first, following parents from CURRENT; stops at
        a parent removed by retention (``--keep``)."""
        manifests = [self.committed()] if self.current() else []
        while manifests and manifests[-1].parent and exists(
                self.manifest_url(manifests[-1].parent)):
            manifests.append(self.manifest(manifests[-1].parent))
        return manifests

    def verify(self, run_id: str | None = None) -> Manifest:
        """Check a snapshot (default: the committed one) file by file: present, sha256
        and row count as in its manifest, readable Parquet. Raises on the first fault."""
        pointer = self.current()
        if run_id is None:
            if pointer is None:
                raise StorageError(f"{self.url} has no committed snapshot")
            run_id = pointer.run_id
        manifest = self.manifest(
            run_id, pointer.manifest_sha256 if pointer and pointer.run_id == run_id else None)
        for record in manifest.state_files + manifest.pending_files:
            read_table(record.path, record)
        return manifest

    # -- writing --
    def write_manifest(self, manifest: Manifest) -> None:
        """Write the (uncommitted) manifest. Snapshot files below the state root are
        named relative to it, so a state directory can be copied or moved whole (and
        ``--state`` spelled any way) and still read its own files."""
        payload = manifest.to_json() | {"layout": RELATIVE_LAYOUT}
        for kind in SNAPSHOT_FILE_KINDS:
            payload[kind] = [record | {"path": self._name(record["path"])}
                             for record in payload[kind]]
        write_json(self.manifest_url(manifest.run_id), payload)

    def _name(self, url: str) -> str:
        """How a manifest names a snapshot file: relative to the state root when it is
        below it (however either is spelled), else its full URL or absolute path."""
        key, root = _file_key(url), _file_key(self.url) + "/"
        return key[len(root):] if key.startswith(root) else key

    def _resolve(self, path: str) -> str:
        """A snapshot file's URL from its name in a manifest (relative to the state
        root, or a full URL or absolute path for files elsewhere)."""
        return path if "://" in path or os.path.isabs(path) else join(self.url, path)

    def _was_committed(self, run_id: str) -> bool:
        """Whether ``run_id``'s snapshot was committed at some point (it has a report,
        or is in the history; a run killed right after its commit has no report)."""
        return exists(self.report_url(run_id)) or any(
            m.run_id == run_id for m in self.history())

    def _retired_url(self, run_id: str) -> str:
        return join(self.snapshot_url(run_id), RETIRED)

    def prepare_run(self, run_id: str, outputs_url: str) -> None:
        """Make ``run_id`` ready to be written: refuse one that was ever committed (even
        if ``--keep`` removed its snapshot since: newer snapshots may share its files),
        and remove what an earlier, uncommitted attempt with this id left behind."""
        if self._was_committed(run_id) or exists(self._retired_url(run_id)):
            raise StateConflictError(f"run id {run_id} is already committed under "
                                     f"{self.url}; pass a new --run-id")
        remove_tree(self.snapshot_url(run_id))
        remove_tree(self.staging_url(run_id))
        remove_tree(join(outputs_url, run_id))

    def commit(self, run_id: str, expected: Pointer | None) -> None:
        """Move CURRENT from ``expected`` (what the run started from) to ``run_id``,
        recording the sha256 of ``run_id``'s manifest.

        The manifest must already be written. If CURRENT moved meanwhile, nothing is
        changed and :class:`StateConflictError` says from what to what.
        """
        manifest = read_bytes(self.manifest_url(run_id))  # StorageError if missing
        pointer = _json_bytes({
            "run_id": run_id, "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "committed_at": datetime.datetime.now(datetime.timezone.utc).isoformat()})
        if not _swap_pointer(self._current_url, expected.token if expected else None, pointer):
            now = self.current()
            raise StateConflictError(
                f"state moved from {expected.run_id if expected else 'empty'} to "
                f"{now.run_id if now else 'empty'} while this run was running; "
                f"{run_id} was not committed and the state is unchanged")

    def rollback(self, run_id: str) -> Manifest:
        """Point CURRENT at another snapshot that was committed before (an ancestor, or
        one rolled back from), after verifying it."""
        pointer = self.current()
        if pointer and pointer.run_id == run_id:
            raise StateConflictError(f"{run_id} is already the committed snapshot")
        if not (exists(self.manifest_url(run_id)) and self._was_committed(run_id)):
            raise StateConflictError(
                f"{run_id} is not a committed snapshot of {self.url}; "
                f"`seqcarry snapshots --state {self.url}` lists them")
        manifest = self.verify(run_id)
        self.commit(run_id, pointer)
        return manifest

    def prune(self, keep: int) -> list[str]:
        """Remove the committed snapshots older than the ``keep`` newest; returns their
        run ids.

        A removed snapshot is *retired*: a marker is written, then its manifest is
        deleted (which ends the history there). Then every file of a retired snapshot
        that no remaining manifest lists is deleted, and a retired snapshot with no
        files left goes entirely. Layers are shared, so a file stays while any
        snapshot lists it, one rolled back from included; retired snapshots are looked
        at on every prune, so files still shared now are deleted by a later one.
        """
        removed = self.history()[max(1, keep):]
        for manifest in removed:
            write_json(self._retired_url(manifest.run_id), {"run_id": manifest.run_id})
            remove_file(self.manifest_url(manifest.run_id))
        fs, root = _fs(join(self.url, "snapshots"))
        with _storage_errors(self.url, "list the snapshots of"):
            listed = [self.manifest(os.path.basename(os.path.dirname(path)))
                      for path in fs.glob(join(root, "*", "manifest.json"))]
            retired = [os.path.dirname(path) for path in fs.glob(join(root, "*", RETIRED))]
        in_use = {_file_key(record.path) for manifest in listed
                  for record in manifest.state_files + manifest.pending_files}
        for folder in retired:
            files = [_url(fs, path) for path in fs.glob(join(folder, "*.parquet"))]
            unused = [url for url in files if _file_key(url) not in in_use]
            if len(unused) == len(files):
                remove_tree(_url(fs, folder))
                continue
            for url in unused:
                remove_file(url)
        return [manifest.run_id for manifest in removed]

    def write_report(self, run_id: str, report: dict) -> None:
        write_json(self.report_url(run_id), report)


def _file_key(url: str) -> str:
    """One name per file however its URL is spelled (``state/x``, ``./state/x``, an
    absolute path, a symlink): manifests written before the relative layout keep
    paths as ``--state`` was typed then."""
    fs, path = _fs(url)
    return os.path.realpath(path) if isinstance(fs, LocalFileSystem) else _url(fs, path)


def newest_layer(versions: Iterable[tuple[int, Any]]) -> tuple[int | None, list[Any]]:
    """Of one sequence's rows ``(layer, row)`` from a layered snapshot, the newest layer
    and the rows it holds (each layer is a complete version of the sequence)."""
    by_layer = collections.defaultdict(list)
    for layer, row in versions:
        by_layer[layer].append(row)
    if not by_layer:
        return None, []
    newest = max(by_layer)
    return newest, by_layer[newest]


def run_file_url(outputs: str, run_id: str, folder: str, part: str) -> str:
    """A file a run writes under ``--outputs``: ``<outputs>/<run_id>/[folder/]part-*``."""
    return join(outputs, run_id, *([folder] if folder else []), f"part-{part}.parquet")


# --- the compare-and-swap of CURRENT, per filesystem ----------------------------------

def _read_pointer(url: str) -> tuple[bytes | None, Any]:
    """CURRENT's bytes (None if absent) and the token that identifies this version."""
    fs, path = _fs(url)
    with _storage_errors(url, "read"):
        try:
            if _is_gcs(fs):
                # Generation first, then content: if CURRENT moves in between, the
                # stale generation makes the commit fail; it can never pass wrongly.
                generation = int(fs.info(path)["generation"])
                return fs.cat_file(path), generation
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None, None
    return data, data


def _gcs_upload_if_generation(fs, path: str, data: bytes, generation: int) -> bool:
    """Upload ``data`` only if the object's generation is ``generation`` (0: absent).

    A multipart upload carries the precondition; GCS (and fake-gcs-server) refuse it
    with HTTP 412, which gcsfs raises as FileExistsError.
    """
    bucket, key = path.split("/", 1)
    body = (b"--seqcarry\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            + json.dumps({"name": key}).encode()
            + b"\r\n--seqcarry\r\nContent-Type: application/json\r\n\r\n"
            + data + b"\r\n--seqcarry--")
    try:
        fs.call("POST", f"{fs._location}/upload/storage/v1/b/{bucket}/o",
                uploadType="multipart", ifGenerationMatch=str(generation), data=body,
                headers={"Content-Type": 'multipart/related; boundary="seqcarry"'},
                json_out=True)
    except FileExistsError:
        return False
    return True


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
    """An exclusive lock next to ``path``; the kernel releases it if the process dies."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _swap_pointer(url: str, token: Any, data: bytes) -> bool:
    """Replace CURRENT with ``data`` if it is still the version ``token`` (None: absent).

    Returns False, changing nothing, if it is not. A swap whose reply was lost and
    whose retry then hit the precondition counts as done: CURRENT holds ``data``.
    """
    fs, path = _fs(url)
    with _storage_errors(url, "commit"):
        if _is_gcs(fs):
            swapped = _gcs_upload_if_generation(fs, path, data, token or 0)
        elif isinstance(fs, LocalFileSystem):
            with _local_lock(path):
                swapped = _read_pointer(url)[1] == token
                if swapped:
                    _write_bytes(url, data)
        else:  # no atomic primitive here: checked, then written
            swapped = _read_pointer(url)[1] == token
            if swapped:
                _write_bytes(url, data)
        return swapped or _read_pointer(url)[0] == data
