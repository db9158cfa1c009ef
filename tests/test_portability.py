"""What Dataflow and Flink need, up to the point of submitting: DoFns survive Beam's
pickler, and the whole pipeline builds and serializes with their options."""
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                  SetupOptions)

import apache_beam as beam
from pipeline.build import build, plan_run
from pipeline.options import RunConfig
from schemas import Chunk, chunks_to_table
from transforms.dofns import (PlanAndRunBucket, ReadChunkFile, WriteManifest,
                              WriteSnapshotShard)

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
    config = plan.config
    dofns = [ReadChunkFile(3, False, "r1", str(tmp_path / "staging"), 2),
             PlanAndRunBucket(config.model, plan.planner, 4, 16),
             WriteSnapshotShard(config.state, "r1", 1, 1, plan.stack.state_names),
             WriteManifest(config.state, "r1", 1, None, False, plan.stack.fingerprint,
                           plan.stack.state_names)]
    restored = [pickler.loads(pickler.dumps(dofn)) for dofn in dofns]
    assert [type(d) for d in restored] == [type(d) for d in dofns]

    chunk_file = str(tmp_path / "chunks.parquet")
    pq.write_table(chunks_to_table([Chunk("a", 0, np.ones((3, 3), np.float32))]), chunk_file)
    (kind, (bucket, staged)), ledger = restored[0].process(chunk_file)
    assert kind == "chunks" and staged.features is None and ledger[0] == "ledger"
    runner = restored[1]
    runner.setup()  # loads the model on "the worker"
    runner.start_bundle()
    envelopes = list(runner.process((bucket, {"states": [], "pending": [], "chunks": [staged]})))
    runner.finish_bundle()
    assert {tag for tag, _ in envelopes} == {"outputs", "states", "ledger"}


@pytest.mark.parametrize("options", [DATAFLOW, FLINK], ids=["dataflow", "flink"])
def test_the_pipeline_builds_and_serializes_with_cluster_runner_options(plan, options):
    parsed = PipelineOptions(options)
    # Build on a local runner object: creating a DataflowRunner would call GCP.
    pipeline = beam.Pipeline(runner="FnApiRunner", options=parsed)
    build(pipeline, plan)
    proto = pipeline.to_runner_api()  # what a runner is sent: every DoFn pickled
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"ReadChunks", "ApplyChunks/PlanAndRun", "WriteSnapshot", "WriteManifest"} <= names
    if options is DATAFLOW:
        assert parsed.view_as(GoogleCloudOptions).region == "europe-west1"
        assert parsed.view_as(SetupOptions).setup_file == "./setup.py"
    else:
        assert type(beam.Pipeline(options=parsed).runner).__name__ == "FlinkRunner"


def test_the_model_is_loaded_once_per_process_whatever_the_dofn_copies(plan):
    # Runners unpickle a DoFn once per thread or bundle; Beam's Shared keeps one model.
    template = PlanAndRunBucket(plan.config.model, plan.planner, 4, 16)
    copies = [pickler.loads(pickler.dumps(template)) for _ in range(3)]
    for dofn in copies:
        dofn.setup()
    assert copies[0]._model is copies[1]._model is copies[2]._model
    assert copies[0]._model.kernel.traces == 0  # compiled lazily, once, on first use
