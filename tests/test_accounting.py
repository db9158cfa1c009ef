"""Input accounting end to end: every chunk read is processed, deferred, skipped or
rejected; bad records land in dead letters with the right reason; no run crashes on
bad input; and whatever arrived in order equals Keras on the whole sequence."""
import math
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import storage
from pipeline import results
from pipeline.build import run_job
from pipeline.demo import make_model
from pipeline.options import RunConfig
from schemas import DEAD_LETTER_SCHEMA, Chunk, chunks_to_table
from schemas import validation as v
from tests.conftest import IN_PROCESS
from transforms.reference import keras_whole_sequence

RUNS = 3
INPUT_DIM = 2
# Malformed records: the row as written, and the reason it must be rejected with.
MALFORMED = {
    "no_id": ((None, 0, [[1.0, 2.0]]), v.MISSING_SEQUENCE_ID),
    "empty_id": (("", 0, [[1.0, 2.0]]), v.MISSING_SEQUENCE_ID),
    "negative_index": (("bad", -3, [[1.0, 2.0]]), v.INVALID_CHUNK_INDEX),
    "no_steps": (("bad", 0, []), v.EMPTY_FEATURES),
    "wrong_width": (("bad", 0, [[1.0, 2.0, 3.0]]), v.WRONG_INPUT_WIDTH),
    "ragged": (("bad", 0, [[1.0, 2.0], [1.0]]), v.RAGGED_FEATURES),
    "nan": (("bad", 0, [[math.nan, 2.0]]), v.NON_FINITE),
    "null_value": (("bad", 0, [[None, 2.0]]), v.NULL_VALUES),
}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = make_model(str(tmp_path_factory.mktemp("model") / "m.keras"), INPUT_DIM, (5,), 2,
                      seed=3)
    return path, keras_whole_sequence(path)


@st.composite
def deliveries(draw):
    """Sequences cut into chunks, and what each run receives: originals (in any run,
    some never), exact duplicates (any run), conflicting copies (a later run than the
    original), and malformed records."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sequences, per_run, malformed = {}, [[] for _ in range(RUNS)], [[] for _ in range(RUNS)]
    for number in range(draw(st.integers(1, 4))):
        sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
        features = rng.normal(size=(sum(sizes), INPUT_DIM)).astype(np.float32)
        sequence_id = f"s{number}"
        start, delivered = 0, 0
        for index, size in enumerate(sizes):
            chunk = Chunk(sequence_id, index, features[start:start + size])
            start += size
            run = draw(st.sampled_from([0, 1, 2, None]))  # None: never delivered
            if run is None:
                continue
            delivered += 1
            per_run[run].append(chunk)
            if draw(st.booleans()):
                per_run[draw(st.integers(0, RUNS - 1))].append(chunk)
            if run < RUNS - 1 and draw(st.integers(0, 3)) == 0:
                per_run[draw(st.integers(run + 1, RUNS - 1))].append(
                    Chunk(sequence_id, index, chunk.features + 1.0))
        sequences[sequence_id] = (features, sizes, delivered == len(sizes))
    for run in range(RUNS):
        malformed[run] = draw(st.lists(st.sampled_from(sorted(MALFORMED)), max_size=3))
    return sequences, per_run, malformed


def write_run(directory, chunks, malformed, rng):
    """One run's input: valid chunks and malformed rows, shuffled over two files."""
    rows = [(c.sequence_id, c.chunk_index, c.features.astype(np.float64).tolist())
            for c in chunks] + [MALFORMED[kind][0] for kind in malformed]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    os.makedirs(directory)
    for part, chunk_of_rows in enumerate((rows[::2], rows[1::2])):
        pq.write_table(pa.table({
            "sequence_id": pa.array([r[0] for r in chunk_of_rows], pa.string()),
            "chunk_index": pa.array([r[1] for r in chunk_of_rows], pa.int64()),
            "features": pa.array([r[2] for r in chunk_of_rows],
                                 pa.list_(pa.list_(pa.float64())))}),
            os.path.join(directory, f"part-{part}.parquet"))


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=deliveries())
def test_every_chunk_is_accounted_for_and_what_arrived_in_order_is_exact(small_model, case):
    model, reference = small_model
    sequences, per_run, malformed = case
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        state, outputs = os.path.join(root, "state"), os.path.join(root, "outputs")
        for run in range(RUNS):
            directory = os.path.join(root, f"in-{run}")
            write_run(directory, per_run[run], malformed[run], rng)
            report = run_job(RunConfig(model, directory, state, outputs, run_id=f"r{run}",
                                       batch_size=3, window_steps=4), IN_PROCESS)
            assert report["chunks_read"] == len(per_run[run]) + len(malformed[run])
            assert report["chunks_read"] == sum(report[c] for c in (
                "chunks_processed", "chunks_deferred", "chunks_skipped_duplicate",
                "chunks_rejected"))
            letters = [row for path in report["dead_letters"]
                       for row in storage.read_table(path).to_pylist()]
            assert len(letters) == report["chunks_rejected"]
            read_reasons = sorted(row["reason"] for row in letters
                                  if row["reason"] in v.READ_REASONS)
            assert read_reasons == sorted(MALFORMED[kind][1] for kind in malformed[run])

        carried = results.committed_states(state)
        produced = results.committed_outputs(state)
        for sequence_id, (features, sizes, complete) in sequences.items():
            if complete:  # every chunk arrived at some point: the whole sequence is done
                assert carried[sequence_id].next_chunk_index == len(sizes)
                assert carried[sequence_id].steps_seen == len(features)
            if sequence_id not in carried:
                assert sequence_id not in produced  # nothing arrived from chunk 0 on
                continue
            steps = carried[sequence_id].steps_seen
            assert steps == sum(sizes[:carried[sequence_id].next_chunk_index])
            if steps == 0:
                continue
            expected_outputs, expected_states = reference(features[:steps])
            np.testing.assert_allclose(produced[sequence_id], expected_outputs, atol=1e-5)
            for got, want in zip(carried[sequence_id].tensors, expected_states):
                np.testing.assert_allclose(got, want, atol=1e-5)


def test_is_last_reports_the_final_state_closes_the_sequence_and_rejects_later_chunks(
        small_model, tmp_path):
    model, reference = small_model
    features = np.random.default_rng(1).normal(size=(7, INPUT_DIM)).astype(np.float32)
    chunks = [Chunk("e", 0, features[:3]), Chunk("e", 1, features[3:], is_last=True)]
    state, outputs = str(tmp_path / "state"), str(tmp_path / "out")

    def run(name, batch):
        directory = tmp_path / name
        directory.mkdir()
        pq.write_table(chunks_to_table(batch), str(directory / "c.parquet"))
        return run_job(RunConfig(model, str(directory), state, outputs, run_id=name),
                       IN_PROCESS)

    first = run("first", [chunks[1], Chunk("live", 0, features[:2])])  # waits for chunk 0
    assert (first["chunks_deferred"], first["sequences_ended"]) == (1, {})
    second = run("second", [chunks[0], Chunk("e", 2, features[:1])])
    assert second["sequences_ended"] == {"is_last": 1}
    assert second["chunks_rejected_by_reason"] == {"sequence_closed": 1}
    (final,) = [row for path in second["final_states"]
                for row in storage.read_table(path).to_pylist()]
    expected_outputs, expected_states = reference(features)
    assert (final["sequence_id"], final["end_reason"], final["steps_seen"]) == ("e", "is_last", 7)
    np.testing.assert_allclose(final["layer0_h"], expected_states[0], atol=1e-5)
    np.testing.assert_allclose(results.committed_outputs(state)["e"], expected_outputs,
                               atol=1e-5)
    assert second["sequences_live"] == 1  # "e" is closed, "live" goes on

    third = run("third", [chunks[1], Chunk("e", 3, features[:1])])
    assert third["chunks_skipped_duplicate"] == 1
    assert third["chunks_rejected_by_reason"] == {"sequence_closed": 1}


def test_idle_sequences_expire_and_report_their_final_state(small_model, tmp_path):
    model, _ = small_model
    state, outputs = str(tmp_path / "state"), str(tmp_path / "out")
    for number, sequence_ids in enumerate([["idle", "busy"], ["busy"], ["busy"]]):
        directory = tmp_path / f"in{number}"
        directory.mkdir()
        pq.write_table(chunks_to_table([Chunk(s, number if s == "busy" else 0,
                                              np.ones((2, INPUT_DIM), np.float32))
                                        for s in sequence_ids]), str(directory / "c.parquet"))
        report = run_job(RunConfig(model, str(directory), state, outputs, run_id=f"r{number}",
                                   expire_after_runs=2), IN_PROCESS)
    assert report["sequences_ended"] == {"expired": 1} and report["sequences_live"] == 1
    (final,) = [row for path in report["final_states"]
                for row in storage.read_table(path).to_pylist()]
    assert (final["sequence_id"], final["end_reason"], final["steps_seen"]) == \
        ("idle", "expired", 2)


def test_dead_letters_follow_their_schema(small_model, tmp_path):
    directory = tmp_path / "in"
    directory.mkdir()
    pq.write_table(pa.table({"sequence_id": ["a"], "chunk_index": [0],
                             "features": [[[1.0, 2.0, 3.0]]]}), str(directory / "c.parquet"))
    report = run_job(RunConfig(small_model[0], str(directory), str(tmp_path / "s"),
                               str(tmp_path / "o")), IN_PROCESS)
    (path,) = report["dead_letters"]
    table = storage.read_table(path)
    assert table.schema.equals(DEAD_LETTER_SCHEMA)
    row = table.to_pylist()[0]
    assert (row["source"], row["row"], row["reason"]) == (
        str(directory / "c.parquet"), 0, "wrong_input_width")
