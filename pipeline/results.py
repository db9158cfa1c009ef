"""Reading what committed runs produced: per-step outputs and carried states."""
from __future__ import annotations

import collections
import datetime

import numpy as np
import pyarrow.compute as pc

import storage
from schemas import CarriedState, Chunk, chunks_from_table, outputs_from_table, states_from_table


def committed_outputs(state_url: str) -> dict[str, np.ndarray]:
    """Every committed run's outputs, concatenated per sequence in chunk order."""
    chunks = collections.defaultdict(dict)
    for manifest in storage.StateStore(state_url).history():
        for record in manifest.output_files:
            for output in outputs_from_table(storage.read_table(record.path, record), record.path):
                chunks[output.sequence_id][output.chunk_index] = output.outputs
    return {sequence_id: np.concatenate([by_index[i] for i in sorted(by_index)])
            for sequence_id, by_index in chunks.items()}


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
        applied = sorted((output.chunk_index, len(output.outputs))
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
