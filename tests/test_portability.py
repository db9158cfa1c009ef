"""What Dataflow and Flink need, up to the point of submitting: DoFns survive Beam's
pickler and work on their own, and the whole pipeline builds and serializes with
their options."""
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                  SetupOptions)

import apache_beam as beam
from pipeline.build import build, plan_run
from pipeline.options import RunConfig
from schemas import CarriedState, Chunk, ChunkOutput, DeadLetter, chunks_to_table, outputs_to_table
from transforms.commit import CommitRun
from transforms.dofns import (COUNTS, DEAD_LETTER_FILE, FINAL_STATE_FILE, OUTPUT_FILE,
                              PlanAndRunBucket, ReadParquetBatches, RouteIds,
                              ValidateChunks, WriteDeadLetters, WriteFinalStates,
                              WriteManifest, WriteOutputPart, WriteSnapshotShard)
from transforms.sequencing import RunSizing
from transforms.staging import slices

DATAFLOW = ["--runner=DataflowRunner", "--project=my-project", "--region=europe-west1",
            "--temp_location=gs://my-bucket/tmp", "--setup_file=./setup.py",
            "--experiments=use_runner_v2"]
FLINK = ["--runner=FlinkRunner", "--flink_master=localhost:8081",
         "--environment_type=EXTERNAL", "--environment_config=localhost:50000"]


@pytest.fixture
def plan(workload, tmp_path):
    return plan_run(RunConfig(workload[0], workload[2][0], str(tmp_path / "state"),
                              str(tmp_path / "out"), run_id="r1"))


def test_dofns_survive_beams_pickler_and_still_work(plan, workload, tmp_path):
    config, carry = plan.config, plan.carry
    dofns = [ReadParquetBatches(),
             ValidateChunks(3, False, "r1", str(tmp_path / "staging")),
             PlanAndRunBucket(config.model, carry.planner, 4, 16),
             RouteIds([]),
             WriteSnapshotShard(config.state, "r1", "a1", 1, carry.stack.state_names),
             WriteManifest(config.state, "r1", "a1", 1, "2026-12-01T00:00:00+00:00", None,
                           False, carry.stack.fingerprint, carry.stack.state_names),
             CommitRun(carry.commit_target())]
    restored = [pickler.loads(pickler.dumps(dofn)) for dofn in dofns]
    assert [type(d) for d in restored] == [type(d) for d in dofns]

    chunk_file = str(tmp_path / "chunks.parquet")
    chunks = [Chunk(f"s{i}", 0, np.ones((3, 3), np.float32)) for i in range(20)]
    pq.write_table(chunks_to_table(chunks), chunk_file)
    (rows,) = restored[0].process(chunk_file)
    envelopes = list(restored[1].process(rows))
    (staged,) = [value for tag, value in envelopes if tag == "staged"]
    assert staged.url.startswith(str(tmp_path / "staging"))
    assert sorted(value for tag, value in envelopes if tag == "ids") == sorted(
        c.sequence_id for c in chunks)
    ((bucket, staged_slice),) = slices(staged, RunSizing(20, 1, 1).buckets)
    runner = restored[2]
    runner.setup()  # loads the model on "the worker"
    runner.start_bundle()
    envelopes = list(runner.process((bucket, {"states": [], "pending": [],
                                              "chunks": [staged_slice]})))
    runner.finish_bundle()
    assert {tag for tag, _ in envelopes} == {"outputs", "states", "ledger"}


def test_writers_give_the_manifest_their_files_and_time(plan, tmp_path):
    # What reaches WriteManifest must be files or counts: anything else is dropped.
    out = str(tmp_path / "out")
    outputs = outputs_to_table([ChunkOutput("a", 0, np.ones((2, 1), np.float32))])
    letter = DeadLetter("in.parquet", 0, "a", 0, "non_finite", "NaN", "{}")
    ended = CarriedState("a", 1, 2, plan.carry.planner.zero_state,
                         plan.carry.stack.fingerprint)
    written = {
        OUTPUT_FILE: WriteOutputPart(out, "r1", "a1").process(("00000-0000", outputs)),
        DEAD_LETTER_FILE: WriteDeadLetters(out, "r1", "a1").process((0, [letter])),
        FINAL_STATE_FILE: WriteFinalStates(out, "r1", "a1",
                                           plan.carry.stack.state_names).process(
            (0, [(ended, "is_last")])),
    }
    for kind, entries in written.items():
        (file_kind, record), (counts_kind, counts), *more = entries
        assert (file_kind, counts_kind, record.rows) == (kind, COUNTS, 1)
        assert "ms_write" in counts and all(entry[0] == COUNTS for entry in more)


@pytest.mark.parametrize("options", [DATAFLOW, FLINK], ids=["dataflow", "flink"])
def test_the_pipeline_builds_and_serializes_with_cluster_runner_options(plan, options):
    parsed = PipelineOptions(options)
    # Build on a local runner object: creating a DataflowRunner would call GCP.
    pipeline = beam.Pipeline(runner="FnApiRunner", options=parsed)
    build(pipeline, plan)
    proto = pipeline.to_runner_api()  # what a runner is sent: every DoFn pickled
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"ReadChunkFiles/ReadBatches", "CarryState/Validate",
            "CarryState/ApplyChunks/PlanAndRun", "CarryState/WriteSnapshot",
            "CarryState/WriteManifest", "CarryState/Commit"} <= names
    if options is DATAFLOW:
        assert parsed.view_as(GoogleCloudOptions).region == "europe-west1"
        assert parsed.view_as(SetupOptions).setup_file == "./setup.py"
    else:
        assert type(beam.Pipeline(options=parsed).runner).__name__ == "FlinkRunner"


def test_the_model_is_loaded_once_per_process_whatever_the_dofn_copies(plan):
    # Runners unpickle a DoFn once per thread or bundle; Beam's Shared keeps one model.
    template = PlanAndRunBucket(plan.config.model, plan.carry.planner, 4, 16)
    copies = [pickler.loads(pickler.dumps(template)) for _ in range(3)]
    for dofn in copies:
        dofn.setup()
    assert copies[0]._model is copies[1]._model is copies[2]._model
    # Loading compiles nothing: the first window compiles (and decides on XLA).
    assert copies[0]._model.kernel.traces == 0
