"""What `seqcarry run` prints on stderr in each output mode (the default, --quiet,
--verbose), with Beam's SDK workers in their own processes: their stderr is the
command's, so TensorFlow's C++ start-up lines and Beam's worker INFO lines would land
there too."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pipeline.demo import make_model, write_chunk_files
from schemas import Chunk
from tests.test_cli import SEQCARRY

TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
TF_CPP = re.compile(r"^[IWEF]\d{4} ")  # I0000 00:00:1796167711.262943 1314 port.cc:153]
SEQCARRY_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} seqcarry event=")
SUMMARY = "seqcarry: ok: run r1 committed: 4 chunks read, 4 processed,"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    model = make_model(str(root / "m.keras"), 3, (4,), 2)
    write_chunk_files(str(root / "chunks"),
                      [Chunk(s, 0, np.ones((5, 3), np.float32)) for s in "abcd"], files=2,
                      rng=np.random.default_rng(0))
    return model, str(root / "chunks")


def stderr_lines(inputs, tmp_path, *flags):
    model, chunks = inputs
    # As a user's shell has it: conftest sets TF_CPP_MIN_LOG_LEVEL for the test process.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [SEQCARRY, *flags, "run", "--model", model, "--chunks", chunks,
         "--state", str(tmp_path / "state"), "--outputs", str(tmp_path / "out"),
         "--run-id", "r1", *TWO_WORKERS],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"run_id": "r1"' in result.stdout  # the report, on stdout in every mode
    return result.stderr.splitlines()


def test_default_shows_seqcarry_lines_and_the_summary_only(inputs, tmp_path):
    lines = stderr_lines(inputs, tmp_path)
    assert lines[-1].startswith(SUMMARY), lines[-1]
    assert [line for line in lines[:-1] if not SEQCARRY_LINE.match(line)] == []
    events = [line.split(" seqcarry ")[1].split()[0] for line in lines[:-1]]
    # event=model_loaded is logged by each worker process, the others by the launcher
    assert {"event=planned", "event=listed", "event=model_loaded",
            "event=committed"} <= set(events)
    text = "\n".join(lines)
    assert not any(TF_CPP.match(line) for line in lines)
    for noise in ("absl::InitializeLog", "apitools", "INFO:apache_beam", "sdk_worker",
                  "__main__", "semi_persistent_directory", "cuInit"):
        assert noise not in text


def test_quiet_shows_the_summary_only(inputs, tmp_path):
    lines = stderr_lines(inputs, tmp_path, "--quiet")
    assert len(lines) == 1 and lines[0].startswith(SUMMARY), lines


def test_verbose_shows_tensorflow_and_beam_workers(inputs, tmp_path):
    lines = stderr_lines(inputs, tmp_path, "--verbose")
    assert lines[-1].startswith(SUMMARY), lines[-1]
    assert any(TF_CPP.match(line) for line in lines)  # TensorFlow's C++ runtime
    assert any(line.startswith("INFO:apache_beam.runners.worker.sdk_worker:")
               for line in lines)  # the SDK worker processes
    assert any(line.startswith("INFO:seqcarry:event=model_loaded") for line in lines)
    assert any(SEQCARRY_LINE.match(line) for line in lines)  # the launcher's own


def test_quiet_and_verbose_together_are_refused():
    result = subprocess.run([SEQCARRY, "--quiet", "--verbose", "snapshots", "--state", "x"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_the_filter_drops_chatter_and_keeps_errors():
    """pipeline/logs.py run as the filter process, on lines from a real run."""
    lines = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to "
        "STDERR",
        "I0000 00:00:1796167711.262943    1314 port.cc:153] oneDNN custom operations are on.",
        "2025-09-17 14:44:05.157831: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] "
        "Could not find cuda drivers on your machine, GPU will not be used.",
        "WARNING:root:apitools not found, and bigquery client libraries are not available",
        "INFO:__main__:Logging handler created.",
        "INFO:apache_beam.runners.worker.sdk_worker:Control channel established.",
        "WARNING:tensorflow:5 out of the last 5 calls to <function window> triggered "
        "tf.function retracing.",
        "INFO:seqcarry:event=model_loaded fingerprint=sha256:00 seconds=0.17",
        "WARNING:seqcarry:event=something_odd",
        "E0000 00:00:1796167715.504387    1314 cuda_platform.cc:52] failed call to cuInit",
        "ERROR:apache_beam.runners.worker.sdk_worker:Error processing instruction 1.",
        "Traceback (most recent call last):",
        "seqcarry: ok: run r1 committed",
    ]
    logs_py = os.path.join(os.path.dirname(os.path.dirname(__file__)), "pipeline", "logs.py")

    def filtered(mode):
        return subprocess.run([sys.executable, "-I", "-S", logs_py, mode], input="\n".join(
            lines) + "\n", capture_output=True, text=True, timeout=60).stdout.splitlines()

    default = filtered("default")
    assert SEQCARRY_LINE.match(default[0]) and default[0].endswith(
        " seqcarry event=model_loaded fingerprint=sha256:00 seconds=0.17")
    assert default[1:] == lines[8:]
    assert filtered("quiet") == lines[9:]
