"""``CarryState`` as users compose it: any source of chunk records in, PCollections out,
the commit as its last step; and planning that never reads the inputs on the launcher."""
import collections
import glob
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

import storage
from pipeline import results
from pipeline.build import plan_run
from pipeline.demo import write_chunk_files
from pipeline.options import RunConfig
from schemas import OUTPUT_SCHEMA, Chunk
from transforms import sequencing
from transforms.carry import CarryState
from transforms.reference import keras_whole_sequence

# Beam's own runner names (seqcarry's CLI maps DirectRunner to the FnApiRunner too).
USER_TWO_WORKERS = ["--runner=FnApiRunner", "--direct_running_mode=multi_processing",
                    "--direct_num_workers=2"]
USER_IN_PROCESS = ["--runner=FnApiRunner", "--direct_running_mode=in_memory"]


def test_beams_own_parquet_io_around_carry_state_equals_the_whole_sequence(workload,
                                                                          tmp_path):
    """ReadFromParquet + CarryState + WriteToParquet, three runs on two worker
    processes: the user's output files and the committed states are the oracle's."""
    model, whole, directories, total_chunks = workload
    state = str(tmp_path / "state")
    for number, directory in enumerate(directories, start=1):
        with beam.Pipeline(options=PipelineOptions(USER_TWO_WORKERS)) as pipeline:
            carried = (pipeline
                       | beam.io.ReadFromParquet(os.path.join(directory, "*.parquet"))
                       | CarryState(model=model, state=state, run_id=f"run-{number}",
                                    batch_size=4, window_steps=16))
            _ = (carried["outputs"]
                 | beam.FlatMap(pa.Table.to_pylist)
                 | beam.io.WriteToParquet(str(tmp_path / "mine" / f"run-{number}" / "part"),
                                          schema=OUTPUT_SCHEMA, file_name_suffix=".parquet"))
    store = storage.StateStore(state)
    reports = [store.report(m.run_id, m.attempt) for m in reversed(store.history())]
    assert [r["run_id"] for r in reports] == ["run-1", "run-2", "run-3"]
    assert [r["parent"] for r in reports] == [None, "run-1", "run-2"]
    assert sum(r["chunks_processed"] for r in reports) == total_chunks
    assert all(r["outputs"] is None for r in reports)  # the user wrote them

    by_sequence = collections.defaultdict(dict)
    for path in glob.glob(str(tmp_path / "mine" / "*" / "*.parquet")):
        for row in pq.read_table(path).to_pylist():
            assert row["chunk_index"] not in by_sequence[row["sequence_id"]]
            by_sequence[row["sequence_id"]][row["chunk_index"]] = np.array(row["outputs"])
    carried_states = results.committed_states(state)
    reference = keras_whole_sequence(model)
    assert sorted(by_sequence) == sorted(carried_states) == sorted(whole)
    for sequence_id, features in whole.items():
        expected_outputs, expected_states = reference(features)
        chunks = by_sequence[sequence_id]
        produced = np.concatenate([chunks[index] for index in sorted(chunks)])
        np.testing.assert_allclose(produced, expected_outputs, atol=1e-5)
        final = carried_states[sequence_id]
        assert final.steps_seen == len(features)
        for got, want in zip(final.tensors, expected_states, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_records_of_any_shape_are_applied_or_dead_lettered_never_lost(workload, tmp_path):
    model = workload[0]
    good = {"sequence_id": "a", "chunk_index": 0, "features": np.ones((2, 3), np.float32)}
    records = [good,
               {"sequence_id": "a", "chunk_index": 1, "features": [[1.0, 2.0]]},  # width 2
               {"sequence_id": "b", "chunk_index": 0, "features": "not numbers"},
               ("a", 2, [[1.0, 2.0, 3.0]]),  # not a record
               pa.table({"sequence_id": ["c"], "chunk_index": [0],
                         "features": [[[0.5, 0.5, 0.5]]], "is_last": [True]})]
    collected = str(tmp_path / "collected.json")
    with beam.Pipeline(options=PipelineOptions(USER_IN_PROCESS)) as pipeline:
        carried = (pipeline | beam.Create(records, reshuffle=False)
                   | CarryState(model=model, state=str(tmp_path / "state"),
                                outputs=str(tmp_path / "outputs"), run_id="mixed"))
        _ = ((carried["dead_letters"] | "Letters" >> beam.Map(lambda d: ("dead", d)),
              carried["final_states"] | "Final" >> beam.Map(lambda f: ("final", f)),
              carried["report"] | "Report" >> beam.Map(lambda r: ("report", r)))
             | beam.Flatten() | beam.combiners.ToList()
             | beam.Map(lambda items: open(collected, "w").write(json.dumps(items))))
    items = json.load(open(collected))
    letters = sorted((d["reason"], d["sequence_id"] or "") for kind, d in items
                     if kind == "dead")
    assert letters == [("wrong_input_width", "a"), ("wrong_type", ""), ("wrong_type", "b")]
    assert [f["sequence_id"] for kind, f in items if kind == "final"] == ["c"]
    (report,) = [r for kind, r in items if kind == "report"]
    assert (report["chunks_read"], report["chunks_processed"], report["chunks_rejected"]) == (
        5, 2, 3)
    # With an outputs folder, the run's files are written and committed with it.
    assert len(report["dead_letters"]) >= 1 and report["outputs"].startswith(str(tmp_path))


def test_the_launcher_reads_no_input_file(workload, tmp_path, monkeypatch):
    """Planning lists the inputs (names and sizes) and reads CURRENT, the manifest and
    the model, nothing else: its cost does not follow the rows of the input."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"the launcher opened an input file: {args[:1]}")

    monkeypatch.setattr(storage, "ParquetInput", refuse)
    monkeypatch.setattr(storage, "read_table", refuse)
    monkeypatch.setattr(pq, "ParquetFile", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    plan = plan_run(RunConfig(workload[0], workload[2][0], str(tmp_path / "state"),
                              str(tmp_path / "outputs"), run_id="r1"))
    assert len(plan.chunk_files) == 3 and plan.input_bytes == sum(
        os.path.getsize(path) for path in plan.chunk_files)


def test_an_incremental_run_reads_only_the_snapshot_files_of_its_sequences(workload,
                                                                          tmp_path,
                                                                          monkeypatch):
    """Touched ids are joined to the snapshot files that can hold them (files are
    sharded by id): a run with chunks of one sequence reads one state file."""
    model = workload[0]
    monkeypatch.setattr(sequencing, "ROWS_PER_STATE_FILE", 4)  # many small state files
    rng = np.random.default_rng(0)
    first = [Chunk(f"s{i}", 0, rng.normal(size=(2, 3)).astype(np.float32)) for i in range(30)]
    write_chunk_files(str(tmp_path / "in-1"), first, files=2, rng=rng)
    write_chunk_files(str(tmp_path / "in-2"), [Chunk("s7", 1, np.ones((1, 3), np.float32))],
                      files=1, rng=rng)
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")
    from pipeline.build import run_job

    run_job(RunConfig(model, str(tmp_path / "in-1"), state, outputs, run_id="r1"),
            USER_IN_PROCESS)
    snapshot_reads, whole_reads = [], []

    def counting(real, reads):
        def read(url, *arguments):
            if "/snapshots/" in url:
                reads.append(url)
            return real(url, *arguments)
        return read

    # Reading whole files is for compacting runs: this one reads its rows only.
    monkeypatch.setattr(storage, "read_table", counting(storage.read_table, whole_reads))
    monkeypatch.setattr(storage, "read_table_rows",
                        counting(storage.read_table_rows, snapshot_reads))
    report = run_job(RunConfig(model, str(tmp_path / "in-2"), state, outputs, run_id="r2"),
                     USER_IN_PROCESS)
    first_manifest = storage.StateStore(state).history()[-1]
    assert len(first_manifest.state_files) == 8  # ceil(30 / 4)
    assert len(snapshot_reads) == 1 and not whole_reads and report["chunks_processed"] == 1
    assert results.committed_states(state)["s7"].next_chunk_index == 2
    assert len(results.committed_states(state)) == 30


def test_a_portable_job_services_metrics_are_read_fresh_and_the_summary_says_ok(
        workload, tmp_path):
    """On Beam's portable job service (the kind Flink, Prism and Dataflow are), the
    launcher asks the job service for the counters again (Beam's result caches its
    first answer), which is what progress lines are made of."""
    from pipeline.build import (ProgressWatcher, beam_metrics, build, pipeline_options,
                                summary_line)

    plan = plan_run(RunConfig(workload[0], workload[2][0], str(tmp_path / "state"),
                              str(tmp_path / "outputs"), run_id="portable"))
    pipeline = beam.Pipeline(options=pipeline_options(plan.config, [
        "--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]))
    build(pipeline, plan)
    result = pipeline.run()
    with ProgressWatcher(result, every_seconds=0.2):
        result.wait_until_finish()
    report = storage.StateStore(plan.config.state).report("portable", plan.attempt)
    live = beam_metrics(result, attempted=True)
    assert live["chunks_read"] == live["chunks_processed"] == report["chunks_read"] > 0
    assert live["steps_processed"] == report["steps_processed"]
    line = summary_line(report)
    assert line.startswith("seqcarry: ok: run portable committed: ") and "\n" not in line


def test_an_unreadable_input_file_is_one_dead_letter_and_the_run_goes_on(workload,
                                                                        tmp_path):
    """Read inside the job, a file that is not Parquet cannot stop the run: it is
    rejected as a file, and every other file is applied."""
    from pipeline.build import run_job

    directory = tmp_path / "in"
    write_chunk_files(str(directory), [Chunk("a", 0, np.ones((2, 3), np.float32))],
                      files=1, rng=np.random.default_rng(0))
    (directory / "empty.parquet").write_bytes(b"")
    (directory / "magic-only.parquet").write_bytes(b"PAR1PAR1")
    (directory / "text.parquet").write_text("sequence_id,chunk_index\na,1\n")
    report = run_job(RunConfig(workload[0], str(directory), str(tmp_path / "state"),
                               str(tmp_path / "outputs"), run_id="r1"), USER_IN_PROCESS)
    assert (report["chunks_read"], report["chunks_processed"], report["chunks_rejected"],
            report["files_rejected"]) == (1, 1, 0, 3)
    assert report["files_rejected_by_reason"] == {"unreadable_file": 3}
    letters = [row for path in report["dead_letters"] for row in pq.read_table(path).to_pylist()]
    assert sorted(os.path.basename(row["source"]) for row in letters) == [
        "empty.parquet", "magic-only.parquet", "text.parquet"]
    assert all("not a readable Parquet file" in row["message"] for row in letters)
