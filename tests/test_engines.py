"""Real engines on 127.0.0.1: Beam's Python portable job service (a separate process),
Beam's Prism runner (built from the Go module proxy by ``make prism``) and a standalone
Flink cluster (a JobManager and two TaskManagers, ``make flink-up``'s). On each, three
chunked, shuffled runs equal Keras on every whole sequence, with the state and outputs
on local disk and on gs:// (fake-gcs-server); on Flink, a TaskManager killed in the
middle of a job, with Flink's restart strategy on and off, and the launcher killed."""
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import storage
from pipeline import cli
from tests.chunked import assert_equals_whole_sequence, run_chunked, write_chunked_runs
from tests.gcs import free_port
from tests.test_cli import SEQCARRY, error_line, seqcarry
from transforms.reference import keras_whole_sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One pytest-xdist worker runs them all: they share the job service, Prism and Flink.
pytestmark = pytest.mark.xdist_group("engines")
# How long one `seqcarry run` on Flink may take before the test kills it and fails with
# what Flink says. Measured: 40-70 s a run alone, up to 234 s with both cores kept busy
# by other processes (a TaskManager killed in it, the launcher's start-up 116 s of it);
# a job that lost its slots for good fails by itself within about 250 s.
FLINK_LAUNCH_TIMEOUT_S = 600


def _tail(text: str, lines: int, width: int = 400) -> str:
    return "\n".join(line[:width] for line in text.splitlines()[-lines:])


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
    port = free_port()
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


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports."""
    for _ in range(100):
        first = free_port()
        with contextlib.ExitStack() as probes:
            try:
                for offset in range(count):
                    probes.enter_context(socket.socket()).bind(("127.0.0.1", first + offset))
            except OSError:
                continue
            return first
    raise AssertionError(f"no {count} consecutive free ports")


class FlinkCluster:
    """engines/flink.py's cluster, on ports and in a folder of its own."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.rest_port = free_port()
        self.env = os.environ | {  # the emulator's address reaches the SDK workers
            "FLINK_RUN_DIR": run_dir, "FLINK_REST_PORT": str(self.rest_port),
            "FLINK_RPC_PORT": str(free_port()), "FLINK_JOB_PORT": str(_free_ports(3)),
            "FLINK_WORKER_POOL_PORT": str(free_port())}
        self.flags: list[str] = []

    def call(self, action: str) -> None:
        """``flink.py up``: the first time, it installs Flink and assembles Beam's job
        server into build/flink/ (minutes); a dead TaskManager rejoins."""
        done = subprocess.run([sys.executable, os.path.join(ROOT, "engines", "flink.py"),
                               action], env=self.env, capture_output=True, text=True,
                              timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]
        if action == "up":
            self.flags = done.stdout.strip().splitlines()[-1].split()

    def pid(self, service: str) -> int:
        with open(os.path.join(self.run_dir, "run", service + ".pid")) as handle:
            return int(handle.read().split()[0])

    def resource_id(self, service: str) -> str:
        """The ResourceID ``flink.py`` gave the TaskManager it started last as ``service``."""
        with open(os.path.join(self.run_dir, "run", service + ".id")) as handle:
            return handle.read().strip()

    def kill(self, service: str) -> None:
        """SIGKILL ``service`` and wait until its process is gone (or a zombie), so that
        ``up`` cannot take the dying JVM for a live one."""
        pid = self.pid(service)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    if handle.read().rsplit(")", 1)[1].split()[0] in "ZX":
                        return
            except OSError:
                return
            time.sleep(0.05)
        raise AssertionError(f"{service} (pid {pid}) still runs 30 s after SIGKILL")

    def diagnose(self, job: str | None = None) -> str:
        """What Flink says: the jobs, ``job``'s state, vertices and exceptions, the
        TaskManagers registered and the services' log tails (for assertion messages)."""
        parts = []
        try:
            parts.append("--- Flink jobs: " + "; ".join(
                f"{j['jid']} {j['name']} {j['state']} tasks={j['tasks']}"
                for j in self.rest("/jobs/overview")["jobs"]))
            if job:
                details = self.rest(f"/jobs/{job}")
                vertices = collections.Counter(v["status"] for v in details["vertices"])
                parts.append(f"--- job {job}: {details['state']}; vertices {dict(vertices)}; "
                             "not created or finished: " + "; ".join(
                                 f"{v['name'][:80]} {v['status']}" for v in details["vertices"]
                                 if v["status"] not in ("CREATED", "FINISHED")))
                history = self.rest(f"/jobs/{job}/exceptions").get(
                    "exceptionHistory", {}).get("entries", [])
                for entry in history[:3]:  # the newest first: what failed, and why
                    trace = (entry.get("stacktrace") or "").splitlines()
                    parts.append(f"--- failure of job {job} on {entry.get('location')}: "
                                 + "\n".join(line[:300] for line in trace[:2] + [
                                     line for line in trace if line.startswith("Caused by")]))
            now_ms = time.time() * 1000  # Flink's "timeSinceLastHeartbeat" is a time stamp
            parts.append("--- TaskManagers registered: " + "; ".join(
                f"{tm['id']} slots={tm['slotsNumber']} free={tm['freeSlots']} last heartbeat "
                f"{(now_ms - tm.get('timeSinceLastHeartbeat', now_ms)) / 1000:.0f} s ago"
                for tm in self.rest("/taskmanagers")["taskmanagers"]))
        except (OSError, ValueError, KeyError) as error:
            parts.append(f"--- Flink's REST API: {error!r}")
        status = subprocess.run([sys.executable, os.path.join(ROOT, "engines", "flink.py"),
                                 "status"], env=self.env, capture_output=True, text=True,
                                timeout=60)
        parts.append("--- flink.py status\n" + status.stdout.strip())
        logs = os.path.join(self.run_dir, "log")
        with open(os.path.join(logs, "jobmanager.log"), errors="replace") as handle:
            events = [line for line in handle if any(key in line for key in (
                "switched from state", "Registering TaskManager", "no longer reachable",
                "NoResourceAvailableException", "Timeout has occurred"))]
        parts.append("--- jobmanager.log (job states, TaskManagers)\n"
                     + _tail("".join(events), 30))
        for name in ("jobmanager", "taskmanager-1", "taskmanager-2", "job-server"):
            path = os.path.join(logs, name + ".log")
            if os.path.exists(path):
                with open(path, errors="replace") as handle:
                    parts.append(f"--- {path} (tail)\n" + _tail(handle.read(), 20))
        return "\n".join(parts)

    def finish(self, launcher: subprocess.Popen, job: str | None) -> str:
        """``launcher``'s stderr once it exits; after FLINK_LAUNCH_TIMEOUT_S, it is
        killed and the test fails with its stderr and what Flink says about ``job``."""
        try:
            return launcher.communicate(timeout=FLINK_LAUNCH_TIMEOUT_S)[1]
        except subprocess.TimeoutExpired:
            launcher.kill()
        err = launcher.communicate()[1]
        pytest.fail(f"`seqcarry run` did not end within {FLINK_LAUNCH_TIMEOUT_S} s (killed); "
                    f"its stderr (tail):\n{_tail(err, 20)}\n{self.diagnose(job)}",
                    pytrace=False)

    def rest(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.rest_port}{path}",
                                    timeout=10) as response:
            return json.load(response)

    def running_job(self, launcher: subprocess.Popen, known: set[str]) -> str:
        """The id of the job ``launcher`` submitted, once tasks of it are running."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if launcher.poll() is not None:
                raise AssertionError(f"the launcher exited {launcher.returncode} before its "
                                     f"job ran:\n{launcher.communicate()[1][-3000:]}\n"
                                     f"{self.diagnose()}")
            for job in self.rest("/jobs/overview")["jobs"]:
                if (job["jid"] not in known and job["state"] == "RUNNING"
                        and job["tasks"]["running"] > 0):
                    return job["jid"]
            time.sleep(0.2)
        launcher.kill()
        err = launcher.communicate()[1]
        raise AssertionError(f"no job of the launcher ran within 300 s (launcher killed); "
                             f"its stderr (tail):\n{_tail(err, 20)}\n{self.diagnose()}")

    def job_ids(self) -> set[str]:
        return {job["jid"] for job in self.rest("/jobs/overview")["jobs"]}


@pytest.fixture(scope="session")
def flink(gcs_emulator, tmp_path_factory):
    """A JobManager, two TaskManagers and Beam's Flink job server, stopped by PID.
    Started once per session: it takes about 50 s (the suite's durations showed that
    setup twice with a module scope)."""
    cluster = FlinkCluster(str(tmp_path_factory.mktemp("flink")))
    try:
        cluster.call("up")
        assert cluster.flags[0] == "--runner=FlinkRunner"
        yield cluster
    finally:
        cluster.call("down")


# Flink's three runs against the oracle are test_flink_faults_commit_once_and_stay_exact
# (state on gs://, with faults): a fault-free Flink case here would add 3-4 minutes.
@pytest.mark.parametrize("engine,where", [("job-service", "local"), ("job-service", "gs"),
                                          ("prism", "local"), ("prism", "gs")])
def test_three_chunked_runs_on_a_real_engine_equal_the_whole_sequence(workload, tmp_path,
                                                                      request, engine,
                                                                      where):
    model, whole = workload[0], workload[1]
    if engine == "job-service":
        beam_args = ["--runner=PortableRunner", *request.getfixturevalue("job_service"),
                     "--environment_type=LOOPBACK"]
    else:
        beam_args = request.getfixturevalue("prism")
        assert beam_args[0] == "--runner=PrismRunner"
    location = request.getfixturevalue("bucket") if where == "gs" else None
    started = time.monotonic()
    state, reports = run_chunked(model, whole, tmp_path, beam_args=beam_args,
                                 location=location)
    elapsed = time.monotonic() - started
    assert [r["parent"] for r in reports] == [None, "run-1", "run-2"]
    assert all(r["chunks_read"] == r["chunks_processed"] + r["chunks_deferred"]
               + r["chunks_skipped_duplicate"] + r["chunks_rejected"] for r in reports)
    assert reports[-1]["chunks_pending_total"] == 0
    reference = keras_whole_sequence(model)
    worst = assert_equals_whole_sequence(state, whole, lambda _, features: reference(features))
    print(f"{engine} ({where}): three runs in {elapsed:.1f} s, max abs diff {worst:.3g}")


# The launches below each end within FLINK_LAUNCH_TIMEOUT_S or fail saying why: room for
# that to happen before pytest-timeout stops the test without Flink's side of the story.
@pytest.mark.timeout(1800)
def test_flink_faults_commit_once_and_stay_exact(flink, workload, tmp_path, bucket):
    """State and outputs on gs://. Run 1: a TaskManager is SIGKILLed mid-job with the
    restart strategy on (the cluster's: two restarts): Flink restarts the job and it
    commits. Run 2, on the cluster restarted without restarts: the job fails, exit 5,
    nothing is committed; the rerun commits. Run 3: the launcher is SIGKILLed once the job runs:
    the job still commits, exactly once (a relaunch finds the run id taken: exit 4).
    The three runs together equal Keras on every whole sequence. A launch that does not
    end within FLINK_LAUNCH_TIMEOUT_S fails the test with Flink's logs and job states."""
    model, whole = workload[0], workload[1]
    directories = write_chunked_runs(whole, tmp_path)
    state = f"{bucket}/state"
    store = storage.StateStore(state)
    took: list[str] = []  # how long each launch ran, for the printed summary
    launched = [0.0]

    def launch(run: int, *extra: str) -> subprocess.Popen:
        launched[0] = time.monotonic()
        return subprocess.Popen(
            [SEQCARRY, "run", "--model", model, "--chunks", directories[run - 1],
             "--state", state, "--outputs", f"{bucket}/outputs", "--run-id", f"run-{run}",
             "--batch-size", "4", "--window-steps", "16", *flink.flags, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(launcher: subprocess.Popen, job: str | None, what: str) -> str:
        err = flink.finish(launcher, job)
        took.append(f"{what} {time.monotonic() - launched[0]:.0f} s")
        return err

    def kill_a_taskmanager_mid_job(launcher: subprocess.Popen) -> str:
        job = flink.running_job(launcher, flink.job_ids())
        killed = flink.resource_id("taskmanager-2")
        flink.kill("taskmanager-2")
        # As a supervisor would: the TaskManager comes back; `up` returns once the new
        # JVM has registered (the dead one stays listed until its heartbeat times out).
        flink.call("up")
        registered = [tm["id"] for tm in flink.rest("/taskmanagers")["taskmanagers"]]
        assert flink.resource_id("taskmanager-2") != killed, registered
        assert flink.resource_id("taskmanager-2") in registered, registered
        return job

    launcher = launch(1)
    job = kill_a_taskmanager_mid_job(launcher)
    err = finish(launcher, job, "run-1 (TaskManager killed, restarted)")
    assert launcher.returncode == 0, err[-3000:] + "\n" + flink.diagnose(job)
    assert flink.rest(f"/jobs/{job}")["state"] == "FINISHED"
    assert flink.rest(f"/jobs/{job}/exceptions")["exceptionHistory"]["entries"], \
        "the killed TaskManager did not make Flink restart the job"

    # Beam's Flink runner leaves batch jobs the cluster's restart strategy: turn it off
    flink.env["FLINK_RESTART_ATTEMPTS"] = "0"
    flink.call("down")
    flink.call("up")
    launcher = launch(2)
    job = kill_a_taskmanager_mid_job(launcher)
    err = finish(launcher, job, "run-2 (TaskManager killed, failed)")
    assert launcher.returncode == 5, err[-3000:] + "\n" + flink.diagnose(job)
    assert "committed nothing (the state is still run-1)" in err.splitlines()[-1]
    assert flink.rest(f"/jobs/{job}")["state"] == "FAILED"
    assert store.current().run_id == "run-1"
    rerun = launch(2)
    err = finish(rerun, None, "run-2 rerun")
    assert rerun.returncode == 0, err[-3000:] + "\n" + flink.diagnose()

    launcher = launch(3)
    job = flink.running_job(launcher, flink.job_ids())
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 300
    while flink.rest(f"/jobs/{job}")["state"] not in ("FINISHED", "FAILED", "CANCELED"):
        assert time.monotonic() < deadline, ("the job did not end within 300 s\n"
                                             + flink.diagnose(job))
        time.sleep(0.5)
    took.append(f"run-3 (launcher killed) {time.monotonic() - launched[0]:.0f} s")
    assert flink.rest(f"/jobs/{job}")["state"] == "FINISHED"
    assert store.current().run_id == "run-3"
    relaunch = launch(3)
    err = finish(relaunch, None, "run-3 relaunch")
    assert relaunch.returncode == 4 and "already committed" in err, err[-3000:]

    assert [record.run_id for record in store.commits()] == ["run-1", "run-2", "run-3"]
    reference = keras_whole_sequence(model)
    worst = assert_equals_whole_sequence(state, whole, lambda _, features: reference(features))
    print(f"flink faults (gs): max abs diff {worst:.3g}; launches: {', '.join(took)}")


def test_bad_engine_options_are_exit_2_in_one_line(workload, tmp_path, flink, capsys):
    """A missing job-server jar or Prism binary, and a Flink master nothing answers at,
    whether this machine starts the job server or the cluster's job server submits
    (through ``seqcarry``'s entry point, in this process)."""
    common = ["run", "--model", workload[0], "--chunks", workload[2][0],
              "--state", str(tmp_path / "state"), "--outputs", str(tmp_path / "outputs")]
    closed = f"127.0.0.1:{free_port()}"
    job_endpoint = next(flag for flag in flink.flags if flag.startswith("--job_endpoint="))
    cases = {
        ("--runner=FlinkRunner", f"--flink_master={closed}",
         f"--flink_job_server_jar={tmp_path / 'nope.jar'}"):
            f"--flink_job_server_jar {tmp_path / 'nope.jar'}: no such file",
        ("--runner=PrismRunner", f"--prism_location={tmp_path / 'prism'}"):
            f"--prism_location {tmp_path / 'prism'}: no such file",
        ("--runner=FlinkRunner", f"--flink_master={closed}"):
            f"--flink_master {closed}: no Flink cluster answers there",
        ("--runner=FlinkRunner", f"--flink_master={closed}", job_endpoint,
         "--environment_type=LOOPBACK"):
            f"--flink_master {closed}: no Flink cluster answers there"}
    for flags, error in cases.items():
        code = cli.main([*common, *flags])
        stderr = capsys.readouterr().err
        assert code == 2, stderr[-3000:]
        assert stderr.strip().splitlines()[-1].startswith(f"seqcarry: error: {error}")
        assert "Traceback" not in stderr
    assert not os.path.exists(tmp_path / "state" / "CURRENT")


def test_an_error_a_worker_raises_keeps_its_exit_code_on_a_portable_runner(workload,
                                                                           tmp_path,
                                                                           job_service):
    """The runner reports a worker's error as text; a damaged state file read by a
    worker is still exit 3 naming the file, as on the in-process runner."""
    engine = ["--runner=PortableRunner", *job_service, "--environment_type=LOOPBACK"]
    common = ["--model", workload[0], "--state", str(tmp_path / "state"),
              "--outputs", str(tmp_path / "outputs"), *engine]
    first = seqcarry("run", *common, "--chunks", workload[2][0], "--run-id", "run-1")
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = storage.StateStore(str(tmp_path / "state")).committed()
    damaged = manifest.state_files[0].path
    damaged = damaged if os.path.isabs(damaged) else str(tmp_path / "state" / damaged)
    with open(damaged, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff" * 8)
    second = seqcarry("run", *common, "--chunks", *workload[2][1:], "--run-id", "run-2")
    assert second.returncode == 3, second.stderr[-3000:]
    last = error_line(second)
    assert last.startswith("seqcarry: error: ") and os.path.basename(damaged) in last
    assert storage.StateStore(str(tmp_path / "state")).current().run_id == "run-1"
