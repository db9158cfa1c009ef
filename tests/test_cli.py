"""The ``seqcarry`` command through its real entry points, in subprocesses."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.demo import make_model, write_chunk_files
from schemas import Chunk

SEQCARRY = os.path.join(os.path.dirname(sys.executable), "seqcarry")


def seqcarry(*args, entry=(SEQCARRY,)):
    return subprocess.run([*entry, *args], capture_output=True, text=True, timeout=600)


def error_line(result):
    """The error people read: stderr's last line (TensorFlow may print start-up lines first)."""
    return result.stderr.strip().splitlines()[-1]


def test_help_explains_commands_options_and_exit_codes():
    top = seqcarry("--help", entry=(sys.executable, "-m", "pipeline"))
    assert top.returncode == 0
    assert "run" in top.stdout and "demo" in top.stdout and "exit codes" in top.stdout
    run = seqcarry("run", "--help")
    assert run.returncode == 0
    for option in ("--model", "--chunks", "--state", "--outputs", "--run-id",
                   "--direct_num_workers=2", "example:"):
        assert option in run.stdout


def test_run_prints_its_report_and_errors_are_one_clear_line(tmp_path):
    model = make_model(str(tmp_path / "m.keras"), 3, (4,), 2)
    chunks = tmp_path / "chunks"
    write_chunk_files(str(chunks), [Chunk("a", 0, np.ones((5, 3), np.float32))], files=1,
                      rng=np.random.default_rng(0))
    common = ["--model", model, "--state", str(tmp_path / "state"),
              "--outputs", str(tmp_path / "out")]

    ok = seqcarry("run", *common, "--chunks", str(chunks), "--run-id", "r1")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert (report["run_id"], report["chunks_processed"], report["steps_processed"]) == \
        ("r1", 1, 5)
    # The job wrote the report beside its snapshot; the launcher adds Beam's metrics.
    assert report["snapshot"] == str(tmp_path / "state" / "snapshots" / "r1" / report["attempt"])
    stored = json.load(open(os.path.join(report["snapshot"], "report.json")))
    assert stored == {key: value for key, value in report.items() if key != "metrics"}

    conflict = seqcarry("run", *common, "--chunks", str(chunks), "--run-id", "r1")
    assert conflict.returncode == 4
    assert error_line(conflict) == (
        f"seqcarry: error: run id r1 is already committed under {tmp_path / 'state'}; "
        "pass a new --run-id")

    # A day without new data is a run: it commits an empty layer (so expiry runs too).
    no_input = seqcarry("run", *common, "--chunks", str(tmp_path / "nothing" / "*.parquet"),
                        "--run-id", "r-empty")
    assert no_input.returncode == 0, no_input.stderr
    assert "event=no_input run_id=r-empty: no file matches --chunks" in no_input.stderr
    assert json.loads(no_input.stdout)["chunks_read"] == 0
    assert error_line(no_input).startswith("seqcarry: ok: run r-empty committed: 0 chunks read")

    bad_model = seqcarry("run", *common[2:], "--model", str(tmp_path / "nope.keras"),
                         "--chunks", str(chunks))
    assert bad_model.returncode == 2
    assert error_line(bad_model) == \
        f"seqcarry: error: model file {tmp_path / 'nope.keras'} does not exist"

    debug = seqcarry("--debug", "run", *common[2:], "--model", str(tmp_path / "nope.keras"),
                     "--chunks", str(chunks))
    assert debug.returncode == 2 and "Traceback" in debug.stderr

    other = make_model(str(tmp_path / "other.keras"), 3, (4,), 2, seed=9)
    mismatch = seqcarry("run", "--model", other, *common[2:], "--chunks", str(chunks))
    assert mismatch.returncode == 2
    assert "was written by model sha256:" in error_line(mismatch)
    assert "--reset-state" in error_line(mismatch)

    wrong_schema = tmp_path / "wrong"
    wrong_schema.mkdir()
    pq.write_table(pa.table({"id": ["a"], "x": [1.0]}), str(wrong_schema / "w.parquet"))
    dead_lettered = seqcarry("run", *common, "--chunks", str(wrong_schema), "--run-id", "r2")
    assert dead_lettered.returncode == 0, dead_lettered.stderr[-2000:]
    report = json.loads(dead_lettered.stdout)
    assert (report["files_rejected_by_reason"], report["chunks_in_rejected_files"],
            report["chunks_read"]) == ({"wrong_schema": 1}, 1, 0)
    assert "1 input file rejected whole (1 wrong_schema)" in error_line(dead_lettered)


def test_demo_runs_three_times_and_checks_against_keras(tmp_path):
    demo = seqcarry("demo", "--sequences", "12", "--workdir", str(tmp_path / "demo"))
    assert demo.returncode == 0, demo.stderr
    assert [line.split()[0] for line in demo.stdout.splitlines()].count("chunks_processed") == 3
    line = next(l for l in demo.stdout.splitlines()
                if l.startswith("max abs diff vs whole sequence"))
    assert float(line.split("outputs ")[1].split(",")[0]) < 1e-5


def test_inspect_model_shows_the_model_and_a_bad_one_exits_2(tmp_path):
    import keras

    model = make_model(str(tmp_path / "m.keras"), 3, (4,), 2)
    shown = seqcarry("inspect-model", model)
    assert shown.returncode == 0, shown.stderr
    for line in ("format: keras", "input width: 3", "output width: 2",
                 "state per sequence: 8 float32 (32 bytes): layer0_h 4, layer0_c 4",
                 "fingerprint: sha256:"):
        assert line in shown.stdout
    bidirectional = str(tmp_path / "bidirectional.keras")
    keras.Sequential([keras.Input((None, 3)), keras.layers.Bidirectional(
        keras.layers.LSTM(2, return_sequences=True))]).save(bidirectional)
    refused = seqcarry("inspect-model", bidirectional)
    assert refused.returncode == 2
    assert error_line(refused).startswith("seqcarry: error: keras:")
    assert "Bidirectional is not supported: it is not causal" in error_line(refused)
    for command, options in [("inspect-model", ("--tf1-scope", "--model-architecture")),
                             ("import-state", ("--from", "--model", "--state")),
                             ("run", ("--tf1-scope", "--tf1-forget-bias"))]:
        helped = seqcarry(command, "--help")
        assert helped.returncode == 0 and "example:" in helped.stdout
        assert all(option in helped.stdout for option in options)


def test_too_much_rejected_input_fails_without_committing(tmp_path):
    model = make_model(str(tmp_path / "m.keras"), 3, (4,), 2)
    chunks = tmp_path / "chunks"
    write_chunk_files(str(chunks), [Chunk("a", 0, np.ones((5, 3), np.float32))], files=1,
                      rng=np.random.default_rng(0))
    pq.write_table(pa.table({"sequence_id": list(range(9)), "chunk_index": [0] * 9,
                             "features": [[[1.0, 2.0, 3.0]]] * 9}), chunks / "ids.parquet")
    (chunks / "empty.parquet").write_bytes(b"")
    common = ["run", "--model", model, "--chunks", str(chunks), "--state",
              str(tmp_path / "state"), "--outputs", str(tmp_path / "out"), "--run-id", "r1"]

    refused = seqcarry(*common, "--max-rejected-fraction", "0.5")
    assert refused.returncode == 2, refused.stderr
    assert error_line(refused).startswith(
        "seqcarry: error: run r1 rejected 90.9% of its input, above --max-rejected-fraction "
        "0.5: 0 of 1 chunks read, and 2 files rejected whole holding 9 rows (1 file "
        "unreadable_file, 1 file wrong_schema); nothing was committed; dead letters are in "
        f"{tmp_path / 'out' / '_dead_letters' / 'r1'}/")
    assert "Traceback" not in refused.stderr
    assert not os.path.exists(tmp_path / "state" / "CURRENT")

    accepted = seqcarry(*common, "--max-rejected-fraction", "0.95")
    assert accepted.returncode == 0, accepted.stderr
    assert error_line(accepted).startswith(
        "seqcarry: warn: run r1 committed: 1 chunks read, 1 processed, 0 deferred, 0 skipped "
        "as duplicates, 0 rejected, 2 input files rejected whole (1 unreadable_file, 1 "
        "wrong_schema); dead letters in ")
    for value in ("-0.1", "1.5", "nan"):
        assert seqcarry(*common, "--max-rejected-fraction", value).returncode == 2


def test_every_command_follows_one_exit_code_scheme(tmp_path):
    model = make_model(str(tmp_path / "m.keras"), 3, (4,), 2)
    chunks = tmp_path / "chunks"
    write_chunk_files(str(chunks), [Chunk("a", 0, np.ones((5, 3), np.float32))], files=1,
                      rng=np.random.default_rng(0))
    state, missing = str(tmp_path / "state"), str(tmp_path / "missing")
    run = ["run", "--model", model, "--chunks", str(chunks), "--state", state,
           "--outputs", str(tmp_path / "out")]
    assert seqcarry(*run, "--run-id", "r1").returncode == 0
    expected = {
        ("run", "--run-id", ""): (2, "--run-id '' must be letters"),
        ("verify", "--state", state, "--run-id", "../../../etc"): (2, "run id '../../../etc' must be"),
        ("verify", "--state", state, "--run-id", "nope"): (2, "nope is not a committed snapshot"),
        ("rollback", "--state", state, "--to", "nope"): (2, "nope is not a committed snapshot"),
        ("verify", "--state", missing): (2, f"{missing} has no committed snapshot"),
        ("snapshots", "--state", missing): (2, f"{missing} has no committed snapshot"),
        ("report", "--state", missing): (2, f"{missing} has no committed run"),
        ("demo", "--sequences", "0"): (2, "--sequences must be at least 1, not 0"),
        ("run", "--expire-after-days", "nan"): (2, "--expire-after-days a number of days"),
        ("run", "--state", str(tmp_path / "state-2"), "--outputs",
         str(chunks / "chunks-000.parquet")): (3, "Not a directory"),
    }
    for args, (code, message) in expected.items():
        if args[0] == "run":
            args = (*run, "--run-id", "r2", *args[1:]) if "--run-id" not in args else (
                *run, *args[1:])
        result = seqcarry(*args)
        assert result.returncode == code, (args, result.stderr[-2000:])
        assert message in error_line(result) and "Traceback" not in result.stderr, (
            args, result.stderr[-2000:])
    html = tmp_path / "new" / "folder" / "runs.html"
    assert seqcarry("report", "--state", state, "--html", str(html)).returncode == 0
    assert html.read_text().startswith("<!doctype html>")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_no_abort_at_exit_in_300_verify_calls(tmp_path):
    """Reading Parquet from Python bytes let an Arrow thread drop the last reference at
    interpreter shutdown: about 1 call in 50 aborted (exit 134) after printing ok. The
    calls exit the normal way here (``main``, not the command's ``exit_now``), two at a
    time for the load that made it show."""
    run_demo = [sys.executable, "-m", "pipeline", "demo", "--sequences", "20",
                "--workdir", str(tmp_path / "demo")]
    assert subprocess.run(run_demo, capture_output=True, timeout=600).returncode == 0
    verify = [sys.executable, "-c", "import sys; from pipeline.cli import main; "
              "sys.exit(main(sys.argv[1:]))", "verify", "--state", str(tmp_path / "demo" / "state")]
    codes = []
    for _ in range(150):
        calls = [subprocess.Popen(verify, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for _ in range(2)]
        codes += [(call.wait(timeout=120), call.stderr.read()[-300:]) for call in calls]
    assert [c for c in codes if c[0] != 0] == []
