"""The state store: attempts, the commit, the commit log, rollback and retention.

The protocol (the layout is in :mod:`schemas.manifest`): every attempt of a run writes
only below folders of its own (``snapshots/<run_id>/<attempt>/``, ``staging/...``,
``<outputs>/[_kind/]<run_id>/<attempt>/``), so two attempts never touch each other's files and
a retried bundle rewrites its own file. The job's last step writes the manifest, then
moves ``CURRENT`` from the snapshot the run was planned on to the attempt's, with a
compare-and-swap: an object generation precondition on ``gs://`` (google-cloud-storage),
a lock plus an atomic, synced rename on local disk. That swap is the only commit point.
``CURRENT`` holds the manifest's sha256 and the manifest every file's, so whatever a
run reads from a snapshot is checked. Each move of ``CURRENT`` is also written to the
create-only commit log (``log/``), which is what history, "was this run id committed"
and retention read, without opening every ancestor manifest.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
from typing import Any, Iterator

from fsspec.implementations.local import LocalFileSystem

from schemas.contract import InputError
from schemas.manifest import (RELATIVE_LAYOUT, RETIRED, RUN_FILE_TREES, SNAPSHOT_FILE_KINDS,
                              CommitRecord, Manifest, ManifestError, attempt_started_at, checked_run_id,
                              log_name, outputs_dir, snapshot_dir, snapshot_file_name,
                              staging_dir)
from storage.faults import fault_point
from storage.files import (IntegrityError, StorageError, exists, filesystem, is_gcs, join,
                           json_bytes, list_names, parse_json, read_bytes, read_table,
                           remove_file, remove_tree, storage_errors, url_of,
                           write_bytes, write_json)

DEFAULT_ORPHAN_GRACE_SECONDS = 86_400  # files of uncommitted attempts live a day at least

Snapshot = tuple[str, "str | None"]  # (run_id, attempt); attempt None before attempts


def check_retention(keep: int | None, orphan_grace_hours: float) -> None:
    """``--keep`` and ``--orphan-grace-hours`` as runs and ``gc`` take them."""
    if keep is not None and keep < 1:
        raise InputError(f"--keep {keep}: keep at least 1 snapshot (the current one)")
    if not 0 < orphan_grace_hours < float("inf"):
        raise InputError("--orphan-grace-hours must be a number of hours above 0")


class StateConflictError(RuntimeError):
    """The committed state moved while this run was running, or the run id is taken."""


class UnsupportedLocation(ValueError):
    """``--state`` is on a filesystem without an atomic conditional write."""


def _check_state_location(url: str) -> None:
    """Refuse a ``--state`` where ``CURRENT`` cannot be swapped atomically."""
    fs, _ = filesystem(url)
    if not (isinstance(fs, LocalFileSystem) or is_gcs(fs)):
        raise UnsupportedLocation(
            f"--state {url}: {fs.protocol} has no atomic conditional write, so a commit "
            "could be lost to a concurrent one; use a local path or gs://")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


class StateStore:
    """The versioned state under one ``--state`` URL."""

    def __init__(self, url: str):
        _check_state_location(url)
        self.url = url.rstrip("/")
        self._current_url = join(self.url, "CURRENT")

    # -- locations --
    def snapshot_url(self, run_id: str, attempt: str | None) -> str:
        return join(self.url, snapshot_dir(run_id, attempt))

    def snapshot_file_url(self, run_id: str, attempt: str, kind: str, shard: int,
                          shards: int) -> str:
        """A snapshot data file: ``kind`` is ``state`` or ``pending``."""
        return join(self.snapshot_url(run_id, attempt), snapshot_file_name(kind, shard, shards))

    def staging_url(self, run_id: str, attempt: str) -> str:
        """Where a running attempt parks chunk features (removed when it ends)."""
        return join(self.url, staging_dir(run_id, attempt))

    def manifest_url(self, run_id: str, attempt: str | None) -> str:
        return join(self.snapshot_url(run_id, attempt), "manifest.json")

    def report_url(self, run_id: str, attempt: str | None) -> str:
        if attempt is None:  # written before attempts
            return join(self.url, "runs", run_id, "report.json")
        return join(self.snapshot_url(run_id, attempt), "report.json")

    def _retired_url(self, run_id: str, attempt: str | None) -> str:
        return join(self.snapshot_url(run_id, attempt), RETIRED)

    # -- CURRENT and the commit log --
    def _recovery(self) -> str:
        """How to put a good CURRENT back, naming the newest logged commits."""
        newest = list(dict.fromkeys(r.run_id for r in reversed(self._logged())))[:3]
        return (f"the newest commits in {join(self.url, 'log')} are "
                f"{', '.join(newest) or 'none (a state from before the log)'}; "
                f"`seqcarry rollback --state {self.url} --to "
                f"{newest[0] if newest else '<run_id>'}` rewrites CURRENT after verifying "
                "that snapshot")

    def current(self) -> CommitRecord | None:
        """The committed snapshot, or None before the first commit. A missing (with
        snapshots present) or damaged ``CURRENT`` is an :class:`IntegrityError`."""
        data, token = _read_pointer(self._current_url)
        if data is None:
            if self._ever_committed():
                raise IntegrityError(f"{self._current_url} is missing but {self.url} holds "
                                     f"committed snapshots; {self._recovery()}")
            return None
        try:
            return CommitRecord.from_json(parse_json(self._current_url, data), token)
        except (ManifestError, IntegrityError) as error:
            raise IntegrityError(f"{self._current_url} is damaged ({error}); "
                                 f"{self._recovery()}") from error

    def _ever_committed(self) -> bool:
        """Whether anything was committed here: the commit log, or what states from
        before it hold (``runs/``, a manifest directly in a run's snapshot folder).
        Files of attempts that never committed (a first run that died) do not count."""
        if list_names(join(self.url, "log"))[1] or list_names(join(self.url, "runs"))[0]:
            return True
        root = join(self.url, "snapshots")
        return any("manifest.json" in list_names(join(root, run_id))[1]
                   for run_id in list_names(root)[0])

    def _logged(self) -> list[CommitRecord]:
        """The commit log, oldest first."""
        log = join(self.url, "log")
        records = []
        for name in list_names(log)[1]:
            if name.endswith(".json"):
                url = join(log, name)
                try:
                    records.append(CommitRecord.from_json(parse_json(url, read_bytes(url))))
                except ManifestError as error:
                    raise IntegrityError(f"{url} is damaged: {error}") from error
        return sorted(records, key=lambda record: record.sequence)

    def commits(self) -> list[CommitRecord]:
        """Every move of CURRENT, oldest first: the commit log, plus CURRENT itself
        where its log entry was not written yet (a commit killed right after its
        swap). A state written before the log has only CURRENT here."""
        logged = self._logged()
        try:
            pointer = self.current()
        except IntegrityError:  # the log still tells what was committed (for rollback)
            pointer = None
        if pointer and not any(r.sequence == pointer.sequence for r in logged):
            logged.append(pointer)
        return logged

    def _log(self, record: CommitRecord) -> None:
        """Write ``record``'s log entry (create-only in effect: only the swap that moved
        CURRENT to this sequence writes it, and a retry writes the same bytes)."""
        if record.sequence > 0:
            url = join(self.url, log_name(record.sequence))
            if not exists(url):
                write_json(url, record.to_json())

    # -- reading snapshots --
    def manifest(self, run_id: str, attempt: str | None,
                 sha256: str | None = None) -> Manifest:
        """A snapshot's manifest; with ``sha256``, checked against it first."""
        url = self.manifest_url(run_id, attempt)
        data = read_bytes(url)
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"{url} is damaged: its sha256 does not match the one "
                                 f"recorded in {self._current_url}")
        payload = parse_json(url, data)
        try:
            if isinstance(payload, dict) and payload.pop("layout", None) == RELATIVE_LAYOUT:
                for kind in SNAPSHOT_FILE_KINDS:
                    payload[kind] = [record | {"path": self._resolve(record["path"])}
                                     for record in payload[kind]]
            return Manifest.from_json(payload)
        except (ManifestError, KeyError, TypeError) as error:
            raise IntegrityError(f"{url} is damaged: {error}") from error

    def committed(self) -> Manifest | None:
        """The manifest CURRENT names, checked, or None before the first commit."""
        pointer = self.current()
        return self.manifest_of(pointer) if pointer else None

    def manifest_of(self, record: CommitRecord) -> Manifest:
        """The manifest a commit record names, checked against its sha256."""
        if not exists(self.manifest_url(*record.snapshot)):
            raise IntegrityError(
                f"{self._current_url} names snapshot {record.run_id} whose manifest "
                f"{self.manifest_url(*record.snapshot)} is missing; {self._recovery()}")
        return self.manifest(*record.snapshot, record.manifest_sha256)

    def lineage(self) -> list[Manifest]:
        """The committed snapshot and its ancestors, newest first (following parents
        from CURRENT); stops at an ancestor removed by retention (``--keep``)."""
        pointer = self.current()
        if pointer is None:
            return []
        manifests = [self.manifest_of(pointer)]
        while manifests[-1].parent is not None:
            parent = (manifests[-1].parent, manifests[-1].parent_attempt)
            if not exists(self.manifest_url(*parent)):
                break
            manifests.append(self.manifest(*parent))
        return manifests

    history = lineage  # the runs that made the committed state, newest first

    def snapshots(self) -> list[tuple[Manifest, str]]:
        """Every committed snapshot still here (one can roll back to each), newest
        commit first, each with where it stands: ``current``, ``ancestor`` (of the
        current one) or ``rolled back from`` (off the current lineage)."""
        lineage = self.lineage()
        on_lineage = {manifest.run_id for manifest in lineage}
        found: dict[str, Manifest] = {}
        for record in reversed(self.commits()):
            if (record.run_id in found or exists(self._retired_url(*record.snapshot))
                    or not exists(self.manifest_url(*record.snapshot))):
                continue
            found[record.run_id] = self.manifest(*record.snapshot,
                                                 record.manifest_sha256 or None)
        for manifest in lineage:  # states from before the commit log
            found.setdefault(manifest.run_id, manifest)
        current = lineage[0].run_id if lineage else None
        return [(manifest, "current" if run_id == current else
                 "ancestor" if run_id in on_lineage else "rolled back from")
                for run_id, manifest in found.items()]

    def committed_attempt(self, run_id: str) -> CommitRecord | None:
        """The newest commit record of ``run_id`` (None if it was never committed)."""
        found = [record for record in self.commits() if record.run_id == run_id]
        if found:
            return found[-1]
        # A state from before the commit log: every commit left a report.
        if exists(self.report_url(run_id, None)):
            return CommitRecord(run_id, "", None)
        return None

    def _available(self, run_id: str) -> CommitRecord | None:
        """The commit of ``run_id`` if its snapshot is still there (not retired)."""
        checked_run_id(run_id, option="run id")  # it becomes part of paths
        record = self.committed_attempt(run_id)
        if record is None or not exists(self.manifest_url(*record.snapshot)):
            return None
        return record

    def was_committed(self, run_id: str) -> bool:
        """Whether ``run_id`` was ever committed here (even if ``--keep`` removed its
        snapshot since: newer snapshots may share its files)."""
        return (self.committed_attempt(run_id) is not None
                or exists(self._retired_url(run_id, None)))  # retired before the log

    def verify(self, run_id: str | None = None) -> Manifest:
        """Check a snapshot (default: the committed one) file by file: present, sha256
        and row count as in its manifest, readable Parquet. Raises on the first fault."""
        if run_id is None:
            record = self.current()
            if record is None:
                raise InputError(f"{self.url} has no committed snapshot")
        else:
            record = self._available(run_id)
            if record is None:
                raise InputError(f"{run_id} is not a committed snapshot of {self.url}; "
                                   f"`seqcarry snapshots --state {self.url}` lists them")
        manifest = (self.manifest_of(record) if run_id is None
                    else self.manifest(*record.snapshot, record.manifest_sha256 or None))
        for file in manifest.state_files + manifest.pending_files:
            read_table(file.path, file)
        return manifest

    # -- writing --
    def check_run_id_free(self, run_id: str) -> None:
        if self.was_committed(run_id):
            raise StateConflictError(f"run id {run_id} is already committed under "
                                     f"{self.url}; pass a new --run-id")

    def write_manifest(self, manifest: Manifest) -> None:
        """Write the (uncommitted) manifest. Snapshot files below the state root are
        named relative to it, so a state directory can be copied or moved whole (and
        ``--state`` spelled any way) and still read its own files."""
        payload = manifest.to_json() | {"layout": RELATIVE_LAYOUT}
        for kind in SNAPSHOT_FILE_KINDS:
            payload[kind] = [record | {"path": self._name(record["path"])}
                             for record in payload[kind]]
        write_json(self.manifest_url(manifest.run_id, manifest.attempt), payload)

    def _name(self, url: str) -> str:
        """How a manifest names a snapshot file: relative to the state root when it is
        below it (however either is spelled), else its full URL or absolute path."""
        key, root = file_key(url), file_key(self.url) + "/"
        return key[len(root):] if key.startswith(root) else key

    def _resolve(self, path: str) -> str:
        """A snapshot file's URL from its name in a manifest (relative to the state
        root, or a full URL or absolute path for files elsewhere)."""
        return path if "://" in path or os.path.isabs(path) else join(self.url, path)

    def commit(self, run_id: str, attempt: str, expected: CommitRecord | None) -> CommitRecord:
        """Move CURRENT from ``expected`` (what the run was planned on) to ``attempt``
        of ``run_id``, recording the sha256 of its manifest, which must be written.

        Idempotent: called again after its swap, it finds its own attempt in CURRENT
        and returns. If CURRENT moved elsewhere, nothing is changed and
        :class:`StateConflictError` says from what to what.
        """
        manifest = read_bytes(self.manifest_url(run_id, attempt))  # StorageError if missing
        if expected is not None:
            self._log(expected)  # a commit killed after its swap left no entry
        return self._swap(run_id, attempt, hashlib.sha256(manifest).hexdigest(), expected,
                          "this run")

    def _swap(self, run_id: str, attempt: str | None, sha256: str,
              expected: CommitRecord | None, who: str, token: Any = None,
              rollback: bool = False) -> CommitRecord:
        """Move CURRENT from ``expected`` (or, for a rollback, from the version
        ``token``) to ``attempt`` of ``run_id``. A prune *touches* CURRENT (rewrites the
        same bytes) to fence off rollbacks; a commit swaps from a touched but unchanged
        CURRENT all the same, and finds out if its own swap was done before, even if
        more commits followed."""
        data, _ = _read_pointer(self._current_url)
        if data is not None and _holds(data, run_id, attempt):
            now = CommitRecord.from_json(parse_json(self._current_url, data))
            self._log(now)  # the swap succeeded before: finish what it started
            return now
        if expected is not None and token is None:
            token = expected.token
        sequence = max([expected.sequence if expected else 0]
                       + [record.sequence for record in self._logged()[-1:]]) + 1
        record = CommitRecord(run_id, sha256, attempt, sequence, _now())
        swapped = _swap_pointer(self._current_url, token, json_bytes(record.to_json()))
        while not swapped and not rollback and expected is not None:
            now, token = _read_pointer(self._current_url)
            if not (now and _unchanged(now, expected)):
                break
            swapped = _swap_pointer(self._current_url, token, json_bytes(record.to_json()))
        if not swapped:
            done = None if rollback else self.committed_attempt(run_id)
            if done is not None and done.attempt == attempt:
                return done  # it did commit, and another commit followed
            moved_to = _parsed(_read_pointer(self._current_url)[0])
            if expected is not None and moved_to == expected:
                raise StateConflictError(
                    f"CURRENT was rewritten (by a prune or a repair) while {who} ran; "
                    f"nothing was changed: run it again")
            raise StateConflictError(
                f"state moved from {expected.run_id if expected else 'empty'} to "
                f"{_describe(moved_to)} while {who} ({run_id}, attempt {attempt}) was "
                f"running; {run_id} attempt {attempt} was not committed, and the "
                f"committed state is {_describe(moved_to)}'s, unchanged by this attempt")
        self._log(record)
        return record

    def rollback(self, run_id: str) -> Manifest:
        """Point CURRENT at another snapshot that was committed before (an ancestor, or
        one rolled back from), after verifying it. Works with a missing or damaged
        CURRENT too: this is how one is repaired."""
        # CURRENT is read once: a commit, rollback or prune that moves or touches it
        # while this one verifies makes the swap fail instead of being overwritten.
        data, token = _read_pointer(self._current_url)
        if data is not None and _holds(data, run_id):
            raise StateConflictError(f"{run_id} is already the committed snapshot")
        try:
            expected = self.current() if data is not None else None
        except IntegrityError:  # missing or damaged: swapped from the version read
            expected = None
        record = self._available(run_id)
        if record is None or exists(self._retired_url(*record.snapshot)):
            raise InputError(
                f"{run_id} is not a committed snapshot of {self.url} (or --keep removed "
                f"it); `seqcarry snapshots --state {self.url}` lists them")
        manifest = self.verify(run_id)
        if expected is not None and exists(self.manifest_url(*expected.snapshot)):
            self._log(expected)  # a real commit, maybe killed before its log entry
        self._swap(run_id, record.attempt, record.manifest_sha256 or hashlib.sha256(
            read_bytes(self.manifest_url(*record.snapshot))).hexdigest(),
            expected, "this rollback", token, rollback=True)
        return manifest

    def remove_staging(self, run_id: str, attempt: str) -> None:
        """Remove an attempt's staged chunks (and the run's folder, if left empty)."""
        _remove_folder(self.staging_url(run_id, attempt))

    def write_report(self, run_id: str, attempt: str, report: dict) -> None:
        write_json(self.report_url(run_id, attempt), report)

    def report(self, run_id: str, attempt: str | None) -> dict:
        """A committed run's report ({} if it has none, e.g. an imported state)."""
        url = self.report_url(run_id, attempt)
        return read_json_object(url) if exists(url) else {}

    # -- retention --
    def prune(self, keep: int, outputs_url: str | None = None,
              grace_seconds: float = DEFAULT_ORPHAN_GRACE_SECONDS) -> list[str]:
        """Keep the snapshots of the ``keep`` most recent commits (rollbacks count as
        commits; the current one is always kept), retire the other committed ones, and
        remove the files of attempts that never committed once older than
        ``grace_seconds``. Returns the run ids retired now.

        Retiring writes a marker, then deletes the manifest. A file of a retired
        snapshot is deleted only when no kept snapshot lists it (layers are shared), so
        a later prune deletes what is still shared now. Each step can be repeated: a
        prune killed anywhere is finished by the next one. Files of attempts younger
        than the grace period are never touched: they may belong to a running job.
        """
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.committed()  # a missing or damaged CURRENT stops retention here
        start, start_token = _read_pointer(self._current_url)
        # Newest first: the commit log, then snapshots from before the log (its
        # lineage first, then any other committed one, e.g. rolled back from).
        recent = [record.snapshot for record in reversed(self.commits())] + [
            (manifest.run_id, None) for manifest in self.lineage()
            if manifest.attempt is None] + self._legacy_committed()
        kept: list[Snapshot] = []
        for snapshot in recent:  # retired ones are gone for good, even if recent
            if (snapshot not in kept and len(kept) < keep
                    and exists(self.manifest_url(*snapshot))):
                kept.append(snapshot)
        committed = set(recent)
        retired_now = []
        for snapshot in sorted(committed - set(kept), key=str):
            if exists(self.manifest_url(*snapshot)):  # not retired yet
                write_json(self._retired_url(*snapshot), {"run_id": snapshot[0],
                                                          "attempt": snapshot[1]})
                remove_file(self.manifest_url(*snapshot))
                retired_now.append(snapshot[0])
                fault_point("mid_prune")
        in_use = {file_key(record.path) for snapshot in kept
                  for manifest in [self.manifest(*snapshot)]
                  for record in manifest.state_files + manifest.pending_files}
        # The fence: rewrite CURRENT's same bytes, so that a rollback that read it
        # before the markers were written fails its swap. If CURRENT moved since this
        # prune began (a rollback, maybe to a snapshot retired here), delete nothing:
        # the next prune will, from the state it finds.
        if start is not None and not _swap_pointer(self._current_url, start_token, start,
                                                   lost_reply_ok=False):
            return retired_now
        cutoff = (datetime.datetime.now(datetime.timezone.utc)
                  - datetime.timedelta(seconds=grace_seconds))
        for snapshot in self._snapshot_folders():
            if snapshot in kept:
                continue
            if snapshot in committed or exists(self._retired_url(*snapshot)):
                self._remove_unused(snapshot, in_use)
            elif _older_than(snapshot[1], cutoff):  # an attempt that never committed
                self._remove_unused(snapshot, in_use)
        for run_id, attempt in _attempt_folders(join(self.url, "staging")):
            if _older_than(attempt, cutoff):
                self.remove_staging(run_id, attempt)
        for kind, tree in RUN_FILE_TREES.items() if outputs_url else ():
            for snapshot in _attempt_folders(join(outputs_url, tree) if tree else outputs_url):
                if snapshot not in committed and _older_than(snapshot[1], cutoff):
                    _remove_folder(join(outputs_url, outputs_dir(*snapshot, kind)))
        return retired_now

    def _legacy_committed(self) -> list[Snapshot]:
        """Snapshots committed before the commit log (a manifest in the run's folder
        and a report in ``runs/``), newest run number first."""
        runs = list_names(join(self.url, "runs"))[0]
        found = [(self.manifest(run_id, None).run_number, run_id) for run_id in runs
                 if exists(self.manifest_url(run_id, None))]
        return [(run_id, None) for _, run_id in sorted(found, reverse=True)]

    def _snapshot_folders(self) -> list[Snapshot]:
        """Every snapshot folder: an attempt's, or a run's from before attempts."""
        root = join(self.url, "snapshots")
        found: list[Snapshot] = []
        for run_id in list_names(root)[0]:
            attempts, files = list_names(join(root, run_id))
            found += [(run_id, attempt) for attempt in attempts]
            if files:
                found.append((run_id, None))
        return found

    def _remove_unused(self, snapshot: Snapshot, in_use: set[str]) -> None:
        """Delete the snapshot's data files that no kept snapshot lists; the whole
        folder once none is left."""
        folder = self.snapshot_url(*snapshot)
        files = [join(folder, name) for name in list_names(folder)[1]
                 if name.endswith(".parquet")]
        unused = [url for url in files if file_key(url) not in in_use]
        if len(unused) < len(files):
            for url in unused:
                remove_file(url)
        elif snapshot[1] is None:  # before attempts: only the run's own files
            for name in list_names(folder)[1]:
                remove_file(join(folder, name))
            _remove_folder(folder, recursive=False)
        else:
            _remove_folder(folder)


def _remove_folder(url: str, recursive: bool = True) -> None:
    """Delete the folder ``url`` (only if empty, unless ``recursive``), then its parent
    (the run's folder) if that is left empty."""
    if recursive:
        remove_tree(url)
    parent = url.rstrip("/").rsplit("/", 1)[0]
    for folder in (url, parent):
        if list_names(folder) == ([], []):
            remove_tree(folder)


def read_json_object(url: str) -> dict:
    """A JSON file that must hold an object (an IntegrityError otherwise)."""
    payload = parse_json(url, read_bytes(url))
    if not isinstance(payload, dict):
        raise IntegrityError(f"{url} is damaged: it holds {type(payload).__name__}, "
                             "not a JSON object")
    return payload


def _describe(record: CommitRecord | None) -> str:
    return f"{record.run_id} (attempt {record.attempt})" if record else "empty"


def _parsed(data: bytes | None) -> CommitRecord | None:
    """CURRENT's bytes as a record; None if absent or damaged."""
    try:
        return CommitRecord.from_json(parse_json("CURRENT", data)) if data else None
    except (ManifestError, IntegrityError):
        return None


def _holds(data: bytes, run_id: str, attempt: str | None = ...) -> bool:
    """Whether CURRENT's bytes name ``run_id`` (and ``attempt``, when given)."""
    record = _parsed(data)
    return (record is not None and record.run_id == run_id
            and (attempt is ... or record.attempt == attempt))


def _unchanged(data: bytes, expected: CommitRecord) -> bool:
    """Whether CURRENT's bytes still say exactly what ``expected`` said (a prune may
    have rewritten them, which changes only the token)."""
    return _parsed(data) == expected


def _older_than(attempt: str | None, cutoff: datetime.datetime) -> bool:
    started = attempt_started_at(attempt) if attempt else None
    return started is not None and started < cutoff


def _attempt_folders(root: str) -> list[Snapshot]:
    """``(run_id, attempt)`` of every ``<root>/<run_id>/<attempt>/`` folder."""
    return [(run_id, attempt) for run_id in list_names(root)[0]
            for attempt in list_names(join(root, run_id))[0]
            if attempt_started_at(attempt) is not None]


def file_key(url: str) -> str:
    """One name per file however its URL is spelled (``state/x``, ``./state/x``, an
    absolute path, a symlink): manifests written before the relative layout keep
    paths as ``--state`` was typed then."""
    fs, path = filesystem(url)
    return os.path.realpath(path) if isinstance(fs, LocalFileSystem) else url_of(fs, path)


def run_file_url(outputs: str, run_id: str, attempt: str, kind: str, part: str) -> str:
    """A file of ``kind`` (a key of :data:`~schemas.manifest.RUN_FILE_TREES`) an attempt
    writes under ``--outputs``."""
    return join(outputs, outputs_dir(run_id, attempt, kind), f"part-{part}.parquet")


def remove_other_attempts(outputs: str, run_id: str, attempt: str) -> None:
    """Remove the output folders (every kind) of ``run_id``'s attempts other than
    ``attempt``, the one that committed: a run id commits once, so they are
    leftovers of failed tries, and ``<outputs>/<run_id>/`` then holds only the
    committed outputs."""
    for kind in RUN_FILE_TREES:
        root = join(outputs, outputs_dir(run_id, None, kind))
        for other in list_names(root)[0]:
            if other != attempt and attempt_started_at(other) is not None:
                _remove_folder(join(root, other))


# --- the compare-and-swap of CURRENT, per filesystem ----------------------------------

def _gcs_blob(path: str):
    """CURRENT as a google-cloud-storage blob (honours STORAGE_EMULATOR_HOST). No
    project: object reads and writes need none."""
    from google.cloud import storage as gcs

    bucket, key = path.split("/", 1)
    return gcs.Client(project=None).bucket(bucket).blob(key)


@contextlib.contextmanager
def _gcs_errors(url: str, doing: str) -> Iterator[None]:
    """google-cloud-storage's errors as one clear StorageError (it retries transient
    ones itself first: 429, 5xx, and conditional uploads)."""
    import requests
    from google.api_core import exceptions
    from google.auth import exceptions as auth_exceptions

    try:
        yield
    except (exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError,
            requests.RequestException) as error:  # retries exhausted, no credentials...
        raise StorageError(f"cannot {doing} {url}: {type(error).__name__}: "
                           f"{(str(error).splitlines() or [''])[0]}") from error


def _read_pointer(url: str) -> tuple[bytes | None, Any]:
    """CURRENT's bytes (None if absent) and the token that identifies this version."""
    fs, path = filesystem(url)
    if is_gcs(fs):
        from google.api_core import exceptions

        blob = _gcs_blob(path)
        with _gcs_errors(url, "read"):
            while True:  # the generation, then the content of exactly that generation
                try:
                    blob.reload()
                    return (blob.download_as_bytes(if_generation_match=blob.generation),
                            blob.generation)
                except exceptions.NotFound:
                    return None, None
                except exceptions.PreconditionFailed:
                    continue  # it moved between the two calls: read it again
    with storage_errors(url, "read"):
        try:
            with open(path, "rb") as handle:  # the bytes and the inode of one version
                data, status = handle.read(), os.fstat(handle.fileno())
        except FileNotFoundError:
            return None, None
    # Every write is a new file renamed into place: a rewrite of the same bytes
    # (a prune's fence) still changes the token.
    return data, (data, status.st_ino, status.st_mtime_ns)


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


def _swap_pointer(url: str, token: Any, data: bytes, lost_reply_ok: bool = True) -> bool:
    """Replace CURRENT with ``data`` if it is still the version ``token`` (None: absent).

    Returns False, changing nothing, if it is not. With ``lost_reply_ok``, a swap
    whose reply was lost and whose retry then hit the precondition counts as done:
    CURRENT holds ``data``.
    """
    fs, path = filesystem(url)
    if is_gcs(fs):
        from google.api_core import exceptions

        with _gcs_errors(url, "commit"):
            try:
                _gcs_blob(path).upload_from_string(
                    data, content_type="application/json", if_generation_match=token or 0)
                swapped = True
            except exceptions.PreconditionFailed:
                swapped = False
    else:
        with storage_errors(url, "commit"), _local_lock(path):
            swapped = _read_pointer(url)[1] == token
            if swapped:
                write_bytes(url, data)
    return swapped or (lost_reply_ok and _read_pointer(url)[0] == data)
