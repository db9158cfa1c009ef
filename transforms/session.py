"""A model loaded once per worker process, and the per-bundle sessions that run it.

:class:`LoadedModel` is what Beam's ``Shared`` holds: the model description and its
compiled :class:`~transforms.kernel.StepKernel`, shared by every DoFn instance and
thread of a process. A bundle opens a :class:`StepSession` on it in ``start_bundle``
and closes it in ``finish_bundle``; the session runs the bundle's batches, records each
batch's compute time as a Beam distribution, and logs the bundle's tallies when closed.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterator, Sequence

from apache_beam.metrics import Metrics

from transforms.kernel import StepKernel
from transforms.models import ModelError, ModelOptions, RecurrentStack, load_model
from transforms.sequencing import BatchResult, SequenceWork, run_continuous

METRICS_NAMESPACE = "seqcarry"
_LOG = logging.getLogger("seqcarry")


class Progress:
    """Chunks and steps applied in this process, logged at most every few seconds as
    ``event=progress chunks_done=... steps=... steps_per_second=...`` (the launcher
    shows the job's totals from Beam's metrics, where the runner reports them)."""

    def __init__(self, every_seconds: float = 5.0):
        self._every = every_seconds
        self._lock = threading.Lock()
        self._started = self._logged = time.perf_counter()
        self.chunks = self.steps = 0

    def add(self, chunks: int, steps: int) -> None:
        with self._lock:
            self.chunks += chunks
            self.steps += steps
            now = time.perf_counter()
            if now - self._logged < self._every:
                return
            self._logged = now
            rate = self.steps / max(now - self._started, 1e-9)
            _LOG.info("event=progress chunks_done=%d steps=%d steps_per_second=%.0f",
                      self.chunks, self.steps, rate)


class LoadedModel:
    """A model and its compiled kernel, loaded once per process.

    ``expected_fingerprint``: the fingerprint the run was planned with; a model with
    another one (a different file behind the same path since planning) is a
    :class:`~transforms.models.ModelError`, before anything is computed with it.
    ``xla``: the kernel's (see :class:`~transforms.kernel.StepKernel`).
    """

    def __init__(self, model_path: str, window_steps: int,
                 model_options: ModelOptions | None = None,
                 expected_fingerprint: str | None = None, xla: bool | None = None):
        started = time.perf_counter()
        self.stack: RecurrentStack = load_model(model_path, model_options)
        if expected_fingerprint is not None and self.stack.fingerprint != expected_fingerprint:
            raise ModelError(
                f"{model_path} is model {self.stack.fingerprint} on this worker, but the run "
                f"was planned with model {expected_fingerprint}: the file changed after "
                "planning; nothing was committed, run again once it stays put")
        self.kernel = StepKernel(self.stack, window_steps, xla=xla)
        self.load_seconds = time.perf_counter() - started
        self._load_reported = threading.Lock()
        self.progress = Progress()
        # Whether XLA can compile it is decided by the first window that asks for XLA.
        _LOG.info("event=model_loaded fingerprint=%s seconds=%.2f", self.stack.fingerprint,
                  self.load_seconds)

    def open_session(self) -> "StepSession":
        # Metrics need a running step, which setup() is not: the first session of the
        # process reports the load time.
        if self._load_reported.acquire(blocking=False):
            Metrics.distribution(METRICS_NAMESPACE, "model_load_ms").update(
                int(self.load_seconds * 1000))
        return StepSession(self.kernel, self.progress)


class StepSession:
    """One bundle's use of the shared kernel."""

    def __init__(self, kernel: StepKernel, progress: Progress):
        self._kernel = kernel
        self._progress = progress
        self.batches = 0
        self.steps = 0
        self._latency = Metrics.distribution(METRICS_NAMESPACE, "batch_compute_ms")

    def run(self, works: Sequence[SequenceWork], slots: int,
            last_only: bool = False) -> Iterator[BatchResult]:
        """``works`` through the kernel on ``slots`` rows (continuous batching, see
        :func:`~transforms.sequencing.run_continuous`, as is ``last_only``): a result
        per ``slots`` sequences finished, each timed as the ``batch_compute_ms`` metric."""
        started = time.perf_counter()
        for result in run_continuous(self._kernel, works, slots, last_only):
            self._latency.update(int((time.perf_counter() - started) * 1000))
            self.batches += 1
            self.steps += result.steps
            self._progress.add(len(result.outputs), result.steps)
            yield result
            started = time.perf_counter()

    def close(self) -> None:
        _LOG.debug("bundle done: %d batches, %d steps", self.batches, self.steps)
