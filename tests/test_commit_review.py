"""Reproductions found while reviewing Commits v2 (issue 14)."""
import dataclasses
import json
import os
import shutil

import pytest

import storage
from pipeline.build import run_job
from tests.conftest import IN_PROCESS, config


def test_gc_with_a_larger_keep_after_a_smaller_one(workload, tmp_path):
    """--keep 1 retires run-1 and run-2; a later --keep 3 must not fail on them."""
    state = str(tmp_path / "state")
    for run in range(3):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    store = storage.StateStore(state)
    assert store.prune(1) == ["run-1", "run-2"]
    store.prune(3)  # StorageError: snapshots/run-2/<attempt>/manifest.json does not exist


def test_a_rollback_racing_a_prune_points_current_at_a_retired_snapshot(workload, tmp_path):
    """rollback --to run-2 verifies run-2 (reading every file: the long part), and a
    gc --keep 1 in another process retires run-2 meanwhile (its pointer check still
    sees run-3, so it goes on and deletes run-2's files too). The rollback's swap then
    succeeds: CURRENT names run-2, whose manifest and files are gone."""
    state = str(tmp_path / "state")
    for run in range(3):
        run_job(config(workload, tmp_path, run, max_layers=1 if run == 2 else 8), IN_PROCESS)
    rolling = storage.StateStore(state)
    verify = rolling.verify

    def verify_then_a_concurrent_gc(run_id=None):
        manifest = verify(run_id)
        assert storage.StateStore(state).prune(1) == ["run-1", "run-2"]
        return manifest

    rolling.verify = verify_then_a_concurrent_gc
    rolling.rollback("run-2")  # succeeds: "CURRENT moved from run-3 to run-2"
    assert rolling.current().run_id == "run-2"
    with pytest.raises(storage.IntegrityError, match="is missing"):
        rolling.committed()  # every command now exits 3
    assert not os.path.exists(rolling.snapshot_url(*rolling.current().snapshot)
                              + "/state-00000-of-00001.parquet")


def test_the_commit_step_retried_after_a_later_commit_says_falsely_not_committed(
        workload, tmp_path):
    """run-2's commit step swapped CURRENT, then failed (e.g. writing its report) and
    Beam retries it; meanwhile run-3 (planned on run-2) committed. The retry raises
    StateConflictError "run-2 attempt ... was not committed", and the launcher exits 4,
    though run-2 is committed (it is in the log and run-3's parent)."""
    from transforms.commit import CommitTarget, commit_run

    state = str(tmp_path / "state")
    for run in range(3):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    store = storage.StateStore(state)
    first, second, _ = store.commits()
    planned_on = storage.CommitRecord.from_json(
        json.loads(storage.read_bytes(state + "/log/0000000001.json")),
        token=storage.read_bytes(state + "/log/0000000001.json"))  # CURRENT's bytes then
    manifest = store.manifest(*second.snapshot)
    target = CommitTarget(state, str(tmp_path / "outputs"), "run-2", second.attempt,
                          planned_on, 0.0)
    with pytest.raises(storage.StateConflictError, match="was not committed"):
        commit_run(manifest, target)
    assert store.committed_attempt("run-2").attempt == second.attempt  # it was


OLD = "/tmp/old"  # `git archive 59bef4b` (the commit before Commits v2)


def old_seqcarry(*args):
    """The seqcarry from before attempts, to write a legacy state directory."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=OLD,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=OLD))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def old_run(workload, tmp_path, run, run_id=None):
    cfg = config(workload, tmp_path, run, run_id=run_id)
    old_seqcarry("run", "--model", cfg.model, "--chunks", workload[2][run], "--state", cfg.state,
                 "--outputs", cfg.outputs, "--run-id", cfg.run_id, "--batch-size", "4",
                 "--window-steps", "16", *IN_PROCESS)


def file_names(state):
    return {os.path.relpath(os.path.join(folder, name), state)
            for folder, _, names in os.walk(state) for name in names}


def test_a_legacy_snapshot_rolled_back_from_is_invisible_to_retention(workload, tmp_path):
    """Legacy run-1, run-2 (CURRENT run-2); the new code rolls back to run-1; a new
    compacting run-3; gc --keep 1. run-2 was committed (it has runs/run-2/report.json
    and its manifest) but is in neither the commit log nor the lineage of CURRENT:
    prune neither keeps nor retires it, deletes run-1's file that run-2 lists, and
    rollback --to run-2 is still accepted, then fails."""
    state = str(tmp_path / "state")
    old_run(workload, tmp_path, 0)
    old_run(workload, tmp_path, 1)
    store = storage.StateStore(state)
    store.rollback("run-1")
    run_job(config(workload, tmp_path, 2, max_layers=1), IN_PROCESS)  # compacts
    store.prune(1)
    left = file_names(state)
    assert "snapshots/run-2/manifest.json" in left  # never retired, never reclaimed
    assert "snapshots/run-1/state-00000-of-00001.parquet" not in left  # deleted
    assert store.was_committed("run-2")
    # run-2 is still offered for rollback, but its files are gone:
    with pytest.raises(storage.StorageError, match="run-1/state-00000-of-00001.parquet"):
        store.rollback("run-2")
    # and repeating gc never reclaims run-2's own files
    store.prune(1)
    assert "snapshots/run-2/state-00000-of-00001.parquet" in file_names(state)


def test_legacy_state_layout(workload, tmp_path):
    old_run(workload, tmp_path, 0)
    old_run(workload, tmp_path, 1)
    for folder, _, names in os.walk(tmp_path / "state"):
        print(folder, sorted(names))
    print(open(tmp_path / "state" / "CURRENT").read())
    assert 0
