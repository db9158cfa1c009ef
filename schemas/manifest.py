"""The state directory's contract as plain data: manifests, commit records (what
``CURRENT`` and the commit log hold), attempt ids and the path layout.

Layout under ``--state`` (names relative to it)::

    CURRENT                                      the commit pointer (a CommitRecord)
    log/<sequence>.json                          every move of CURRENT, create-only
    snapshots/<run_id>/<attempt>/manifest.json   files (rows, sha256), parent, counts
    snapshots/<run_id>/<attempt>/state-*.parquet carried state of the sequences it touched
    snapshots/<run_id>/<attempt>/pending-*.parquet  their deferred chunks
    snapshots/<run_id>/<attempt>/report.json     the run report, written by the job
    staging/<run_id>/<attempt>/                  chunk features while the attempt runs

and under ``--outputs`` (see :data:`RUN_FILE_TREES`)::

    <run_id>/<attempt>/part-*.parquet                 per-step outputs, nothing else
    _dead_letters/<run_id>/<attempt>/part-*.parquet   rejected input, with reasons
    _final_states/<run_id>/<attempt>/part-*.parquet   states of sequences that ended

so ``<outputs>/`` and ``<outputs>/<run_id>/`` read whole (pyarrow, pandas, Beam's
``ReadFromParquet``, BigQuery, Spark) hold one schema: those readers skip names that
start with ``_``, and no run id can. Every file of an attempt is below a folder of its
own, so two attempts of one run id never touch each other's files; once a run commits,
its other attempts' output folders are removed. Runs written before this layout keep
dead letters and final states inside the attempt's folder (``.../dead_letters/``), and
state directories written before attempts existed have no ``<attempt>`` level
(``attempt`` is None for them); manifests name every file, so both keep being read.
"""
from __future__ import annotations

import dataclasses
import datetime
import re
import secrets
from typing import Any, Iterable

from schemas.contract import InputError

SNAPSHOT_FILE_KINDS = ("state_files", "pending_files")  # a snapshot's own data files
RETIRED = "RETIRED"  # marks a snapshot removed by --keep whose files may still be shared
# A manifest's "layout": its snapshot files are named relative to the state root.
# Manifests without one (written before) name them as --state was typed then.
RELATIVE_LAYOUT = "relative-to-state"
_ATTEMPT_TIME = "%Y%m%dT%H%M%SZ"


class ManifestError(ValueError):
    """A manifest or commit record does not have the fields it must have."""


def new_attempt_id(now: datetime.datetime | None = None) -> str:
    """A fresh attempt id: its UTC start time (so its age is known from its name alone)
    and 8 random hex digits, e.g. ``20261201T144100Z-3f9a2c1d``."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"{now.strftime(_ATTEMPT_TIME)}-{secrets.token_hex(4)}"


def attempt_started_at(attempt: str) -> datetime.datetime | None:
    """When ``attempt`` started, from its id; None if it is not an attempt id."""
    try:
        return datetime.datetime.strptime(attempt.split("-", 1)[0], _ATTEMPT_TIME).replace(
            tzinfo=datetime.timezone.utc)
    except ValueError:
        return None


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def checked_run_id(run_id: str | None, prefix: str = "", option: str = "--run-id") -> str:
    """``run_id`` if it is a valid name (an InputError naming ``option`` if not), or
    ``prefix`` + the UTC time when None."""
    if run_id is None:
        run_id = prefix + datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y%m%dT%H%M%S%fZ")
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise InputError(f"{option} {run_id!r} must be letters, digits, '.', '_' or '-' "
                         "(at most 128, starting with a letter or digit)")
    return run_id


def snapshot_dir(run_id: str, attempt: str | None) -> str:
    """An attempt's snapshot folder, relative to the state root."""
    return "/".join(["snapshots", run_id] + ([attempt] if attempt else []))


def staging_dir(run_id: str, attempt: str) -> str:
    return f"staging/{run_id}/{attempt}"


# The trees under --outputs, by kind of run file: per-step outputs at the top.
RUN_FILE_TREES = {"outputs": "", "dead_letters": "_dead_letters",
                  "final_states": "_final_states"}


def outputs_dir(run_id: str, attempt: str | None, kind: str = "outputs") -> str:
    """An attempt's folder of ``kind`` (a key of :data:`RUN_FILE_TREES`) under
    ``--outputs``."""
    return "/".join(([RUN_FILE_TREES[kind]] if RUN_FILE_TREES[kind] else [])
                    + [run_id] + ([attempt] if attempt else []))


def snapshot_file_name(kind: str, shard: int, shards: int) -> str:
    """A snapshot data file's name: ``kind`` (``state`` or ``pending``) of the sequences
    whose stable hash modulo ``shards`` is ``shard``."""
    return f"{kind}-{shard:05d}-of-{shards:05d}.parquet"


_SHARD_NAME = re.compile(r"(?:^|/)(?:state|pending)-(\d+)-of-(\d+)\.parquet$")


def shard_of_file(path: str) -> tuple[int, int] | None:
    """(shard, shards) of a snapshot file named by :func:`snapshot_file_name`, or None
    for a name that does not say (a file written before sharding was fixed)."""
    found = _SHARD_NAME.search(path)
    return (int(found[1]), int(found[2])) if found else None


def log_name(sequence: int) -> str:
    return f"log/{sequence:010d}.json"


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
    ``parent_attempt`` and ``attempt`` are None in snapshots written before attempts.
    ``outputs_at`` says which outputs the run wrote (``every`` step of its chunks, or
    each chunk's ``last``); None in snapshots written before ``--outputs-at`` (every
    step) and in those not written by a run (``import-state``).
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
    attempt: str | None = None
    parent_attempt: str | None = None
    outputs_at: str | None = None

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

    @property
    def predates_layers(self) -> bool:
        """Written before snapshots were layered: its files are layer 0 and its counts
        may lack the snapshot's totals, so the next run compacts it."""
        return any(record.layer == 0 for record in self.state_files + self.pending_files)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, payload: Any) -> "Manifest":
        """A manifest from its JSON; :class:`ManifestError` if fields are missing or of
        the wrong kind."""
        try:
            fields = dict(payload, state_names=tuple(payload["state_names"]))
            for field in dataclasses.fields(cls):
                if field.name.endswith("_files"):
                    fields[field.name] = tuple(FileRecord(**record)
                                               for record in payload[field.name])
            for kind in SNAPSHOT_FILE_KINDS:  # files written before layers: layer 0
                fields[kind] = tuple(dataclasses.replace(record, layer=record.layer or 0)
                                     for record in fields[kind])
            manifest = cls(**fields)
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestError(f"not a seqcarry manifest ({type(error).__name__}: "
                                f"{error})") from error
        wrong = [name for name, value, kinds in manifest._typed_fields()
                 if not isinstance(value, kinds) or isinstance(value, bool)]
        if wrong:
            raise ManifestError(f"not a seqcarry manifest ({', '.join(wrong)} of the wrong "
                                "kind)")
        return manifest

    def _typed_fields(self):
        """(name, value, the types it may have) of every field a reader relies on."""
        text, maybe_text, maybe_int = str, (str, type(None)), (int, type(None))
        yield from [("run_id", self.run_id, text), ("run_number", self.run_number, int),
                    ("parent", self.parent, maybe_text), ("created_at", self.created_at, text),
                    ("model_fingerprint", self.model_fingerprint, text),
                    ("counts", self.counts, dict), ("attempt", self.attempt, maybe_text),
                    ("parent_attempt", self.parent_attempt, maybe_text),
                    ("outputs_at", self.outputs_at, maybe_text)]
        yield from (("state_names", name, text) for name in self.state_names)
        for field in dataclasses.fields(self):
            if field.name.endswith("_files"):
                for record in getattr(self, field.name):
                    yield from [(field.name, record.path, text), (field.name, record.rows, int),
                                (field.name, record.sha256, text),
                                (field.name, record.layer, maybe_int)]


@dataclasses.dataclass(frozen=True)
class CommitRecord:
    """One move of ``CURRENT``: what ``CURRENT`` holds, and what the commit log keeps
    of every commit and rollback (``log/<sequence>.json``).

    ``sequence`` counts the moves of ``CURRENT`` (1 for the first commit; 0 in a
    ``CURRENT`` written before the log existed). ``token`` identifies the version of
    ``CURRENT`` it was read from, for the compare-and-swap (the object generation on
    GCS, the file's bytes on local disk); it is not stored.
    """
    run_id: str
    manifest_sha256: str
    attempt: str | None = None
    sequence: int = 0
    committed_at: str = ""
    token: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def snapshot(self) -> tuple[str, str | None]:
        return self.run_id, self.attempt

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "attempt": self.attempt,
                "manifest_sha256": self.manifest_sha256, "sequence": self.sequence,
                "committed_at": self.committed_at}

    @classmethod
    def from_json(cls, payload: Any, token: Any = None) -> "CommitRecord":
        if not isinstance(payload, dict):
            raise ManifestError(f"a commit record is a JSON object, not {payload!r}"[:200])
        try:
            record = cls(run_id=payload["run_id"], manifest_sha256=payload["manifest_sha256"],
                         attempt=payload.get("attempt"), sequence=payload.get("sequence", 0),
                         committed_at=payload.get("committed_at", ""), token=token)
        except KeyError as missing:
            raise ManifestError(f"a commit record needs {missing.args[0]!r}") from missing
        if not (isinstance(record.run_id, str) and record.run_id
                and isinstance(record.manifest_sha256, str)
                and isinstance(record.sequence, int)
                and (record.attempt is None or isinstance(record.attempt, str))):
            raise ManifestError("a commit record's fields are of the wrong kind")
        return record


def newest_layer(versions: Iterable[tuple[int, Any]]) -> tuple[int | None, list[Any]]:
    """Of one sequence's rows ``(layer, row)`` from a layered snapshot, the newest layer
    and the rows it holds (each layer is a complete version of the sequence)."""
    by_layer: dict[int, list[Any]] = {}
    for layer, row in versions:
        by_layer.setdefault(layer, []).append(row)
    if not by_layer:
        return None, []
    newest = max(by_layer)
    return newest, by_layer[newest]
