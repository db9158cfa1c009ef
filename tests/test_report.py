"""The run history report and `seqcarry inspect` on the demo's messy three-run history:
the plots hold the run reports' numbers, the HTML stands alone, and the CLI answers."""
import base64
import json
import os
import re
import subprocess
import sys

import matplotlib.colors
import pytest

import storage
from pipeline import report
from pipeline.demo import run_demo

SEQCARRY = os.path.join(os.path.dirname(sys.executable), "seqcarry")


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("demo") / "demo")
    assert run_demo(workdir, sequences=16, beam_args=["--direct_running_mode=in_memory"]) < 1e-5
    return os.path.join(workdir, "state")


def reports(state):
    store = storage.StateStore(state)
    return [store.report(m.run_id, m.attempt) for m in reversed(store.history())]


def test_rows_and_plots_hold_the_numbers_of_the_run_reports(history):
    rows, runs = report.history_rows(history), reports(history)
    assert [r["run_id"] for r in rows] == ["demo-run-1", "demo-run-2", "demo-run-3"]
    for row, run in zip(rows, runs):
        for column in report.COLUMNS:
            assert row[column] == run[column]
    assert sum(r["chunks_rejected"] for r in rows) == 3  # the demo's messy input
    assert sum(r["chunks_deferred"] for r in rows) > 0

    plots = report.figures(rows)
    chunks, throughput, live, dead = (plots[t].axes[0] for t in plots)
    heights = [bar.get_height() for bar in chunks.patches]  # category by category
    assert heights == [row[c] for c in report.CATEGORIES for row in rows]
    # One colour per category and reason, the same in every chart; small counts visible.
    assert chunks.get_yscale() == "log"
    for container, category in zip(chunks.containers, report.CATEGORIES):
        assert {bar.get_facecolor() for bar in container} == {
            matplotlib.colors.to_rgba(report.COLOURS[category])}
    assert live.lines[1].get_color() == report.COLOURS["chunks_pending_total"] == \
        report.COLOURS["chunks_deferred"]
    assert list(throughput.lines[0].get_ydata()) == [r["steps_per_second"] for r in runs]
    assert list(live.lines[0].get_ydata()) == [r["sequences_live"] for r in runs]
    assert list(live.lines[1].get_ydata()) == [r["chunks_pending_total"] for r in runs]
    by_reason = {}
    for run in runs:
        for reason, count in run["chunks_rejected_by_reason"].items():
            by_reason[reason] = by_reason.get(reason, 0) + count
    labels = [text.get_text() for text in dead.get_legend().get_texts()]
    for label, container in zip(labels, dead.containers):
        assert container[0].get_facecolor() == matplotlib.colors.to_rgba(
            report.REASON_COLOURS[label])
    totals = {label: sum(bar.get_height() for bar in container)
              for label, container in zip(labels, dead.containers)}
    assert totals == by_reason


def test_html_report_is_self_contained(history):
    page = report.html_page(history, report.history_rows(history))
    images = re.findall(r'<img alt="[^"]+" src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert not re.search(r'src="(?!data:)', page)  # nothing fetched from elsewhere
    # Each run links to its dead-letter files.
    letters = [path for run in reports(history) for path in run["dead_letters"]]
    assert letters and re.findall(r'href="file://([^"]+)"', page) == letters
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)'
                                r'</script>', page, re.S).group(1))
    assert data == report.history_rows(history)


def seqcarry(*args):
    return subprocess.run([SEQCARRY, *args], capture_output=True, text=True, timeout=300)


def test_report_and_inspect_commands(history, tmp_path):
    html = tmp_path / "runs.html"
    done = seqcarry("report", "--state", history, "--html", str(html))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "demo-run-3" in done.stdout and html.read_text().startswith("<!doctype html>")

    shown = seqcarry("inspect", "--state", history, "--sequence", "seq-00003", "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    details = json.loads(shown.stdout)
    applied = [i for run in details["runs"] for i in run["chunks"]]
    assert applied == list(range(details["next_chunk_index"]))
    assert details["steps_seen"] == sum(run["steps"] for run in details["runs"])
    text = seqcarry("inspect", "--state", history, "--sequence", "seq-00003")
    assert "|layer0_h| =" in text.stdout and "runs that applied its chunks" in text.stdout

    missing = seqcarry("inspect", "--state", history, "--sequence", "no-such-sequence")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith(
        "seqcarry: error: sequence 'no-such-sequence' is in no committed run")
    empty = seqcarry("report", "--state", str(tmp_path / "nothing"))
    assert empty.returncode == 2 and "has no committed run" in empty.stderr


def test_snapshots_and_rollback_commands(tmp_path):
    run_demo(str(tmp_path / "demo"), sequences=6,
             beam_args=["--direct_running_mode=in_memory"])
    state = str(tmp_path / "demo" / "state")
    def snapshots():
        listed = seqcarry("snapshots", "--state", state)
        assert listed.returncode == 0, listed.stderr
        return [(line.startswith("*"), line.lstrip("* ").split()[0],
                 line.split("  ")[-1].strip()) for line in listed.stdout.splitlines()[1:]]

    assert snapshots() == [(True, "demo-run-3", "current"), (False, "demo-run-2", "ancestor"),
                           (False, "demo-run-1", "ancestor")]  # newest first
    back = seqcarry("rollback", "--state", state, "--to", "demo-run-2")
    assert back.returncode == 0 and back.stdout.strip() == \
        "CURRENT moved from demo-run-3 to demo-run-2"
    # The snapshot rolled back from is still listed: one can roll forward to it.
    assert snapshots() == [(True, "demo-run-2", "current"),
                           (False, "demo-run-3", "rolled back from"),
                           (False, "demo-run-1", "ancestor")]
    unknown = seqcarry("rollback", "--state", state, "--to", "never")
    assert unknown.returncode == 2 and "never is not a committed snapshot" in unknown.stderr
