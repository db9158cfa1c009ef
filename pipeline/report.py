"""The run history report (``seqcarry report``): a table and plots of every committed
run, as text or as one self-contained HTML file (plots embedded as PNG)."""
from __future__ import annotations

import base64
import html
import io
import itertools
import json

import storage
from schemas.contract import InputError
from schemas.validation import FILE_REASONS, READ_REASONS
from transforms.sequencing import PLAN_REASONS

CATEGORIES = ("chunks_processed", "chunks_deferred", "chunks_skipped_duplicate",
              "chunks_rejected")
REASONS = FILE_REASONS + READ_REASONS + PLAN_REASONS
COLUMNS = ("run_id", "chunks_read", *CATEGORIES, "files_rejected", "chunks_pending_total",
           "sequences_live", "steps_processed", "steps_per_second", "seconds", "outputs_at")
# One colour per thing, the same in every chart: pending chunks are deferred ones, and
# each rejection reason keeps its colour whichever runs are shown.
COLOURS = {"chunks_processed": "#2e7d32", "chunks_deferred": "#1565c0",
           "chunks_skipped_duplicate": "#757575", "chunks_rejected": "#c62828",
           "chunks_pending_total": "#1565c0", "sequences_live": "#2e7d32",
           "steps_per_second": "#6a1b9a"}
REASON_COLOURS = dict(zip(REASONS, itertools.cycle(["#b71c1c", "#e65100", "#f9a825", "#827717", "#33691e",
                                    "#006064", "#01579b", "#1a237e", "#4a148c", "#880e4f",
                                    "#3e2723", "#ff6f00", "#5d4037", "#c2185b", "#0097a7",
                                    "#7cb342", "#8e24aa", "#546e7a"])))


def history_rows(state_url: str) -> list[dict]:
    """One row per committed run, oldest first: its report's numbers."""
    store = storage.StateStore(state_url)
    rows = []
    for manifest in reversed(store.history()):
        report = store.report(manifest.run_id, manifest.attempt)
        rows.append({"run_id": manifest.run_id, "created_at": manifest.created_at,
                     **{column: report.get(column, 0) for column in COLUMNS[1:]},
                     # runs from before --outputs-at wrote every step's outputs
                     "outputs_at": report.get("outputs_at") or "every",
                     # a file rejected whole is one dead letter, as a record is
                     "rejected_by_reason": {**report.get("chunks_rejected_by_reason", {}),
                                            **report.get("files_rejected_by_reason", {})},
                     "dead_letters": report.get("dead_letters", [])})
    return rows


def text_table(rows: list[dict]) -> str:
    """The history as aligned columns."""
    table = [COLUMNS] + [tuple(str(row[c]) for c in COLUMNS) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in table)


def figures(rows: list[dict]) -> dict:
    """The four plots of the report, by title (matplotlib Figures)."""
    try:
        import matplotlib
    except ImportError as missing:  # an extra: workers never need it
        raise InputError("the report's plots need matplotlib: pip install "
                         "'seqcarry[report]' (or matplotlib)") from missing
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [row["run_id"] for row in rows]
    positions = list(range(len(rows)))
    plots = {}

    def new(title, ylabel, counts=True):
        figure, axes = plt.subplots(figsize=(12, 3.6), dpi=100)
        if counts:
            axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(title, fontsize=12, loc="left")
        axes.set_ylabel(ylabel)
        axes.set_xticks(positions, runs, rotation=30 if len(runs) > 4 else 0,
                        ha="right" if len(runs) > 4 else "center", fontsize=9)
        axes.grid(axis="y", alpha=0.3)
        axes.spines[["top", "right"]].set_visible(False)
        plots[title] = figure
        return axes

    def grouped(axes, series: dict[str, tuple[list[int], str]]):
        """Bars side by side on a log scale, each labelled with its count: a handful of
        rejected chunks stays visible beside a million processed ones."""
        width = 0.8 / max(1, len(series))
        for number, (label, (values, colour)) in enumerate(series.items()):
            offsets = [p - 0.4 + width * (number + 0.5) for p in positions]
            bars = axes.bar(offsets, values, width=width, label=label, color=colour)
            axes.bar_label(bars, labels=[str(v) if v else "" for v in values], fontsize=7)
        if any(any(values) for values, _ in series.values()):
            axes.set_yscale("log")
            axes.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
        else:
            axes.text(0.5, 0.5, "none in these runs", transform=axes.transAxes,
                      ha="center", color="grey")

    grouped(new("Chunks read, by what happened to them", "chunks (log scale)", counts=False),
            {c.removeprefix("chunks_").replace("_", " "): ([row[c] for row in rows],
                                                           COLOURS[c]) for c in CATEGORIES})
    axes = new("Throughput", "steps per second", counts=False)
    axes.plot(positions, [row["steps_per_second"] for row in rows], marker="o",
              color=COLOURS["steps_per_second"])
    axes.set_ylim(bottom=0)
    axes = new("Live sequences and pending chunks after each run", "count")
    axes.plot(positions, [row["sequences_live"] for row in rows], marker="o", label="live",
              color=COLOURS["sequences_live"])
    axes.plot(positions, [row["chunks_pending_total"] for row in rows], marker="s",
              linestyle="--", label="pending chunks", color=COLOURS["chunks_pending_total"])
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    reasons = [r for r in REASONS if any(row["rejected_by_reason"].get(r) for row in rows)]
    grouped(new("Dead letters, by reason", "dead letters (log scale)", counts=False),
            {r: ([row["rejected_by_reason"].get(r, 0) for row in rows], REASON_COLOURS[r])
             for r in reasons})
    for figure in plots.values():
        figure.tight_layout()
    return plots


def html_page(state_url: str, rows: list[dict]) -> str:
    """One self-contained HTML page: the table, the plots as embedded PNGs, and the
    plotted numbers as JSON (``<script id="report-data">``)."""
    images = []
    for title, figure in figures(rows).items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        encoded = base64.b64encode(buffer.getvalue()).decode()
        images.append(f'<figure><img alt="{html.escape(title)}" '
                      f'src="data:image/png;base64,{encoded}"></figure>')
    header = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS) + "<th>dead letters</th>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(row[c]))}</td>" for c in COLUMNS)
                   + f"<td>{_links(row['dead_letters'])}</td></tr>" for row in rows)
    data = json.dumps(rows).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>seqcarry runs: {html.escape(state_url)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ margin: 1.5em 0; }}
figure img {{ width: 100%; height: auto; }}
</style></head><body>
<h1>seqcarry run history</h1>
<p>State: <code>{html.escape(state_url)}</code>, {len(rows)} committed runs, oldest first.</p>
<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>
{''.join(images)}
<script type="application/json" id="report-data">{data}</script>
</body></html>
"""


def _links(paths: list[str]) -> str:
    """Links to a run's dead-letter files (in the Cloud console for gs://)."""
    def href(path: str) -> str:
        if path.startswith("gs://"):
            return "https://console.cloud.google.com/storage/browser/_details/" + path[5:]
        return "file://" + path
    return " ".join(f'<a href="{html.escape(href(path))}">{html.escape(path.rsplit("/", 1)[-1])}'
                    "</a>" for path in paths) or "-"
