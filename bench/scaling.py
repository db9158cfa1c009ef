"""``make bench`` cases that measure how a run's cost scales, not its speed.

* incremental: a run touching 1,000 sequences of a 100,000-sequence snapshot vs the
  same run against a snapshot holding only those 1,000 (issue 7: at most 2x).
* memory: peak RSS of a run over 10x more sequences of the same length (issue 7:
  less than 1.3x).
* padding: one 60,000-step sequence alone, and with 255 one-step sequences in the same
  run (issue 18: at most 1.3x, in peak RSS and in seconds).
* small run: ``seqcarry run`` over one 128-step chunk, as a command, start to exit: the
  fixed cost every daily run pays (issue 18: under 2.5 s), beside what importing
  TensorFlow and Beam alone costs in a fresh interpreter.

Runs whose memory is measured each run in a fresh process, so each peak is its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

TOUCHED, SNAPSHOT = 1_000, 100_000
CHUNK_STEPS = 128
LONG_STEPS, SHORT_SEQUENCES = 60_000, 255


def _snapshot(state_url: str, model_path: str, sequence_ids: list[str]) -> None:
    """Start ``state_url`` with random states for ``sequence_ids`` (``seqcarry
    import-state``), instead of a long set-up run."""
    from pipeline.importer import import_state
    from transforms.models import ModelOptions, load_model

    stack = load_model(model_path)
    rng = np.random.default_rng(1)
    source = state_url + ".npz"
    np.savez(source, sequence_id=np.array(sorted(sequence_ids)),
             next_chunk_index=np.ones(len(sequence_ids), np.int64),
             **{name: rng.normal(0, 0.1, (len(sequence_ids), size)).astype(np.float32)
                for name, size in zip(stack.state_names, stack.state_sizes)})
    import_state(model_path, ModelOptions(), state_url, source, run_id="seed")


def incremental(root: str, model_path: str, input_dim: int) -> dict:
    """Seconds of the same run against a 1,000- and a 100,000-sequence snapshot."""
    from pipeline.build import run_job
    from pipeline.demo import write_chunk_files
    from pipeline.options import RunConfig
    from schemas import Chunk

    rng = np.random.default_rng(2)
    everyone = [f"seq-{number:06d}" for number in range(SNAPSHOT)]
    touched = sorted(rng.choice(everyone, TOUCHED, replace=False))
    chunks = [Chunk(sequence_id, 1, rng.normal(size=(CHUNK_STEPS, input_dim)).astype(np.float32))
              for sequence_id in touched]
    chunk_dir = os.path.join(root, "incremental-chunks")
    write_chunk_files(chunk_dir, chunks, files=4, rng=rng)
    seconds = {}
    for name, held in (("small", touched), ("large", everyone)):
        state = os.path.join(root, f"incremental-{name}")
        _snapshot(state, model_path, held)
        report = run_job(RunConfig(model=model_path, chunks=chunk_dir, state=state,
                                   outputs=os.path.join(root, f"incremental-out-{name}"),
                                   run_id="daily"), ["--direct_running_mode=in_memory"])
        assert report["chunks_processed"] == TOUCHED, report
        seconds[name] = report["seconds"]
    return {"touched": TOUCHED, "snapshot": SNAPSHOT, "seconds_small": seconds["small"],
            "seconds_large": seconds["large"], "ratio": seconds["large"] / seconds["small"]}


# Peak RSS from VmHWM, this program's own: getrusage's ru_maxrss keeps the peak of the
# process before its exec, i.e. of the forked bench itself (2 GB by then).
_MEASURE_RSS = """
import json, os, sys
from pipeline.build import run_job
from pipeline.options import RunConfig
model, chunks, root = sys.argv[1:4]
report = run_job(RunConfig(model=model, chunks=chunks, state=os.path.join(root, "state"),
                           outputs=os.path.join(root, "out"), run_id="memory"),
                 ["--direct_running_mode=in_memory"])
with open("/proc/self/status") as status:
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mib": peak_kib / 1024,
                  "steps": report["steps_processed"], "seconds": report["seconds"]}))
"""


def memory(root: str, model_path: str, input_dim: int, sequences: int, steps: int) -> dict:
    """Peak RSS of one run over ``sequences`` and over 10x as many, each of ``steps``."""
    from pipeline.demo import write_chunk_files
    from schemas import Chunk

    rng = np.random.default_rng(3)
    measured = {}
    for factor in (1, 10):
        chunk_dir = os.path.join(root, f"memory-chunks-{factor}x")
        chunks = [Chunk(f"seq-{number:06d}", index,
                        rng.normal(size=(CHUNK_STEPS, input_dim)).astype(np.float32))
                  for number in range(sequences * factor)
                  for index in range(steps // CHUNK_STEPS)]
        write_chunk_files(chunk_dir, chunks, files=8 * factor, rng=rng)
        del chunks
        measured[factor] = _measured_run(model_path, chunk_dir,
                                         os.path.join(root, f"memory-run-{factor}x"))
    return {"sequences": sequences, "steps": steps,
            "peak_rss_mib_1x": measured[1]["peak_rss_mib"],
            "peak_rss_mib_10x": measured[10]["peak_rss_mib"],
            "ratio": measured[10]["peak_rss_mib"] / measured[1]["peak_rss_mib"]}


def _measured_run(model_path: str, chunk_dir: str, root: str) -> dict:
    """Peak RSS, steps and seconds of one run in a fresh process."""
    child = subprocess.run([sys.executable, "-c", _MEASURE_RSS, model_path, chunk_dir, root],
                           check=True, capture_output=True, text=True,
                           env=os.environ | {"PYTHONPATH": "."})
    return json.loads(child.stdout.strip().splitlines()[-1])


def padding(root: str, model_path: str, input_dim: int) -> dict:
    """Peak RSS and seconds of a run over one 60,000-step sequence alone, and of the
    same run with 255 one-step sequences beside it."""
    from pipeline.demo import write_chunk_files
    from schemas import Chunk

    rng = np.random.default_rng(4)
    long_one = [Chunk("long", index, rng.normal(size=(CHUNK_STEPS, input_dim)).astype(np.float32))
                for index in range(LONG_STEPS // CHUNK_STEPS)]
    short = [Chunk(f"short-{number:03d}", 0, rng.normal(size=(1, input_dim)).astype(np.float32))
             for number in range(SHORT_SEQUENCES)]
    measured = {}
    for name, chunks in (("alone", long_one), ("with_short", long_one + short)):
        chunk_dir = os.path.join(root, f"padding-chunks-{name}")
        write_chunk_files(chunk_dir, chunks, files=4, rng=rng)
        measured[name] = _measured_run(model_path, chunk_dir, os.path.join(root, f"padding-{name}"))
    alone, with_short = measured["alone"], measured["with_short"]
    return {"long_steps": LONG_STEPS, "short_sequences": SHORT_SEQUENCES,
            "peak_rss_mib_alone": alone["peak_rss_mib"], "seconds_alone": alone["seconds"],
            "peak_rss_mib_with_short": with_short["peak_rss_mib"],
            "seconds_with_short": with_short["seconds"],
            "rss_ratio": with_short["peak_rss_mib"] / alone["peak_rss_mib"],
            "time_ratio": with_short["seconds"] / alone["seconds"]}


def small_run(root: str, model_path: str, input_dim: int) -> dict:
    """Wall seconds of ``seqcarry run`` over one small chunk as a new process, start to
    exit, with the job's own seconds (planning to commit) from its report; and of a
    fresh interpreter importing TensorFlow, then Beam (what every run starts with)."""
    import storage
    from pipeline.demo import write_chunk_files
    from schemas import Chunk

    rng = np.random.default_rng(5)
    chunk_dir = os.path.join(root, "small-chunks")
    write_chunk_files(chunk_dir, [Chunk("one", 0, rng.normal(size=(CHUNK_STEPS, input_dim))
                                        .astype(np.float32))], files=1, rng=rng)
    state = os.path.join(root, "small-state")
    command = [sys.executable, "-m", "pipeline", "run", "--model", model_path, "--chunks",
               chunk_dir, "--state", state, "--outputs", os.path.join(root, "small-out"),
               "--run-id", "small"]
    wall = _wall_seconds(command)
    store = storage.StateStore(state)
    job_seconds = store.report("small", store.current().attempt)["seconds"]
    imports = {name: _wall_seconds([sys.executable, "-c", f"import {name}"])
               for name in ("tensorflow", "apache_beam")}
    return {"wall_seconds": wall, "job_seconds": job_seconds,
            "import_tensorflow_seconds": imports["tensorflow"],
            "import_beam_seconds": imports["apache_beam"]}


def _wall_seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True,
                   env=os.environ | {"PYTHONPATH": ".", "TF_CPP_MIN_LOG_LEVEL": "2"})
    return time.perf_counter() - started
