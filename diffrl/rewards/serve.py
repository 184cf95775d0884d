"""``diffrl serve-reward NAME``: any registered reward (or weighted parts) served over HTTP, so that it can run in
its own process, dependency environment or machine while `HttpReward` (``--reward http://host:port/score``)
scores through it. The wire format is in `diffrl.rewards.http`.

    diffrl serve-reward gdino --reward-model /models/grounding-dino-tiny --device cuda --port 8000
    diffrl train --reward http://127.0.0.1:8000/score

Built on the standard library's ``http.server.ThreadingHTTPServer`` (why: see `diffrl.rewards.http`). Requests
are read in parallel threads and scored one at a time (a lock: a model is not assumed thread-safe). It binds to
127.0.0.1 unless told otherwise; it has no authentication, so another host is for trusted networks only.

What it refuses, each with one line in ``{"error": ...}`` and without stopping:
- a body over ``max_request_bytes`` (Content-Length is read first: 413, and the body is never read), a body
  without a Content-Length (411), one that ends early or stalls past ``read_timeout`` seconds (400 / 408);
- not JSON, missing or extra fields, a bad layout, a truncated or non-PNG image, images of mixed sizes, an
  image over 8192 pixels a side or over 2²⁶ pixels in one request, a count of images that is not the count of
  layouts (400);
- a batch the reward raises on (422, with the reward's error line; GPU out-of-memory included).
Nothing in a request is ever unpickled: images are PNG or safetensors, layouts JSON.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from diffrl.errors import UserError
from diffrl.rewards.base import Reward
from diffrl.rewards.guard import error_line
from diffrl.rewards.http import BadRequest, decode_request, encode_response

DEFAULT_MAX_REQUEST_MB = 64


class RewardHTTPServer(ThreadingHTTPServer):
    """An HTTP server holding one reward. ``daemon_threads``: a stalled client never keeps the process alive."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], reward: Reward, *, name: str, device: str = "cpu",
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_MB * 2**20, read_timeout: float = 60.0,
                 quiet: bool = False):
        self.reward, self.name, self.device = reward, name, torch.device(device)
        self.max_request_bytes, self.read_timeout, self.quiet = max_request_bytes, read_timeout, quiet
        self.lock = threading.Lock()  # one scoring at a time
        super().__init__(address, RewardHandler)

    def handle_error(self, request, client_address) -> None:  # a bug in a handler: one line, and keep serving
        err = sys.exc_info()[1]
        print(f"diffrl serve-reward: error serving {client_address[0]}: {error_line(err)}", file=sys.stderr)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/score"


class RewardHandler(BaseHTTPRequestHandler):
    server: RewardHTTPServer
    server_version = "diffrl-serve-reward"

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # socket timeout for every read of this connection
        super().setup()

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._send(404, {"error": f"no {self.path} here: GET /health, POST /score"})
        self._send(200, {"status": "ok", "reward": self.server.name, "max_request_bytes": self.server.max_request_bytes})

    def do_POST(self) -> None:
        start = time.monotonic()
        self._unread = True  # the body is still in the socket until read below
        if self.path != "/score":
            return self._send(404, {"error": f"no {self.path} here: POST /score, GET /health"})
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or self.headers.get("Content-Length") is None:
            return self._send(411, {"error": "send a Content-Length header (chunked bodies are not read)"})
        try:
            length = int(self.headers["Content-Length"])
            if length < 0:
                raise ValueError
        except ValueError:
            return self._send(400, {"error": f"Content-Length {self.headers['Content-Length']!r} is not a byte count"})
        if length > self.server.max_request_bytes:  # refused before reading a byte of it
            return self._send(413, {"error": f"a body of {length} bytes is over this server's limit of "
                                             f"{self.server.max_request_bytes} (--max-request-mb); send fewer images "
                                             "per request (reward.http_batch)"})
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            return self._send(408, {"error": f"the body did not arrive within {self.server.read_timeout:g} s"})
        self._unread = False
        if len(body) < length:
            return self._send(400, {"error": f"the body ended after {len(body)} of {length} bytes"})
        try:
            images, layouts = decode_request(body)
        except BadRequest as err:
            return self._send(400, {"error": str(err)})
        try:
            with self.server.lock, torch.no_grad():
                out = self.server.reward(images.to(self.server.device), layouts)
        except Exception as err:  # noqa: BLE001  (the reward's failure is this batch's answer, not the server's end)
            return self._send(422, {"error": f"the reward raised on this batch: {error_line(err)}"})
        try:
            answer = encode_response(out)
        except Exception as err:  # noqa: BLE001  (a reward whose output breaks the contract: say so, keep serving)
            return self._send(500, {"error": f"the reward's output cannot be sent: {error_line(err)}"})
        self._send(200, answer, note=f"{len(layouts)} images, {time.monotonic() - start:.2f} s")

    def _send(self, status: int, payload: dict | bytes, note: str = "") -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self._note = note or (payload.get("error", "") if isinstance(payload, dict) else "")
        if status != 200:
            self.close_connection = True  # an unread body must not be taken for the next request
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status != 200:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            if getattr(self, "_unread", False):
                self._linger()
        except OSError:  # the client left before its answer: nothing to tell it
            self.close_connection = True

    def _linger(self, max_bytes: int = 2**20, seconds: float = 0.5) -> None:
        """Closing a socket with an unread body resets the connection, and the client may lose the answer just sent
        (Apache's "lingering close"): say we are done writing, then drain a bounded amount for a bounded time."""
        self.connection.shutdown(socket.SHUT_WR)
        self.connection.settimeout(seconds)
        deadline, drained = time.monotonic() + seconds, 0
        while drained < max_bytes and time.monotonic() < deadline:
            chunk = self.connection.recv(65536)
            if not chunk:
                break
            drained += len(chunk)

    def log_request(self, code="-", size="-") -> None:
        if not self.server.quiet:
            note = getattr(self, "_note", "")
            sys.stderr.write(f"diffrl serve-reward: {self.address_string()} {self.command} {self.path} {code}"
                             f"{' (' + note + ')' if note else ''}\n")

    def log_message(self, format: str, *args) -> None:  # http.server's own lines (bad request lines, timeouts)
        if not self.server.quiet:
            sys.stderr.write(f"diffrl serve-reward: {self.address_string()} {format % args}\n")


def make_server(reward: Reward, *, name: str, host: str = "127.0.0.1", port: int = 0, device: str = "cpu",
                max_request_bytes: int = DEFAULT_MAX_REQUEST_MB * 2**20, read_timeout: float = 60.0,
                quiet: bool = False) -> RewardHTTPServer:
    """A bound (not yet serving) server; ``port`` 0 takes a free one (see ``server.url``). Call
    ``serve_forever()``, and ``shutdown()`` + ``server_close()`` to stop it."""
    try:
        return RewardHTTPServer((host, port), reward, name=name, device=device, max_request_bytes=max_request_bytes,
                                read_timeout=read_timeout, quiet=quiet)
    except OSError as err:
        raise UserError(f"cannot serve on {host}:{port}: {err.strerror or err}; pick another --port or --host") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(server: RewardHTTPServer, stop_after: float = 0.0) -> None:
    """Serve until interrupted, or for ``stop_after`` seconds when > 0; the socket is closed either way."""
    timer = threading.Timer(stop_after, server.shutdown) if stop_after > 0 else None
    try:
        if timer is not None:
            timer.daemon = True
            timer.start()
        server.serve_forever(poll_interval=0.2)
    finally:
        if timer is not None:
            timer.cancel()
        server.server_close()
