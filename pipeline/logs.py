"""What seqcarry prints on stderr: ``--quiet``, the default, ``--verbose``.

* default: seqcarry's progress lines (``event=...``), warnings, the run's summary line;
* ``--quiet``: errors and the summary line only;
* ``--verbose``: everything TensorFlow (its C++ runtime included) and Beam log, workers
  included, at INFO.

Python loggers are set in the launcher by :func:`configure`. What is written to stderr
without the launcher's logging is filtered line by line: TensorFlow's C++ runtime (its
start-up lines ignore ``TF_CPP_MIN_LOG_LEVEL``, in every process that imports it) and
the SDK worker processes of ``--direct_running_mode=multi_processing``, which never see
pipeline options such as ``--default_sdk_harness_log_level`` (they log
``Pipeline_options: {}``) and print at INFO to the stderr they inherit. The ``seqcarry``
command points its stderr (file descriptor 2, which its subprocesses inherit) at a small
filter process that drops those lines (:func:`claim_stderr`); only this stdlib module
runs there (``python -I -S pipeline/logs.py MODE``). ``--verbose`` filters nothing.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import subprocess
import sys
import time

QUIET, DEFAULT, VERBOSE = "quiet", "default", "verbose"
FORMAT = "%(asctime)s %(name)s %(message)s"  # seqcarry's own lines

# Loggers whose warnings are not for seqcarry's users, outside --verbose.
_NOISY = (
    "google.auth",  # "Compute Engine Metadata server unavailable" off GCP, before ADC
    "tensorflow",   # tf.function retracing and other advice for TensorFlow developers
    # a worker's log records, sent back over the Fn API and logged again (as
    # "Worker: severity: WARN timestamp {...}") beside what the worker printed itself
    "apache_beam.runners.portability.local_job_service",
    "apache_beam.utils.subprocess_server",  # "Really starting service at ..." (Prism)
)
# Loggers that repeat, with a traceback, an error the command reports in one line
# (``--debug`` shows its traceback): a DoFn's exception, logged for each try.
_REPEATING = ("apache_beam.runners.common",)
_BEAM_IMPORT_WARNING = "apitools not found"  # logged on the root logger by `import apache_beam`

_claimed = False  # set by claim_stderr(): this process is the `seqcarry` command
_filter: tuple[subprocess.Popen, int] | None = None


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _HoldBeamImportWarning(logging.Filter):
    """Keeps Beam's import-time warning back until :func:`configure` knows the mode."""

    held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if _BEAM_IMPORT_WARNING in str(record.msg):
            self.held.append(record)
            return False
        return True


# pipeline.cli imports this module before Beam (pipeline.options imports it).
logging.getLogger().addFilter(_HoldBeamImportWarning())


def _basic_config_handler(handler: logging.Handler) -> bool:
    """Whether ``handler`` is the one logging.basicConfig() adds (Beam's import-time
    warning, logged with logging.warning(), adds it)."""
    return (type(handler) is logging.StreamHandler
            and handler.stream in (sys.stderr, sys.__stderr__)
            and getattr(handler.formatter, "_fmt", None) == logging.BASIC_FORMAT)


def mode_of(quiet: bool, verbose: bool) -> str:
    return QUIET if quiet else VERBOSE if verbose else DEFAULT


def configure(mode: str) -> logging.Logger:
    """Set up stderr for ``mode`` before TensorFlow or Beam is imported; returns the
    ``seqcarry`` logger. Safe to call again (tests call ``cli.main`` in-process)."""
    # Read by TensorFlow's C++ runtime when it loads, here and in every worker process
    # started after this (they inherit the environment); 3 also hides "failed call to
    # cuInit" where no GPU is. A value the user set wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if mode == VERBOSE else "3")
    if _claimed and mode != VERBOSE:
        _filter_stderr(mode)

    # A root handler in place of basicConfig's, before TensorFlow is imported (which
    # would otherwise add its own to the "tensorflow" logger).
    root = logging.getLogger()
    for handler in [h for h in root.handlers
                    if getattr(h, "_seqcarry", False) or _basic_config_handler(h)]:
        root.removeHandler(handler)
    handler = _Stderr()
    handler._seqcarry = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    root.addHandler(handler)
    root.setLevel({QUIET: logging.ERROR, DEFAULT: logging.WARNING}.get(mode, logging.INFO))
    held, _HoldBeamImportWarning.held[:] = list(_HoldBeamImportWarning.held), []
    if mode == VERBOSE:
        for record in held:
            root.callHandlers(record)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.NOTSET if mode == VERBOSE else logging.ERROR)
    for name in _REPEATING:
        logging.getLogger(name).setLevel(logging.NOTSET if mode == VERBOSE
                                         else logging.CRITICAL)
    logging.captureWarnings(mode == QUIET)  # Python's warnings, as WARNING records

    # seqcarry's own lines (planning, progress, commit) as key=value pairs.
    logger = logging.getLogger("seqcarry")
    for handler in [h for h in logger.handlers if getattr(h, "_seqcarry", False)]:
        logger.removeHandler(handler)
    handler = _Stderr()
    handler._seqcarry = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.propagate = False  # the root handler would print each line again
    logger.setLevel(logging.ERROR if mode == QUIET else logging.INFO)
    return logger


def claim_stderr() -> None:
    """Called by the ``seqcarry`` command only (not by ``cli.main`` run in-process):
    :func:`configure` may then filter this process's file descriptor 2."""
    global _claimed
    _claimed = True


def _filter_stderr(mode: str) -> None:
    global _filter
    if _filter is not None:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        return  # no stderr to filter
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__),
                                    mode], stdin=read_end, stdout=saved, stderr=saved)
    except (OSError, ValueError):  # unfiltered stderr, not a failed command
        for fd in (read_end, write_end, saved):
            os.close(fd)
        return
    os.close(read_end)
    os.dup2(write_end, 2)  # inheritable: the subprocesses started from now on write here
    os.close(write_end)
    _filter = (process, saved)
    atexit.register(release_stderr)  # after Beam's exit handlers (stopping its servers)


def release_stderr(wait_seconds: float = 3.0) -> None:
    """Give file descriptor 2 back and let the filter print what it still holds (it
    exits when every process writing to it has: this one, and any left over)."""
    global _filter
    if _filter is None:
        return
    process, saved = _filter
    _filter = None
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(saved, 2)
    os.close(saved)
    try:
        process.wait(wait_seconds)
    except subprocess.TimeoutExpired:
        pass


# The filter process: stdlib only, compiled once per line kind.
_TF_CPP = (
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    rb"STDERR",
    rb"[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ",  # absl: I0000 00:00:1796...
    rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] \S+:\d+\] ",  # older TensorFlow's format
    rb"To enable the following instructions: .* rebuild TensorFlow",
)
_WORKER_CHATTER = (  # basicConfig's LEVEL:logger:message, printed by SDK worker processes
    rb"(DEBUG|INFO):(?!seqcarry[.:])",
    rb"WARNING:root:" + _BEAM_IMPORT_WARNING.encode(),
    rb"WARNING:__main__:No semi_persistent_directory found",
    rb"WARNING:google\.auth\.",
    rb"WARNING:tensorflow:",
)
_DROP = {
    DEFAULT: re.compile(b"|".join(_TF_CPP + _WORKER_CHATTER)),
    QUIET: re.compile(b"|".join(_TF_CPP + _WORKER_CHATTER + (rb"(INFO|WARNING):",))),
}
_WORKER_SEQCARRY = re.compile(rb"INFO:seqcarry(?:\.[\w.]+)?:")


def _run_filter(mode: str) -> None:
    """Copy stdin to stdout line by line, without the lines ``mode`` drops; a worker's
    ``INFO:seqcarry:...`` line is written the way the launcher writes its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the command, not its stderr
    drop = _DROP[mode]
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    for line in iter(source.readline, b""):
        if drop.match(line):
            continue
        seqcarry = _WORKER_SEQCARRY.match(line)
        if seqcarry:
            now = time.time()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            line = b"%s,%03d seqcarry %s" % (stamp.encode(), int(now * 1000) % 1000,
                                              line[seqcarry.end():])
        try:
            sink.write(line)
            sink.flush()
        except OSError:  # nobody reads stderr any more: keep draining, so writers go on
            pass


if __name__ == "__main__":
    _run_filter(sys.argv[1])
