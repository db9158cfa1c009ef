"""The commit protocol: faults at every stage, concurrent runs, damaged files,
rollback and retention. Whatever happens, the committed snapshot stays intact and
rerunning gives a final state bit for bit equal to a run that never failed."""
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

import storage
from schemas import InputError
from transforms.sequencing import RunSizing
from pipeline import results
from pipeline.build import execute, plan_run, run_job
from tests.conftest import (IN_PROCESS, RESUMED, assert_same_outputs, config,
                            final_state)

SEQCARRY = os.path.join(os.path.dirname(sys.executable), "seqcarry")


def run_three(workload, tmp_path, **extra) -> storage.StateStore:
    """The workload's three runs, without faults; returns their state store."""
    for run in range(3):
        run_job(config(workload, tmp_path, run, **extra), IN_PROCESS)
    return storage.StateStore(str(tmp_path / "state"))


@pytest.mark.parametrize("stage", storage.FAULT_STAGES)
@pytest.mark.parametrize("action", ["kill", "raise"])
def test_a_run_dying_at_any_stage_harms_nothing(workload, tmp_path, never_failed, stage,
                                               action):
    state = str(tmp_path / "state")
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    committed_before = final_state(state)
    failing = config(workload, tmp_path, 1)

    if action == "kill":  # SIGKILL of the whole run, in its own process
        died = subprocess.run(
            [SEQCARRY, "run", "--model", failing.model, "--chunks", *failing.chunks,
             "--state", failing.state, "--outputs", failing.outputs, "--run-id", "run-2",
             "--batch-size", "4", "--window-steps", "16", *IN_PROCESS],
            env=os.environ | {storage.FAULT_ENV: f"{stage}:kill"}, capture_output=True)
        assert died.returncode == -9, died.stderr[-2000:]
    else:
        os.environ[storage.FAULT_ENV] = f"{stage}:raise"
        try:
            with pytest.raises(Exception, match=f"injected fault at {stage}"):
                run_job(failing, IN_PROCESS)
        finally:
            del os.environ[storage.FAULT_ENV]

    store = storage.StateStore(state)
    committed = stage == "after_commit"
    assert store.current().run_id == ("run-2" if committed else "run-1")
    store.verify()  # the committed snapshot is intact and readable
    if not committed:
        assert final_state(state) == committed_before
        assert set(results.committed_outputs(state)) <= set(committed_before)

    # Rerun: the same run id if it never committed (a new attempt beside the dead one's
    # files), then run 3.
    rerun = config(workload, tmp_path, 1, run_id="run-2-again" if committed else "run-2")
    report = run_job(rerun, IN_PROCESS)
    if committed:
        assert report["chunks_processed"] == 0
        assert report["chunks_skipped_duplicate"] == report["chunks_read"]
    run_job(config(workload, tmp_path, 2), IN_PROCESS)
    assert final_state(state) == never_failed[0]
    assert_same_outputs(results.committed_outputs(state), never_failed[1])
    listed = {r.path for m in store.history() for r in m.output_files}
    # The dead attempt's files stay in folders of their own until they are older than
    # the grace period; then gc removes them.
    store.prune(10, str(tmp_path / "outputs"), grace_seconds=0)
    on_disk = {url for url, _ in storage.list_files(str(tmp_path / "outputs"))}
    assert on_disk == listed
    store.verify()


def test_two_runs_from_the_same_state_one_commits_the_other_changes_nothing(
        workload, tmp_path):
    state = str(tmp_path / "state")
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    first = plan_run(config(workload, tmp_path, 1, run_id="first"))
    second = plan_run(config(workload, tmp_path, 1, run_id="second"))
    execute(first, IN_PROCESS)
    winner = final_state(state)
    with pytest.raises(storage.StateConflictError,
                       match=f"state moved from run-1 to first .attempt {first.attempt}. "
                             f"while .*second.*{second.attempt}.* was running"):
        execute(second, IN_PROCESS)
    store = storage.StateStore(state)
    assert store.current().snapshot == ("first", first.attempt)
    assert final_state(state) == winner
    assert not os.path.exists(store.report_url("second", second.attempt))


@pytest.mark.parametrize("where", ["local", "gs"])
def test_compare_and_swap_of_current_lets_exactly_one_writer_win(tmp_path, request, where):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("bucket")
    store = storage.StateStore(f"{root}/state")
    names = ["base"] + [f"run{i}" for i in range(8)]
    for name in names:
        storage.write_json(store.manifest_url(name, "a1"), {"run_id": name})
    store.commit("base", "a1", None)
    with pytest.raises(storage.StateConflictError, match="state moved from empty to base"):
        store.commit("run0", "a1", None)  # create-only: CURRENT exists now
    base = store.current()
    wins, barrier = [], threading.Barrier(len(names) - 1)

    def contend(name):
        barrier.wait()
        try:
            store.commit(name, "a1", base)
            wins.append(name)
        except storage.StateConflictError:
            pass

    threads = [threading.Thread(target=contend, args=(name,)) for name in names[1:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1 and store.current().run_id == wins[0]
    assert [(r.run_id, r.sequence) for r in store.commits()] == [("base", 1), (wins[0], 2)]


def damage(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2] if how == "truncate"
                     else data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])


@pytest.mark.parametrize("how", ["truncate", "flip-a-byte"])
def test_a_damaged_snapshot_file_stops_the_run_and_names_the_file(workload, tmp_path, how):
    state = str(tmp_path / "state")
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    store = storage.StateStore(state)
    (record,) = store.committed().state_files
    damage(record.path, how)
    damaged_bytes = open(record.path, "rb").read()

    with pytest.raises(storage.IntegrityError, match=f"{record.path} is damaged"):
        store.verify()
    with pytest.raises(Exception, match=f"{record.path} is damaged"):
        run_job(config(workload, tmp_path, 1), IN_PROCESS)
    assert store.current().run_id == "run-1"
    assert open(record.path, "rb").read() == damaged_bytes  # nothing was overwritten

    cli = subprocess.run([SEQCARRY, "verify", "--state", state], capture_output=True,
                         text=True)
    assert cli.returncode == 3
    assert cli.stderr.strip().splitlines()[-1].startswith(
        f"seqcarry: error: {record.path} is damaged")


def test_an_altered_manifest_is_detected(workload, tmp_path):
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    store = storage.StateStore(str(tmp_path / "state"))
    path = store.manifest_url(*store.current().snapshot)
    open(path, "a").write(" ")
    with pytest.raises(storage.IntegrityError, match="manifest.json is damaged"):
        store.verify()


def test_rollback_then_rerun_reproduces_the_rolled_back_runs_exactly(workload, tmp_path,
                                                                    never_failed):
    store = run_three(workload, tmp_path)
    state = store.url
    store.rollback("run-1")
    assert [m.run_id for m in store.history()] == ["run-1"]
    for run in (1, 2):
        run_job(config(workload, tmp_path, run, run_id=f"rerun-{run + 1}"), IN_PROCESS)
    assert final_state(state) == never_failed[0]
    assert_same_outputs(results.committed_outputs(state), never_failed[1])
    with pytest.raises(InputError, match="not a committed snapshot"):
        store.rollback("never-ran")


def test_keep_removes_old_snapshots_and_the_rest_still_works(workload, tmp_path,
                                                              never_failed):
    state = str(tmp_path / "state")
    reports = [run_job(config(workload, tmp_path, run, keep=2), IN_PROCESS)
               for run in range(3)]
    assert [r["snapshots_removed"] for r in reports] == [[], [], ["run-1"]]
    store = storage.StateStore(state)
    assert [m.run_id for m in store.history()] == ["run-3", "run-2"]
    # run-1's manifest is gone; its state files stay while run-3 still lists them.
    run_1 = store.committed_attempt("run-1").snapshot
    shared = [r.path for r in store.committed().state_files
              if r.path.startswith(store.snapshot_url(*run_1))]
    assert shared and not os.path.exists(store.manifest_url(*run_1))
    assert sorted(os.listdir(store.snapshot_url(*run_1))) == sorted(
        [storage.RETIRED, "report.json"] + [os.path.basename(path) for path in shared])
    # Its run id stays taken (the commit log remembers it).
    with pytest.raises(storage.StateConflictError, match="run-1 is already committed"):
        run_job(config(workload, tmp_path, 0, run_id="run-1"), IN_PROCESS)
    store.verify()
    assert final_state(state) == never_failed[0]


def test_keep_deletes_retired_files_once_no_snapshot_lists_them(workload, tmp_path,
                                                                never_failed):
    store = run_three(workload, tmp_path, keep=1)  # run-1 and run-2 retired, still shared
    snapshots = os.path.join(store.url, "snapshots")
    assert sorted(os.listdir(snapshots)) == ["run-1", "run-2", "run-3"]
    # A compacting run, whose chunks are all duplicates: nothing is shared any more.
    run_job(config(workload, tmp_path, 2, run_id="run-4", keep=1, max_layers=1), IN_PROCESS)
    assert os.listdir(snapshots) == ["run-4"]
    assert final_state(store.url) == never_failed[0]


def test_keep_knows_a_shared_file_however_state_is_spelled(workload, tmp_path, never_failed):
    for run in range(2):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    respelled = config(workload, tmp_path, 2, keep=1)
    run_job(dataclasses.replace(respelled, state=str(tmp_path / "." / "state")), IN_PROCESS)
    storage.StateStore(str(tmp_path / "state")).verify()
    assert final_state(str(tmp_path / "state")) == never_failed[0]


def test_a_state_directory_moved_whole_still_reads_its_layers(workload, tmp_path,
                                                               never_failed):
    for run in range(2):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    moved = str(tmp_path / "moved" / "state")
    shutil.move(str(tmp_path / "state"), moved)  # nothing is left where it was
    run_job(dataclasses.replace(config(workload, tmp_path, 2), state=moved), IN_PROCESS)
    manifest = storage.StateStore(moved).verify()
    assert manifest.layers == 3 and all(record.path.startswith(moved + "/")
                                        for record in manifest.state_files)
    assert final_state(moved) == never_failed[0]


@pytest.mark.parametrize("keep", [2, 3])
def test_keep_counts_commits_and_rollbacks_and_spares_shared_files(workload, tmp_path, keep):
    for run in range(2):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    store = storage.StateStore(str(tmp_path / "state"))
    rolled_back_from = final_state(store.url)
    store.rollback("run-1")
    # Commits, newest first: run-3, run-1 (the rollback), run-2, run-1.
    report = run_job(config(workload, tmp_path, 2, keep=keep, max_layers=1), IN_PROCESS)
    if keep == 2:  # run-3 and run-1 kept: run-2 retired, and cannot be rolled back to
        assert report["snapshots_removed"] == ["run-2"]
        with pytest.raises(InputError, match="not a committed snapshot"):
            store.rollback("run-2")
        return
    assert report["snapshots_removed"] == []
    assert not os.path.exists(store.report_url("run-2", None))
    store.rollback("run-2")  # run-2 still lists run-1's files: they were kept
    store.verify()
    assert final_state(store.url) == rolled_back_from


def test_keep_removes_whole_snapshots_once_compacted(workload, tmp_path, never_failed):
    state = str(tmp_path / "state")
    reports = [run_job(config(workload, tmp_path, run, keep=1, max_layers=1), IN_PROCESS)
               for run in range(3)]
    assert [r["snapshots_removed"] for r in reports] == [[], ["run-1"], ["run-2"]]
    store = storage.StateStore(state)
    assert os.listdir(os.path.join(state, "snapshots")) == ["run-3"]
    assert store.committed().layers == 1
    assert final_state(state) == never_failed[0]


def test_a_retried_write_bundle_rewrites_the_same_file_with_the_same_bytes(tmp_path):
    from schemas import CarriedState, ChunkOutput, outputs_to_table
    from transforms.dofns import WriteOutputPart, WriteSnapshotShard

    states = [CarriedState(f"s{i}", 1, 3, (np.full(2, i, np.float32),), "fp") for i in (2, 0, 1)]
    outputs = [ChunkOutput(f"s{i}", 0, np.full((3, 2), i, np.float32)) for i in (1, 0)]
    writers = [
        (WriteSnapshotShard(str(tmp_path / "state"), "r", "a", 1, ("layer0_h",)),
         lambda order: (0, {"states": order(states), "pending": []})),
        # Outputs come as one table in a fixed order (PlanAndRunBucket sorts them).
        (WriteOutputPart(str(tmp_path / "out"), "r", "a"),
         lambda order: ("00000-0000", outputs_to_table(outputs)))]
    def files(entries):  # leaves out the counts, which include time taken
        return [(kind, payload) for kind, payload in entries if kind.endswith("_files")]

    for writer, element in writers:
        sizing = (RunSizing(3, 1, 1),) if isinstance(writer, WriteSnapshotShard) else ()
        first = files(writer.process(element(list), *sizing))
        retried = files(writer.process(element(lambda items: list(reversed(items))),
                                       *sizing))
        assert first == retried  # same path, rows and sha256, whatever the element order
        ((_, record),) = first
        assert os.listdir(os.path.dirname(record.path)) == [os.path.basename(record.path)]


def test_a_run_rewrites_only_the_sequences_it_has_chunks_for(workload, tmp_path,
                                                             never_failed):
    store = run_three(workload, tmp_path)
    run_2 = store.manifest(*store.committed_attempt("run-2").snapshot)
    own = {sid for record in run_2.state_files if "/run-2/" in record.path
           for sid in storage.read_table(record.path).column("sequence_id").to_pylist()}
    arrived = set(pq.read_table(workload[2][1]).column("sequence_id").to_pylist())
    assert RESUMED not in own and own <= arrived
    assert run_2.layers == 2 and store.committed().layers == 3
    assert run_2.sequences == len(results.snapshot_contents(run_2)[0])
    assert final_state(store.url) == never_failed[0]


def test_a_snapshot_from_before_layers_is_compacted_by_the_next_run(workload, tmp_path,
                                                                     never_failed):
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    store = storage.StateStore(str(tmp_path / "state"))
    # Rewrite run-1's manifest as the first versions wrote it: no layers, no totals.
    run_1 = store.current()
    legacy = store.manifest(*run_1.snapshot).to_json()
    for kind in ("state_files", "pending_files"):
        legacy[kind] = [record | {"layer": None} for record in legacy[kind]]
    legacy["counts"] = {key: value for key, value in legacy["counts"].items()
                        if key not in ("sequences_live", "sequences_closed",
                                       "chunks_pending_total")}
    storage.write_json(store.manifest_url(*run_1.snapshot), legacy)
    sha256 = hashlib.sha256(open(store.manifest_url(*run_1.snapshot), "rb").read()).hexdigest()
    storage.write_json(os.path.join(store.url, "CURRENT"),
                       run_1.to_json() | {"manifest_sha256": sha256})
    assert store.committed().predates_layers
    for run in (1, 2):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    manifest = store.committed()
    states, pending = results.snapshot_contents(manifest)
    assert (manifest.sequences, manifest.pending_chunks) == (
        len(states), sum(len(chunks) for chunks in pending.values()))
    assert store.manifest(*store.committed_attempt("run-2").snapshot).layers == 1
    assert not manifest.predates_layers
    assert final_state(store.url) == never_failed[0]


def test_compaction_gives_the_same_state_as_layers(workload, tmp_path, never_failed):
    store = run_three(workload, tmp_path, max_layers=2)
    state, manifest = store.url, store.committed()
    assert manifest.layers == 1  # run-3 found two layers and compacted them
    assert final_state(state) == never_failed[0]
    assert manifest.sequences == len(final_state(state))


def test_reading_some_rows_of_a_snapshot_file_checks_it_whole(tmp_path, monkeypatch):
    """A run's sequences are read from a snapshot file a record batch at a time (the
    file is hashed first, in pieces): the rows kept are those asked for, in file
    order, and a damaged file or one with other rows than its record says is refused."""
    import pyarrow as pa

    from storage import files

    monkeypatch.setattr(files, "FILTER_BATCH_ROWS", 7)
    monkeypatch.setattr(files, "HASH_PIECE_BYTES", 100)
    table = pa.table({"sequence_id": [f"s{i:03d}" for i in range(50)],
                      "value": np.arange(50, dtype=np.float32)})
    url = str(tmp_path / "state.parquet")
    record = storage.write_table(url, table)
    kept = storage.read_table_rows(url, record, "sequence_id", ["s049", "s003", "s020", "x"])
    assert kept.to_pydict() == {"sequence_id": ["s003", "s020", "s049"],
                                "value": [3.0, 20.0, 49.0]}
    with pytest.raises(storage.IntegrityError, match="has 50 rows, the manifest says 49"):
        storage.read_table_rows(url, dataclasses.replace(record, rows=49), "sequence_id", [])
    data = bytearray(open(url, "rb").read())
    data[len(data) // 2] ^= 1
    open(url, "wb").write(bytes(data))
    with pytest.raises(storage.IntegrityError, match="is damaged"):
        storage.read_table_rows(url, record, "sequence_id", ["s003"])
