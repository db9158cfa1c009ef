import os

# Quiet TensorFlow's C++ start-up logs here and in Beam's worker processes.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipeline import results  # noqa: E402
from pipeline.build import run_job  # noqa: E402
from pipeline.demo import (cut_into_chunks, make_model, make_sequences,  # noqa: E402
                           spread_over_runs, write_chunk_files)
from pipeline.options import RunConfig  # noqa: E402

RUNS = 3
IN_PROCESS = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
TWO_WORKERS = ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
               "--direct_num_workers=2"]
# The sequence that starts in run 1, sits out run 2 and continues in run 3.
RESUMED = "resumed-after-a-missed-run"
# Set on a test marked xdist_group that pytest-xdist did not put in its group.
_UNGROUPED = pytest.StashKey[bool]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup``, xdist marks a grouped test's node id ``...@group`` on
    the worker; some pytest/xdist pairs silently do not (pytest-xdist#1386, pytest 9.2),
    and the engine tests would then start clusters on both workers at once."""
    if os.environ.get("PYTEST_XDIST_WORKER") and config.getvalue("loadgroup"):
        for item in items:
            item.stash[_UNGROUPED] = (item.get_closest_marker("xdist_group") is not None
                                      and "@" not in item.nodeid)


def pytest_runtest_setup(item):
    if item.stash.get(_UNGROUPED, False):
        pytest.fail(f"pytest {pytest.__version__} with this pytest-xdist ignores xdist_group "
                    "(pytest-xdist#1386), so grouped tests would run on both workers at "
                    "once; install the versions in constraints.txt (make test does)",
                    pytrace=False)


@pytest.fixture(scope="session")
def workload(tmp_path_factory):
    """A model, whole sequences, and each run's chunk directory."""
    root = tmp_path_factory.mktemp("workload")
    rng = np.random.default_rng(42)
    model = make_model(str(root / "model.keras"), input_dim=3, units=(8, 6), output_dim=2,
                       seed=7)
    whole = make_sequences(rng, 36, input_dim=3, max_steps=300)
    whole["one-step"] = rng.normal(size=(1, 3)).astype(np.float32)
    whole[RESUMED] = rng.normal(size=(40, 3)).astype(np.float32)
    per_run = [[] for _ in range(RUNS)]
    for number, (sequence_id, features) in enumerate(sorted(whole.items())):
        # Chunk sizes: all ones for some sequences, ragged up to 60 steps for others.
        chunks = cut_into_chunks(rng, sequence_id, features, max_chunk=[1, 3, 17, 60][number % 4])
        if sequence_id == RESUMED:
            parts = [chunks[:3], [], chunks[3:]]
        else:
            parts = spread_over_runs(rng, chunks, RUNS)
        for run, part in enumerate(parts):
            per_run[run].extend(part)
    directories = []
    for run, chunks in enumerate(per_run):
        directory = str(root / f"run-{run + 1}")
        write_chunk_files(directory, chunks, files=3, rng=rng)
        directories.append(directory)
    assert any(c.steps == 1 for run in per_run for c in run)
    return model, whole, directories, sum(map(len, per_run))


@pytest.fixture(scope="session")
def gcs_emulator():
    """fake-gcs-server on 127.0.0.1 for the whole session; clients pointed at it."""
    from tests import gcs

    saved = {key: os.environ.get(key) for key in
             [*gcs.CLIENT_ENV, "STORAGE_EMULATOR_HOST", "CLOUD_STORAGE_EMULATOR_ENDPOINT"]}
    with gcs.emulator() as base:
        gcs.point_clients_at(base)
        yield base
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(gcs_emulator, request):
    """A new, empty bucket; yields its gs:// URL."""
    import hashlib
    import re

    from tests import gcs

    name = (re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-"
            + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10])
    gcs.create_bucket(gcs_emulator, name)
    yield f"gs://{name}"


@pytest.fixture(scope="session")
def dask_cluster():
    """A dask.distributed LocalCluster of 2 worker processes on 127.0.0.1; yields the
    scheduler address for --dask_client_address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                      host="127.0.0.1", dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def tf1_checkpoints(tmp_path_factory):
    """Real TF1 checkpoints and their TF1 oracle (see tests/tf1_checkpoints.py), written
    once per session in a subprocess: the TF1 cells need TF_USE_LEGACY_KERAS=1, which
    must be set before TensorFlow is imported."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tf1")
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    done = subprocess.run([sys.executable, "-m", "tests.tf1_checkpoints", str(out)],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# --- the workload's runs, and what runs that never failed give ---------------------

def config(workload, tmp_path, run, run_id=None, **extra):
    return RunConfig(model=workload[0], chunks=workload[2][run], state=str(tmp_path / "state"),
                     outputs=str(tmp_path / "outputs"), run_id=run_id or f"run-{run + 1}",
                     **(dict(batch_size=4, window_steps=16) | extra))


def final_state(state_url):
    """Everything the committed snapshot carries, as comparable plain values."""
    return {sid: (s.next_chunk_index, s.steps_seen, [t.tobytes() for t in s.tensors])
            for sid, s in results.committed_states(state_url).items()}


def assert_close_states(state_url, expected, atol=1e-6):
    """The committed snapshot carries what ``expected`` (a :func:`final_state`) holds,
    the tensors to ``atol``: for a state written partly by other code, whose batches
    (so float rounding) may differ."""
    actual = final_state(state_url)
    assert sorted(actual) == sorted(expected)
    for sequence_id, (next_index, steps, tensors) in expected.items():
        assert actual[sequence_id][:2] == (next_index, steps)
        for got, want in zip(actual[sequence_id][2], tensors, strict=True):
            np.testing.assert_allclose(np.frombuffer(got, np.float32),
                                       np.frombuffer(want, np.float32), atol=atol)


@pytest.fixture(scope="session")
def never_failed(workload, tmp_path_factory):
    """Final state and outputs of the workload's three runs, none of which failed."""
    tmp_path = tmp_path_factory.mktemp("never-failed")
    for run in range(RUNS):
        run_job(config(workload, tmp_path, run), IN_PROCESS)
    state = str(tmp_path / "state")
    return final_state(state), results.committed_outputs(state)


def assert_same_outputs(got, want):
    assert sorted(got) == sorted(want)
    for sequence_id in want:
        np.testing.assert_array_equal(got[sequence_id], want[sequence_id])
