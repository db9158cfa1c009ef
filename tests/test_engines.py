"""Real engines on 127.0.0.1: Beam's Python portable job service (a separate process)
and Beam's Prism runner (built from the Go module proxy by ``make prism``). On each,
three chunked, shuffled runs equal Keras on every whole sequence."""
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.chunked import assert_equals_whole_sequence, run_chunked
from transforms.reference import keras_whole_sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the engine exited with {process.returncode}"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {seconds} s")


@pytest.fixture(scope="module")
def job_service(tmp_path_factory):
    """Beam's Python job service in a process of its own, stopped by PID."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("job-service") / "log.txt", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
         "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, process)
        yield [f"--job_endpoint=localhost:{port}"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def prism():
    """`make prism`'s flags: the runner built once into build/prism/ (about 2 minutes
    on a fresh machine, then reused)."""
    built = subprocess.run([os.path.join(ROOT, "engines", "prism.sh")], cwd=ROOT,
                           capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stderr[-3000:]
    yield built.stdout.strip().splitlines()[-1].split()
    # Beam stops the Prism process at exit and warns that it does, by then into
    # pytest's closed log capture ("--- Logging error ---"): that stop is expected.
    logging.getLogger("apache_beam.utils.subprocess_server").setLevel(logging.ERROR)


@pytest.mark.parametrize("engine", ["job-service", "prism"])
def test_three_chunked_runs_on_a_real_engine_equal_the_whole_sequence(workload, tmp_path,
                                                                      request, engine):
    model, whole = workload[0], workload[1]
    if engine == "job-service":
        beam_args = ["--runner=PortableRunner", *request.getfixturevalue("job_service"),
                     "--environment_type=LOOPBACK"]
    else:
        beam_args = request.getfixturevalue("prism")
        assert beam_args[0] == "--runner=PrismRunner"
    started = time.monotonic()
    state, reports = run_chunked(model, whole, tmp_path, beam_args=beam_args)
    elapsed = time.monotonic() - started
    assert [r["parent"] for r in reports] == [None, "run-1", "run-2"]
    assert all(r["chunks_read"] == r["chunks_processed"] + r["chunks_deferred"]
               + r["chunks_skipped_duplicate"] + r["chunks_rejected"] for r in reports)
    assert reports[-1]["chunks_pending_total"] == 0
    reference = keras_whole_sequence(model)
    worst = assert_equals_whole_sequence(state, whole, lambda _, features: reference(features))
    print(f"{engine}: three runs in {elapsed:.1f} s, max abs diff {worst:.3g}")
