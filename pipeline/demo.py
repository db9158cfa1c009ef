"""The built-in demo (``seqcarry demo``, what ``make run`` runs), and the generators of
models and chunked data it uses (the tests use them too).

It makes a random 2-layer LSTM + Dense Keras model and a few hundred sequences of
uneven length, cuts each into chunks of random sizes, spreads every sequence's
chunks over three successive runs (shuffled), runs the pipeline three times and
checks the result against Keras on each whole sequence. Like a real feed, the input
is a little messy: some chunks arrive a run late (the chunks after them wait as
deferred), some are sent twice, one is resent with different content, and two
records are malformed; the reports account for each.
"""
from __future__ import annotations

import os
import shutil
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from pipeline import results
from pipeline.build import RunConfig, run_job
from schemas import Chunk, InputError, chunks_to_table


def make_model(path: str, input_dim: int, units: Sequence[int], output_dim: int | None,
               seed: int = 0) -> str:
    """Save a random Keras model: stacked LSTM(return_sequences=True) [+ Dense]."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.Input((None, input_dim))]
    layers += [keras.layers.LSTM(u, return_sequences=True) for u in units]
    if output_dim:
        layers.append(keras.layers.Dense(output_dim))
    model = keras.Sequential(layers)
    rng = np.random.default_rng(seed)
    # Non-zero biases, so a state mix-up cannot hide behind zeros.
    model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(np.float32)
                       for w in model.get_weights()])
    model.save(path)
    return path


def make_sequences(rng: np.random.Generator, count: int, input_dim: int,
                   max_steps: int) -> dict[str, np.ndarray]:
    """``count`` sequences of 1 to ``max_steps`` steps of random features."""
    return {f"seq-{number:05d}": rng.normal(
                size=(int(rng.integers(1, max_steps + 1)), input_dim)).astype(np.float32)
            for number in range(count)}


def cut_into_chunks(rng: np.random.Generator, sequence_id: str, features: np.ndarray,
                    max_chunk: int) -> list[Chunk]:
    """Cut one sequence into chunks of random sizes from 1 to ``max_chunk`` steps."""
    chunks, start = [], 0
    while start < len(features):
        size = int(rng.integers(1, max_chunk + 1))
        chunks.append(Chunk(sequence_id, len(chunks), features[start:start + size]))
        start += size
    return chunks


def spread_over_runs(rng: np.random.Generator, chunks: Sequence[Chunk],
                     runs: int) -> list[list[Chunk]]:
    """Give each run a contiguous (possibly empty) range of the sequence's chunks."""
    cuts = sorted(int(c) for c in rng.integers(0, len(chunks) + 1, size=runs - 1))
    bounds = [0] + cuts + [len(chunks)]
    return [list(chunks[bounds[r]:bounds[r + 1]]) for r in range(runs)]


def write_chunk_files(directory: str, chunks: Sequence[Chunk], files: int,
                      rng: np.random.Generator) -> None:
    """Write ``chunks`` shuffled over ``files`` Parquet files in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    order = rng.permutation(len(chunks))
    for number, part in enumerate(np.array_split(order, files)):
        if len(part):
            pq.write_table(chunks_to_table([chunks[i] for i in part]),
                           os.path.join(directory, f"chunks-{number:03d}.parquet"))


def run_demo(workdir: str = "build/demo", sequences: int = 300, runs: int = 3,
             beam_args: Sequence[str] = (), seed: int = 0) -> float:
    """Run the demo; print each run's report and the comparison with Keras.

    Returns the largest absolute difference from the whole-sequence model (outputs
    and final states).
    """
    from transforms.reference import keras_whole_sequence

    if sequences < 1:
        raise InputError(f"--sequences must be at least 1, not {sequences}")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    rng = np.random.default_rng(seed)
    model_path = make_model(os.path.join(workdir, "model.keras"), input_dim=8,
                            units=(32, 32), output_dim=4, seed=seed)
    whole = make_sequences(rng, sequences, input_dim=8, max_steps=400)
    per_run: list[list[Chunk]] = [[] for _ in range(runs)]
    for sequence_id, features in whole.items():
        parts = spread_over_runs(rng, cut_into_chunks(rng, sequence_id, features, 64), runs)
        for run in range(runs - 1):
            if len(parts[run]) > 1 and rng.random() < 0.1:  # arrives a run late
                parts[run + 1].insert(0, parts[run].pop(0))
        for run, part in enumerate(parts):
            per_run[run].extend(part)
    for run in range(1, runs):  # resends of chunks already delivered: exact duplicates
        earlier = [chunk for part in per_run[:run] for chunk in part]
        per_run[run].extend(earlier[i] for i in rng.choice(len(earlier), 5, replace=False))
    altered = per_run[0][0]  # and one resend with different content
    per_run[-1].append(Chunk(altered.sequence_id, altered.chunk_index, altered.features + 1))
    malformed = [Chunk("sensor-x", 0, np.ones((3, 5), np.float32)),  # wrong input width
                 Chunk("sensor-y", 0, np.full((2, 8), np.nan, np.float32))]  # NaN
    print(f"demo: {sequences} sequences, {sum(len(f) for f in whole.values())} steps, "
          f"{sum(map(len, per_run))} chunks over {runs} runs, model {model_path}")

    state, outputs = os.path.join(workdir, "state"), os.path.join(workdir, "outputs")
    for run in range(runs):
        chunk_dir = os.path.join(workdir, "chunks", f"run-{run + 1}")
        write_chunk_files(chunk_dir, per_run[run] + (malformed if run == 1 else []), files=2,
                          rng=rng)
        report = run_job(RunConfig(model=model_path, chunks=chunk_dir, state=state,
                                   outputs=outputs, run_id=f"demo-run-{run + 1}"), beam_args)
        print(format_report(report))

    reference = keras_whole_sequence(model_path)
    produced, carried = results.committed_outputs(state), results.committed_states(state)
    output_diff = state_diff = 0.0
    for sequence_id, features in whole.items():
        expected_outputs, expected_states = reference(features)
        output_diff = max(output_diff,
                          float(np.abs(produced[sequence_id] - expected_outputs).max()))
        state_diff = max(state_diff, max(
            float(np.abs(got - want).max())
            for got, want in zip(carried[sequence_id].tensors, expected_states)))
    print(f"max abs diff vs whole sequence: outputs {output_diff:.3g}, "
          f"final state {state_diff:.3g} ({sequences} sequences)")
    return max(output_diff, state_diff)


def format_report(report: dict) -> str:
    """A run report as aligned 'key  value' lines (Beam metrics left to report.json)."""
    shown = {key: value for key, value in report.items() if key != "metrics"}
    width = max(map(len, shown))
    return "\n".join(f"  {key:<{width}}  {value}" for key, value in shown.items())
