"""Several chunked pipeline runs over whole sequences, and their comparison with a
whole-sequence oracle: shared by the end-to-end tests of every model format."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from pipeline import results
from pipeline.build import run_job
from pipeline.demo import cut_into_chunks, spread_over_runs, write_chunk_files
from pipeline.options import RunConfig
from tests.conftest import IN_PROCESS

Oracle = Callable[[str, np.ndarray], tuple[np.ndarray, list[np.ndarray]]]


def write_chunked_runs(whole: dict[str, np.ndarray], root, runs: int = 3,
                       seed: int = 0) -> list[str]:
    """Cut each sequence into random chunks (1 to 17 steps) and spread them over
    ``runs`` runs, shuffled over two files each; returns each run's chunk directory."""
    rng = np.random.default_rng(seed)
    per_run: list[list] = [[] for _ in range(runs)]
    for sequence_id, features in sorted(whole.items()):
        chunks = cut_into_chunks(rng, sequence_id, features, max_chunk=17)
        for run, part in enumerate(spread_over_runs(rng, chunks, runs)):
            per_run[run].extend(part)
    directories = []
    for run, chunks in enumerate(per_run):
        directories.append(str(root / f"chunks-{run + 1}"))
        write_chunk_files(directories[-1], chunks, files=2, rng=rng)
    return directories


def run_chunked(model: str, whole: dict[str, np.ndarray], root, runs: int = 3,
                seed: int = 0, beam_args: Sequence[str] = IN_PROCESS,
                location: str | None = None, **config) -> tuple[str, list[dict]]:
    """Run the pipeline once per run of :func:`write_chunked_runs`, with the state and
    outputs under ``location`` (default: ``root``); returns the state URL and the
    reports. ``config``: more RunConfig fields (model options)."""
    location = location or str(root)
    state, outputs = f"{location}/state", f"{location}/outputs"
    reports = []
    for run, directory in enumerate(write_chunked_runs(whole, root, runs, seed)):
        reports.append(run_job(RunConfig(
            model=model, chunks=directory, state=state, outputs=outputs,
            run_id=f"run-{run + 1}", batch_size=4, window_steps=16, **config), beam_args))
    return state, reports


def assert_equals_whole_sequence(state: str, whole: dict[str, np.ndarray],
                                 oracle: Oracle, atol: float = 1e-5,
                                 among_others: bool = False) -> float:
    """Every sequence's committed outputs and carried state equal ``oracle(id,
    features)`` on its whole sequence; returns the largest absolute difference. With
    ``among_others``, the state may hold other sequences too."""
    produced, carried = results.committed_outputs(state), results.committed_states(state)
    if among_others:
        produced = {key: value for key, value in produced.items() if key in whole}
        carried = {key: value for key, value in carried.items() if key in whole}
    assert sorted(produced) == sorted(carried) == sorted(whole)
    worst = 0.0
    for sequence_id, features in whole.items():
        expected_outputs, expected_states = oracle(sequence_id, features)
        assert produced[sequence_id].shape == expected_outputs.shape
        np.testing.assert_allclose(produced[sequence_id], expected_outputs, atol=atol)
        final = carried[sequence_id]
        assert final.steps_seen == len(features)
        for got, want in zip(final.tensors, expected_states, strict=True):
            np.testing.assert_allclose(got, want, atol=atol)
        worst = max([worst, float(np.abs(produced[sequence_id] - expected_outputs).max())]
                    + [float(np.abs(g - w).max()) for g, w in zip(final.tensors, expected_states)])
    return worst
