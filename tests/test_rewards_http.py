"""A reward over HTTP: `HttpReward` against `diffrl serve-reward` gives the in-process reward's numbers; garbage
gets a 4xx and the server keeps serving; a server killed mid-run leaves the run going, its samples counted
invalid until it returns. Servers bind to 127.0.0.1 on a free port and stop by themselves."""

import base64
import http.client
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import diffrl.algos.trainer as trainer
from diffrl.cli import main
from diffrl.errors import UserError
from diffrl.rewards import HttpReward, ShapesReward, build_reward, parse_reward_spec
from diffrl.rewards.base import RewardUnavailable
from diffrl.rewards.guard import GuardedReward, is_unavailable
from diffrl.rewards.http import encode_request
from diffrl.rewards.serve import make_server
from diffrl.shapes.world import render, sample_layouts

ROOT = Path(__file__).resolve().parents[1]


class Served:
    """A reward served from a thread of this process; ``stop`` closes its port (clients are refused), ``start``
    opens the same port again."""

    def __init__(self, reward=None, port: int = 0, **kwargs):
        self.reward, self.kwargs = reward or ShapesReward(), kwargs
        self.port = port
        self.start()

    def start(self):
        self.server = make_server(self.reward, name="shapes", port=self.port, quiet=True, **self.kwargs)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/score"


@pytest.fixture
def served():
    server = Served()
    yield server
    server.stop()


def assert_same_output(got, expected):
    assert torch.equal(got.rewards, expected.rewards)
    assert got.info.keys() == expected.info.keys()
    for key, value in expected.info.items():
        assert got.info[key].dtype == value.dtype and torch.equal(got.info[key], value), key


@pytest.mark.parametrize("image_format", ["png", "safetensors"])
def test_http_reward_gives_the_in_process_rewards_and_info(served, image_format):
    layouts = sample_layouts(7, [2, 3, 5], seed=4)  # instance counts differ between requests: info padded as in-process
    images = render(layouts, size=32)
    if image_format == "png":  # PNG carries 8 bits: the same numbers as in-process on 8-bit images
        images = (images * 255).round() / 255
    reward = build_reward(served.url, None, http=dict(batch_size=3, image_format=image_format))
    assert isinstance(reward, HttpReward)
    assert_same_output(reward(images, layouts), ShapesReward()(images, layouts))
    # a composite with a server part: the server's verdicts stand for the composite's, its value is a part
    composite = build_reward(f"shapes=1,{served.url}=0.5", None, http=dict(image_format=image_format))
    out = composite(images, layouts)
    expected = ShapesReward()(images, layouts).rewards
    torch.testing.assert_close(out.rewards, 1.5 * expected)
    assert torch.equal(out.info[f"part/{served.url}"], expected)


def test_reward_specs_name_a_server_by_its_url():
    assert parse_reward_spec("http://127.0.0.1:8000/score") == [("http://127.0.0.1:8000/score", 1.0)]
    assert parse_reward_spec("shapes=1,https://rewards.lan/geneval=0.5") == [("shapes", 1.0),
                                                                            ("https://rewards.lan/geneval", 0.5)]
    assert HttpReward("http://127.0.0.1:8000", check=False).url == "http://127.0.0.1:8000/score"  # path default /score
    for spec, message in (("http", "name the reward server by its URL"), ("http://:8000/score", "http://host:port/score"),
                          ("http://h:port/score", "http://host:port/score")):
        with pytest.raises(UserError, match=message):
            parse_reward_spec(spec)
    with pytest.raises(UserError, match="--reward-model is for rewards with a detector"):
        build_reward("http://127.0.0.1:8000/score", "shapes")


def post(port: int, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/score", body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def raw_post(port: int, head: str, body: bytes) -> tuple[int, dict, float]:
    """Send ``head`` (request line and headers) and a few body bytes, then read whatever comes back."""
    tic = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1]), time.monotonic() - tic


def png_b64(image: torch.Tensor, cut: int | None = None) -> str:
    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()[:cut]).decode()


def test_garbage_gets_a_4xx_and_the_next_good_request_is_served():
    """Against the real command (`diffrl serve-reward` in its own process), which stops by itself."""
    command = [sys.executable, "-m", "diffrl.cli", "serve-reward", "shapes", "--port", "0", "--max-request-mb", "1",
               "--stop-after", "120", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        line = server.stdout.readline()
        assert line.startswith("serving reward shapes on http://127.0.0.1:"), (line, server.stderr.read())
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        layouts = sample_layouts(3, [2, 3], seed=1)
        images = (render(layouts, size=32) * 255).round() / 255
        good = encode_request(images, layouts)
        lay = [layout.to_dict() for layout in layouts]
        status, body = post(port, good)
        assert status == 200
        garbage = {
            "bad JSON": b'{"layouts": [',
            "JSON nested too deep": b"[" * 100_000,
            "a pickle": pickle.dumps({"layouts": lay}),  # never unpickled: it is not JSON
            "a truncated PNG": json.dumps({"layouts": lay[:1], "images": [png_b64(images[0], cut=60)]}).encode(),
            "not base64": json.dumps({"layouts": lay[:1], "images": ["%%%"]}).encode(),
            "fewer images than layouts": json.dumps({"layouts": lay, "images": [png_b64(images[0])]}).encode(),
            "a bad layout": json.dumps({"layouts": [{"prompt": "x", "phrases": ["a"], "boxes": [[0, 0, 2, 1]]}],
                                        "images": [png_b64(images[0])]}).encode(),
            "a bad safetensors": json.dumps({"layouts": lay[:1], "safetensors": base64.b64encode(b"\x08" * 16).decode()}).encode(),
            "no images field": json.dumps({"layouts": lay}).encode(),
        }
        for what, request in garbage.items():
            status, answer = post(port, request)
            assert status == 400, what
            assert answer["error"] and "\n" not in answer["error"], what
        assert "not a readable PNG" in post(port, garbage["a truncated PNG"])[1]["error"]
        assert "images but" in post(port, garbage["fewer images than layouts"])[1]["error"]
        # 100 MB announced, a few bytes sent: refused at once, the body never read
        status, answer, seconds = raw_post(port, "POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000", b"\0" * 1000)
        assert status == 413 and "over this server's limit" in answer["error"] and seconds < 10
        status, answer, _ = raw_post(port, "POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", b"5\r\nhello")
        assert status == 411
        assert post(port, good) == (200, body)  # still serving, and the same answer
        # a client reward splits its batch under the server's byte limit (1 MiB here), rather than getting a 413
        big = torch.rand(4, 3, 192, 192)  # 0.6 MB per image in base64: one per request
        big_layouts = sample_layouts(4, [2], seed=0)
        got = HttpReward(f"http://127.0.0.1:{port}/score", image_format="safetensors")(big, big_layouts)
        assert_same_output(got, ShapesReward()(big, big_layouts))
    finally:
        server.kill()
        server.wait(timeout=30)


def test_serve_reward_needs_only_what_the_rewards_import():
    """A reward's own environment may lack torchrl, diffusers and Ray: serve-reward never imports them."""
    code = ("import sys; from diffrl.cli import main; "
            "main(['serve-reward', 'shapes', '--port', '0', '--stop-after', '0.2', '--quiet']); "
            "print(sorted(m for m in ('torchrl', 'diffusers', 'transformers', 'ray', 'diffrl.algos', 'diffrl.envs', "
            "'diffrl.policies') if m in sys.modules))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("serving reward shapes on http://127.0.0.1:"), lines
    assert lines[1] == "[]"


def test_a_dead_server_marks_the_whole_batch_in_one_call_and_is_one_line_unguarded(served):
    url = served.url
    with pytest.raises(UserError, match=r"is not a diffrl reward server: .* HTTP 404: no /elsewhere/health here"):
        HttpReward(url.replace("/score", "/elsewhere/score"))  # something answers, but not a reward server
    served.stop()
    with pytest.raises(RewardUnavailable, match=r"did not answer after 2 tries"):  # built: asks /health at once
        HttpReward(url, retries=1, backoff=0.05)
    reward = HttpReward(url, retries=2, backoff=0.05, check=False)
    layouts = sample_layouts(6, [2], seed=0)
    images = render(layouts, size=16)
    with pytest.raises(RewardUnavailable, match=r"did not answer after 3 tries .*ConnectionRefusedError"):
        reward(images, layouts)

    class Counted(HttpReward):
        calls = 0

        def __call__(self, images, layouts):
            Counted.calls += 1
            return super().__call__(images, layouts)

    guard = GuardedReward(Counted(url, retries=2, backoff=0.05, check=False))
    out = guard(images, layouts)
    assert torch.isnan(out.rewards).all() and Counted.calls == 1  # no bisection: one round of retries for the batch
    errors = guard.take_errors()
    assert len(errors) == 6 and all(is_unavailable(line) for line in errors)
    served.start()  # back on the same port: the same client scores again
    assert torch.equal(reward(images, layouts).rewards, ShapesReward()(images, layouts).rewards)


class RaisesOnTriangles(ShapesReward):
    def __call__(self, images, layouts):
        if any(layout.phrases[0].endswith("triangle") for layout in layouts):
            raise ValueError("detector crashed on this image")
        return super().__call__(images, layouts)


def test_a_reward_that_raises_on_the_server_marks_exactly_those_samples_as_in_process():
    served = Served(RaisesOnTriangles())
    try:
        layouts = sample_layouts(8, [2, 3], seed=5)
        bad = [layout.phrases[0].endswith("triangle") for layout in layouts]
        assert 0 < sum(bad) < len(bad)  # the seed gives both
        images = render(layouts, size=32)
        guard = GuardedReward(HttpReward(served.url, image_format="safetensors"))
        out = guard(images, layouts)
        local = GuardedReward(RaisesOnTriangles())(images, layouts)
        assert torch.equal(out.rewards.isnan(), torch.tensor(bad))
        assert torch.equal(out.rewards.nan_to_num(), local.rewards.nan_to_num())
        errors = guard.take_errors()
        assert len(errors) == sum(bad) and not any(is_unavailable(line) for line in errors)
        assert errors[0].endswith("HTTP 422: the reward raised on this batch: ValueError: detector crashed on this image")
    finally:
        served.stop()


def test_the_docs_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "rewards_remote.md").read_text(), re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/rewards_remote.md", "exec"), {})


def small_config(tmp_path, **extra) -> str:
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({
        "env": {"layouts_per_iter": 2, "group_size": 2, "num_steps": 3, "levels": [3, 4]},
        "eval": {"layouts": 4, "batch_size": 4, "grid": 4, "levels": [2]},
        "reward": {"http_retries": 1, **extra}}))  # one retry after 0.5 s: a dead server costs 0.5 s per batch
    return str(config)


def test_a_reward_server_killed_mid_run_leaves_the_run_going(tmp_path, saved_generator, monkeypatch, capsys, served,
                                                             one_thread):
    """Killed after iteration 1's rollout, back after iteration 3's: iterations 2 and 3 count every sample invalid
    and skip their update, and the run finishes with its final evaluation on the returned server."""
    drop_invalid = trainer._drop_invalid

    def drop_and_switch(rollout, errors, events, iteration):
        if iteration == 0:
            served.stop()
        if iteration == 2:
            served.start()
        return drop_invalid(rollout, errors, events, iteration)

    monkeypatch.setattr(trainer, "_drop_invalid", drop_and_switch)
    run = tmp_path / "run"
    assert main(["train", "--model", str(saved_generator), "--algo", "grpo", "--iterations", "4", "--out", str(run),
                 "--reward", served.url, "--config", small_config(tmp_path), "--quiet"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2, 3, 4]
    for line in (lines[0], lines[3]):
        assert line["invalid_samples"] == 0 and line["reward_errors"] == 0 and line["reward_mean"] > 0
        assert "loss_objective" in line and "train_isr" in line  # the server's verdicts reach the metrics
    for line in lines[1:3]:
        assert line["invalid_samples"] == 4 and line["reward_errors"] == 4
        assert "reward_mean" not in line and "loss_objective" not in line
        assert "RewardUnavailable" in line["events"][0] and "update was skipped" in line["events"][-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["reward"] > 0 and summary["base"]["reward"] > 0
    assert "RewardUnavailable" in capsys.readouterr().err


def test_a_reward_server_that_stays_down_stops_the_run_in_one_line_and_resume_finishes_it(
        tmp_path, saved_generator, monkeypatch, capsys, served, one_thread):
    """Down from the first iteration: the run stops after reward.max_down_iterations=2 in one line naming --resume.
    Resumed while it is still down: one line before any work. Back, then gone again at the final evaluation: one
    line saying the weights are saved; back again: --resume writes summary.json."""
    evaluate = trainer.evaluate

    def evaluate_then_stop(*args, **kwargs):  # the server goes down right after the base evaluation
        result = evaluate(*args, **kwargs)
        if kwargs.get("desc") == "eval base":
            served.stop()
        return result

    monkeypatch.setattr(trainer, "evaluate", evaluate_then_stop)
    run = tmp_path / "run"
    args = ["train", "--model", str(saved_generator), "--iterations", "2", "--out", str(run), "--reward", served.url,
            "--config", small_config(tmp_path, max_down_iterations=2), "--quiet", "checkpoint_every=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()  # each iteration's events, then the one error line
    assert err[-1].startswith("diffrl: error: iterations 1–2: the reward was unreachable on every sample"), err
    assert f"--resume {run}" in err[-1] and "RewardUnavailable" in err[-1]
    assert all(line.startswith("diffrl: iteration ") for line in err[:-1])
    assert not (run / "summary.json").exists()

    assert main(["train", "--resume", str(run), "--quiet"]) == 2  # still down: the client's /health check says so
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"diffrl: error: reward server {served.url} did not answer after 2"), err

    def stop_then_evaluate(*args, **kwargs):  # back for the start, gone for the final evaluation
        if kwargs.get("desc") == "eval final":
            served.stop()
        return evaluate(*args, **kwargs)

    served.start()
    monkeypatch.setattr(trainer, "evaluate", stop_then_evaluate)
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffrl: error: final evaluation: reward server"), err
    assert f"--resume {run} evaluates them" in err[0]
    served.start()
    monkeypatch.setattr(trainer, "evaluate", evaluate)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["final"]["reward"] > 0


@pytest.mark.parametrize("override, message", [
    (("reward.runtime_env", "pip"), "config reward.runtime_env: expected a mapping"),
    (("reward.runtime_env", {"env_vars": {"A": "b"}}), "add --reward-workers N"),
    (("reward.http_batch", 0), "reward.http_batch ≥ 1"),
    (("reward.http_format", "jpeg"), "'png' or 'safetensors'"),
    (("reward.max_down_iterations", 0), "reward.max_down_iterations ≥ 1"),
])
def test_bad_reward_settings_are_one_line(override, message):
    from diffrl.config import build_config

    with pytest.raises(UserError, match=message):
        build_config(overrides=[override])
