"""``make bench`` case: the launcher's planning of a run (``plan_run``) on gs://.

fake-gcs-server (tests/gcs.py) holds a small Keras model, a committed state (1,000
sequences, from ``import-state``) and ``files`` Parquet chunk files; the clients talk to
it through a :class:`tests.gcs.FaultProxy` that delays every request by ``delay``
seconds. Measured, for two row counts per file over the same number of files:

* wall seconds of ``plan_run`` (issue: at most 10 s for 10,000 files at 50 ms/request);
* the launcher's memory: tracemalloc's peak over a second, traced ``plan_run``, and
  RSS before, at its highest during (sampled every 5 ms), and after the timed one
  (issue: independent of the number of rows);
* the requests through the proxy: listings, requests naming an input object, and how
  many of those read one (``alt=media``) -- the launcher should read only the
  listing, CURRENT, the parent manifest and the model, never an input file.

The files are uploaded straight to the emulator (not through the proxy), many at once.
Imports (TensorFlow, Keras) are done before the timing.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import gc
import io
import json
import os
import re
import tempfile
import threading
import time
import tracemalloc
import urllib.parse
import urllib.request
from typing import Iterator, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

FILES, DELAY = 10_000, 0.05
ROWS_PER_FILE = (1, 50)
STEPS, INPUT_DIM, UNITS = 4, 4, 8  # each row: a chunk of 4 steps x 4 features
SNAPSHOT_SEQUENCES = 1_000
BUCKET = "planning"
UPLOAD_THREADS = 32
TARGET_SECONDS = 10.0


def _rss() -> int:
    """This process's resident set size, in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """The highest RSS seen while in the ``with`` block (sampled every 5 ms)."""

    def __enter__(self) -> "_PeakRss":
        self.peak, self._done = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


@contextlib.contextmanager
def _restored_environment(keys: Sequence[str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _chunk_file(number: int, rows: int, rng: np.random.Generator) -> bytes:
    """One input file: ``rows`` chunks, each of its own sequence."""
    import pyarrow.parquet as pq

    from schemas import Chunk, chunks_to_table

    features = rng.normal(size=(rows, STEPS, INPUT_DIM)).astype(np.float32)
    table = chunks_to_table([Chunk(f"seq-{number:06d}-{row:04d}", 0, features[row])
                             for row in range(rows)])
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _upload(base: str, bucket: str, name: str, data: bytes) -> None:
    """One object, straight to the emulator (JSON API, simple upload)."""
    url = (f"{base}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
           f"{urllib.parse.quote(name, safe='')}")
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()


def upload_chunk_files(base: str, bucket: str, prefix: str, files: int, rows: int) -> float:
    """Write and upload ``files`` chunk files under ``prefix``; returns the seconds."""
    started = time.perf_counter()

    def one(number: int) -> None:
        data = _chunk_file(number, rows, np.random.default_rng(number))
        _upload(base, bucket, f"{prefix}chunks-{number:06d}.parquet", data)

    with concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        for _ in pool.map(one, range(files)):
            pass
    return time.perf_counter() - started


def _seed(base: str, root: str) -> tuple[str, str]:
    """Upload the model and commit a first state; returns (model URL, state URL)."""
    from pipeline.demo import make_model
    from pipeline.importer import import_state
    from transforms.models import ModelOptions, load_model

    local_model = make_model(os.path.join(root, "model.keras"), input_dim=INPUT_DIM,
                             units=(UNITS,), output_dim=2, seed=0)
    model = f"gs://{BUCKET}/model/model.keras"
    with open(local_model, "rb") as handle:
        _upload(base, BUCKET, "model/model.keras", handle.read())
    stack = load_model(local_model)  # also: Keras and TensorFlow imported before timing
    rng = np.random.default_rng(1)
    source = os.path.join(root, "snapshot.npz")
    np.savez(source, sequence_id=np.array([f"old-{n:06d}" for n in range(SNAPSHOT_SEQUENCES)]),
             next_chunk_index=np.ones(SNAPSHOT_SEQUENCES, np.int64),
             **{name: rng.normal(0, 0.1, (SNAPSHOT_SEQUENCES, size)).astype(np.float32)
                for name, size in zip(stack.state_names, stack.state_sizes)})
    state = f"gs://{BUCKET}/state"
    import_state(model, ModelOptions(), state, source, run_id="seed")
    return model, state


def classify(requests: Sequence[tuple[str, str]], bucket: str, prefix: str) -> dict:
    """Counts of ``requests`` (method, path): listings, requests naming one input file
    (an object of ``bucket`` under ``prefix``: its metadata, a listing probing it as a
    directory, a read) and those of them reading it (``input_reads``), requests naming
    any other object, and the rest."""
    counts = collections.Counter(total=len(requests))
    for method, path in requests:
        split = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        counts[f"method_{method}"] += 1
        where = re.search(r"/b/([^/]+)/o(?:/(.+))?$", split.path)
        if where is None:
            counts["other"] += 1
            continue
        in_bucket = urllib.parse.unquote(where.group(1)) == bucket
        if where.group(2) is None:  # a listing
            listed = query.get("prefix", [""])[0].rstrip("/")
            if in_bucket and listed.startswith(prefix) and listed.endswith(".parquet"):
                counts["input_object_requests"] += 1  # gcsfs asking "is it a directory?"
            else:
                counts["listings"] += 1
        elif in_bucket and urllib.parse.unquote(where.group(2)).startswith(prefix):
            counts["input_object_requests"] += 1
            if method == "GET" and query.get("alt") == ["media"]:
                counts["input_reads"] += 1
        else:
            counts["other_objects"] += 1
    for key in ("listings", "input_object_requests", "input_reads", "other_objects", "other"):
        counts.setdefault(key, 0)
    return dict(counts)


def measure(config, proxy, bucket: str, prefix: str) -> dict:
    """Time one ``plan_run`` (RSS around it, requests through ``proxy``), then run it
    again under tracemalloc for the peak of Python allocations."""
    from pipeline.build import plan_run

    gc.collect()
    first = len(proxy.seen)
    rss_before = _rss()
    with _PeakRss() as rss:
        started = time.perf_counter()
        plan = plan_run(config)
        seconds = time.perf_counter() - started
    rss_after = _rss()
    requests = classify(proxy.seen[first:], bucket, prefix)
    files, rows = len(getattr(plan, "chunk_files", ())), getattr(plan, "chunk_rows", None)
    del plan
    gc.collect()
    tracemalloc.start()
    try:
        plan_run(config)
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    mib = 2**20
    return {"seconds": seconds, "files_planned": files, "rows_planned": rows,
            "tracemalloc_peak_mib": traced_peak / mib, "rss_before_mib": rss_before / mib,
            "rss_peak_mib": rss.peak / mib, "rss_after_mib": rss_after / mib,
            "rss_growth_mib": (rss.peak - rss_before) / mib, "requests": requests}


def bench_planning(files: int = FILES, delay: float = DELAY,
                   rows_per_file: Sequence[int] = ROWS_PER_FILE) -> dict:
    """``plan_run`` over ``files`` chunk files on gs:// behind ``delay`` s/request, once
    per entry of ``rows_per_file``; see the module's docstring."""
    from pipeline.options import RunConfig
    from tests import gcs

    cases = []
    env_keys = [*gcs.CLIENT_ENV, "STORAGE_EMULATOR_HOST", "CLOUD_STORAGE_EMULATOR_ENDPOINT"]
    with (_restored_environment(env_keys), tempfile.TemporaryDirectory() as root,
          gcs.emulator() as base):
        gcs.point_clients_at(base)
        gcs.create_bucket(base, BUCKET)
        model, state = _seed(base, root)
        uploads = {}
        for rows in rows_per_file:
            # A bucket each: the emulator's uploads slow down as a bucket fills.
            gcs.create_bucket(base, f"{BUCKET}-{rows}-rows")
            uploads[rows] = upload_chunk_files(base, f"{BUCKET}-{rows}-rows", "in/", files, rows)
        with gcs.FaultProxy(base, delay_seconds=delay) as proxy:
            gcs.point_clients_at(proxy.url)
            for rows in rows_per_file:
                config = RunConfig(model=model, chunks=f"gs://{BUCKET}-{rows}-rows/in/",
                                   state=state, outputs=f"gs://{BUCKET}/out",
                                   run_id=f"plan-{rows}")
                case = {"rows_per_file": rows, "files": files, "rows": files * rows,
                        "chunks": config.chunks[0], "upload_seconds": uploads[rows]}
                cases.append(case | measure(config, proxy, f"{BUCKET}-{rows}-rows", "in/"))
    worst = max(case["seconds"] for case in cases)
    peaks = [case["tracemalloc_peak_mib"] for case in cases]
    return {"files": files, "delay_seconds": delay, "snapshot_sequences": SNAPSHOT_SEQUENCES,
            "cases": cases, "seconds": worst, "target_seconds": TARGET_SECONDS,
            "tracemalloc_peak_mib": max(peaks),
            # how much more the launcher held for more rows (1.0: memory ignores rows)
            "peak_ratio": max(peaks) / max(min(peaks), 1e-9),
            "input_reads": sum(case["requests"]["input_reads"] for case in cases),
            "met": worst <= TARGET_SECONDS
                   and all(case["requests"]["input_object_requests"] == 0 for case in cases)}


def summary_line(result: dict) -> str:
    return (f"planning {result['files']:,} files on gs:// ({result['delay_seconds'] * 1000:.0f} "
            f"ms/request): {result['seconds']:.1f} s, peak {result['tracemalloc_peak_mib']:.1f} "
            f"MiB (target <= {result['target_seconds']:.0f} s); input files read: "
            f"{result['input_reads']:,} requests (target 0)")


def table(result: dict) -> str:
    head = (f"{'rows/file':>9}{'rows':>10}{'upload s':>10}{'plan s':>9}{'traced MiB':>12}"
            f"{'RSS +MiB':>10}{'requests':>10}{'listings':>10}{'input obj':>11}{'reads':>8}")
    lines = [head]
    for case in result["cases"]:
        r = case["requests"]
        lines.append(f"{case['rows_per_file']:>9}{case['rows']:>10,}{case['upload_seconds']:>10.1f}"
                     f"{case['seconds']:>9.2f}{case['tracemalloc_peak_mib']:>12.1f}"
                     f"{case['rss_growth_mib']:>10.1f}{r['total']:>10,}{r['listings']:>10,}"
                     f"{r['input_object_requests']:>11,}{r['input_reads']:>8,}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.planning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=FILES)
    parser.add_argument("--delay", type=float, default=DELAY, help="seconds per request")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS_PER_FILE),
                        help="rows per file, one case each (default 1 50)")
    args = parser.parse_args(argv)
    result = bench_planning(args.files, args.delay, args.rows)
    print(table(result))
    print(summary_line(result))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
