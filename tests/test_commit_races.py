"""The commit protocol where retention, rollbacks, retried commit steps and states
from before attempts meet (found by a review of Commits v2; each test was first a
reproduction of the bug it now guards against)."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import storage
from schemas import InputError
from pipeline import results
from pipeline.build import run_job
from pipeline.importer import import_state
from tests.conftest import IN_PROCESS, assert_close_states, config, final_state
from transforms.commit import CommitTarget, commit_run
from transforms.models import ModelOptions, load_model


def three_runs(workload, tmp_path, **extra) -> storage.StateStore:
    for run in range(3):
        run_job(config(workload, tmp_path, run, **extra), IN_PROCESS)
    return storage.StateStore(str(tmp_path / "state"))


def test_a_larger_keep_after_a_smaller_one_keeps_what_is_left(workload, tmp_path):
    store = three_runs(workload, tmp_path)
    assert store.prune(1) == ["run-1", "run-2"]
    assert store.prune(3) == []  # run-1 and run-2 are among the 3 newest, but retired
    assert [m.run_id for m in store.history()] == ["run-3"]
    store.verify()


def test_a_rollback_racing_a_prune_fails_instead_of_naming_a_retired_snapshot(
        workload, tmp_path):
    """A gc in another process retires run-2 while `rollback --to run-2` verifies it:
    the prune's fence (it rewrites CURRENT) makes the rollback's swap fail."""
    store = three_runs(workload, tmp_path, max_layers=1)  # run-3 compacts: shares nothing
    before = final_state(store.url)
    verify = store.verify

    def verify_during_a_concurrent_gc(run_id=None):
        manifest = verify(run_id)
        assert storage.StateStore(store.url).prune(1) == ["run-1", "run-2"]
        return manifest

    store.verify = verify_during_a_concurrent_gc
    with pytest.raises(storage.StateConflictError, match="CURRENT was rewritten"):
        store.rollback("run-2")
    del store.verify
    assert store.current().run_id == "run-3" and store.verify().run_id == "run-3"
    assert final_state(store.url) == before
    with pytest.raises(InputError, match="not a committed snapshot"):
        storage.StateStore(store.url).rollback("run-2")  # retired: refused up front


def test_a_commit_landing_during_a_rollback_is_not_overwritten(workload, tmp_path):
    state = str(tmp_path / "state")
    for run in range(2):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    rolling = storage.StateStore(state)
    verify = rolling.verify

    def verify_while_run_3_commits(run_id=None):
        manifest = verify(run_id)
        run_job(config(workload, tmp_path, 2), IN_PROCESS)
        return manifest

    rolling.verify = verify_while_run_3_commits
    with pytest.raises(storage.StateConflictError, match="state moved from run-2 to run-3"):
        rolling.rollback("run-1")
    assert [r.run_id for r in rolling.commits()] == ["run-1", "run-2", "run-3"]


def test_a_concurrent_gc_does_not_fail_a_running_commit(workload, tmp_path, never_failed):
    """A prune rewrites CURRENT (its fence) without changing it: a run planned before
    still commits."""
    from pipeline.build import execute, plan_run

    state = str(tmp_path / "state")
    for run in range(2):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    plan = plan_run(config(workload, tmp_path, 2))
    assert storage.StateStore(state).prune(1) == ["run-1"]
    assert execute(plan, IN_PROCESS)["run_id"] == "run-3"
    assert final_state(state) == never_failed[0]


def test_a_commit_step_retried_after_later_commits_knows_it_committed(workload, tmp_path):
    """run-2's step swapped, failed after (say, writing its report), and is retried
    after run-3 committed on top: it succeeds, changing nothing."""
    store = three_runs(workload, tmp_path)
    first, second, third = store.commits()
    log_1 = os.path.join(store.url, "log", "0000000001.json")
    planned_on = storage.CommitRecord.from_json(json.load(open(log_1)),
                                                token=("an old version", 0, 0))
    target = CommitTarget(store.url, str(tmp_path / "outputs"), "run-2", second.attempt,
                          planned_on, 0.0)
    report = commit_run(store.manifest(*second.snapshot), target)
    assert report["run_id"] == "run-2"
    assert store.commits() == [first, second, third] and store.current() == third


def test_a_state_path_with_brackets_on_gcs(workload, bucket, tmp_path):
    """gcsfs' recursive rm reads its path as a glob; seqcarry deletes object by object."""
    state = f"{bucket}/st[a]te"
    reports = [run_job(dataclasses.replace(config(workload, tmp_path, run, keep=1),
                                           state=state, outputs=f"{bucket}/outputs"),
                       IN_PROCESS) for run in range(2)]
    assert [r["snapshots_removed"] for r in reports] == [[], ["run-1"]]
    store = storage.StateStore(state)
    assert store.report(*store.current().snapshot)["run_id"] == "run-2"
    assert storage.list_names(f"{state}/staging") == ([], [])
    store.verify()


def test_an_ancestor_manifest_with_a_field_of_the_wrong_kind_is_exit_3(workload, tmp_path):
    state = str(tmp_path / "state")
    for run in range(2):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    store = storage.StateStore(state)
    url = store.manifest_url(*store.commits()[0].snapshot)
    payload = json.load(open(url))
    json.dump(payload | {"parent": 7}, open(url, "w"))
    with pytest.raises(storage.IntegrityError, match="parent of the wrong kind"):
        store.history()


def test_import_state_then_runs_then_gc(workload, tmp_path):
    stack = load_model(workload[0], ModelOptions())
    np.savez(tmp_path / "s.npz", sequence_id=np.array(["seq-a", "seq-b"]),
             **{name: np.ones((2, size), np.float32)
                for name, size in zip(stack.state_names, stack.state_sizes)})
    state = str(tmp_path / "state")
    import_state(workload[0], ModelOptions(), state, str(tmp_path / "s.npz"), "imp.1")
    for run in range(3):
        run_job(config(workload, tmp_path, run, run_id=f"r.{run}"), IN_PROCESS)
    store = storage.StateStore(state)
    assert store.prune(1) == ["imp.1", "r.0", "r.1"]
    assert store.prune(2) == []
    store.verify()
    assert {"seq-a", "seq-b"} <= set(results.committed_states(state))


@pytest.mark.parametrize("then", ["rollback", "prune", "both"])
def test_a_commit_killed_between_its_swap_and_its_log_entry(workload, tmp_path, then):
    store = three_runs(workload, tmp_path)
    os.remove(os.path.join(store.url, "log", "0000000003.json"))
    assert store.was_committed("run-3")
    if then in ("prune", "both"):
        assert store.prune(1) == ["run-1", "run-2"]
        store.verify()
    if then == "both":
        with pytest.raises(InputError, match="not a committed snapshot"):
            store.rollback("run-1")
    if then == "rollback":
        store.rollback("run-1")
        assert [r.sequence for r in store.commits()] == [1, 2, 3, 4]  # run-3 logged
        assert store.prune(1) == ["run-2", "run-3"]
        store.verify()
        assert store.was_committed("run-3")


# --- state directories written before attempts (by the code of commit 59bef4b) -------

LEGACY_COMMIT = "59bef4b"  # the last commit before attempts and the commit log


@pytest.fixture(scope="module")
def legacy_code(tmp_path_factory):
    """seqcarry as it was before attempts, unpacked from git."""
    folder = tmp_path_factory.mktemp("legacy-code")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(f"git archive {LEGACY_COMMIT} | tar -x -C {folder}", shell=True,
                   cwd=root, check=True)
    return str(folder)


def legacy_run(legacy_code, workload, tmp_path, run):
    cfg = config(workload, tmp_path, run)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--model", cfg.model, "--chunks",
         workload[2][run], "--state", cfg.state, "--outputs", cfg.outputs, "--run-id",
         cfg.run_id, "--batch-size", "4", "--window-steps", "16", *IN_PROCESS],
        cwd=legacy_code, env=dict(os.environ, PYTHONPATH=legacy_code), capture_output=True,
        text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def state_files(state):
    return {os.path.relpath(os.path.join(folder, name), state)
            for folder, _, names in os.walk(state) for name in names}


def test_a_legacy_state_goes_on_and_its_snapshots_are_retired(legacy_code, workload,
                                                              tmp_path, never_failed):
    state = str(tmp_path / "state")
    for run in range(2):
        legacy_run(legacy_code, workload, tmp_path, run)
    store = storage.StateStore(state)
    assert [m.attempt for m in store.history()] == [None, None]
    run_job(config(workload, tmp_path, 2), IN_PROCESS)
    # Legacy code batched other sequences together: the same values to float rounding.
    assert_close_states(state, never_failed[0])
    assert store.prune(2) == ["run-1"]
    assert_close_states(state, never_failed[0])  # run-1's shared layer stays


def test_a_legacy_snapshot_rolled_back_from_is_retired_too(legacy_code, workload, tmp_path):
    """run-2 (legacy) is neither in the commit log nor an ancestor of CURRENT after a
    rollback to run-1: retention still knows it was committed."""
    state = str(tmp_path / "state")
    for run in range(2):
        legacy_run(legacy_code, workload, tmp_path, run)
    store = storage.StateStore(state)
    store.rollback("run-1")
    run_job(config(workload, tmp_path, 2, max_layers=1), IN_PROCESS)  # compacts
    assert sorted(store.prune(1)) == ["run-1", "run-2"]
    left = state_files(state)
    assert not [name for name in left if name.startswith(("snapshots/run-1/",
                                                          "snapshots/run-2/"))]
    with pytest.raises(InputError, match="not a committed snapshot"):
        store.rollback("run-2")
    assert store.was_committed("run-2")  # its run id stays taken
    store.verify()
