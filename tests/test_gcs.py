"""The state store on gs:// against the real fake-gcs-server: the oracle, the
compare-and-swap, faults, damaged files, and transient and permanent HTTP errors."""
import os
import subprocess
import sys
import time

import fsspec
import pytest

import storage
from pipeline.build import execute, plan_run, run_job
from pipeline.options import RunConfig
from tests import gcs
from tests.conftest import IN_PROCESS, TWO_WORKERS, final_state
from tests.test_pipeline import assert_equals_whole_sequence_model

SEQCARRY = os.path.join(os.path.dirname(sys.executable), "seqcarry")


def upload_workload(workload, bucket):
    """The workload's model and chunk files, copied to the bucket."""
    fs = fsspec.filesystem("gs")
    model = f"{bucket}/model/model.keras"
    fs.put(workload[0], model)
    directories = []
    for number, directory in enumerate(workload[2]):
        target = f"{bucket}/chunks/run-{number + 1}"
        for name in sorted(os.listdir(directory)):
            fs.put(os.path.join(directory, name), f"{target}/{name}")
        directories.append(target)
    return model, directories


def gs_config(model, chunks, bucket, run_id, **extra):
    return RunConfig(model=model, chunks=chunks, state=f"{bucket}/state",
                     outputs=f"{bucket}/outputs", run_id=run_id, batch_size=4,
                     window_steps=16, **extra)


def test_oracle_with_chunks_state_outputs_and_model_on_gcs(workload, bucket):
    model, directories = upload_workload(workload, bucket)
    reports = [run_job(gs_config(model, chunks, bucket, f"run-{n + 1}"), TWO_WORKERS)
               for n, chunks in enumerate(directories)]
    assert sum(r["chunks_processed"] for r in reports) == workload[3]
    assert reports[-1]["outputs"] == f"{bucket}/outputs/run-3/{reports[-1]['attempt']}"
    assert_equals_whole_sequence_model(workload, f"{bucket}/state")
    store = storage.StateStore(f"{bucket}/state")
    assert [m.run_id for m in store.history()] == ["run-3", "run-2", "run-1"]
    store.verify()


def test_two_runs_on_gcs_one_commits_the_other_fails_cleanly(workload, bucket):
    model, directories = upload_workload(workload, bucket)
    run_job(gs_config(model, directories[0], bucket, "run-1"), IN_PROCESS)
    first = plan_run(gs_config(model, directories[1], bucket, "first"))
    second = plan_run(gs_config(model, directories[1], bucket, "second"))
    execute(first, IN_PROCESS)
    winner = final_state(f"{bucket}/state")
    with pytest.raises(storage.StateConflictError, match="state moved from run-1 to first"):
        execute(second, IN_PROCESS)
    assert storage.StateStore(f"{bucket}/state").current().run_id == "first"
    assert final_state(f"{bucket}/state") == winner


@pytest.mark.parametrize("stage", ["after_state_file", "after_manifest", "before_commit"])
def test_a_run_killed_on_gcs_leaves_the_committed_snapshot_intact(workload, bucket, stage):
    model, directories = upload_workload(workload, bucket)
    run_job(gs_config(model, directories[0], bucket, "run-1"), IN_PROCESS)
    config = gs_config(model, directories[1], bucket, "run-2")
    died = subprocess.run(
        [SEQCARRY, "run", "--model", model, "--chunks", *config.chunks, "--state",
         config.state, "--outputs", config.outputs, "--run-id", "run-2", "--batch-size", "4",
         "--window-steps", "16", *IN_PROCESS],
        env=os.environ | {storage.FAULT_ENV: f"{stage}:kill"}, capture_output=True)
    assert died.returncode == -9
    store = storage.StateStore(config.state)
    assert store.verify().run_id == "run-1"
    committed = run_job(config, IN_PROCESS)["attempt"]
    # The killed attempt's output folders went when run-2 committed.
    for tree in ("", "/_dead_letters", "/_final_states"):
        assert storage.list_names(f"{config.outputs}{tree}/run-2")[0] in ([], [committed])
    assert storage.list_names(f"{config.outputs}/run-2")[0] == [committed]
    run_job(gs_config(model, directories[2], bucket, "run-3"), IN_PROCESS)
    assert_equals_whole_sequence_model(workload, config.state)


def test_pack_run_and_read_outputs_all_on_gcs(bucket, tmp_path):
    """Long-format CSV on gs:// packed into chunks on gs://, run, the rest packed as
    Parquet against the gs:// state, run again; `seqcarry outputs` writes to gs://:
    every sequence equals Keras on its whole sequence, step by step."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.demo import make_model
    from pipeline.pack import pack_files
    from transforms.reference import keras_whole_sequence

    rng = np.random.default_rng(3)
    model = make_model(str(tmp_path / "m.keras"), 2, (5,), 3)
    whole = {f"s{n}": rng.normal(size=(steps, 2)).astype(np.float32)
             for n, steps in enumerate([1, 5, 12, 30])}
    cut = {key: (len(value) + 1) // 2 for key, value in whole.items()}

    def long_frame(part):
        rows = [(key, step, *whole[key][step]) for key in whole for step in part(key)]
        return pd.DataFrame(rows, columns=["sequence_id", "t", "f0", "f1"]).sample(
            frac=1, random_state=0)

    days = [long_frame(lambda key: range(cut[key])),
            long_frame(lambda key: range(cut[key], len(whole[key])))]
    storage.write_bytes(f"{bucket}/raw/day-1.csv", days[0].to_csv(index=False).encode())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(days[1], preserve_index=False), sink)
    storage.write_bytes(f"{bucket}/raw/day-2/part.parquet", sink.getvalue())
    state, outputs = f"{bucket}/state", f"{bucket}/outputs"
    for day, source in enumerate([f"{bucket}/raw/day-1.csv", f"{bucket}/raw/day-2"], 1):
        summary = pack_files(source, f"{bucket}/chunks/day-{day}", chunk_steps=4,
                             feature_columns=["f0", "f1"], state=state)
        assert summary["steps"] == len(days[day - 1])
        run_job(RunConfig(model=model, chunks=f"{bucket}/chunks/day-{day}", state=state,
                          outputs=outputs, run_id=f"day-{day}", batch_size=4,
                          window_steps=16), IN_PROCESS)
    done = subprocess.run([SEQCARRY, "outputs", "--state", state, "--to",
                           f"{bucket}/read/all.csv"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    frame = pd.read_csv(pa.BufferReader(storage.read_bytes(f"{bucket}/read/all.csv")))
    reference = keras_whole_sequence(model)
    for key, features in whole.items():
        rows = frame[frame["sequence_id"] == key]
        assert rows["step"].tolist() == list(range(len(features)))
        np.testing.assert_allclose(rows[["output_0", "output_1", "output_2"]].to_numpy(),
                                   reference(features)[0], atol=1e-5)


def test_a_damaged_object_on_gcs_is_named_and_left_alone(workload, bucket):
    model, directories = upload_workload(workload, bucket)
    run_job(gs_config(model, directories[0], bucket, "run-1"), IN_PROCESS)
    store = storage.StateStore(f"{bucket}/state")
    (record,) = store.committed().state_files
    fs = fsspec.filesystem("gs")
    damaged = fs.cat_file(record.path)[:-10]
    fs.pipe_file(record.path, damaged)
    with pytest.raises(storage.IntegrityError, match=f"{record.path} is damaged"):
        store.verify()
    with pytest.raises(Exception, match=f"{record.path} is damaged"):
        run_job(gs_config(model, directories[1], bucket, "run-2"), IN_PROCESS)
    assert fs.cat_file(record.path) == damaged and store.current().run_id == "run-1"


def test_transient_503s_are_retried_and_the_runs_succeed(workload, bucket, gcs_emulator,
                                                          tmp_path):
    model, directories = upload_workload(workload, bucket)
    with gcs.FaultProxy(gcs_emulator, status=503, fail_every=5, max_failures=8) as proxy:
        gcs.point_clients_at(proxy.url)
        try:
            for number, chunks in enumerate(directories):
                run_job(gs_config(model, chunks, bucket, f"run-{number + 1}"), IN_PROCESS)
        finally:
            gcs.point_clients_at(gcs_emulator)
    assert proxy.failures == 8 and proxy.requests > 40
    # Same bits as the same runs on local disk.
    for number, chunks in enumerate(workload[2]):
        run_job(RunConfig(workload[0], chunks, str(tmp_path / "state"), str(tmp_path / "out"),
                          run_id=f"run-{number + 1}", batch_size=4, window_steps=16),
                IN_PROCESS)
    assert final_state(f"{bucket}/state") == final_state(str(tmp_path / "state"))


def test_permanent_errors_fail_fast_with_a_clear_message(workload, bucket, gcs_emulator):
    model, directories = upload_workload(workload, bucket)
    with pytest.raises(storage.StorageError, match="--state gs://no-such-bucket/state: "
                                                   "bucket no-such-bucket does not exist"):
        run_job(gs_config(model, directories[0], "gs://no-such-bucket", "r"), IN_PROCESS)
    with gcs.FaultProxy(gcs_emulator, status=403) as proxy:
        env = os.environ | {"STORAGE_EMULATOR_HOST": proxy.url,
                            "CLOUD_STORAGE_EMULATOR_ENDPOINT": proxy.url}
        started = time.monotonic()
        refused = subprocess.run(
            [SEQCARRY, "run", "--model", workload[0], "--chunks", directories[0],
             "--state", f"{bucket}/state", "--outputs", f"{bucket}/outputs"],
            env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - started
    assert refused.returncode == 3, refused.stderr[-2000:]
    assert "Forbidden" in refused.stderr.strip().splitlines()[-1]
    assert elapsed < 60 and proxy.failures <= 2  # not retried
