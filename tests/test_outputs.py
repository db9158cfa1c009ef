"""What users read after runs (issue 20): ``<outputs>/<run_id>/`` holds only the
committed per-step outputs, dead letters and final states have trees of their own,
and ``read_outputs`` / ``seqcarry outputs`` give each sequence's outputs across runs,
in step order, equal to the whole-sequence model, in the old layout too."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage
from pipeline import results
from pipeline.build import run_job
from schemas import DEAD_LETTER_SCHEMA, OUTPUT_SCHEMA, Chunk, chunks_to_table
from tests.conftest import IN_PROCESS, RUNS, assert_close_states, config
from tests.test_commits import ROOT, attempt_folders, cli, run_args
from transforms.reference import keras_whole_sequence

TREES = ("", "_dead_letters", "_final_states")


def extra_chunks(folder) -> str:
    """A file for run-2: a sequence that ends (a final state) and a chunk with a NaN
    (a dead letter)."""
    rng = np.random.default_rng(5)
    path = os.path.join(folder, "extra.parquet")
    pq.write_table(chunks_to_table([
        Chunk("ends", 0, rng.normal(size=(4, 3)).astype(np.float32), is_last=True),
        Chunk("bad", 0, np.full((2, 3), np.nan, np.float32))]), path)
    return path


def committed_rows(state, kind):
    return sum(record.rows for manifest in storage.StateStore(state).history()
               for record in getattr(manifest, kind))


def test_each_outputs_folder_reads_whole_with_one_schema_after_a_failed_attempt(
        workload, tmp_path, never_failed):
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")
    run_job(config(workload, tmp_path, 0), IN_PROCESS)
    run_2 = dataclasses.replace(config(workload, tmp_path, 1),
                                chunks=[workload[2][1], extra_chunks(tmp_path)])
    died = cli(*run_args(run_2), env={storage.FAULT_ENV: "after_manifest:kill"})
    assert died.returncode == -9, died.stderr[-2000:]
    (failed,) = attempt_folders(os.path.join(outputs, "_dead_letters"), "run-2")
    assert failed in attempt_folders(outputs, "run-2")
    committed = run_job(run_2, IN_PROCESS)["attempt"]
    # The failed attempt's folders went when run-2 committed: each tree holds only
    # the committed attempt.
    for tree in TREES:
        assert attempt_folders(os.path.join(outputs, tree), "run-2") == [committed], tree
    run_job(config(workload, tmp_path, 2), IN_PROCESS)

    # pyarrow and pandas read a run's folder, or all of --outputs, as one table of
    # per-step outputs: the dead letters and final states are not mixed in.
    whole_run = pq.read_table(os.path.join(outputs, "run-2"))
    assert whole_run.schema.names == OUTPUT_SCHEMA.names
    assert whole_run.num_rows == sum(
        r.rows for r in storage.StateStore(state).manifest("run-2", committed).output_files)
    everything = pd.read_parquet(outputs)
    assert list(everything.columns) == OUTPUT_SCHEMA.names
    assert len(everything) == committed_rows(state, "output_files")
    letters = pq.read_table(os.path.join(outputs, "_dead_letters"))
    assert letters.schema.names == DEAD_LETTER_SCHEMA.names
    assert letters.column("sequence_id").to_pylist() == ["bad"]
    assert letters.column("reason").to_pylist() == ["non_finite"]
    ended = pq.read_table(os.path.join(outputs, "_final_states"))
    assert ended.column("sequence_id").to_pylist() == ["ends"]

    # The workload's sequences came out as in runs without the failure.
    produced = results.committed_outputs(state)
    for sequence_id, expected in never_failed[1].items():
        np.testing.assert_allclose(produced[sequence_id], expected, atol=1e-6)
    assert produced["ends"].shape == (4, 2) and "bad" not in produced


@pytest.fixture(scope="module")
def three_runs(workload, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("three-runs")
    for run in range(RUNS):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    return str(tmp_path / "state")


def test_read_outputs_gives_every_step_in_order_equal_to_the_whole_sequence(
        workload, three_runs):
    model, whole, _, _ = workload
    reference = keras_whole_sequence(model)
    table = results.read_outputs(three_runs)
    assert table.column_names[:4] == ["sequence_id", "step", "chunk_index", "run_id"]
    frame = table.to_pandas()
    assert sorted(frame["sequence_id"].unique()) == sorted(whole)
    for sequence_id, rows in frame.groupby("sequence_id"):
        assert rows["step"].tolist() == list(range(len(whole[sequence_id])))
        assert rows["chunk_index"].is_monotonic_increasing
        assert set(rows["run_id"]) <= {f"run-{run + 1}" for run in range(RUNS)}
        np.testing.assert_allclose(rows[["output_0", "output_1"]].to_numpy(),
                                   reference(whole[sequence_id])[0],
                                   atol=1e-5)


def test_one_run_or_some_sequences_keep_their_place_in_the_whole_sequence(three_runs):
    every = results.read_outputs(three_runs).to_pandas()
    run_3 = results.read_outputs(three_runs, run_id="run-3").to_pandas()
    assert set(run_3["run_id"]) == {"run-3"} and len(run_3)
    pd.testing.assert_frame_equal(
        run_3.reset_index(drop=True),
        every[every["run_id"] == "run-3"].reset_index(drop=True))
    chosen = sorted(every["sequence_id"].unique())[:2]
    some = results.read_outputs(three_runs, sequence_ids=chosen).to_pandas()
    pd.testing.assert_frame_equal(
        some, every[every["sequence_id"].isin(chosen)].reset_index(drop=True))
    assert len(results.read_outputs(three_runs, sequence_ids=["nobody"])) == 0


def test_steps_before_a_retired_snapshot_are_unknown(three_runs, tmp_path):
    state = str(tmp_path / "state")
    shutil.copytree(three_runs, state)
    storage.StateStore(state).prune(1)
    every = results.read_outputs(three_runs).to_pandas()
    left = results.read_outputs(state).to_pandas()
    assert set(left["run_id"]) == {"run-3"}
    # Known only where run-3 read a sequence from its chunk 0.
    first = left.groupby("sequence_id")["chunk_index"].transform("min")
    known = every[every["run_id"] == "run-3"].reset_index(drop=True)
    assert (first == 0).any() and (first > 0).any()
    assert left["step"].isna().tolist() == (first > 0).tolist()
    assert (left["step"] == known["step"])[first == 0].all()


def test_the_outputs_command_writes_csv_and_parquet(three_runs, tmp_path):
    every = results.read_outputs(three_runs).to_pandas()
    chosen = sorted(every["sequence_id"].unique())[3]
    printed = cli("outputs", "--state", three_runs, "--sequence", chosen)
    assert printed.returncode == 0, printed.stderr[-2000:]
    from_csv = pd.read_csv(pa.BufferReader(printed.stdout.encode()))
    expected = every[every["sequence_id"] == chosen].reset_index(drop=True)
    assert from_csv[["step", "chunk_index"]].equals(expected[["step", "chunk_index"]])
    np.testing.assert_allclose(from_csv["output_1"], expected["output_1"], rtol=1e-6)
    target = str(tmp_path / "folder" / "run-2.parquet")
    written = cli("outputs", "--state", three_runs, "--run-id", "run-2", "--to", target)
    assert written.returncode == 0, written.stderr[-2000:]
    assert "wrote" in written.stderr
    pd.testing.assert_frame_equal(
        pd.read_parquet(target),
        every[every["run_id"] == "run-2"].reset_index(drop=True))
    for wrong in (["--run-id", "run-9"], ["--to", str(tmp_path / "out.txt")]):
        refused = cli("outputs", "--state", three_runs, *wrong)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert refused.stderr.strip().splitlines()[-1].startswith("seqcarry: error:")


# --- outputs written in the layout before this one ------------------------------------

NESTED_LAYOUT_COMMIT = "ca676ae"  # dead letters and final states inside <run_id>/<attempt>/


def test_runs_written_in_the_nested_layout_keep_being_read(workload, tmp_path, never_failed):
    code = tmp_path / "nested-layout-code"
    code.mkdir()
    subprocess.run(f"git archive {NESTED_LAYOUT_COMMIT} | tar -x -C {code}", shell=True,
                   cwd=ROOT, check=True)
    first = config(workload, tmp_path, 0)
    done = subprocess.run([sys.executable, "-m", "pipeline", *run_args(first)], cwd=code,
                          env=dict(os.environ, PYTHONPATH=str(code)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    old = json.loads(done.stdout)["attempt"]
    assert os.path.isdir(os.path.join(first.outputs, "run-1", old))
    for run in range(1, RUNS):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    state = first.state
    # Equal to float32 rounding: the older code batched run-1's sequences otherwise.
    produced = results.committed_outputs(state)
    assert sorted(produced) == sorted(never_failed[1])
    for sequence_id, expected in never_failed[1].items():
        np.testing.assert_allclose(produced[sequence_id], expected, atol=1e-6)
    assert_close_states(state, never_failed[0], atol=1e-6)
    # gc leaves the committed old-layout folder alone.
    kept = cli("gc", "--state", state, "--keep", "3", "--outputs", first.outputs,
               "--orphan-grace-hours", "0.0001")
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert attempt_folders(first.outputs, "run-1") == [old]
    every = results.read_outputs(state)
    assert results.read_outputs(state, run_id="run-1").equals(
        every.filter(pa.compute.equal(every["run_id"], "run-1")))
