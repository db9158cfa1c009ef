"""Reading what committed runs produced: per-step outputs and carried states."""
from __future__ import annotations

import collections

import numpy as np

from pipeline import storage
from schemas import CarriedState, outputs_from_table, states_from_table


def committed_outputs(state_url: str) -> dict[str, np.ndarray]:
    """Every committed run's outputs, concatenated per sequence in chunk order."""
    chunks = collections.defaultdict(dict)
    for manifest in storage.StateStore(state_url).history():
        for record in manifest.output_files:
            for output in outputs_from_table(storage.read_table(record.path, record), record.path):
                chunks[output.sequence_id][output.chunk_index] = output.outputs
    return {sequence_id: np.concatenate([by_index[i] for i in sorted(by_index)])
            for sequence_id, by_index in chunks.items()}


def committed_states(state_url: str) -> dict[str, CarriedState]:
    """The committed snapshot's carried state of every live sequence."""
    history = storage.StateStore(state_url).history()
    if not history:
        return {}
    manifest = history[0]
    return {state.sequence_id: state
            for record in manifest.state_files
            for state in states_from_table(storage.read_table(record.path, record),
                                           manifest.state_names, record.path)}
