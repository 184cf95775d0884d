"""A reward over HTTP: `HttpReward`, the client that ``--reward http://host:port/score`` builds, and the wire
format it shares with the server ``diffrl serve-reward NAME`` (`diffrl.rewards.serve`). The reward then runs in
its own process, dependency environment or machine (GenEval's mmdet stack beside a modern torch, say).

    from diffrl.rewards.http import HttpReward
    reward = HttpReward("http://127.0.0.1:8000/score", batch_size=32, timeout=60, retries=3)
    out = reward(images, layouts)       # a Reward like any other: rewards [B] and info, on the images' device

Wire format: JSON in UTF-8 both ways; images as PNG (portable, 8-bit) or safetensors (lossless float); nothing
is ever pickled, so a request can carry data but never code.

    POST /score   {"layouts": [{"prompt": str, "phrases": [str, ...], "boxes": [[x0, y0, x1, y1], ...]}, ...],
                   "images": ["<base64 PNG>", ...]}          8-bit RGB, one per layout, all of one size
              or, in place of "images",
                   "safetensors": "<base64 safetensors file>"  its one tensor "images": float [B, 3, H, W] in [0, 1]
        200 →     {"rewards": [B numbers], "info": {name: {"dtype": "float32", "shape": [B, ...], "data": nested lists}}}
        else →    {"error": "one line"}: 400 malformed request, 404 unknown path, 411 no Content-Length, 413 body over
                  the server's limit, 422 the reward raised on this batch, 500 a server bug
    GET /health → {"status": "ok", "reward": NAME, "max_request_bytes": N}

The layouts are `Layout`'s JSONL fields. Rewards and info values that are NaN or ±inf are written as Python's
``json`` writes them (``NaN``, ``Infinity``); everything else is strict JSON.

The client asks ``/health`` when it is built (a server that is not there fails before any work, and the answer
says the server's byte limit), sends at most ``batch_size`` images per request, and halves a request that would
pass that limit. A request that cannot connect, times out, is dropped, or gets a 5xx is
tried again after 0.5, 1, 2, … s (``retries`` times, ≤ 10 s each wait); after that `RewardUnavailable` is raised,
which `GuardedReward` (training) turns into "every sample of this batch invalid, the run goes on" and which an
unguarded caller (an evaluation) prints as one line. A 4xx is the request's fault and is not retried: it raises
a RuntimeError with the server's line, so `GuardedReward` bisects the batch to the samples the reward fails on,
exactly as for a reward in this process.

Why the standard library (``http.client`` here, ``http.server`` in the server) and not requests/FastAPI: two
endpoints with JSON bodies need nothing more, a reward environment then needs no web stack beside the
detector's own dependencies, and the client never goes through an ``http_proxy`` from the environment (urllib
and requests would), which for a reward on loopback or a cluster network is the right default.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import time
from typing import Any, Sequence
from urllib.parse import urlsplit

import torch
from torch import Tensor

from diffrl.errors import UserError
from diffrl.layout import Layout, LayoutError
from diffrl.registry import REWARDS
from diffrl.rewards.base import Reward, RewardOutput, RewardUnavailable, check_inputs
from diffrl.rewards.guard import cat_outputs, error_line

FORMATS = ("png", "safetensors")
DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32",
                                                  "int16", "int8", "uint8", "bool")}
MAX_SIDE = 8192  # pixels per image side the server decodes at most (a small PNG can unpack to gigabytes) …
MAX_PIXELS = 2**26  # … and pixels per request (64 images of 1024²: 0.8 GB as float32)


class BadRequest(ValueError):
    """A request the server cannot read; its message is the one line sent back with a 400."""


# ------------------------------------------------------------------------------------------------ the wire

def encode_request(images: Tensor, layouts: Sequence[Layout], image_format: str = "png") -> bytes:
    """images float [B, 3, H, W] in [0, 1] + layouts → the JSON body of ``POST /score``."""
    body: dict[str, Any] = {"layouts": [layout.to_dict() for layout in layouts]}
    images = images.detach().float().cpu()
    if image_format == "png":
        from PIL import Image

        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        encoded = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(array, "RGB").save(buffer, format="PNG", compress_level=1)
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        body["images"] = encoded
    elif image_format == "safetensors":
        from safetensors.torch import save

        body["safetensors"] = base64.b64encode(save({"images": images.contiguous()})).decode("ascii")
    else:
        raise UserError(f"reward.http_format: one of {', '.join(FORMATS)}, got {image_format!r}")
    return json.dumps(body).encode()


def decode_request(body: bytes) -> tuple[Tensor, list[Layout]]:
    """The server's side of `encode_request` → (images float [B, 3, H, W] in [0, 1], layouts); BadRequest
    (one line) for anything else: not JSON, missing or extra fields, a bad layout, an unreadable image."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"the body is not JSON ({err})") from None
    except RecursionError:
        raise BadRequest("the body is JSON nested too deep to read") from None
    if not isinstance(request, dict) or not isinstance(request.get("layouts"), list):
        raise BadRequest('expected a JSON object with "layouts": [...] and "images": [...] or "safetensors": "..."')
    unknown = set(request) - {"layouts", "images", "safetensors"}
    if unknown or ("images" in request) == ("safetensors" in request):
        raise BadRequest(f'expected "layouts" and exactly one of "images" / "safetensors", got {sorted(request)}')
    layouts = []
    for i, item in enumerate(request["layouts"]):
        try:
            layouts.append(Layout.from_dict(item))
        except (LayoutError, TypeError) as err:
            raise BadRequest(f"layouts[{i}]: {err}") from None
    if "images" in request:
        images = _decode_pngs(request["images"])
    else:
        images = _decode_safetensors(request["safetensors"])
    if images.shape[0] != len(layouts):
        raise BadRequest(f"got {images.shape[0]} images but {len(layouts)} layouts")
    if images.shape[0] == 0:
        raise BadRequest("no images to score")
    return images, layouts


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise BadRequest(f"{what}: expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"{what}: not base64 ({err})") from None


def _decode_pngs(items: Any) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(items, list):
        raise BadRequest('"images" must be a list of base64 PNG strings')
    tensors, pixels = [], 0
    for i, text in enumerate(items):
        data = _b64(text, f"images[{i}]")
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:  # PNG only: no other decoder is exposed
                pixels += image.size[0] * image.size[1]
                if max(image.size) > MAX_SIDE:
                    raise BadRequest(f"images[{i}]: {image.size[0]}×{image.size[1]} pixels, over {MAX_SIDE} a side")
                if pixels > MAX_PIXELS:
                    raise BadRequest(f"images[:{i + 1}] hold over {MAX_PIXELS} pixels; send fewer images per request "
                                     "(reward.http_batch)")
                image.load()
                array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
                tensors.append(array.view(image.size[1], image.size[0], 3).permute(2, 0, 1).float() / 255)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            if isinstance(err, BadRequest):
                raise
            raise BadRequest(f"images[{i}]: not a readable PNG ({error_line(err)})") from None
        if tensors[-1].shape != tensors[0].shape:
            raise BadRequest(f"images[{i}] is {tuple(tensors[-1].shape[1:])} but images[0] is "
                             f"{tuple(tensors[0].shape[1:])}; send images of one size per request")
    return torch.stack(tensors) if tensors else torch.zeros(0, 3, 1, 1)


def _decode_safetensors(text: Any) -> Tensor:
    from safetensors.torch import load

    try:
        tensors = load(_b64(text, "safetensors"))
    except BadRequest:
        raise
    except Exception as err:  # noqa: BLE001  (safetensors raises its own error types for a bad header)
        raise BadRequest(f"safetensors: not a readable safetensors file ({error_line(err)})") from None
    images = tensors.get("images")
    if set(tensors) != {"images"} or images is None:
        raise BadRequest(f'safetensors: expected one tensor "images", got {sorted(tensors)}')
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise BadRequest(f"safetensors: images must be float [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if max(images.shape[2:]) > MAX_SIDE:
        raise BadRequest(f"safetensors: images of {tuple(images.shape[2:])} pixels, over {MAX_SIDE} a side")
    return images.float()


def _tensor_json(value: Tensor) -> dict:
    value = value.detach().cpu()
    return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape), "data": value.tolist()}


def encode_response(out: RewardOutput) -> bytes:
    """A reward's output → the JSON body of a 200 (rewards and each info tensor as nested lists)."""
    rewards = out.rewards.detach().float().cpu().tolist()
    return json.dumps({"rewards": rewards, "info": {k: _tensor_json(v) for k, v in out.info.items()}}).encode()


def decode_response(body: bytes, n: int) -> RewardOutput:
    """The client's side of `encode_response`, for a request of ``n`` images; ValueError if it is not one."""
    response = json.loads(body)
    rewards = torch.tensor(response["rewards"], dtype=torch.float32)
    if rewards.shape != (n,):
        raise ValueError(f"{tuple(rewards.shape)} rewards for {n} images")
    info = {}
    for key, item in response.get("info", {}).items():
        dtype = DTYPES[item["dtype"]]
        info[key] = torch.tensor(item["data"], dtype=dtype).reshape(item["shape"])
        if info[key].shape[:1] != (n,):
            raise ValueError(f"info {key!r} of shape {tuple(info[key].shape)} for {n} images")
    return RewardOutput(rewards, info)


def check_url(url: str) -> str:
    """``http(s)://host[:port][/path]`` (path default /score) → the URL; a UserError saying the form otherwise."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise UserError(f"--reward {url}: a reward server is named by its URL, http://host:port/score (no query); "
                        "start one with `diffrl serve-reward NAME --port PORT`")
    return url if parts.path not in ("", "/") else f"{parts.scheme}://{parts.netloc}/score"


# ---------------------------------------------------------------------------------------------- the client

@REWARDS.register("http")
class HttpReward(Reward):
    """The reward a `diffrl serve-reward` server at ``url`` computes. ``batch_size``: images per request;
    ``timeout``: seconds for one request's answer; ``retries``: further tries of a request that got no answer
    or a 5xx, after 0.5, 1, 2, … s; ``image_format``: "png" (8-bit, portable) or "safetensors" (lossless).
    ``check``: ask the server's /health now (with the same retries), so a server that is not there fails in one
    line before any work rather than at the first batch."""

    name = "http"

    def __init__(self, url: str, batch_size: int = 32, timeout: float = 60.0, retries: int = 3,
                 image_format: str = "png", backoff: float = 0.5, check: bool = True):
        self.url = check_url(url)
        if batch_size < 1 or timeout <= 0 or retries < 0 or backoff < 0:
            raise UserError(f"reward.http_batch ≥ 1, reward.http_timeout > 0, reward.http_retries ≥ 0; got "
                            f"{batch_size}, {timeout}, {retries}")
        if image_format not in FORMATS:
            raise UserError(f"reward.http_format: one of {', '.join(FORMATS)}, got {image_format!r}")
        self.batch_size, self.timeout, self.retries, self.backoff = batch_size, timeout, retries, backoff
        self.image_format = image_format
        parts = urlsplit(self.url)
        self._connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._path = parts.hostname, parts.port, parts.path
        self._health_path = parts.path.rsplit("/", 1)[0] + "/health"  # beside /score, also behind a path prefix
        self._limit: int | None = None  # the server's max_request_bytes, once /health has said it
        if check:
            try:
                self._limit = self._health(self._call("GET", self._health_path, None))
            except RuntimeError as err:  # it answered, with a 4xx
                raise UserError(f"{self.url} is not a diffrl reward server: {err}") from None

    def __call__(self, images: Tensor, layouts: Sequence[Layout]) -> RewardOutput:
        check_inputs(images, layouts)
        layouts = list(layouts)
        if not layouts:
            return RewardOutput(torch.zeros(0, device=images.device))
        outputs = [self._score(images[i: i + self.batch_size], layouts[i: i + self.batch_size])
                   for i in range(0, len(layouts), self.batch_size)]
        out = cat_outputs(outputs)
        return RewardOutput(out.rewards.to(images.device), {k: v.to(images.device) for k, v in out.info.items()})

    def _score(self, images: Tensor, layouts: list[Layout]) -> RewardOutput:
        body = encode_request(images, layouts, self.image_format)
        limit = self._server_limit()
        if limit is not None and len(body) > limit:
            if len(layouts) == 1:
                raise RuntimeError(f"reward server {self.url}: one image makes a request of {len(body)} bytes, over "
                                   f"its limit of {limit}; start it with a larger --max-request-mb"
                                   + (" or use reward.http_format=png" if self.image_format != "png" else ""))
            half = len(layouts) // 2
            return cat_outputs([self._score(images[:half], layouts[:half]), self._score(images[half:], layouts[half:])])
        data = self._call("POST", self._path, body)
        try:
            return decode_response(data, len(layouts))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise RuntimeError(f"reward server {self.url} answered something that is not a diffrl reward response "
                               f"({error_line(err)}); is it `diffrl serve-reward`?") from None

    def _request(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        connection = self._connection(self._host, self._port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def _health(self, data: bytes) -> int:
        """The byte limit per request from a /health answer; a UserError if it is not a diffrl reward server's."""
        try:
            health = json.loads(data)
            assert health["status"] == "ok"
            return int(health["max_request_bytes"])
        except (ValueError, KeyError, TypeError, AssertionError):
            raise UserError(f"{self.url} is not a diffrl reward server: its {self._health_path} answered "
                            f"{data[:80]!r}; start one with `diffrl serve-reward NAME`") from None

    def _server_limit(self) -> int | None:
        """The server's byte limit per request (asked once; None while it cannot be asked)."""
        if self._limit is None:
            try:
                status, data = self._request("GET", self._health_path, None, min(self.timeout, 10.0))
                if status == 200:
                    self._limit = self._health(data)
            except (OSError, http.client.HTTPException, UserError):
                pass  # a server that is down is found out, and retried, by the request itself
        return self._limit

    def _call(self, method: str, path: str, body: bytes | None) -> bytes:
        """The answer to a request, retrying what may pass (no connection, a timeout, a 5xx); a 4xx raises at once."""
        start, last = time.monotonic(), ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 10.0))
            try:
                status, data = self._request(method, path, body, self.timeout)
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, dropped mid-answer
                last = error_line(err)
                continue
            if status == 200:
                return data
            message = _error_message(data)
            if status >= 500 or status == 429:
                last = f"HTTP {status}: {message}"
                continue
            hint = f"; lower reward.http_batch (now {self.batch_size})" if status == 413 else ""
            raise RuntimeError(f"reward server {self.url} answered HTTP {status}: {message}{hint}")
        raise RewardUnavailable(f"reward server {self.url} did not answer after {self.retries + 1} tries in "
                                f"{time.monotonic() - start:.1f} s (last: {last}); start it with `diffrl "
                                "serve-reward NAME` or raise reward.http_retries / reward.http_timeout")


def _error_message(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"]).splitlines()[0]
    except (ValueError, KeyError, TypeError, IndexError):
        text = data[:200].decode("utf-8", "replace").strip()
        return text.splitlines()[0] if text else "(no message)"
