"""Reading what committed runs produced: per-step outputs and carried states.

The outputs are read through the manifests, never by listing folders, so what is
returned is exactly what was committed (checksums checked), in every layout a state
has been written in::

    from pipeline.results import read_outputs
    table = read_outputs("build/demo/state", sequence_ids=["seq-00007"])
    frame = table.to_pandas()  # sequence_id, step, chunk_index, run_id, output_0...
"""
from __future__ import annotations

import collections
import datetime
from typing import BinaryIO, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet as pq

import storage
from schemas import (CarriedState, Chunk, InputError, chunks_from_table, matrices_from_array,
                     outputs_from_table, states_from_table, with_steps)


def _runs_to_read(store: storage.StateStore, run_id: str | None) -> list[storage.Manifest]:
    """The committed lineage oldest first, or the one committed snapshot ``run_id``."""
    if run_id is None:
        return store.lineage()[::-1]
    for manifest, _ in store.snapshots():
        if manifest.run_id == run_id:
            return [manifest]
    raise InputError(f"run {run_id!r} is not a committed snapshot kept in {store.url}; "
                     "`seqcarry snapshots` lists them")


def _steps_before(store: storage.StateStore, manifest: storage.Manifest,
                  wanted: set[str] | None) -> dict[str, int] | None:
    """Steps each sequence had seen before ``manifest``'s run (from its parent
    snapshot); None when that snapshot was removed by retention."""
    if manifest.parent is None:
        return {}
    parent = (manifest.parent, manifest.parent_attempt)
    if not storage.exists(store.manifest_url(*parent)):
        return None
    only = next(iter(wanted)) if wanted is not None and len(wanted) == 1 else None
    states, _ = snapshot_contents(store.manifest(*parent), only)
    return {key: state.steps_seen for key, state in states.items()}


def read_outputs(state_url: str, sequence_ids: Iterable[str] | None = None,
                 run_id: str | None = None) -> pa.Table:
    """The committed outputs, one row per step that has one, in step order per
    sequence (sequences sorted by id): ``sequence_id``, ``step`` (the step's place in
    the whole sequence, from 0), ``chunk_index``, ``run_id`` (the run that computed it)
    and ``output_0`` ... ``output_<k-1>`` (float32). A run with ``--outputs-at every``
    gave every step a row; one with ``last``, each chunk's last step only.

    Reads every run of the committed lineage (those retention still keeps), or only
    the committed snapshot ``run_id`` (an InputError if there is none such);
    ``sequence_ids`` limits it to those sequences. ``step`` is null for a sequence
    whose earlier steps are in a snapshot retention (``--keep``) has removed.
    """
    store = storage.StateStore(state_url)
    runs = _runs_to_read(store, run_id)
    wanted = None if sequence_ids is None else set(sequence_ids)
    parts = []
    for manifest in runs:
        for record in manifest.output_files:
            table = with_steps(storage.read_table(record.path, record))
            if wanted is not None:
                table = table.filter(pc.is_in(table["sequence_id"],
                                              pa.array(sorted(wanted), pa.string())))
            if len(table):
                parts.append(table.append_column(
                    "run_id", pa.array([manifest.run_id] * len(table), pa.string())))
    if not parts:
        return _per_step_table(pa.array([], pa.string()), pa.array([], pa.int64()),
                               pa.array([], pa.int64()), pa.array([], pa.string()),
                               np.zeros((0, 0), np.float32))
    chunks = pa.concat_tables(parts).sort_by([("sequence_id", "ascending"),
                                              ("chunk_index", "ascending")])
    matrices = matrices_from_array(chunks["outputs"], "outputs")
    widths = {matrix.shape[1] for matrix in matrices if len(matrix)}
    if len(widths) > 1:
        raise InputError(f"the outputs of {state_url} have different widths {sorted(widths)}: "
                         "read them one run at a time (--run-id)")
    # Each output's chunk row, and its step's place among its sequence's steps read
    # here: a chunk's outputs are those of its last ``kept`` steps (all, or the last).
    kept = np.fromiter((len(m) for m in matrices), np.int64, len(matrices))
    steps = chunks["steps"].to_numpy()
    row_of_output = np.repeat(np.arange(len(matrices)), kept)
    ids = chunks["sequence_id"].to_numpy(zero_copy_only=False)
    new_sequence = np.r_[True, ids[1:] != ids[:-1]]
    sequence_of_row = np.cumsum(new_sequence) - 1
    first_row = np.flatnonzero(new_sequence)
    chunk_start = np.r_[0, np.cumsum(steps)[:-1]]
    chunk_start -= chunk_start[first_row][sequence_of_row]
    first_output = np.r_[0, np.cumsum(kept)[:-1]]
    within = np.arange(int(kept.sum())) + np.repeat(chunk_start + steps - kept - first_output,
                                                    kept)
    # A sequence read from its chunk 0 starts at step 0; else where its parent left it.
    before = _steps_before(store, runs[0], wanted)
    first_index = chunks["chunk_index"].to_numpy()[first_row]
    offsets = pa.array([0 if index == 0 else before.get(ids[row], 0) if before is not None
                        else None for row, index in zip(first_row, first_index)], pa.int64())
    step = pc.add(pa.array(within), offsets.take(pa.array(sequence_of_row[row_of_output])))
    rows = pa.array(row_of_output)
    return _per_step_table(chunks["sequence_id"].take(rows), step,
                           chunks["chunk_index"].take(rows), chunks["run_id"].take(rows),
                           np.concatenate(matrices).reshape(len(within), max(widths, default=0)))


def _per_step_table(sequence_id: pa.Array, step: pa.Array, chunk_index: pa.Array,
                    run_id: pa.Array, values: np.ndarray) -> pa.Table:
    return pa.table({"sequence_id": sequence_id, "step": step, "chunk_index": chunk_index,
                     "run_id": run_id,
                     **{f"output_{i}": pa.array(values[:, i]) for i in range(values.shape[1])}})


def write_table_as(table: pa.Table, target: str | BinaryIO) -> None:
    """Write ``table`` to ``target``: a path or URL ending in ``.parquet`` or ``.csv``
    (an InputError for any other), or a binary stream (CSV)."""
    if not isinstance(target, str):
        pa.csv.write_csv(table, target)
        return
    kind = target.rsplit(".", 1)[-1].lower()
    if kind not in ("parquet", "csv"):
        raise InputError(f"--to {target!r}: the name must end in .parquet or .csv")
    sink = pa.BufferOutputStream()
    (pq.write_table if kind == "parquet" else pa.csv.write_csv)(table, sink)
    storage.write_bytes(target, sink.getvalue())


def committed_outputs(state_url: str) -> dict[str, np.ndarray]:
    """Every committed run's outputs, concatenated per sequence in step order."""
    table = read_outputs(state_url)
    if not len(table):
        return {}
    names = [name for name in table.column_names if name.startswith("output_")]
    values = np.stack([table[name].to_numpy() for name in names], axis=1)
    ids = table["sequence_id"].to_numpy(zero_copy_only=False)
    bounds = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True])
    return {ids[start]: values[start:end] for start, end in zip(bounds[:-1], bounds[1:])}


def snapshot_contents(manifest: storage.Manifest, sequence_id: str | None = None
                      ) -> tuple[dict[str, CarriedState], dict[str, list[Chunk]]]:
    """A snapshot's carried state and pending chunks per sequence (closed sequences as
    tombstones), resolved across its layers; only ``sequence_id``'s when given."""
    versions = collections.defaultdict(list)
    for kind, records in (("state", manifest.state_files), ("pending", manifest.pending_files)):
        for record in records:
            table = storage.read_table(record.path, record)
            if sequence_id is not None:
                table = table.filter(pc.equal(table["sequence_id"], sequence_id))
            rows = (states_from_table(table, manifest.state_names, record.path)
                    if kind == "state" else chunks_from_table(table, record.path, pending=True))
            for row in rows:
                versions[row.sequence_id].append((record.layer, (kind, row)))
    states, pending = {}, {}
    for key, rows in versions.items():
        _, newest = storage.newest_layer(rows)
        for kind, row in newest:
            if kind == "state":
                states[key] = row
            else:
                pending.setdefault(key, []).append(row)
    return states, pending


def committed_states(state_url: str) -> dict[str, CarriedState]:
    """The committed snapshot's carried state of every sequence (closed ones as
    tombstones)."""
    manifest = storage.StateStore(state_url).committed()
    return snapshot_contents(manifest)[0] if manifest else {}


def sequence_details(state_url: str, sequence_id: str) -> dict:
    """Everything the committed history holds about one sequence: its carried state
    (norms per part), pending chunks, final state if it ended, and the runs that
    applied its chunks. Raises KeyError when no committed run knows it."""
    history = storage.StateStore(state_url).history()
    if not history:
        raise KeyError(f"{state_url} has no committed snapshot")
    manifest = history[0]

    def rows(records):
        """Each file's rows of this sequence."""
        for record in records:
            table = storage.read_table(record.path, record)
            yield record, table.filter(pc.equal(table["sequence_id"], sequence_id))

    states, pending = snapshot_contents(manifest, sequence_id)
    state, pending = states.get(sequence_id), pending.get(sequence_id, [])
    runs = []
    for run in reversed(history):
        applied = sorted((output.chunk_index, output.steps)
                         for record, table in rows(run.output_files)
                         for output in outputs_from_table(table, record.path))
        ended = [reason for _, table in rows(run.final_state_files)
                 for reason in table.column("end_reason").to_pylist()]
        if applied or ended:
            runs.append({"run_id": run.run_id, "chunks": [index for index, _ in applied],
                         "steps": sum(steps for _, steps in applied),
                         **({"ended": ended[0]} if ended else {})})
    if state is None and not pending and not runs:
        raise KeyError(f"sequence {sequence_id!r} is in no committed run of {state_url} "
                       f"({manifest.sequences} sequences in snapshot {manifest.run_id})")
    details = {"sequence_id": sequence_id, "snapshot": manifest.run_id}
    if state is not None:
        details |= {
            "status": "closed" if state.closed else "live",
            "next_chunk_index": state.next_chunk_index, "steps_seen": state.steps_seen,
            "model_fingerprint": state.model_fingerprint,
            "last_run_number": state.last_run_number,
            "last_touched_at": datetime.datetime.fromtimestamp(
                state.last_touched_at, datetime.timezone.utc).isoformat(),
            "state_norms": {name: round(float(np.linalg.norm(part)), 6)
                            for name, part in zip(manifest.state_names, state.tensors)},
        }
    details["pending_chunks"] = [{"chunk_index": c.chunk_index, "steps": c.steps,
                                  "arrived_in_run": c.arrived_in_run} for c in pending]
    details["runs"] = runs
    return details
