"""A local standalone Flink cluster for seqcarry, on 127.0.0.1: one JobManager, two
TaskManagers (one slot each, separate JVMs), Beam's Flink job server and an EXTERNAL
Python SDK worker pool, all started from build/flink/ and stopped by PID.

    python engines/flink.py up      # idempotent; last line: flags for `seqcarry run`
    python engines/flink.py down    # stops exactly what `up` started
    python engines/flink.py status

Versions (environment variables):
  FLINK_VERSION (1.19.3)         the Flink distribution, from PyPI's apache-flink wheels
  BEAM_JAVA_VERSION (2.62.0)     Beam's Flink runner from Maven Central. Maven Central as
                                 reached here serves no `beam-runners-flink-*-job-server`
                                 artifact at all (2.77.0 included), so the job server is
                                 assembled from `beam-runners-flink-<minor>` and its
                                 dependencies (2.62.0: the newest whose dependencies all
                                 resolve) into one jar; an official job-server jar is used
                                 when Maven serves it.
Ports: FLINK_REST_PORT (8081), FLINK_RPC_PORT (6123), FLINK_JOB_PORT (8099; +1 artifacts,
+2 expansion), FLINK_WORKER_POOL_PORT (50000). FLINK_RESTART_ATTEMPTS (2): how often a
failed job restarts, 5 s apart (0: never); a restarted job that cannot get its slots (a
TaskManager gone for good) fails after 120 s each time, not after Flink's 300 s.
FLINK_RUN_DIR (build/flink): where a cluster keeps its configuration, logs, PID files
(and each TaskManager's ResourceID, new at each start) and temporary files, so that
several clusters (the tests' own, on other ports) can share the installation cached in
build/flink/.

Beam's runner classes are on the TaskManagers' own class path (parent-first), so the SDK
workers of a job outlive each stage (--environment_cache_millis): with the job's copy of
those classes Beam stops the workers after every stage, and each stage pays a Python
start-up (three runs of the tests' workload: 159 s, against 53 s this way).
"""
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOME = os.path.join(ROOT, "build", "flink")
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
FLINK_VERSION = os.environ.get("FLINK_VERSION", "1.19.3")
FLINK_MINOR = ".".join(FLINK_VERSION.split(".")[:2])
BEAM_JAVA = os.environ.get("BEAM_JAVA_VERSION", "2.62.0")
REST_PORT = int(os.environ.get("FLINK_REST_PORT", "8081"))
RPC_PORT = int(os.environ.get("FLINK_RPC_PORT", "6123"))
JOB_PORT = int(os.environ.get("FLINK_JOB_PORT", "8099"))
POOL_PORT = int(os.environ.get("FLINK_WORKER_POOL_PORT", "50000"))
RESTART_ATTEMPTS = int(os.environ.get("FLINK_RESTART_ATTEMPTS", "2"))
HOST = "127.0.0.1"

DIST = os.path.join(HOME, "dist-" + FLINK_VERSION)
FLINK_HOME = os.path.join(DIST, "pyflink")
M2 = os.path.join(HOME, "m2")
RUN_DIR = os.path.abspath(os.environ.get("FLINK_RUN_DIR", HOME))
CONF = os.path.join(RUN_DIR, "conf")
LOGS = os.path.join(RUN_DIR, "log")
PIDS = os.path.join(RUN_DIR, "run")
JAR = os.path.join(HOME, f"beam-runners-flink-{FLINK_MINOR}-job-server-{BEAM_JAVA}.jar")

# name -> what to run; the order is the start order (stopped in reverse)
SERVICES = ("jobmanager", "taskmanager-1", "taskmanager-2", "job-server", "worker-pool")
TASKMANAGERS = ("taskmanager-1", "taskmanager-2")


def log(message: str) -> None:
    print(f"flink: {message}", file=sys.stderr, flush=True)


BOOT = os.path.join(ROOT, "engines", "sdk-boot")


def flags() -> str:
    # PROCESS, not EXTERNAL: both TaskManagers name their first SDK worker "1-1", and one
    # shared worker pool keeps one process per name, so when one TaskManager stops its
    # worker the pool kills the other's (the job fails: "CANCELLED: client cancelled").
    return (f"--runner=FlinkRunner --flink_master={HOST}:{REST_PORT} "
            f"--job_endpoint={HOST}:{JOB_PORT} --environment_type=PROCESS "
            f"--environment_options=process_command={BOOT} --parallelism=2 "
            f"--environment_cache_millis=60000")


# ---- installation (cached under build/flink/) ----

def install_flink() -> None:
    if os.path.exists(os.path.join(FLINK_HOME, "bin", "jobmanager.sh")):
        return
    log(f"installing the Flink {FLINK_VERSION} distribution (PyPI wheels, --no-deps) "
        f"into {DIST}")
    subprocess.run([os.path.join(VENV_BIN, "python"), "-m", "pip", "install", "--quiet",
                    "--no-deps", "--target", DIST, f"apache-flink=={FLINK_VERSION}",
                    f"apache-flink-libraries=={FLINK_VERSION}"], check=True)
    for name in os.listdir(os.path.join(FLINK_HOME, "bin")):
        os.chmod(os.path.join(FLINK_HOME, "bin", name), 0o755)


def mvn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mvn", "-B", "-q", f"-Dmaven.repo.local={M2}", *args],
                          capture_output=True, text=True)


def fetch_job_server() -> None:
    if os.path.exists(JAR):
        return
    official = f"org.apache.beam:beam-runners-flink-{FLINK_MINOR}-job-server:{BEAM_JAVA}"
    log(f"fetching {official} with mvn")
    done = mvn("dependency:copy", f"-Dartifact={official}", "-Dtransitive=false",
               f"-DoutputDirectory={HOME}", "-Dmdep.stripVersion=false")
    if done.returncode == 0 and os.path.exists(JAR):
        return
    log(f"Maven serves no {official}; assembling it from "
        f"beam-runners-flink-{FLINK_MINOR}:{BEAM_JAVA} and its dependencies")
    work = os.path.join(HOME, "job-server-build")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    with open(os.path.join(work, "pom.xml"), "w") as pom:
        pom.write(f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>seqcarry</groupId><artifactId>flink-job-server</artifactId><version>1</version>
  <dependencies><dependency><groupId>org.apache.beam</groupId>
    <artifactId>beam-runners-flink-{FLINK_MINOR}</artifactId><version>{BEAM_JAVA}</version>
  </dependency></dependencies>
</project>
""")
    # Three tries: a fresh clone's run once failed "Failed to copy full contents" of a
    # jar just downloaded, and the same command succeeded when run again.
    for attempt in range(1, 4):
        shutil.rmtree(os.path.join(work, "lib"), ignore_errors=True)
        done = mvn("-f", os.path.join(work, "pom.xml"), "dependency:copy-dependencies",
                   "-DincludeScope=runtime", f"-DoutputDirectory={os.path.join(work, 'lib')}")
        if done.returncode == 0:
            break
        log(f"mvn failed (try {attempt} of 3): {done.stdout.strip()[-300:]}")
    if done.returncode != 0:
        sys.exit(f"flink: mvn could not resolve beam-runners-flink-{FLINK_MINOR}:{BEAM_JAVA}:"
                 f"\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    merge_jars(sorted(os.path.join(work, "lib", name)
                      for name in os.listdir(os.path.join(work, "lib"))), JAR + ".tmp")
    os.replace(JAR + ".tmp", JAR)
    shutil.rmtree(work)


def merge_jars(jars: list[str], target: str) -> None:
    """One runnable jar, as the job server's shadow jar: the first copy of each class
    wins, META-INF/services files are concatenated, signatures are dropped."""
    services: dict[str, list[bytes]] = {}
    seen = set()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        out.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\nMain-Class: "
                     "org.apache.beam.runners.flink.FlinkJobServerDriver\n\n")
        seen.add("META-INF/MANIFEST.MF")
        for jar in jars:
            with zipfile.ZipFile(jar) as source:
                for entry in source.infolist():
                    name = entry.filename
                    upper = name.upper()
                    if entry.is_dir() or name in seen or upper.endswith(
                            (".SF", ".DSA", ".RSA", "META-INF/INDEX.LIST")):
                        continue
                    if name.startswith("META-INF/services/"):
                        services.setdefault(name, []).append(source.read(entry))
                        continue
                    seen.add(name)
                    out.writestr(entry, source.read(entry))
        for name, parts in services.items():
            out.writestr(name, b"\n".join(part.rstrip(b"\n") for part in parts) + b"\n")


def write_conf() -> None:
    os.makedirs(CONF, exist_ok=True)
    for name in ("log4j.properties", "log4j-console.properties", "log4j-cli.properties"):
        shutil.copy(os.path.join(FLINK_HOME, "conf", name), CONF)
    tmp = os.path.join(RUN_DIR, "tmp")
    os.makedirs(tmp, exist_ok=True)
    # Small for a 2-core shared machine (the Python SDK workers run outside the JVMs), but
    # Beam batch jobs need ~512 network buffers (32 KiB) per TaskManager: 64m is too few.
    settings = {
        "jobmanager.rpc.address": HOST, "jobmanager.rpc.port": RPC_PORT,
        "jobmanager.bind-host": HOST, "rest.address": HOST, "rest.bind-address": HOST,
        "rest.port": REST_PORT, "taskmanager.host": HOST, "taskmanager.bind-host": HOST,
        "jobmanager.memory.process.size": "1024m",
        "taskmanager.memory.process.size": "1280m",
        "taskmanager.memory.managed.size": "32m",
        "taskmanager.memory.network.min": "256m", "taskmanager.memory.network.max": "256m",
        "taskmanager.numberOfTaskSlots": 1, "parallelism.default": 2,
        "io.tmp.dirs": tmp, "web.tmpdir": tmp, "blob.storage.directory": tmp,
        "env.java.opts.all": "-XX:ActiveProcessorCount=2",
        "classloader.resolve-order": "parent-first",
        # A killed TaskManager is noticed in seconds, not after the default 50 s.
        "heartbeat.interval": 2000, "heartbeat.timeout": 10000,
        # A (restarted) batch job whose slots cannot be had, as when a TaskManager is gone
        # and none replaces it, fails after this long, then restarts (if it may) and waits
        # again. Flink's default, 300 s, made a job that lost a TaskManager for good wait
        # 2 x 300 s before it failed ("NoResourceAvailableException: Slot request bulk is
        # not fulfillable! ... Timeout has occurred: 300000 ms"): its launcher looked hung.
        # A replacement TaskManager registered 15-20 s after the kill on an idle machine,
        # 72 s into a full `make test` on 2 cores: 120 s, twice (two restarts), leave room.
        "slot.request.timeout": 120000,
        # The job server (it reads this file too) gives up on an unreachable
        # --flink_master after ~3 s, not after 20 tries 3 s apart.
        "rest.retry.max-attempts": 3, "rest.retry.delay": 1000,
    }
    # The cluster's restart strategy is the one Beam's batch jobs get: the Flink runner
    # (2.62, Flink 1.19) does not apply --number_of_execution_retries to them.
    if RESTART_ATTEMPTS > 0:
        settings |= {"restart-strategy.type": "fixed-delay",
                     "restart-strategy.fixed-delay.attempts": RESTART_ATTEMPTS,
                     "restart-strategy.fixed-delay.delay": "5 s"}
    else:
        settings["restart-strategy.type"] = "none"
    with open(os.path.join(CONF, "config.yaml"), "w") as conf:
        conf.writelines(f"{key}: {value}\n" for key, value in settings.items())


# ---- processes ----

def pid_file(name: str) -> str:
    return os.path.join(PIDS, name + ".pid")


def id_file(name: str) -> str:
    """A TaskManager's ResourceID (``taskmanager.resource-id``), new at each start: how
    the JobManager's REST API names it, so `up` can wait for that very JVM."""
    return os.path.join(PIDS, name + ".id")


def resource_id(name: str) -> str | None:
    try:
        with open(id_file(name)) as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def running(name: str) -> int | None:
    """The PID of a service started by `up`, if that process still runs."""
    try:
        with open(pid_file(name)) as handle:
            pid = int(handle.read().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except (OSError, ValueError, IndexError):
        return None
    return pid if RUN_DIR.encode() in cmdline or ROOT.encode() in cmdline else None


def start(name: str, command: list[str], env: dict) -> subprocess.Popen:
    os.makedirs(PIDS, exist_ok=True)
    os.makedirs(LOGS, exist_ok=True)
    if name in TASKMANAGERS:
        ident = f"{name}-{os.urandom(3).hex()}"
        command = [*command, f"-Dtaskmanager.resource-id={ident}"]
        with open(id_file(name), "w") as handle:
            handle.write(ident + "\n")
    with open(os.path.join(LOGS, name + ".log"), "ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=RUN_DIR,
                                   start_new_session=True)
    with open(pid_file(name), "w") as handle:
        handle.write(f"{process.pid}\n")
    log(f"started {name} (pid {process.pid}"
        + (f", ResourceID {resource_id(name)}" if name in TASKMANAGERS else "")
        + f", log {os.path.join(LOGS, name + '.log')})")
    return process


def commands() -> dict[str, tuple[list[str], dict]]:
    flink_env = dict(os.environ, FLINK_HOME=FLINK_HOME, FLINK_CONF_DIR=CONF,
                     FLINK_LOG_DIR=LOGS, HADOOP_CLASSPATH=JAR)
    bin_ = os.path.join(FLINK_HOME, "bin")
    # The worker pool starts each SDK worker through engines/sdk-boot (the venv's python,
    # with the job's pipeline options); the venv also goes first on PATH.
    pool_env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    return {
        "jobmanager": ([os.path.join(bin_, "jobmanager.sh"), "start-foreground"], flink_env),
        "taskmanager-1": ([os.path.join(bin_, "taskmanager.sh"), "start-foreground"],
                          flink_env),
        "taskmanager-2": ([os.path.join(bin_, "taskmanager.sh"), "start-foreground"],
                          flink_env),
        "job-server": (["java", "-Xmx512m", "-XX:ActiveProcessorCount=2", "-jar", JAR,
                        "--flink-master", f"{HOST}:{REST_PORT}", "--job-host", HOST,
                        "--job-port", str(JOB_PORT), "--artifact-port", str(JOB_PORT + 1),
                        "--expansion-port", str(JOB_PORT + 2),
                        "--artifacts-dir", os.path.join(RUN_DIR, "artifacts"),
                        "--flink-conf-dir", CONF], dict(os.environ)),
        "worker-pool": ([os.path.join(VENV_BIN, "python"), "-m",
                         "apache_beam.runners.worker.worker_pool_main",
                         f"--service_port={POOL_PORT}",
                         f"--container_executable={BOOT}"],
                        pool_env),
    }


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


def registered() -> list[str]:
    """The ResourceIDs of the TaskManagers the JobManager has registered. One that was
    killed stays on it until its heartbeat times out (heartbeat.timeout)."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{REST_PORT}/taskmanagers",
                                    timeout=2) as r:
            return [tm["id"] for tm in json.load(r).get("taskmanagers", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def ready() -> bool:
    """Two TaskManagers registered, each of them the JVM started last under its name:
    a replacement counts once it registered, not the dead one it replaces, which the
    JobManager still lists for up to heartbeat.timeout (so `up` used to return before
    the replacement had registered, or had even started its JVM)."""
    ids = registered()
    wanted = [resource_id(name) for name in TASKMANAGERS]
    return (len(ids) >= 2 and all(ident in ids for ident in wanted if ident)
            and port_open(JOB_PORT) and port_open(POOL_PORT))


@contextlib.contextmanager
def installing():
    """Hold build/flink/'s install lock: clusters started at once (two test workers,
    each with its own cluster) would otherwise both download and assemble into the same
    folder, and one of them fail (a fresh clone's `make test` once did)."""
    os.makedirs(HOME, exist_ok=True)
    with open(os.path.join(HOME, ".install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def up(timeout_s: float = 180) -> None:
    alive = {name: running(name) for name in SERVICES}
    if all(alive.values()) and ready():
        log("already running: " + ", ".join(f"{n} {p}" for n, p in alive.items()))
        print(flags())
        return
    if alive["jobmanager"] is None and any(alive.values()):
        log("the JobManager is gone: stopping what is left first")
        down()
        alive = dict.fromkeys(SERVICES)
    if not any(alive.values()):
        busy = [port for port in (REST_PORT, RPC_PORT, JOB_PORT, POOL_PORT)
                if port_open(port)]
        if busy:
            sys.exit(f"flink: ports {busy} on {HOST} are taken by processes not started here")
        with installing():
            install_flink()
            fetch_job_server()
        write_conf()
    began = time.monotonic()
    started = {name: start(name, command, env) for name, (command, env) in commands().items()
               if alive[name] is None}  # a TaskManager that died rejoins the cluster
    while not ready():
        # (not running(): until its exec, a child's command line is still this script's)
        dead = [name for name, process in started.items() if process.poll() is not None]
        if dead or time.monotonic() - began > timeout_s:
            for name in dead or SERVICES:
                path = os.path.join(LOGS, name + ".log")
                if os.path.exists(path):
                    with open(path, errors="replace") as handle:
                        log(f"--- {path} (tail)\n" + "".join(handle.readlines()[-15:]))
            down()
            sys.exit(f"flink: not ready after {time.monotonic() - began:.0f} s"
                     + (f" ({', '.join(dead)} exited)" if dead else ""))
        time.sleep(1)
    log(f"ready in {time.monotonic() - began:.1f} s: JobManager http://{HOST}:{REST_PORT}, "
        f"TaskManagers {', '.join(filter(None, map(resource_id, TASKMANAGERS)))}, "
        f"job server {HOST}:{JOB_PORT}, worker pool {HOST}:{POOL_PORT}")
    log(f"or, with a job server per run: --runner=FlinkRunner "
        f"--flink_master={HOST}:{REST_PORT} --flink_job_server_jar={JAR} "
        f"--environment_type=PROCESS --environment_options=process_command={BOOT} --parallelism=2")
    log(f"EXTERNAL (worker pool {HOST}:{POOL_PORT}) works with one TaskManager only, or "
        f"for --runner=PortableRunner: with two, the shared pool kills workers (see flags())")
    print(flags())


def down() -> None:
    for name in reversed(SERVICES):
        pid = running(name)
        if pid:
            os.killpg(pid, signal.SIGTERM)  # its own session: the JVM or the pool + workers
            for _ in range(100):
                if running(name) is None or not os.path.exists(f"/proc/{pid}"):
                    break
                try:
                    if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                        break
                except OSError:
                    break
                time.sleep(0.2)
            else:
                os.killpg(pid, signal.SIGKILL)
            log(f"stopped {name} (pid {pid})")
        for path in (pid_file(name), id_file(name)):
            if os.path.exists(path):
                os.remove(path)


def status() -> None:
    for name in SERVICES:
        pid = running(name)
        ident = f" (ResourceID {resource_id(name)})" if name in TASKMANAGERS and pid else ""
        print(f"{name}: {'pid ' + str(pid) if pid else 'not running'}{ident}")
    print(f"taskmanagers registered: {', '.join(registered()) or 'none'}")


if __name__ == "__main__":
    actions = {"up": up, "down": down, "status": status}
    if len(sys.argv) != 2 or sys.argv[1] not in actions:
        sys.exit("usage: flink.py up|down|status")
    actions[sys.argv[1]]()
