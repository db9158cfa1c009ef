"""Fuzzing the input: generated Parquet files (random schemas, types, encodings, nulls,
truncations, changed bytes, a FIFO) mixed with good ones, through the real ``seqcarry
run`` over several runs. No run may fail or hang; every bad file and record is
accounted for with its reason; the good sequences equal Keras on each whole sequence.

``FUZZ_FILES`` (files over all runs, default 1,000) and ``FUZZ_SEED`` choose the input;
``make fuzz`` runs more of them with a new seed each time.
"""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.demo import cut_into_chunks, make_model, spread_over_runs
from schemas import validation as v
from tests import fuzz
from tests.chunked import assert_equals_whole_sequence
from tests.test_cli import seqcarry
from transforms.reference import keras_whole_sequence

FUZZ_FILES = int(os.environ.get("FUZZ_FILES", "1000"))
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20261202"))
RUNS = 4
WIDTH = 2


def dead_letters(report: dict) -> list[dict]:
    return [row for path in report["dead_letters"] for row in pq.read_table(path).to_pylist()]


def check_accounted(report: dict, letters: list[dict], expected: dict, good: str) -> None:
    """Every bad file and record of a run has its dead letter, with its reason."""
    assert len(letters) == report["chunks_rejected"] + report["files_rejected"]
    by_source: dict[str, list[dict]] = {}
    for letter in letters:
        by_source.setdefault(letter["source"], []).append(letter)
    assert not [s for s in by_source if s.startswith(good)], "a good file was rejected"
    for path, fate in expected.items():
        mine = by_source.get(path, [])
        whole_file = [(l["reason"], json.loads(l["record"]).get("rows"))
                      for l in mine if l["reason"] in v.FILE_REASONS]
        if fate.file_reason is not None:
            assert whole_file == [(fate.file_reason, fate.rows)], (path, mine)
            assert len(mine) == 1, (path, mine)
        elif not fate.anything:
            read = {l["row"]: l["reason"] for l in mine if l["reason"] in v.READ_REASONS}
            assert read == fate.row_reasons and not whole_file, (path, mine)


@pytest.mark.timeout(1800)
def test_generated_input_never_fails_a_run_and_good_sequences_stay_exact(tmp_path):
    rng = np.random.default_rng(FUZZ_SEED)
    model = make_model(str(tmp_path / "m.keras"), WIDTH, (5,), 2, seed=4)
    whole = {f"good-{number:02d}": rng.normal(size=(int(rng.integers(1, 40)), WIDTH))
             .astype(np.float32) for number in range(12)}
    per_run: list[list] = [[] for _ in range(RUNS)]
    for sequence_id, features in whole.items():
        chunks = cut_into_chunks(rng, sequence_id, features, max_chunk=9)
        for run, part in enumerate(spread_over_runs(rng, chunks, RUNS)):
            per_run[run].extend(part)
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")
    for run in range(RUNS):
        good, bad = str(tmp_path / f"good-{run}"), str(tmp_path / f"bad-{run}")
        fuzz.write_good_files(good, per_run[run], rng)
        expected = fuzz.write_bad_files(bad, FUZZ_FILES // RUNS - 3, WIDTH, rng)
        result = seqcarry("--quiet", "run", "--model", model, "--chunks", good, bad,
                          "--state", state, "--outputs", outputs, "--run-id", f"run-{run}",
                          "--batch-size", "8")
        assert result.returncode == 0, (FUZZ_SEED, run, result.stderr[-3000:])
        report = json.loads(result.stdout)
        check_accounted(report, dead_letters(report), expected, good)
    keras = keras_whole_sequence(model)
    assert_equals_whole_sequence(state, whole, lambda _, features: keras(features),
                                 among_others=True)
