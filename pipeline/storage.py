"""All storage access and the commit protocol, through fsspec.

Layout under ``--state``::

    CURRENT                              name of the committed snapshot (written last)
    snapshots/<run_id>/state-*.parquet   carried state, one row per live sequence
    snapshots/<run_id>/manifest.json     files (rows, sha256), parent, fingerprint, counts
    runs/<run_id>/report.json            the run report

and under ``--outputs``: ``<run_id>/part-*.parquet``.

A run writes only under names that belong to its own ``run_id``, so a retried bundle
rewrites its own file instead of adding a copy, and the committed snapshot is never
touched. Files are written whole to a temporary name and then moved into place.
The only commit point is replacing ``CURRENT``, after the manifest is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

class StorageError(RuntimeError):
    """A file or directory cannot be read or written, or holds something unexpected."""


class StateConflictError(RuntimeError):
    """The committed state moved while this run was running, or the run id is taken."""


def join(base: str, *parts: str) -> str:
    """Join URL/path parts with '/', whatever the filesystem."""
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL that names ``path`` on ``fs`` (a plain path for local files)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def expand_glob(pattern: str) -> list[str]:
    """Files matching ``pattern`` (a path, directory or glob), sorted."""
    fs, path = _fs(pattern)
    if fs.isdir(path):
        path = join(path, "**", "*.parquet")
    return sorted(_url(fs, p) for p in fs.glob(path) if not fs.isdir(p))


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """A written data file: where, how many rows, and the sha256 of its bytes."""
    path: str
    rows: int
    sha256: str


def write_table(url: str, table: pa.Table) -> FileRecord:
    """Write ``table`` as Parquet to ``url`` (all or nothing) and describe what was written."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = buffer.getvalue()
    _write_bytes(url, data)
    return FileRecord(url, table.num_rows, hashlib.sha256(data).hexdigest())


def read_table(url: str) -> pa.Table:
    fs, path = _fs(url)
    try:
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle)
    except FileNotFoundError as error:
        raise StorageError(f"{url} does not exist") from error
    except pa.ArrowInvalid as error:
        raise StorageError(f"{url} is not a readable Parquet file: {error}") from error


def parquet_rows(url: str) -> int:
    """Row count of a Parquet file, from its footer only."""
    fs, path = _fs(url)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def _write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or all of it."""
    fs, path = _fs(url)
    if not isinstance(fs, LocalFileSystem):
        with fs.open(path, "wb") as handle:  # an object appears whole when closed
            handle.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json(url: str, payload: Any) -> None:
    _write_bytes(url, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    fs, path = _fs(url)
    try:
        with fs.open(path, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError as error:
        raise StorageError(f"{url} does not exist") from error
    except json.JSONDecodeError as error:
        raise StorageError(f"{url} is not valid JSON: {error}") from error


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a snapshot holds; written before ``CURRENT`` is moved to it."""
    run_id: str
    parent: str | None
    created_at: str
    model_fingerprint: str
    state_names: tuple[str, ...]
    state_files: tuple[FileRecord, ...]
    output_files: tuple[FileRecord, ...]
    counts: dict[str, int]

    @property
    def sequences(self) -> int:
        return sum(record.rows for record in self.state_files)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"sequences": self.sequences}

    @classmethod
    def from_json(cls, payload: dict) -> "Manifest":
        return cls(
            run_id=payload["run_id"], parent=payload["parent"],
            created_at=payload["created_at"],
            model_fingerprint=payload["model_fingerprint"],
            state_names=tuple(payload["state_names"]),
            state_files=tuple(FileRecord(**r) for r in payload["state_files"]),
            output_files=tuple(FileRecord(**r) for r in payload["output_files"]),
            counts=dict(payload["counts"]))


class StateStore:
    """The versioned state under one ``--state`` URL."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    @property
    def _current_url(self) -> str:
        return join(self.url, "CURRENT")

    def current(self) -> str | None:
        """The committed snapshot's run id, or None before the first commit."""
        if not exists(self._current_url):
            return None
        fs, path = _fs(self._current_url)
        with fs.open(path, "rb") as handle:
            return handle.read().decode().strip() or None

    def snapshot_url(self, run_id: str) -> str:
        return join(self.url, "snapshots", run_id)

    def state_file_url(self, run_id: str, shard: int, shards: int) -> str:
        return join(self.snapshot_url(run_id), f"state-{shard:05d}-of-{shards:05d}.parquet")

    def manifest_url(self, run_id: str) -> str:
        return join(self.snapshot_url(run_id), "manifest.json")

    def report_url(self, run_id: str) -> str:
        return join(self.url, "runs", run_id, "report.json")

    def manifest(self, run_id: str) -> Manifest:
        return Manifest.from_json(read_json(self.manifest_url(run_id)))

    def history(self) -> list[Manifest]:
        """Committed snapshots, newest first, following parents from CURRENT."""
        manifests, run_id = [], self.current()
        while run_id:
            manifests.append(self.manifest(run_id))
            run_id = manifests[-1].parent
        return manifests

    def write_manifest(self, manifest: Manifest) -> None:
        write_json(self.manifest_url(manifest.run_id), manifest.to_json())

    def check_new_run(self, run_id: str) -> None:
        """Refuse a run id that is already used by a snapshot or a report."""
        if exists(self.manifest_url(run_id)) or exists(self.report_url(run_id)):
            raise StateConflictError(f"run id {run_id} is already used under {self.url}; "
                                     "pass a new --run-id")

    def commit(self, run_id: str, expected_parent: str | None) -> None:
        """Make ``run_id``'s snapshot the committed one, if CURRENT is still the parent.

        The manifest must already be written: CURRENT never names a partial snapshot.
        """
        if not exists(self.manifest_url(run_id)):
            raise StorageError(f"cannot commit {run_id}: {self.manifest_url(run_id)} is missing")
        current = self.current()
        if current != expected_parent:
            raise StateConflictError(f"state moved from {expected_parent} to {current} "
                                     f"while this run was running; {run_id} was not committed")
        _write_bytes(self._current_url, (run_id + "\n").encode())

    def write_report(self, run_id: str, report: dict) -> None:
        write_json(self.report_url(run_id), report)


def outputs_part_url(outputs: str, run_id: str, part: str) -> str:
    return join(outputs, run_id, f"part-{part}.parquet")
