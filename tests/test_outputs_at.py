"""``--outputs-at every|last`` (issue 19): a run writes every step's outputs, or each
applied chunk's output at its last step only; either way the state is carried over
every step, the counts are of steps computed, and ``read_outputs`` / ``seqcarry
outputs`` give each output its step in the whole sequence, in lineages that mix both.
The oracle is Keras on each whole sequence (and, for a classifier, Keras on each
prefix the chunks end)."""
import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import storage
from pipeline import results
from pipeline.build import run_job
from schemas import OUTPUT_SCHEMA, InputError, outputs_from_table, with_steps
from tests.chunked import run_chunked
from tests.conftest import IN_PROCESS, RUNS, TWO_WORKERS, config
from tests.test_commits import cli, cli_here
from transforms.reference import keras_whole_sequence


@pytest.fixture(scope="module")
def applied(workload):
    """What the workload's runs apply, from its chunk files: ``(sequence_id,
    chunk_index) -> (run number from 1, first step, steps)`` (no chunk of it waits)."""
    rows = []
    for run, directory in enumerate(workload[2]):
        table = pq.read_table(directory, columns=["sequence_id", "chunk_index", "features"])
        rows.append(pd.DataFrame({
            "sequence_id": table["sequence_id"].to_pylist(),
            "chunk_index": table["chunk_index"].to_pylist(),
            "steps": pc.list_value_length(table["features"]).to_numpy(), "run": run + 1}))
    chunks = pd.concat(rows).sort_values(["sequence_id", "chunk_index"])
    chunks["first"] = chunks.groupby("sequence_id")["steps"].cumsum() - chunks["steps"]
    return {(row.sequence_id, row.chunk_index): (row.run, row.first, row.steps)
            for row in chunks.itertuples()}


@pytest.fixture(scope="module")
def reference(workload):
    """Keras' per-step outputs and final states on each whole sequence."""
    whole_sequence = keras_whole_sequence(workload[0])
    return {sequence_id: whole_sequence(features)
            for sequence_id, features in workload[1].items()}


def expected_rows(applied, outputs_at):
    """The rows ``read_outputs`` must give when run N wrote ``outputs_at[N - 1]``:
    (sequence_id, step, chunk_index, run_id), in its order."""
    rows = []
    for (sequence_id, index), (run, first, steps) in sorted(applied.items()):
        kept = range(first, first + steps) if outputs_at[run - 1] == "every" else [
            first + steps - 1]
        rows += [(sequence_id, step, index, f"run-{run}") for step in kept]
    return pd.DataFrame(rows, columns=["sequence_id", "step", "chunk_index", "run_id"])


def assert_outputs_are(frame, expected, reference):
    """``frame`` (of read_outputs) has exactly the ``expected`` rows, each with Keras'
    whole-sequence output at its step."""
    pd.testing.assert_frame_equal(frame[list(expected.columns)].reset_index(drop=True),
                                  expected.reset_index(drop=True), check_dtype=False)
    for sequence_id, rows in frame.groupby("sequence_id"):
        np.testing.assert_allclose(rows[["output_0", "output_1"]].to_numpy(),
                                   reference[sequence_id][0][rows["step"].to_numpy()],
                                   atol=1e-5)


def assert_states_equal_keras(state, reference):
    """The state was carried over every step, whatever outputs were kept."""
    carried = results.committed_states(state)
    assert sorted(carried) == sorted(reference)
    for sequence_id, (outputs, finals) in reference.items():
        assert carried[sequence_id].steps_seen == len(outputs)
        for got, want in zip(carried[sequence_id].tensors, finals, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


def run_lineage(workload, tmp_path, outputs_at, beam_args):
    """The workload's runs, run N with ``outputs_at[N - 1]`` and ``beam_args[N - 1]``."""
    return [run_job(config(workload, tmp_path, run, outputs_at=outputs_at[run]),
                    beam_args[run]) for run in range(RUNS)]


def assert_steps_counted(reports, state, whole):
    """Reports, Beam's metrics and ``seqcarry inspect`` count the steps computed."""
    total = sum(map(len, whole.values()))
    assert sum(report["steps_processed"] for report in reports) == total
    for report in reports:
        if "steps_processed" in report["metrics"]:  # Beam's, where the runner has them
            assert report["metrics"]["steps_processed"] == report["steps_processed"]
    for sequence_id in sorted(whole)[:3]:
        runs = results.sequence_details(state, sequence_id)["runs"]
        assert sum(run["steps"] for run in runs) == len(whole[sequence_id])


def test_last_outputs_equal_the_whole_sequence_at_each_chunk_end(workload, tmp_path,
                                                                  applied, reference):
    state = str(tmp_path / "state")
    reports = run_lineage(workload, tmp_path, ["last"] * RUNS, [IN_PROCESS] * RUNS)
    store = storage.StateStore(state)
    assert [r["outputs_at"] for r in reports] == ["last"] * RUNS
    assert [m.outputs_at for m in reversed(store.history())] == ["last"] * RUNS
    # The files: one row per applied chunk, its steps and its last step's output.
    written = [output for manifest in store.history() for record in manifest.output_files
               for output in outputs_from_table(storage.read_table(record.path, record),
                                                record.path)]
    assert sorted((o.sequence_id, o.chunk_index) for o in written) == sorted(applied)
    for output in written:
        assert output.outputs.shape == (1, 2)
        assert output.steps == applied[output.sequence_id, output.chunk_index][2]
    assert_outputs_are(results.read_outputs(state).to_pandas(),
                       expected_rows(applied, ["last"] * RUNS), reference)
    assert_states_equal_keras(state, reference)
    assert_steps_counted(reports, state, workload[1])


def test_a_lineage_mixing_every_and_last_reads_in_step_order(workload, tmp_path, applied,
                                                             reference):
    """Run 1 with the default (every, for this model of per-step outputs), run 2 with
    last on two worker processes, run 3 with every."""
    reports = run_lineage(workload, tmp_path, ["auto", "last", "every"],
                          [IN_PROCESS, TWO_WORKERS, IN_PROCESS])
    state = str(tmp_path / "state")
    outputs_at = ["every", "last", "every"]
    assert [r["outputs_at"] for r in reports] == outputs_at
    every = results.read_outputs(state).to_pandas()
    expected = expected_rows(applied, outputs_at)
    assert_outputs_are(every, expected, reference)
    assert_states_equal_keras(state, reference)
    assert_steps_counted(reports, state, workload[1])
    # One run, or one sequence of one run, keeps each row's step in the whole sequence
    # (run-3's steps start where run-2, which kept only chunk ends, left them).
    for run_id in ("run-2", "run-3"):
        assert_outputs_are(results.read_outputs(state, run_id=run_id).to_pandas(),
                           expected[expected["run_id"] == run_id], reference)
    chosen = sorted(every.loc[every["run_id"] == "run-3", "sequence_id"].unique())[0]
    only = expected[(expected["run_id"] == "run-3") & (expected["sequence_id"] == chosen)]
    assert only["step"].min() > 0
    assert_outputs_are(results.read_outputs(state, [chosen], "run-3").to_pandas(), only,
                       reference)
    # seqcarry outputs gives the same rows, for a sequence across runs or for run-2.
    chosen = sorted(every.loc[every["run_id"] == "run-2", "sequence_id"].unique())[-1]
    for arguments, rows, target in (
            (["--sequence", chosen], every["sequence_id"] == chosen, "one.csv"),
            (["--run-id", "run-2"], every["run_id"] == "run-2", "run-2.parquet")):
        target = str(tmp_path / target)
        written = cli_here("outputs", "--state", state, *arguments, "--to", target)
        assert written.returncode == 0, written.stderr[-2000:]
        read = (pd.read_csv if target.endswith(".csv") else pd.read_parquet)(target)
        assert_outputs_are(read, expected[rows.to_numpy()], reference)


def test_outputs_written_before_steps_existed_have_a_step_per_output():
    older = pa.table({"sequence_id": ["a", "b"], "chunk_index": [0, 3],
                      "outputs": [[[1.0], [2.0], [3.0]], [[4.0]]]})
    assert with_steps(older).schema.names == OUTPUT_SCHEMA.names
    assert [(o.chunk_index, o.steps, o.outputs.shape) for o in outputs_from_table(
        older, "older.parquet")] == [(0, 3, (3, 1)), (3, 1, (1, 1))]


def test_an_unknown_outputs_at_is_refused_before_anything_runs(workload, tmp_path):
    wrong = dataclasses.replace(config(workload, tmp_path, 0), outputs_at="sometimes")
    with pytest.raises(InputError, match="--outputs-at 'sometimes'"):
        run_job(wrong, IN_PROCESS)
    refused = cli("run", "--model", wrong.model, "--chunks", *wrong.chunks, "--state",
                  wrong.state, "--outputs", wrong.outputs, "--outputs-at", "sometimes")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "--outputs-at" in refused.stderr and "'last'" in refused.stderr
    assert not (tmp_path / "state").exists()


def test_a_classifier_says_at_each_chunk_end_what_keras_says_of_that_prefix(tmp_path):
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(8),
                              keras.layers.Dense(3)])
    rng = np.random.default_rng(3)
    model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(np.float32)
                       for w in model.get_weights()])  # biases not zero
    path = str(tmp_path / "classifier.keras")
    model.save(path)
    whole = {f"s{number}": rng.normal(size=(int(rng.integers(1, 60)), 4)).astype(np.float32)
             for number in range(8)}
    state, reports = run_chunked(path, whole, tmp_path)  # --outputs-at auto
    assert [r["outputs_at"] for r in reports] == ["last"] * 3
    assert sum(r["steps_processed"] for r in reports) == sum(map(len, whole.values()))
    frame = results.read_outputs(state).to_pandas()
    assert sorted(frame["sequence_id"].unique()) == sorted(whole)
    # Chunks of one step among them: chunk ends one step apart, or a chunk 0 of one.
    ends = frame.groupby("sequence_id")["step"]
    assert ((ends.diff() == 1) | ((ends.cumcount() == 0) & (frame["step"] == 0))).any()
    worst = 0.0
    for row in frame.itertuples():
        got = np.array([row.output_0, row.output_1, row.output_2])
        expected = model.predict(whole[row.sequence_id][None, :row.step + 1], verbose=0)[0]
        np.testing.assert_allclose(got, expected, atol=1e-5)
        worst = max(worst, float(np.abs(got - expected).max()))
    # Each sequence's last output is the classifier's output on the whole sequence.
    assert (ends.max() == frame.groupby("sequence_id")["sequence_id"].first().map(
        lambda sequence_id: len(whole[sequence_id]) - 1)).all()
    print(f"classifier: max abs diff vs Keras on each prefix: {worst:.3g} ({len(frame)} chunks)")
