"""Commits v2 (issue 14): every attempt isolated, the job commits itself, nothing can
damage the committed state. Real runs of the real pipeline and of the ``seqcarry``
command (in subprocesses where a process must die or race), checked against runs
that never failed (bit for bit) and against the whole-sequence Keras model."""
import collections
import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import storage
from pipeline import results
from pipeline.build import execute, plan_run, run_job
from schemas import outputs_from_table
from transforms.commit import commit_run
from tests.conftest import IN_PROCESS, RESUMED, assert_same_outputs, config, final_state

SEQCARRY = os.path.join(os.path.dirname(sys.executable), "seqcarry")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def after_two_runs(workload, tmp_path_factory):
    """A state and outputs after run-1 and run-2 (copied by tests that change them)."""
    tmp_path = tmp_path_factory.mktemp("two-runs")
    for run in range(2):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    return tmp_path


def copy_state(source, tmp_path):
    """Copy a state directory whole (manifests name state files relative to it; the
    outputs they list stay where they are, read only)."""
    shutil.copytree(source / "state", tmp_path / "state")
    return str(tmp_path / "state")


def cli(*args, env=None, timeout=300):
    return subprocess.run([SEQCARRY, *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ | (env or {}), cwd=ROOT)


def cli_here(*args):
    """``seqcarry`` run by its ``main`` in this process, stdout and stderr captured: for
    commands that need no process of their own (no fault to inject, nothing to kill),
    without paying a fresh interpreter's imports each time."""
    from pipeline import cli as command_line

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = command_line.main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_args(cfg, *extra):
    """``seqcarry run`` arguments for a RunConfig (in-process DirectRunner)."""
    return ["run", "--model", cfg.model, "--chunks", *cfg.chunks, "--state", cfg.state,
            "--outputs", cfg.outputs, "--run-id", cfg.run_id, "--batch-size",
            str(cfg.batch_size), "--window-steps", str(cfg.window_steps), *extra, *IN_PROCESS]


def one_error_line(done, beam_may_log=False) -> str:
    """A failed command's error: one ``seqcarry: error:`` line, last on stderr, and no
    traceback (TensorFlow or progress lines may come before it). With
    ``beam_may_log``, for errors raised inside the job: Beam's own ERROR log of the
    failed DoFn (with its traceback) may come first, but not seqcarry's traceback."""
    if beam_may_log:
        assert 'pipeline/cli.py", line' not in done.stderr, done.stderr[-3000:]
    else:
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("seqcarry: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], done.stderr[-3000:]
    return errors[0]


def tree_digest(*roots):
    """{path: sha256} of every file below ``roots``."""
    found = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as handle:
                    found[path] = hashlib.sha256(handle.read()).hexdigest()
    return found


def committed_files(state):
    """Every file the committed history lists (snapshot files, outputs, dead letters,
    final states) and the manifests, with their sha256."""
    store = storage.StateStore(state)
    paths = [store.manifest_url(m.run_id, m.attempt) for m in store.history()]
    paths += [r.path for m in store.history()
              for r in (m.state_files + m.pending_files + m.output_files
                        + m.dead_letter_files + m.final_state_files)]
    return tree_digest_of(paths)


def tree_digest_of(paths):
    return {path: hashlib.sha256(open(path, "rb").read()).hexdigest() for path in paths}


def temporary_files(*roots):
    return [path for root in roots for path in glob.glob(os.path.join(glob.escape(str(root)),
                                                                      "**", "*.tmp-*"),
                                                         recursive=True)]


def committed_chunk_counts(state):
    """How often each (sequence_id, chunk_index) appears in the committed outputs."""
    counts = collections.Counter()
    for manifest in storage.StateStore(state).history():
        for record in manifest.output_files:
            for output in outputs_from_table(storage.read_table(record.path, record),
                                             record.path):
                counts[output.sequence_id, output.chunk_index] += 1
    return counts


def assert_continues_exactly(workload, tmp_path, never_failed, runs=(2,), state=None):
    """Run the remaining runs (default run-3) and compare with runs that never failed:
    the carried state bit for bit, the outputs, and no output chunk twice."""
    for run in runs:
        cfg = config(workload, tmp_path, run)
        if state:
            cfg = dataclasses.replace(cfg, state=state)
        run_job(cfg, IN_PROCESS)
    state = state or str(tmp_path / "state")
    storage.StateStore(state).verify()
    assert final_state(state) == never_failed[0]
    assert_same_outputs(results.committed_outputs(state), never_failed[1])
    assert max(committed_chunk_counts(state).values()) == 1


def attempt_folders(root, run_id):
    folder = os.path.join(root, run_id)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# --- 1. two attempts of one run id ------------------------------------------------------

@pytest.mark.parametrize("apart", [0.2, 1.5, 3.0])
def test_two_attempts_of_one_run_id_at_once_at_most_one_commits(workload, tmp_path,
                                                                never_failed, apart):
    from tests.test_pipeline import assert_equals_whole_sequence_model

    state = str(tmp_path / "state")
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    store = storage.StateStore(state)
    parent = store.current()
    cfg = config(workload, tmp_path, 1)  # run-2, twice, both from run-1
    first = subprocess.Popen([SEQCARRY, *run_args(cfg)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(apart)
    second = subprocess.Popen([SEQCARRY, *run_args(cfg)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
    done = []
    for process in (first, second):
        out, err = process.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    codes = sorted(d.returncode for d in done)
    assert codes == [0, 4], [d.stderr[-2000:] for d in done]
    winner = next(d for d in done if d.returncode == 0)
    loser = next(d for d in done if d.returncode == 4)
    report = json.loads(winner.stdout)
    now = store.current()
    assert (now.run_id, now.attempt) == ("run-2", report["attempt"])
    assert now.sequence == parent.sequence + 1
    # The loser says what is true: its run id was taken, or the state moved to the
    # winner's attempt and its own attempt was not committed.
    message = one_error_line(loser, beam_may_log=True)
    assert ("run id run-2 is already committed" in message
            or (report["attempt"] in message and "not committed" in message)), message
    # Exactly one commit of run-2 in the log, and the loser's files (if it wrote any)
    # are in a folder of their own.
    assert [r.run_id for r in store.commits()] == ["run-1", "run-2"]
    for root in (os.path.join(state, "snapshots"), str(tmp_path / "outputs")):
        assert report["attempt"] in attempt_folders(root, "run-2")
    verified = cli("verify", "--state", state)
    assert verified.returncode == 0, verified.stderr[-2000:]
    assert_continues_exactly(workload, tmp_path, never_failed)
    assert_equals_whole_sequence_model(workload, state)


# --- 2. a zombie attempt that computes other bits ---------------------------------------

def test_a_zombie_attempt_writing_other_bits_after_the_winner_committed_changes_nothing(
        workload, tmp_path, never_failed):
    state = str(tmp_path / "state")
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    store = storage.StateStore(state)
    winner = plan_run(config(workload, tmp_path, 1))
    # The zombie: the same run id from the same parent, but it computes other bits
    # (other chunks, another batch size and window: other files, other shard contents).
    zombie = plan_run(config(workload, tmp_path, 2, run_id="run-2", batch_size=3,
                             window_steps=5))
    assert winner.attempt != zombie.attempt
    assert winner.carry.parent_pointer == zombie.carry.parent_pointer
    execute(winner, IN_PROCESS)
    committed = store.current()
    assert committed.snapshot == ("run-2", winner.attempt)
    before = committed_files(state)
    state_before, outputs_before = final_state(state), results.committed_outputs(state)
    current_bytes = open(os.path.join(state, "CURRENT"), "rb").read()

    with pytest.raises(storage.StateConflictError) as raised:
        execute(zombie, IN_PROCESS)
    message = str(raised.value)
    assert f"to run-2 (attempt {winner.attempt})" in message
    assert zombie.attempt in message and "not committed" in message

    # Nothing the winner committed changed: CURRENT, the log, every listed file.
    assert open(os.path.join(state, "CURRENT"), "rb").read() == current_bytes
    assert [r.snapshot for r in store.commits()] == [("run-1", parent_attempt(store)),
                                                     ("run-2", winner.attempt)]
    assert committed_files(state) == before
    assert final_state(state) == state_before
    assert_same_outputs(results.committed_outputs(state), outputs_before)
    # The zombie wrote only below folders of its own, and wrote no report.
    zombie_snapshot = store.snapshot_url("run-2", zombie.attempt)
    winner_snapshot = store.snapshot_url("run-2", winner.attempt)
    assert zombie_snapshot != winner_snapshot
    zombie_files = tree_digest(zombie_snapshot, os.path.join(
        str(tmp_path / "outputs"), "run-2", zombie.attempt))
    assert zombie_files and not set(zombie_files) & set(before)
    assert all(path.startswith((zombie_snapshot + "/", str(tmp_path / "outputs")))
               for path in zombie_files)
    assert not os.path.exists(store.report_url("run-2", zombie.attempt))
    assert not os.path.exists(store.staging_url("run-2", zombie.attempt))
    store.verify()
    assert_continues_exactly(workload, tmp_path, never_failed)


def parent_attempt(store):
    return store.committed_attempt("run-1").attempt


# --- 3. the commit step retried after its swap --------------------------------------------

def run_2_committed(workload, tmp_path):
    """run-1, then run-2 through plan and execute: (state, run-2's plan, its store)."""
    state = str(tmp_path / "state")
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    plan = plan_run(config(workload, tmp_path, 1))
    execute(plan, IN_PROCESS)
    return state, plan, storage.StateStore(state)


def test_the_commit_step_retried_after_its_swap_succeeds_and_changes_nothing(
        workload, tmp_path, never_failed):
    state, plan, store = run_2_committed(workload, tmp_path)
    current_bytes = open(os.path.join(state, "CURRENT"), "rb").read()
    log_before = sorted(os.listdir(os.path.join(state, "log")))
    report_before = storage.read_json(store.report_url("run-2", plan.attempt))

    retried = commit_run(store.committed(), plan.carry.commit_target())  # e.g. a retried bundle

    assert open(os.path.join(state, "CURRENT"), "rb").read() == current_bytes
    assert sorted(os.listdir(os.path.join(state, "log"))) == log_before
    assert [r.run_id for r in store.commits()] == ["run-1", "run-2"]
    report_after = storage.read_json(store.report_url("run-2", plan.attempt))
    timing = ("seconds", "steps_per_second", "stage_seconds")
    assert ({k: v for k, v in report_after.items() if k not in timing}
            == {k: v for k, v in report_before.items() if k not in timing})
    assert set(report_after["stage_seconds"]) == set(report_before["stage_seconds"])
    assert retried == report_after
    store.verify()
    assert_continues_exactly(workload, tmp_path, never_failed)


def test_the_commit_step_retried_after_its_swap_but_before_its_log_entry(
        workload, tmp_path, never_failed):
    """A commit killed between the swap and the log entry: the retry writes the entry."""
    state, plan, store = run_2_committed(workload, tmp_path)
    sequence = store.current().sequence
    entry = os.path.join(state, "log", f"{sequence:010d}.json")
    saved = open(entry, "rb").read()
    os.remove(entry)
    assert [r.run_id for r in store.commits()] == ["run-1", "run-2"]  # from CURRENT
    commit_run(store.committed(), plan.carry.commit_target())
    assert open(entry, "rb").read() == saved
    assert_continues_exactly(workload, tmp_path, never_failed)


def test_a_committed_run_id_is_refused_before_anything_is_written(workload, tmp_path):
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    before = tree_digest(state, outputs)
    with pytest.raises(storage.StateConflictError, match="run id run-1 is already committed"):
        run_job(config(workload, tmp_path, 1, run_id="run-1"), IN_PROCESS)
    assert tree_digest(state, outputs) == before
    assert len(attempt_folders(os.path.join(state, "snapshots"), "run-1")) == 1


def test_no_wait_submits_and_the_job_commits_itself(workload, tmp_path, never_failed):
    state = str(tmp_path / "state")
    submitted = run_job(config(workload, tmp_path, 0, no_wait=True), IN_PROCESS)
    assert submitted["submitted"] and submitted["run_id"] == "run-1"
    store = storage.StateStore(state)
    pointer = store.current()
    # The in-process runner finishes the job before returning; the job committed and
    # wrote its report where the launcher said it would be.
    assert pointer.snapshot == ("run-1", submitted["attempt"])
    report = storage.read_json(submitted["report"])
    assert report["run_id"] == "run-1" and report["attempt"] == submitted["attempt"]
    assert report["chunks_processed"] == report["chunks_read"] > 0
    assert_continues_exactly(workload, tmp_path, never_failed, runs=(1, 2))


# --- 4. SIGKILL inside pruning ------------------------------------------------------------

def snapshot_parquet_files(state):
    return {os.path.realpath(p) for p in glob.glob(
        os.path.join(glob.escape(state), "snapshots", "**", "*.parquet"), recursive=True)}


@pytest.mark.parametrize("compacted", [False, True], ids=["layered", "compacted"])
def test_a_prune_killed_midway_is_finished_by_the_next_one(workload, tmp_path, never_failed,
                                                          compacted):
    state = str(tmp_path / "state")
    for run in range(3):
        run_job(config(workload, tmp_path, run, max_layers=1 if compacted and run == 2
                       else 8), IN_PROCESS)
    store = storage.StateStore(state)
    current = store.current()
    kept_files = {storage.file_key(r.path) for r in
                  store.committed().state_files + store.committed().pending_files}
    killed = cli("gc", "--state", state, "--keep", "1",
                 env={storage.FAULT_ENV: "mid_prune:kill"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    # Killed after retiring the first: the state is still whole and usable.
    assert cli("verify", "--state", state).returncode == 0

    again = cli("gc", "--state", state, "--keep", "1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert store.current() == current
    # Everything reclaimable is gone: only the files the kept snapshot lists remain,
    # no other manifest, and folders only where a retired snapshot still shares files.
    assert snapshot_parquet_files(state) == kept_files
    manifests = glob.glob(os.path.join(state, "snapshots", "*", "*", "manifest.json"))
    assert manifests == [store.manifest_url(*current.snapshot)]
    for run_id in ("run-1", "run-2"):
        for attempt in attempt_folders(os.path.join(state, "snapshots"), run_id):
            names = os.listdir(store.snapshot_url(run_id, attempt))
            assert storage.RETIRED in names
            assert any(n.endswith(".parquet") for n in names), (run_id, names)
    if compacted:  # run-3 shares nothing: only its folder is left
        assert os.listdir(os.path.join(state, "snapshots")) == ["run-3"]
    third = cli("gc", "--state", state, "--keep", "1")  # and it stays so
    assert third.returncode == 0 and snapshot_parquet_files(state) == kept_files
    assert cli("verify", "--state", state).returncode == 0
    assert final_state(state) == never_failed[0]
    # A next run continues exactly: run-3's chunks again, all duplicates, compacting
    # (so nothing is shared any more) with --keep 1.
    report = run_job(config(workload, tmp_path, 2, run_id="run-4", keep=1, max_layers=1),
                     IN_PROCESS)
    assert report["chunks_processed"] == 0
    assert report["chunks_skipped_duplicate"] == report["chunks_read"]
    assert os.listdir(os.path.join(state, "snapshots")) == ["run-4"]
    store.verify()
    assert final_state(state) == never_failed[0]


# --- 5. orphans of attempts that never committed ----------------------------------------

@pytest.mark.parametrize("stage", ["mid_compute", "after_manifest"])
def test_files_of_a_killed_attempt_are_removed_only_after_the_grace_period(
        workload, tmp_path, never_failed, stage):
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    store = storage.StateStore(state)
    committed = committed_files(state)
    died = cli(*run_args(config(workload, tmp_path, 1)), env={storage.FAULT_ENV: f"{stage}:kill"})
    assert died.returncode == -9, died.stderr[-2000:]
    (attempt,) = attempt_folders(os.path.join(state, "staging"), "run-2")
    orphan = [store.snapshot_url("run-2", attempt), store.staging_url("run-2", attempt),
              os.path.join(outputs, "run-2", attempt)]
    left = [path for path in orphan if os.path.isdir(path)]
    assert store.staging_url("run-2", attempt) in left
    if stage == "after_manifest":
        assert os.path.exists(store.manifest_url("run-2", attempt))
        assert all(os.path.isdir(path) for path in orphan)

    kept = cli("gc", "--state", state, "--keep", "1", "--outputs", outputs)  # a day's grace
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert all(os.path.isdir(path) for path in left)
    time.sleep(2)  # attempt ids have a resolution of one second
    removed = cli("gc", "--state", state, "--keep", "1", "--outputs", outputs,
                  "--orphan-grace-hours", "0.0001")
    assert removed.returncode == 0, removed.stderr[-2000:]
    assert not [path for path in orphan if os.path.exists(path)]
    assert committed_files(state) == committed  # committed files untouched
    assert store.current().run_id == "run-1"
    store.verify()
    # The run id never committed: it can run again, then run-3, exactly.
    assert_continues_exactly(workload, tmp_path, never_failed, runs=(1, 2))


def test_a_run_with_keep_removes_old_orphans_but_not_a_running_attempts_files(
        workload, tmp_path, never_failed):
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    died = cli(*run_args(config(workload, tmp_path, 1)),
               env={storage.FAULT_ENV: "after_manifest:kill"})
    assert died.returncode == -9, died.stderr[-2000:]
    store = storage.StateStore(state)
    (orphan,) = attempt_folders(os.path.join(state, "snapshots"), "run-2")
    time.sleep(20)
    # Another attempt of run-2, planned now: "running" while the next run prunes, with
    # a file in each of its folders.
    running = plan_run(config(workload, tmp_path, 1))
    running_files = [os.path.join(store.snapshot_url("run-2", running.attempt), "x.parquet"),
                     os.path.join(store.staging_url("run-2", running.attempt), "x.arrow"),
                     os.path.join(outputs, "run-2", running.attempt, "part-x.parquet")]
    for path in running_files:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").write(b"in progress")
    # Grace 14 s: the orphan is 20 s old or more; the running attempt is as old as the
    # next run takes (4.3 s on a loaded 2-core machine, 1 s more with attempt ids' whole
    # seconds: a 5 s grace once pruned it).
    report = run_job(config(workload, tmp_path, 1, run_id="run-2b", keep=1,
                            orphan_grace_hours=14 / 3600), IN_PROCESS)
    assert report["snapshots_removed"] == ["run-1"]
    assert not os.path.exists(store.snapshot_url("run-2", orphan))
    assert not os.path.exists(store.staging_url("run-2", orphan))
    assert not os.path.exists(os.path.join(outputs, "run-2", orphan))
    assert all(os.path.exists(path) for path in running_files)
    store.verify()
    run_job(config(workload, tmp_path, 2), IN_PROCESS)
    store.verify()
    assert final_state(state) == never_failed[0]  # (run-1's outputs left with its snapshot)


# --- 6. a missing or damaged CURRENT, damaged manifests ------------------------------------

CURRENT_DAMAGE = {
    "missing": None,
    "empty": b"",
    "not-json": b"{not json",
    "empty-object": b"{}",
    "null": b"null",
    "a-list": b"[1, 2]",
    "wrong-fields": json.dumps({"run_id": 5, "manifest_sha256": 7}).encode(),
    "missing-snapshot": json.dumps({"run_id": "run-9", "attempt": "20261201T000000Z-00000000",
                                    "manifest_sha256": "0" * 64, "sequence": 9,
                                    "committed_at": ""}).encode(),
}


@pytest.mark.parametrize("how", list(CURRENT_DAMAGE))
def test_a_missing_or_damaged_current_stops_every_command_until_rolled_back(
        workload, tmp_path, never_failed, after_two_runs, how):
    state = copy_state(after_two_runs, tmp_path)
    current = os.path.join(state, "CURRENT")
    if CURRENT_DAMAGE[how] is None:
        os.remove(current)
    else:
        with open(current, "wb") as handle:
            handle.write(CURRENT_DAMAGE[how])
    damaged = None if CURRENT_DAMAGE[how] is None else open(current, "rb").read()
    wrong = {}
    for args in (run_args(config(workload, tmp_path, 2)), ["snapshots", "--state", state],
                 ["verify", "--state", state], ["gc", "--state", state, "--keep", "1"],
                 ["report", "--state", state],
                 ["inspect", "--state", state, "--sequence", RESUMED]):
        done = cli_here(*args)
        line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        if (done.returncode != 3 or "Traceback" in done.stderr or current not in line
                or f"seqcarry rollback --state {state} --to run-2" not in line):
            wrong[args[0]] = (done.returncode, line)
    assert not wrong, wrong  # each: exit 3, one line naming CURRENT and the recovery
    # Nothing was written by the refused commands.
    assert (open(current, "rb").read() if os.path.exists(current) else None) == damaged
    assert not os.path.exists(os.path.join(state, "snapshots", "run-3"))
    repaired = cli_here("rollback", "--state", state, "--to", "run-2")
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert cli_here("verify", "--state", state).returncode == 0
    store = storage.StateStore(state)
    assert store.current().run_id == "run-2"
    # The commit log holds real commits only (what the damaged CURRENT named is not
    # one), and retention works on the repaired state.
    assert {r.run_id for r in store.commits()} == {"run-1", "run-2"}
    retention = cli_here("gc", "--state", state, "--keep", "5")
    assert retention.returncode == 0, retention.stderr[-2000:]
    assert_continues_exactly(workload, tmp_path, never_failed)


def test_repairing_a_current_that_names_a_missing_snapshot_logs_no_false_commit(
        workload, tmp_path, never_failed, after_two_runs):
    state = copy_state(after_two_runs, tmp_path)
    with open(os.path.join(state, "CURRENT"), "wb") as handle:
        handle.write(CURRENT_DAMAGE["missing-snapshot"])
    repaired = cli_here("rollback", "--state", state, "--to", "run-2")
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    store = storage.StateStore(state)
    assert store.current().run_id == "run-2"
    # run-9 was never committed: the log must not say it was, its run id stays free,
    # and retention keeps working.
    assert {r.run_id for r in store.commits()} == {"run-1", "run-2"}
    assert not store.was_committed("run-9")
    retention = cli_here("gc", "--state", state, "--keep", "5")
    assert retention.returncode == 0, retention.stderr[-2000:]
    assert_continues_exactly(workload, tmp_path, never_failed)


@pytest.mark.parametrize("which,content", [("current", b"{}"), ("current", b""),
                                           ("ancestor", b"{}"), ("ancestor", b"null")])
def test_a_damaged_manifest_is_exit_3_naming_it(workload, tmp_path, never_failed,
                                                after_two_runs, which, content):
    state = copy_state(after_two_runs, tmp_path)
    store = storage.StateStore(state)
    run_id = "run-2" if which == "current" else "run-1"
    manifest = store.manifest_url(*store.committed_attempt(run_id).snapshot)
    with open(manifest, "wb") as handle:
        handle.write(content)
    # Every command that reads the damaged manifest stops with exit 3 naming it. A run
    # reads only the committed snapshot's manifest: it stops when that one is damaged
    # (an ancestor's it does not need).
    commands = [["snapshots", "--state", state], ["report", "--state", state]]
    commands += ([run_args(config(workload, tmp_path, 2)), ["verify", "--state", state]]
                 if which == "current" else [["verify", "--state", state, "--run-id", "run-1"]])
    wrong = {}
    for args in commands:
        done = cli_here(*args)
        line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        if done.returncode != 3 or "Traceback" in done.stderr or manifest not in line:
            wrong[" ".join(args[:1] + args[-2:])] = (done.returncode, line)
    assert not wrong, wrong
    assert not os.path.exists(os.path.join(state, "snapshots", "run-3"))
    if which == "ancestor":
        # The committed snapshot itself is whole: verify passes, and putting back the
        # ancestor's manifest is all it takes.
        assert cli_here("verify", "--state", state).returncode == 0
        shutil.copy(after_two_runs / os.path.relpath(manifest, tmp_path), manifest)
    else:
        repaired = cli_here("rollback", "--state", state, "--to", "run-1")
        assert repaired.returncode == 0, repaired.stderr[-2000:]
        run_job(config(workload, tmp_path, 1, run_id="run-2-again"), IN_PROCESS)
    assert_continues_exactly(workload, tmp_path, never_failed)


# --- 7. a full disk, a read-only state directory -------------------------------------------

@contextlib.contextmanager
def tmpfs(path, size):
    """A tmpfs of ``size`` mounted at ``path`` (we run as root); unmounted after."""
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield str(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder, leave):
    """Fill the filesystem of ``folder`` until about ``leave`` bytes are free."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    path = os.path.join(folder, "filler")
    with open(path, "wb") as handle:
        with contextlib.suppress(OSError):  # ENOSPC: full, as wanted
            handle.write(b"\0" * max(0, free - leave))
            handle.flush()
    return path


# With this workload, run-2 then runs out of space writing: its staged chunks, its
# state file, its manifest, CURRENT (tmpfs counts whole 4 KiB pages). Whichever it is,
# the invariants below must hold.
@pytest.mark.parametrize("leave", [0, 100 * 1024, 104 * 1024, 108 * 1024],
                         ids=["staging", "state-file", "manifest", "current"])
def test_a_full_state_disk_is_exit_3_and_harms_nothing(workload, tmp_path, never_failed,
                                                      leave):
    with tmpfs(tmp_path / "state", "2m") as state:
        run_job(config(workload, tmp_path, 0), IN_PROCESS)
        store = storage.StateStore(state)
        before, current = committed_files(state), store.current()
        filler = fill(state, leave)
        done = cli(*run_args(config(workload, tmp_path, 1)))
        assert done.returncode == 3, done.stderr[-3000:]
        line = one_error_line(done, beam_may_log=True)
        assert state in line and "No space left on device" in line, line
        assert not temporary_files(state, tmp_path / "outputs")
        assert store.current() == current
        assert committed_files(state) == before
        os.remove(filler)
        assert cli("verify", "--state", state).returncode == 0
        assert_continues_exactly(workload, tmp_path, never_failed, runs=(1, 2))


def test_a_full_outputs_disk_is_exit_3_and_harms_nothing(workload, tmp_path, never_failed):
    state = str(tmp_path / "state")
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    store = storage.StateStore(state)
    before, current = committed_files(state), store.current()
    with tmpfs(tmp_path / "full-outputs", "16k") as outputs:
        cfg = dataclasses.replace(config(workload, tmp_path, 1), outputs=outputs)
        done = cli(*run_args(cfg))
        assert done.returncode == 3, done.stderr[-3000:]
        line = one_error_line(done, beam_may_log=True)
        assert outputs in line and "No space left on device" in line, line
        assert not temporary_files(state, outputs)
    assert store.current() == current and committed_files(state) == before
    assert cli("verify", "--state", state).returncode == 0
    assert_continues_exactly(workload, tmp_path, never_failed, runs=(1, 2))


def test_a_read_only_state_directory_is_exit_3_and_harms_nothing(workload, tmp_path,
                                                                 never_failed):
    with tmpfs(tmp_path / "state", "2m") as state:
        run_job(config(workload, tmp_path, 0), IN_PROCESS)
        store = storage.StateStore(state)
        before, current = committed_files(state), store.current()
        subprocess.run(["mount", "-o", "remount,ro", state], check=True)
        try:
            done = cli(*run_args(config(workload, tmp_path, 1)))
            assert done.returncode == 3, done.stderr[-3000:]
            line = one_error_line(done, beam_may_log=True)
            assert state in line and "Read-only file system" in line, line
            # Reading works on a read-only state.
            assert cli("verify", "--state", state).returncode == 0
            assert cli("snapshots", "--state", state).returncode == 0
        finally:
            subprocess.run(["mount", "-o", "remount,rw", state], check=True)
        assert not temporary_files(state, tmp_path / "outputs")
        assert store.current() == current and committed_files(state) == before
        assert_continues_exactly(workload, tmp_path, never_failed, runs=(1, 2))


@pytest.mark.parametrize("command", ["gc", "rollback"])
def test_a_read_only_state_directory_refuses_gc_and_rollback_with_exit_3(workload, tmp_path,
                                                                       command):
    with tmpfs(tmp_path / "state", "2m") as state:
        for run in range(2):
            run_job(config(workload, tmp_path, run), IN_PROCESS)
        store = storage.StateStore(state)
        before, current = tree_digest(state), store.current()
        subprocess.run(["mount", "-o", "remount,ro", state], check=True)
        try:
            done = cli(*{"gc": ["gc", "--state", state, "--keep", "1"],
                         "rollback": ["rollback", "--state", state, "--to", "run-1"]}[command])
            assert done.returncode == 3, done.stderr[-3000:]
            assert "Read-only file system" in one_error_line(done)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", state], check=True)
        assert store.current() == current and tree_digest(state) == before
        assert cli("verify", "--state", state).returncode == 0


# --- 8. --keep bounds, a state path with [ and ] -------------------------------------------

@pytest.mark.parametrize("keep", ["0", "-1"])
def test_keep_below_one_is_refused_with_exit_2(workload, tmp_path, keep):
    state = str(tmp_path / "state")
    done = cli(*run_args(config(workload, tmp_path, 0), "--keep", keep))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--keep" in one_error_line(done)
    assert not os.path.exists(state)
    gc = cli("gc", "--state", state, "--keep", keep)
    assert gc.returncode == 2, gc.stderr[-2000:]
    assert "--keep" in one_error_line(gc)


def test_keep_deletes_old_files_under_a_state_path_with_brackets(workload, tmp_path,
                                                                  never_failed):
    state, outputs = str(tmp_path / "st[a]te"), str(tmp_path / "out[p]uts")
    for run in range(3):
        cfg = dataclasses.replace(config(workload, tmp_path, run, keep=1, max_layers=1),
                                  state=state, outputs=outputs)
        run_job(cfg, IN_PROCESS)
    store = storage.StateStore(state)
    assert os.listdir(os.path.join(state, "snapshots")) == ["run-3"]
    assert snapshot_parquet_files(state) == {
        storage.file_key(r.path) for r in store.committed().state_files
        + store.committed().pending_files}
    store.verify()
    assert final_state(state) == never_failed[0]


def test_orphans_are_removed_under_paths_with_brackets(workload, tmp_path):
    state, outputs = str(tmp_path / "st[a]te"), str(tmp_path / "out[p]uts")
    cfg = dataclasses.replace(config(workload, tmp_path, 0), state=state, outputs=outputs)
    died = cli(*run_args(cfg), env={storage.FAULT_ENV: "after_manifest:kill"})
    assert died.returncode == -9, died.stderr[-2000:]
    (attempt,) = attempt_folders(os.path.join(state, "snapshots"), "run-1")
    time.sleep(2)
    done = cli("gc", "--state", state, "--keep", "1", "--outputs", outputs,
               "--orphan-grace-hours", "0.0001")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not attempt_folders(os.path.join(state, "snapshots"), "run-1")
    assert not attempt_folders(os.path.join(state, "staging"), "run-1")
    assert not attempt_folders(outputs, "run-1")
    # A first run that died left nothing committed: the state is empty, not damaged.
    listed = cli("snapshots", "--state", state)
    assert listed.returncode == 2 and "has no committed snapshot" in one_error_line(listed)
    run_job(cfg, IN_PROCESS)
    assert storage.StateStore(state).current().run_id == "run-1"


def test_a_first_run_that_died_leaves_an_empty_state_not_a_damaged_one(workload, tmp_path,
                                                                        never_failed):
    state = str(tmp_path / "state")
    died = cli(*run_args(config(workload, tmp_path, 0)),
               env={storage.FAULT_ENV: "after_manifest:kill"})
    assert died.returncode == -9, died.stderr[-2000:]
    assert os.path.isdir(os.path.join(state, "snapshots", "run-1"))
    assert storage.StateStore(state).current() is None
    assert_continues_exactly(workload, tmp_path, never_failed, runs=(0, 1, 2))


# --- 9. a --state without an atomic conditional write ----------------------------------------

def test_a_state_on_memory_fs_is_refused_by_run_with_exit_2(workload, tmp_path):
    done = cli(*run_args(dataclasses.replace(config(workload, tmp_path, 0),
                                             state="memory://x")))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "memory://x" in one_error_line(done)


@pytest.mark.parametrize("command", ["import-state", "gc", "rollback"])
def test_a_state_on_memory_fs_is_refused_by_every_writing_command(workload, tmp_path,
                                                                  command):
    from transforms.models import load_model

    if command == "import-state":
        stack = load_model(workload[0])
        arrays = {name: np.zeros((2, size), np.float32)
                  for name, size in zip(stack.state_names, stack.state_sizes)}
        np.savez(tmp_path / "states.npz", sequence_id=np.array(["a", "b"]), **arrays)
        args = ["import-state", "--model", workload[0], "--from",
                str(tmp_path / "states.npz"), "--state", "memory://x"]
    elif command == "gc":
        args = ["gc", "--state", "memory://x", "--keep", "1"]
    else:
        args = ["rollback", "--state", "memory://x", "--to", "run-1"]
    if os.path.exists("/x"):
        pytest.skip("/x exists on this machine")
    try:
        done = cli(*args)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "memory://x" in one_error_line(done)
        assert not os.path.exists("/x"), "a local /x was written for memory://x"
    finally:
        if os.path.isdir("/x"):  # made by this test's command
            shutil.rmtree("/x")


def test_rollback_on_a_state_with_nothing_committed_is_one_line_not_a_traceback(tmp_path):
    state = str(tmp_path / "state")
    os.makedirs(state)
    done = cli("rollback", "--state", state, "--to", "run-1")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "run-1 is not a committed snapshot" in one_error_line(done)
