"""``make bench`` cases that measure how a run's cost scales, not its speed.

* incremental: a run touching 1,000 sequences of a 100,000-sequence snapshot vs the
  same run against a snapshot holding only those 1,000 (issue 7: at most 2x).
* memory: peak RSS of a run over 10x more sequences of the same length (issue 7:
  less than 1.3x). Each size runs in a fresh process, so each peak is its own.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import numpy as np

TOUCHED, SNAPSHOT = 1_000, 100_000
CHUNK_STEPS = 128


def _snapshot(state_url: str, model_path: str, sequence_ids: list[str]) -> None:
    """Commit a snapshot holding ``sequence_ids`` with random states, written directly
    in seqcarry's snapshot format (what a run writes), to save a long set-up run."""
    from pipeline import storage
    from schemas import CarriedState, states_to_table
    from transforms.model import load_model

    stack = load_model(model_path)
    rng = np.random.default_rng(1)
    states = [CarriedState(sequence_id, 1, CHUNK_STEPS,
                           tuple(rng.normal(0, 0.1, size).astype(np.float32)
                                 for size in stack.state_sizes), stack.fingerprint)
              for sequence_id in sorted(sequence_ids)]
    store = storage.StateStore(state_url)
    record = storage.write_table(store.snapshot_file_url("seed", "state", 0, 1),
                                 states_to_table(states, stack.state_names), layer=1)
    store.write_manifest(storage.Manifest(
        run_id="seed", run_number=1, parent=None,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        model_fingerprint=stack.fingerprint, state_names=stack.state_names,
        counts={"sequences_live": len(states)}, state_files=(record,), pending_files=(),
        output_files=(), dead_letter_files=(), final_state_files=()))
    store.commit("seed", None)


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


_MEASURE_RSS = """
import json, os, resource, sys
from pipeline.build import run_job
from pipeline.options import RunConfig
model, chunks, root = sys.argv[1:4]
report = run_job(RunConfig(model=model, chunks=chunks, state=os.path.join(root, "state"),
                           outputs=os.path.join(root, "out"), run_id="memory"),
                 ["--direct_running_mode=in_memory"])
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
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
        child = subprocess.run(
            [sys.executable, "-c", _MEASURE_RSS, model_path, chunk_dir,
             os.path.join(root, f"memory-run-{factor}x")],
            check=True, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": "."})
        measured[factor] = json.loads(child.stdout.strip().splitlines()[-1])
    return {"sequences": sequences, "steps": steps,
            "peak_rss_mib_1x": measured[1]["peak_rss_mib"],
            "peak_rss_mib_10x": measured[10]["peak_rss_mib"],
            "ratio": measured[10]["peak_rss_mib"] / measured[1]["peak_rss_mib"]}
