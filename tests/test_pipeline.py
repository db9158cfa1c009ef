"""End to end: several chunked, shuffled runs of the real Beam pipeline equal Keras on
each whole sequence, on the in-process and the multi-process DirectRunner."""
import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage
from pipeline import results
from pipeline.results import snapshot_contents
from pipeline.build import run_job
from pipeline.demo import make_model, write_chunk_files
from pipeline.options import InputError, RunConfig
from schemas import Chunk
from transforms.models import ModelError
from tests.chunked import assert_equals_whole_sequence
from tests.conftest import IN_PROCESS, RESUMED, TWO_WORKERS
from transforms.reference import keras_whole_sequence


def run_all(workload, tmp_path, beam_args, xla="auto"):
    model, _, directories, _ = workload
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")
    reports = [run_job(RunConfig(model=model, chunks=directory, state=state, outputs=outputs,
                                 run_id=f"run-{number + 1}", batch_size=4, window_steps=16,
                                 xla=xla),
                       beam_args)
               for number, directory in enumerate(directories)]
    return state, reports


def assert_equals_whole_sequence_model(workload, state):
    model, whole, _, _ = workload
    reference = keras_whole_sequence(model)
    return assert_equals_whole_sequence(state, whole, lambda _, features: reference(features))


@pytest.mark.parametrize("runner", ["in-process", "two-worker-processes", "dask-cluster"])
def test_chunked_runs_equal_the_whole_sequence_model(workload, tmp_path, request, runner,
                                                     monkeypatch):
    beam_args = {"in-process": IN_PROCESS, "two-worker-processes": TWO_WORKERS}.get(runner) or [
        "--runner=DaskRunner",
        f"--dask_client_address={request.getfixturevalue('dask_cluster')}"]
    # Small buckets run plain, large ones XLA-compiled; the two worker processes compile
    # every batch (--xla on, an option that travels to them), so both paths are checked
    # against Keras.
    everywhere = runner == "two-worker-processes"
    monkeypatch.delenv("SEQCARRY_XLA", raising=False)
    state, reports = run_all(workload, tmp_path, beam_args, "on" if everywhere else "auto")
    paths = {path for r in reports for path in r["batches_by_path"]}
    assert paths == {"xla"} if everywhere else "plain" in paths, paths

    total_chunks = workload[3]
    assert sum(r["chunks_read"] for r in reports) == total_chunks
    assert sum(r["chunks_processed"] for r in reports) == total_chunks
    assert all(r["chunks_deferred"] == r["chunks_skipped_duplicate"] == r["chunks_rejected"]
               == r["chunks_pending_total"] == 0 for r in reports)
    assert [r["parent"] for r in reports] == [None, "run-1", "run-2"]
    # Staged chunks are removed when a run is done.
    assert not [name for _, _, names in os.walk(os.path.join(state, "staging")) for name in names]
    assert reports[-1]["sequences_live"] == len(workload[1])
    assert sum(r["steps_processed"] for r in reports) == sum(map(len, workload[1].values()))
    # Where each run's time went, on every runner (from the ledger, not Beam metrics).
    assert all({"read", "plan", "compute", "write", "commit"} <= set(r["stage_seconds"])
               and sum(r["stage_seconds"].values()) <= r["seconds"] * 4 for r in reports)
    worst = assert_equals_whole_sequence_model(workload, state)
    print(f"max abs diff vs whole sequence ({runner}): {worst:.3g}")


def test_sequence_absent_from_a_run_keeps_its_state_bit_for_bit(workload, tmp_path):
    state, _ = run_all(workload, tmp_path, IN_PROCESS)
    store = storage.StateStore(state)
    by_run = {}
    for manifest in store.history():
        by_run[manifest.run_id] = snapshot_contents(manifest)[0]
    before, during = by_run["run-1"][RESUMED], by_run["run-2"][RESUMED]
    assert (during.next_chunk_index, during.steps_seen) == (3, before.steps_seen)
    for a, b in zip(before.tensors, during.tensors):
        np.testing.assert_array_equal(a, b)
    assert by_run["run-3"][RESUMED].steps_seen == 40


def write_chunks(directory, chunks):
    write_chunk_files(str(directory), chunks, files=1, rng=np.random.default_rng(0))
    return str(directory)


def test_deferred_chunks_wait_for_the_gap_and_duplicates_are_skipped(workload, tmp_path):
    model = workload[0]
    features = np.random.default_rng(3).normal(size=(9, 3)).astype(np.float32)
    chunks = [Chunk("g", i, features[3 * i:3 * i + 3]) for i in range(3)]
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")

    def run(name, batch):
        return run_job(RunConfig(model, write_chunks(tmp_path / name, batch), state, outputs,
                                 run_id=name), IN_PROCESS)

    first = run("first", [chunks[0], chunks[2]])  # chunk 1 missing: 2 waits
    assert (first["chunks_processed"], first["chunks_deferred"]) == (1, 1)
    assert first["chunks_pending_total"] == 1
    assert results.committed_states(state)["g"].steps_seen == 3
    second = run("second", [chunks[1], chunks[0], chunks[1]])  # the gap, and two repeats
    assert (second["chunks_processed"], second["chunks_skipped_duplicate"]) == (1, 2)
    assert (second["pending_applied"], second["chunks_pending_total"]) == (1, 0)

    expected_outputs, expected_states = keras_whole_sequence(model)(features)
    np.testing.assert_allclose(results.committed_outputs(state)["g"], expected_outputs,
                               atol=1e-5)
    carried = results.committed_states(state)["g"]
    assert (carried.next_chunk_index, carried.steps_seen) == (3, 9)
    for got, want in zip(carried.tensors, expected_states):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_failed_run_commits_nothing(workload, tmp_path):
    model = workload[0]
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")
    good = [Chunk("a", 0, np.ones((2, 3), np.float32))]
    run_job(RunConfig(model, write_chunks(tmp_path / "good", good), state, outputs,
                      run_id="good"), IN_PROCESS)
    os.environ[storage.FAULT_ENV] = "mid_compute:raise"
    try:
        with pytest.raises(Exception, match="injected fault at mid_compute"):
            next_chunk = [Chunk("a", 1, np.ones((2, 3), np.float32))]
            run_job(RunConfig(model, write_chunks(tmp_path / "bad", next_chunk), state,
                              outputs, run_id="bad"), IN_PROCESS)
    finally:
        del os.environ[storage.FAULT_ENV]
    assert storage.StateStore(state).current().run_id == "good"
    assert not glob.glob(os.path.join(state, "snapshots", "bad", "*", "manifest.json"))


def test_state_from_another_model_is_refused(workload, tmp_path):
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")
    chunks = write_chunks(tmp_path / "c", [Chunk("a", 0, np.ones((2, 3), np.float32))])
    run_job(RunConfig(workload[0], chunks, state, outputs, run_id="one"), IN_PROCESS)
    other = make_model(str(tmp_path / "other.keras"), 3, (8, 6), 2, seed=99)
    with pytest.raises(ModelError, match="was written by model sha256:.*--reset-state"):
        run_job(RunConfig(other, chunks, state, outputs, run_id="two"), IN_PROCESS)
    assert storage.StateStore(state).current().run_id == "one"

    # --reset-state: the sequence restarts from zeros under the new model, and goes on
    # with its chunk numbering.
    more = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32)
    run_job(RunConfig(other, write_chunks(tmp_path / "next", [Chunk("a", 1, more)]), state,
                      outputs, run_id="two", reset_state=True), IN_PROCESS)
    carried = results.committed_states(state)["a"]
    expected_outputs, expected_states = keras_whole_sequence(other)(more)
    assert (carried.next_chunk_index, carried.steps_seen) == (2, 6)
    assert carried.model_fingerprint == storage.StateStore(state).committed().model_fingerprint
    for got, want in zip(carried.tensors, expected_states):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_reused_run_id_and_empty_input_are_refused_a_bad_file_is_dead_lettered(workload, tmp_path):
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")
    chunks = write_chunks(tmp_path / "c", [Chunk("a", 0, np.ones((2, 3), np.float32))])
    run_job(RunConfig(workload[0], chunks, state, outputs, run_id="one"), IN_PROCESS)
    with pytest.raises(storage.StateConflictError, match="run id one is already committed"):
        run_job(RunConfig(workload[0], chunks, state, outputs, run_id="one"), IN_PROCESS)
    nothing = run_job(RunConfig(workload[0], str(tmp_path / "none" / "*.parquet"), state,
                                outputs, run_id="two"), IN_PROCESS)  # a day without data
    assert (nothing["chunks_read"], nothing["parent"]) == (0, "one")
    for expiry in ({"expire_after_runs": 0}, {"expire_after_days": -1.0}):
        with pytest.raises(InputError, match="--expire-after-runs must be at least 1"):
            run_job(RunConfig(workload[0], chunks, state, outputs, **expiry), IN_PROCESS)
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"sequence_id": ["a"]}), str(bad / "x.parquet"))
    report = run_job(RunConfig(workload[0], str(bad), state, outputs, run_id="three"),
                     IN_PROCESS)
    assert (report["chunks_rejected_by_reason"], report["files_rejected_by_reason"]) == (
        {}, {"wrong_schema": 1})


@pytest.mark.parametrize("args, runner", [
    ([], "FnApiRunner"),
    (["--runner=DirectRunner", "--direct_num_workers=2"], "FnApiRunner"),
    (["--runner=DaskRunner"], "apache_beam.runners.dask.dask_runner.DaskRunner"),
    (["--runner=PrismRunner"], "PrismRunner"),
    (["--runner=DataflowRunner"], "DataflowRunner"),
])
def test_direct_runner_runs_locally_without_fetching_prism(args, runner):
    from apache_beam.options.pipeline_options import StandardOptions

    from pipeline.build import pipeline_options
    config = RunConfig("m.keras", "in/", "state/", "out/")
    assert pipeline_options(config, args).view_as(StandardOptions).runner == runner


def test_a_model_file_changed_after_planning_fails_the_run_and_commits_nothing(
        workload, tmp_path, monkeypatch):
    """Workers load --model by path: each checks it is the model the run was planned
    with. Then the report says which compiled path computed the batches."""
    import dataclasses
    import shutil

    from pipeline.build import execute, plan_run
    from pipeline.cli import classify_error
    from tests.conftest import config

    model = str(tmp_path / "model.keras")
    shutil.copy(workload[0], model)
    cfg = dataclasses.replace(config(workload, tmp_path, 0), model=model)
    plan = plan_run(cfg)
    make_model(model, input_dim=3, units=(8, 6), output_dim=2, seed=8)  # other weights
    with pytest.raises(Exception) as failed:
        execute(plan, IN_PROCESS)
    code, error = classify_error(failed.value)
    assert code == 2 and isinstance(error, ModelError), failed.value
    assert "changed after planning" in str(error) and plan.carry.stack.fingerprint in str(error)
    assert storage.StateStore(cfg.state).current() is None

    shutil.copy(workload[0], model)
    # Small buckets run plain unless SEQCARRY_XLA=1 asks for XLA everywhere.
    monkeypatch.delenv("SEQCARRY_XLA", raising=False)
    report = run_job(cfg, IN_PROCESS)
    assert report["batches_by_path"].get("plain", 0) > 0, report["batches_by_path"]
    monkeypatch.setenv("SEQCARRY_XLA", "1")
    report = run_job(dataclasses.replace(config(workload, tmp_path, 1), model=model),
                     IN_PROCESS)
    assert set(report["batches_by_path"]) == {"xla"} and report["batches_by_path"]["xla"] > 0
    # --xla off wins over the worker's SEQCARRY_XLA=1 (SEQCARRY_XLA=0: tests/test_kernel.py).
    report = run_job(dataclasses.replace(config(workload, tmp_path, 2, xla="off"), model=model),
                     IN_PROCESS)
    assert set(report["batches_by_path"]) == {"plain"}
