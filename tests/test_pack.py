"""``seqcarry pack`` and :mod:`pipeline.pack`: long-format data (one row per step) into
chunk files, appending to the sequences of a state. Real files, real runs."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline import results
from pipeline.demo import make_model
from pipeline.pack import pack, pack_files, pack_table
from schemas import CHUNK_SCHEMA, InputError
from tests.test_cli import error_line, seqcarry


def long_format(rng, lengths, width=2, start=0):
    """Whole sequences {id: float32 [steps, width]} and their steps as a long-format
    table (sequence_id, t, f0, f1, ...), rows shuffled, t from ``start`` in steps of 10."""
    whole = {f"seq-{n}": rng.normal(size=(steps, width)).astype(np.float32)
             for n, steps in enumerate(lengths)}
    ids = np.concatenate([[key] * len(value) for key, value in whole.items()])
    t = np.concatenate([start + 10 * np.arange(len(value)) for value in whole.values()])
    features = np.concatenate(list(whole.values()))
    order = rng.permutation(len(ids))
    table = pa.table({"sequence_id": ids[order], "t": t[order],
                      **{f"f{j}": features[order, j] for j in range(width)}})
    return whole, table


def by_sequence(table):
    """{sequence_id: [(chunk_index, features [steps, width], is_last), ...]} in order."""
    found = {}
    for row in table.to_pylist():
        found.setdefault(row["sequence_id"], []).append(
            (row["chunk_index"], np.asarray(row["features"], np.float32).reshape(
                len(row["features"]), -1), row["is_last"]))
    return {key: sorted(value, key=lambda chunk: chunk[0]) for key, value in found.items()}


def check_round_trip(table, whole, chunk_steps, first=None):
    assert table.schema.equals(CHUNK_SCHEMA)
    chunks = by_sequence(table)
    assert set(chunks) == set(whole)
    for key, features in whole.items():
        start = (first or {}).get(key, 0)
        assert [index for index, _, _ in chunks[key]] == list(
            range(start, start + len(chunks[key])))
        steps = [len(matrix) for _, matrix, _ in chunks[key]]
        assert all(size == chunk_steps for size in steps[:-1]) and 1 <= steps[-1] <= chunk_steps
        np.testing.assert_array_equal(np.concatenate([m for _, m, _ in chunks[key]]), features)


@pytest.mark.parametrize("chunk_steps", [1, 5, 64])
def test_a_shuffled_dataframe_packs_into_chunks_that_concatenate_back(chunk_steps):
    rng = np.random.default_rng(chunk_steps)
    whole, table = long_format(rng, [1, 4, 5, 6, 11, 23, 70])
    frame = table.to_pandas().assign(note="ignored text")  # not numeric: not a feature
    packed = pack_table(frame.sample(frac=1, random_state=1), chunk_steps=chunk_steps)
    check_round_trip(packed.table, whole, chunk_steps)
    assert packed.feature_columns == ("f0", "f1")  # the shuffled index is no feature
    assert (packed.sequences, packed.steps) == (7, sum(map(len, whole.values())))
    assert not any(packed.table["is_last"].to_pylist())
    # A DataFrame indexed by sequence and step packs the same.
    indexed = pack(frame.set_index(["sequence_id", "t"]), chunk_steps=chunk_steps)
    assert indexed.equals(packed.table)


def test_arrow_tables_types_and_last_steps():
    rng = np.random.default_rng(3)
    whole, table = long_format(rng, [3, 9, 10], width=3)
    # Dictionary ids (a pandas categorical), integer and float64 features, any order.
    table = table.set_column(0, "sequence_id", table["sequence_id"].dictionary_encode())
    table = table.set_column(2, "f0", pa.array(np.round(table["f0"].to_numpy() * 100)
                                               .astype(np.int64)))
    whole = {key: np.column_stack([np.round(value[:, 0] * 100), value[:, 1:]])
             .astype(np.float32) for key, value in whole.items()}
    ends = pc_last_steps(table)
    table = table.append_column("last", pa.array(ends))
    packed = pack_table(table, chunk_steps=4, feature_columns=["f0", "f1", "f2"],
                        last_column="last")
    check_round_trip(packed.table, whole, 4)
    chunks = by_sequence(packed.table)
    assert [last for _, _, last in chunks["seq-1"]] == [False, False, True]
    assert packed.sequences_ended == 3
    # Feature order is the caller's.
    swapped = by_sequence(pack(table, chunk_steps=100, feature_columns=["f2", "f0"]))
    np.testing.assert_array_equal(swapped["seq-2"][0][1], whole["seq-2"][:, [2, 0]])
    # Integer sequence ids become strings.
    numbered = pack(pa.table({"sequence_id": [7, 7, 8], "t": [1, 0, 0],
                              "x": [1.0, 2.0, 3.0]}), chunk_steps=2)
    assert numbered.to_pylist() == [
        {"sequence_id": "7", "chunk_index": 0, "features": [[2.0], [1.0]], "is_last": False},
        {"sequence_id": "8", "chunk_index": 0, "features": [[3.0]], "is_last": False}]
    assert pack(table.slice(0, 0), chunk_steps=3).equals(CHUNK_SCHEMA.empty_table())


def test_large_chunk_columns_are_split_below_int32_offsets(monkeypatch):
    """``list<>`` offsets are int32: a features column of more values is written in
    pieces (here with the limit lowered to a few values)."""
    import pipeline.pack

    rng = np.random.default_rng(8)
    whole, table = long_format(rng, [1, 4, 5, 6, 11, 23, 70], width=3)
    whole_column = pack(table, chunk_steps=5)
    monkeypatch.setattr(pipeline.pack, "_MAX_LIST_VALUES", 31)
    pieces = pack(table, chunk_steps=5)
    assert pieces["features"].num_chunks > 5 and pieces.equals(whole_column)
    check_round_trip(pieces, whole, 5)
    with pytest.raises(InputError, match="use a smaller chunk_steps"):
        pack(table, chunk_steps=11)


def pc_last_steps(table):
    """True on each sequence's last step (the largest t)."""
    ids, t = table["sequence_id"].to_pylist(), table["t"].to_pylist()
    last = {}
    for key, step in zip(ids, t):
        last[key] = max(last.get(key, step), step)
    return [last[key] == step for key, step in zip(ids, t)]


def test_data_that_cannot_be_packed_is_one_clear_input_error():
    table = pa.table({"sequence_id": ["a", "a", "b", "b"], "t": [0, 1, 0, 0],
                      "x": [1.0, 2.0, 3.0, 4.0]})
    cases = {
        "duplicate": (dict(data=table), "sequence 'b' has t 0 more than once"),
        "chunk_steps": (dict(data=table, chunk_steps=0), "chunk_steps must be a whole number"),
        "missing": (dict(data=table, feature_columns=["x", "y"]),
                    "feature column 'y' not found; the columns are sequence_id, t, x"),
        "order": (dict(data=table, order_column="step"), "order column 'step' not found"),
        "nulls": (dict(data=pa.table({"sequence_id": ["a", "b"], "t": [0, 0],
                                      "x": [1.0, None]})),
                  "column 'x' has null values (1; the first in sequence 'b')"),
        "text": (dict(data=table.append_column("s", pa.array(list("abcd"))),
                      feature_columns=["s"]), "feature column 's' is string, not a number"),
        "none": (dict(data=table.select(["sequence_id", "t"])), "no numeric feature column"),
        "early end": (dict(data=table.slice(0, 2).append_column("end", pa.array([True, False])),
                           last_column="end"),
                      "sequence 'a': end is true at t 0, but later steps follow it"),
        "null order": (dict(data=pa.table({"sequence_id": ["a"], "t": pa.array([None], pa.int64()),
                                           "x": [1.0]})), "column 't' has null values"),
        "not a table": (dict(data=[1, 2]), "expected a pyarrow.Table or a pandas.DataFrame"),
    }
    for name, (arguments, message) in cases.items():
        arguments = {"chunk_steps": 2} | arguments
        with pytest.raises(InputError) as raised:
            pack(arguments.pop("data"), **arguments)
        assert message in str(raised.value), name


def test_pack_command_reads_csv_and_parquet_and_exits_2_on_bad_input(tmp_path):
    rng = np.random.default_rng(5)
    whole, table = long_format(rng, [2, 8, 13, 30])
    raw = tmp_path / "raw"
    raw.mkdir()
    # The ids look like numbers: CSV must keep them as text ("007", not 7).
    table = table.set_column(0, "sequence_id", pc_map(table["sequence_id"],
                                                      lambda key: "00" + key[-1]))
    whole = {"00" + key[-1]: value for key, value in whole.items()}
    half = table.num_rows // 2
    with pa.CompressedOutputStream(str(raw / "part-1.csv.gz"), "gzip") as compressed:
        pacsv.write_csv(table.slice(0, half), compressed)
    pq.write_table(table.slice(half), str(raw / "part-2.parquet"))

    out = tmp_path / "chunks"
    result = seqcarry("pack", "--input", str(raw / "part-1.csv.gz"), str(raw / "*.parquet"),
                      "--output", str(out), "--chunk-steps", "3", "--features", "f0,f1",
                      "--rows-per-file", "5")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    chunks = sum(-(-len(value) // 3) for value in whole.values())
    assert {key: summary[key] for key in ("inputs", "sequences", "chunks", "steps",
                                          "feature_columns", "first_chunk_index")} == {
        "inputs": 2, "sequences": 4, "chunks": chunks, "steps": table.num_rows,
        "feature_columns": ["f0", "f1"], "first_chunk_index": {}}
    assert len(summary["files"]) == -(-chunks // 5)
    assert all(os.path.basename(name).startswith("pack-") for name in summary["files"])
    assert sorted(map(str, out.iterdir())) == sorted(summary["files"])
    check_round_trip(pq.read_table(str(out)), whole, 3)
    assert error_line(result).startswith(f"seqcarry: ok: packed {table.num_rows} steps of 4 "
                                         f"sequences into {chunks} chunks")
    # A folder reads its CSV and Parquet files; packing again adds files, never replaces.
    again = seqcarry("pack", "--input", str(raw), "--output", str(out), "--chunk-steps", "3")
    assert again.returncode == 0, again.stderr
    assert len(list(out.iterdir())) == len(summary["files"]) + len(
        json.loads(again.stdout)["files"])

    duplicated = raw / "dup.csv"
    duplicated.write_text("sequence_id,t,f0\na,0,1.5\na,1,2.5\na,1,3.5\n")
    missing = raw / "missing.csv"
    missing.write_text("sequence_id,time,f0\na,0,1.5\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    expected = {
        (str(missing),): (2, f"{missing}: order column 't' not found; the columns are "
                             "sequence_id, time, f0"),
        (str(duplicated),): (2, "sequence 'a' has t 1 more than once"),
        (str(tmp_path / "nothing*.csv"),): (2, "no file matches"),
        (str(raw / "part-1.csv.gz"), "--chunk-steps", "0"): (2, "chunk_steps must be"),
        (str(raw / "part-1.csv.gz"), "--output", str(blocker / "sub")): (3, "cannot write"),
    }
    for args, (code, message) in expected.items():
        bad = seqcarry("pack", "--output", str(tmp_path / "bad"), "--chunk-steps", "2",
                       "--input", *args)
        assert bad.returncode == code, (args, bad.stderr[-2000:])
        assert message in error_line(bad) and "Traceback" not in bad.stderr, (
            args, bad.stderr[-2000:])
        assert error_line(bad).startswith("seqcarry: error: ")


def pc_map(column, function):
    return pa.array([function(value) for value in column.to_pylist()], pa.string())


def test_packing_with_the_state_appends_to_what_runs_applied(tmp_path):
    """Pack the first part of each sequence, run; pack the rest with --state, run: the
    committed outputs equal Keras on each whole sequence."""
    from transforms.reference import keras_whole_sequence

    rng = np.random.default_rng(11)
    model = make_model(str(tmp_path / "m.keras"), 2, (5,), 3)
    whole, _ = long_format(rng, [1, 6, 9, 17, 40])
    whole["late"] = rng.normal(size=(7, 2)).astype(np.float32)  # only in the second part
    cut = {key: len(value) // 2 for key, value in whole.items()}
    cut["late"] = 0
    first = {key: value[:cut[key]] for key, value in whole.items() if cut[key]}
    second = {key: value[cut[key]:] for key, value in whole.items() if cut[key] < len(value)}
    ended = rng.normal(size=(4, 2)).astype(np.float32)  # ends in the first run
    gap = rng.normal(size=(6, 2)).astype(np.float32)  # its chunk 0 never arrives

    def long_table(parts, start_of, last=()):
        rows = [(key, 10 * (start_of.get(key, 0) + step), *features)
                for key, value in parts.items() for step, features in enumerate(value)]
        order = rng.permutation(len(rows))
        columns = list(zip(*[rows[i] for i in order]))
        table = pa.table({"sequence_id": pa.array(columns[0], pa.string()),
                          "t": pa.array(columns[1], pa.int64()),
                          "f0": pa.array(columns[2], pa.float32()),
                          "f1": pa.array(columns[3], pa.float32())})
        return table.append_column("end", pa.array(
            [key in last and t == 10 * (len(parts[key]) - 1) for key, t in
             zip(columns[0], columns[1])]))

    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(long_table(first | {"ended": ended}, {}, last={"ended"}),
                   str(raw / "first.parquet"))
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")
    packed = seqcarry("pack", "--input", str(raw / "first.parquet"), "--output",
                      str(tmp_path / "chunks-1"), "--chunk-steps", "4", "--features",
                      "f0,f1", "--last-column", "end", "--state", state)
    assert packed.returncode == 0, packed.stderr
    assert json.loads(packed.stdout)["state_snapshot"] is None  # no commit there yet
    gap_chunks = pack(long_table({"gap": gap}, {}), chunk_steps=2, feature_columns=["f0", "f1"])
    pq.write_table(gap_chunks.filter(pc.not_equal(gap_chunks["chunk_index"], 0)),
                   str(tmp_path / "chunks-1" / "gap.parquet"))  # chunks 1, 2: they wait
    common = ["--model", model, "--state", state, "--outputs", outputs]
    run = seqcarry("run", *common, "--chunks", str(tmp_path / "chunks-1"), "--run-id", "r1")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["chunks_deferred"] == 2

    pq.write_table(long_table(second | {"gap": gap[:1]}, cut | {"gap": 9}),
                   str(raw / "second.parquet"))
    packed = seqcarry("pack", "--input", str(raw / "second.parquet"), "--output",
                      str(tmp_path / "chunks-2"), "--chunk-steps", "3",
                      "--features", "f0,f1", "--state", state)
    assert packed.returncode == 0, packed.stderr
    summary = json.loads(packed.stdout)
    assert summary["state_snapshot"] == "r1"
    assert summary["first_chunk_index"] == {
        key: -(-cut[key] // 4) for key in first if key in second} | {"gap": 3}
    assert "event=pack_after_pending sequences=1 first='gap'" in packed.stderr
    run = seqcarry("run", *common, "--chunks", str(tmp_path / "chunks-2"), "--run-id", "r2")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["chunks_rejected"], report["chunks_deferred"]) == (0, 1)  # gap's

    reference = keras_whole_sequence(model)
    produced, carried = results.committed_outputs(state), results.committed_states(state)
    for key, features in (whole | {"ended": ended}).items():
        expected_outputs, expected_states = reference(features)
        np.testing.assert_allclose(produced[key], expected_outputs, atol=1e-5, err_msg=key)
        if key != "ended":
            for got, want in zip(carried[key].tensors, expected_states):
                np.testing.assert_allclose(got, np.ravel(want), atol=1e-5, err_msg=key)
    assert carried["ended"].closed

    # More steps for the sequence that ended: refused, naming it.
    pq.write_table(long_table({"ended": ended[:1]}, {"ended": 4}), str(raw / "more.parquet"))
    refused = seqcarry("pack", "--input", str(raw / "more.parquet"), "--output",
                       str(tmp_path / "chunks-3"), "--chunk-steps", "3", "--state", state)
    assert refused.returncode == 2, refused.stderr
    assert "1 sequence(s) ended in the committed snapshot r2" in error_line(refused)
    assert "'ended'" in error_line(refused)
    with pytest.raises(InputError, match="drop their rows or give them new sequence ids"):
        pack_files([str(raw / "more.parquet")], str(tmp_path / "chunks-3"), chunk_steps=3,
                   state=state, feature_columns=["f0", "f1"])
    assert not (tmp_path / "chunks-3").exists()
