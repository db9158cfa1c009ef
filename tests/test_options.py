"""Options as Beam pipeline options, and strict command lines: both spellings work,
nothing unknown is dropped, and a shell-expanded glob reads every file."""
import glob
import json
import os

import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

import storage
from pipeline.build import pipeline_options
from pipeline.demo import make_model, write_chunk_files
from pipeline.options import RunConfig, SeqcarryOptions
from schemas import Chunk
from tests.test_cli import error_line, seqcarry


def test_seqcarry_options_are_pipeline_options_in_either_spelling():
    dashed = PipelineOptions(["--model", "m.keras", "--chunks", "a/*.parquet", "b.parquet",
                              "--state", "s", "--outputs", "o", "--batch-size", "8",
                              "--allow-non-finite", "--tf1-scope", "x=rnn",
                              "--outputs-at", "last", "--xla", "off"])
    underscored = PipelineOptions(["--model", "m.keras", "--chunks", "a/*.parquet",
                                   "b.parquet", "--state", "s", "--outputs", "o",
                                   "--batch_size", "8", "--allow_non_finite",
                                   "--tf1_scope", "x=rnn", "--outputs_at", "last",
                                   "--xla", "off"])
    config = RunConfig.from_options(dashed)
    assert config == RunConfig.from_options(underscored)
    # Local paths become absolute: an engine's workers run in other directories.
    assert (config.chunks, config.batch_size, config.allow_non_finite, config.tf1_scopes) == (
        (os.path.abspath("a/*.parquet"), os.path.abspath("b.parquet")), 8, True, ("x=rnn",))
    assert (config.model, config.state, config.outputs) == tuple(
        map(os.path.abspath, ("m.keras", "s", "o")))
    assert RunConfig("gs://b/m.keras", "gs://b/c", "gs://b/s", "gs://b/o").model == \
        "gs://b/m.keras"
    assert config.window_steps == 256 and config.max_layers == 8  # defaults kept
    assert config.outputs_at == "last" and RunConfig("m", "c", "s", "o").outputs_at == "auto"
    assert config.xla == "off" and RunConfig("m", "c", "s", "o").xla == "auto"

    # The job's options carry seqcarry's, whatever else Beam is given.
    job = pipeline_options(config, ["--runner=DirectRunner", "--direct_num_workers=2"])
    assert job.view_as(StandardOptions).runner == "FnApiRunner"
    carried = job.view_as(SeqcarryOptions).get_all_options(current_only=True)
    assert carried["batch_size"] == 8 and carried["chunks"] == list(config.chunks)
    assert job.get_all_options()["direct_num_workers"] == 2
    assert RunConfig.from_options(job) == config


def test_a_missing_required_option_is_named():
    with pytest.raises(ValueError, match="--chunks, --outputs required"):
        RunConfig.from_options(PipelineOptions(["--model", "m", "--state", "s"]))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A model and five single-chunk sequences in five files."""
    root = tmp_path_factory.mktemp("options")
    model = make_model(str(root / "m.keras"), 3, (4,), 2)
    chunks = [Chunk(f"s{i}", 0, np.full((2, 3), i, np.float32)) for i in range(5)]
    write_chunk_files(str(root / "chunks"), chunks, files=5, rng=np.random.default_rng(0))
    return model, sorted(glob.glob(str(root / "chunks" / "*.parquet")))


def test_underscore_spellings_reach_the_run(small, tmp_path):
    model, files = small
    state = str(tmp_path / "state")
    done = seqcarry("run", "--model", model, "--chunks", *files, "--state", state,
                    "--outputs", str(tmp_path / "out"), "--batch_size", "2", "--run_id", "r1",
                    "--window_steps", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    # A shell-expanded glob: every file is read, not only the first.
    assert (report["run_id"], report["chunks_read"], report["chunks_processed"]) == ("r1", 5, 5)
    assert storage.StateStore(state).committed().counts["batches"] == 3  # 5 rows, batch 2


@pytest.mark.parametrize("flag, said", [
    (["--runer=PrismRunner"], "unknown option --runer; did you mean --runner?"),
    (["--max_layer", "3"], "unknown option --max_layer; did you mean --max-layers?"),
    (["--batch", "8"], "unknown option --batch"),  # no abbreviations
    (["--no-such-thing"], "unknown option --no-such-thing"),
])
def test_an_unknown_run_option_is_refused_before_anything_is_written(small, tmp_path, flag,
                                                                     said):
    model, files = small
    done = seqcarry("run", "--model", model, "--chunks", files[0], "--state",
                    str(tmp_path / "state"), "--outputs", str(tmp_path / "out"), *flag)
    assert done.returncode == 2
    assert error_line(done) == f"seqcarry: error: {said}"
    assert not os.path.exists(tmp_path / "state") and not os.path.exists(tmp_path / "out")


def test_every_command_is_as_strict(small, tmp_path):
    model, files = small
    state = str(tmp_path / "state")
    for run_id in ("r1", "r2"):
        assert seqcarry("run", "--model", model, "--chunks", *files, "--state", state,
                        "--outputs", str(tmp_path / "out"), "--run-id", run_id).returncode == 0
    # --run_id is --run-id: verify checks r1, not the current snapshot.
    r2 = storage.StateStore(state).committed()
    storage.remove_file(max(r2.state_files, key=lambda record: record.layer).path)  # r2's own
    assert seqcarry("verify", "--state", state, "--run_id", "r1").returncode == 0
    assert seqcarry("verify", "--state", state, "--run-id", "r2").returncode == 3
    for args, said in [
            (["verify", "--state", state, "--runid", "r1"],
             "unknown option --runid; did you mean --run-id?"),
            (["snapshots", "--state", state, "--runner=DirectRunner"],
             "unknown option --runner"),
            (["rollback", "--state", state, "--to", "r1", "extra"],
             "unexpected argument 'extra' (quote a glob given to --chunks, or list every "
             "file after it)")]:
        done = seqcarry(*args)
        assert (done.returncode, error_line(done)) == (2, f"seqcarry: error: {said}")
    assert storage.StateStore(state).current().run_id == "r2"  # rollback never ran


def test_local_paths_are_refused_for_a_runner_whose_workers_run_elsewhere(small, tmp_path):
    model, files = small
    done = seqcarry("run", "--model", model, "--chunks", files[0], "--state",
                    str(tmp_path / "state"), "--outputs", "gs://bucket/out",
                    "--runner=DataflowRunner", "--project=p", "--region=europe-west1",
                    "--temp_location=gs://bucket/tmp")
    assert done.returncode == 2
    assert error_line(done) == (
        f"seqcarry: error: DataflowRunner's workers cannot read this machine's files: "
        f"--model {model}, --chunks {files[0]}, --state {tmp_path / 'state'}; use gs:// paths")
    assert not os.path.exists(tmp_path / "state")
