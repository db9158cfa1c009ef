"""``seqcarry import-state``: start a state directory from recurrent states saved
elsewhere, e.g. the h and c a TF1 user kept with numpy between sessions.

The input is an ``.npz`` file (``numpy.savez``) holding ``sequence_id`` [N] (strings)
and one float array [N, size] per state part of the model, named as seqcarry names them
(``layer0_h``, ``layer0_c``, ...; ``seqcarry inspect-model`` lists them), and
optionally ``next_chunk_index`` [N] (the index the sequence's next chunk will carry,
default 0) and ``steps_seen`` [N] (default 0). The states become the first committed
snapshot of a new state directory, under the model's fingerprint, so the next
``seqcarry run`` with that model continues every sequence from them.
"""
from __future__ import annotations

import datetime
import io
import time
import zipfile

import numpy as np

import storage
from pipeline.options import InputError
from schemas import CarriedState, states_to_table
from schemas.manifest import checked_run_id, new_attempt_id
from transforms.models import ModelOptions, load_model

_OPTIONAL = ("next_chunk_index", "steps_seen")


def import_state(model_url: str, options: ModelOptions, state_url: str, source: str,
                 run_id: str | None = None) -> dict:
    """Commit the states in ``source`` as the first snapshot of ``state_url``;
    returns the report (also stored as the run's report.json)."""
    stack = load_model(model_url, options)
    store = storage.StateStore(state_url)
    if store.current() is not None:
        raise InputError(f"{state_url} already has committed snapshots; import-state only "
                         "starts a new state directory")
    try:
        with np.load(io.BytesIO(storage.read_bytes(source)), allow_pickle=False) as arrays:
            columns = {name: arrays[name] for name in arrays.files}
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise InputError(f"{source} cannot be read as a numpy .npz file: {error}") from error
    unknown = sorted(set(columns) - {"sequence_id", *_OPTIONAL, *stack.state_names})
    missing = [name for name in ("sequence_id", *stack.state_names) if name not in columns]
    if unknown or missing:
        raise InputError(f"{source}: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else [])
            + ([f"unknown {', '.join(unknown)}"] if unknown else []))
            + f" (the model's state parts: {', '.join(stack.state_names)})")
    ids = [str(i) for i in columns["sequence_id"]]
    count = len(ids)
    if len(set(ids)) != count or not all(ids):
        raise InputError(f"{source}: sequence_id must be {count} distinct, non-empty ids")
    for name, size in zip(stack.state_names, stack.state_sizes):
        if columns[name].shape != (count, size):
            raise InputError(f"{source}: {name} has shape {list(columns[name].shape)}; the "
                             f"model needs [{count}, {size}] (one row per sequence_id)")
        if not np.isfinite(columns[name]).all():
            raise InputError(f"{source}: {name} holds NaN or infinite values")
    counters = {name: np.asarray(columns.get(name, np.zeros(count)), np.int64)
                for name in _OPTIONAL}
    run_id = checked_run_id(run_id, prefix="import-")
    now = int(time.time())
    states = [CarriedState(sequence_id, int(counters["next_chunk_index"][row]),
                           int(counters["steps_seen"][row]),
                           tuple(np.asarray(columns[name][row], np.float32)
                                 for name in stack.state_names),
                           stack.fingerprint, last_run_number=1, last_touched_at=now)
              for row, sequence_id in enumerate(ids)]
    attempt = new_attempt_id()  # its own folder: an earlier failed import is left alone
    record = storage.write_table(store.snapshot_file_url(run_id, attempt, "state", 0, 1),
                                 states_to_table(states, stack.state_names), layer=1)
    counts = {"sequences_imported": count, "sequences_live": count}
    store.write_manifest(storage.Manifest(
        run_id=run_id, run_number=1, parent=None,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        model_fingerprint=stack.fingerprint, state_names=stack.state_names, counts=counts,
        state_files=(record,), pending_files=(), output_files=(), dead_letter_files=(),
        final_state_files=(), attempt=attempt))
    store.commit(run_id, attempt, None)
    report = {"run_id": run_id, "attempt": attempt, "imported_from": source, **counts,
              "model_fingerprint": stack.fingerprint,
              "snapshot": store.snapshot_url(run_id, attempt)}
    store.write_report(run_id, attempt, report)
    return report
