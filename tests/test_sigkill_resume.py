"""A `diffrl train` process killed with SIGKILL — before its first checkpoint and again mid-run — and resumed
with --resume RUN each time, ends with exactly the metrics and final evaluation of an uninterrupted run.
With ``--learners 2`` the same holds when a learner process is killed too (the run goes on by itself from its last
checkpoint) and the checkpoints are torch.distributed.checkpoint folders the two learners write together.

Everything a checkpoint holds is compared bit for bit, with the default text cache (each string is encoded
on its own, so a resumed process gets the same embeddings as the killed one)."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

TIMING = {"seconds", "rollout_seconds"}
# Runs the CLI with ray.init booby-trapped: an in-process run must never start Ray. (Importing it is
# another matter: torchrl.data imports Ray whenever it is installed.)
NO_RAY = ("import sys, ray; from diffrl.cli import main\n"
          "def trap(*args, **kwargs): raise AssertionError('an in-process run started Ray')\n"
          "ray.init = trap; sys.exit(main(sys.argv[1:]))")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _complete_lines(run) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _kill_when(args, ready, timeout=240, before=None, stderr=subprocess.PIPE):
    """Start `diffrl train`, SIGKILL it as soon as ``ready()`` holds (polled every 5 ms) → its return code.
    ``before(process)``, polled alike until it returns True, comes first (it may kill one of the run's children);
    the processes the run started (a local Ray's) are killed with it."""
    import psutil

    process = subprocess.Popen([sys.executable, "-m", "diffrl.cli", *args], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + timeout
    try:
        for condition in ([lambda: before(process)] if before else []) + [ready]:
            while not condition():
                assert process.poll() is None, f"the run ended before it could be killed: {_stderr(process)}"
                assert time.time() < deadline, "the run never reached the point to kill it at"
                time.sleep(0.005)
        children = psutil.Process(process.pid).children(recursive=True)
        os.kill(process.pid, signal.SIGKILL)
        for child in children:  # by pid: the Ray this run started, nothing else
            child.kill() if child.is_running() else None
        return process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()


def _stderr(process) -> str:
    return process.stderr.read().decode() if hasattr(process.stderr, "read") else "(its stderr went to a file)"


def _resume(run):
    result = subprocess.run([sys.executable, "-m", "diffrl.cli", "train", "--resume", str(run), "--quiet"],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


def test_sigkilled_run_resumes_to_the_uninterrupted_runs_metrics(tmp_path, saved_generator):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"env": {"layouts_per_iter": 2, "group_size": 2, "num_steps": 3},
                                      "eval": {"layouts": 5, "batch_size": 5, "grid": 4}, "checkpoint_every": 1}))
    args = ["train", "--model", str(saved_generator), "--algo", "ppo", "--config", str(config), "--iterations", "5",
            "--quiet"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    result = subprocess.run([sys.executable, "-c", NO_RAY, *args, "--out", str(whole)], env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr

    # 1. killed as soon as the run folder has its config: before any checkpoint (base evaluation or earlier)
    code = _kill_when([*args, "--out", str(part)], lambda: (part / "config.yaml").is_file())
    assert code == -signal.SIGKILL
    assert not list((part / "checkpoints").glob("checkpoint-*.safetensors"))
    # 2. resumed, and killed again the moment iteration 2's metrics line is out (its checkpoint may be half written)
    code = _kill_when(["train", "--resume", str(part), "--quiet"], lambda: _complete_lines(part) >= 2)
    assert code == -signal.SIGKILL
    assert _complete_lines(part) < 5, "the kill came too late to interrupt the run"
    # a torn checkpoint from a kill mid-write: never read, removed on resume
    torn = part / "checkpoints" / ".checkpoint-000004.safetensors.tmp"
    torn.write_bytes(b"\x00" * 100)
    _resume(part)
    assert not torn.exists()

    got, want = _lines(part), _lines(whole)
    assert [line["iteration"] for line in got] == [1, 2, 3, 4, 5]
    assert [{k: v for k, v in line.items() if k not in TIMING} for line in got] == \
           [{k: v for k, v in line.items() if k not in TIMING} for line in want]
    summary = json.loads((part / "summary.json").read_text())
    assert summary["final"] == json.loads((whole / "summary.json").read_text())["final"]
    assert summary["iterations"] == 5


RESTARTS = "the run goes on from its last checkpoint"


def _kill_a_learner(process) -> bool:
    """SIGKILL learner rank 1 (a Ray Train worker process of this run), once one exists → whether it did."""
    import psutil

    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                child.kill()
                return True
        except psutil.NoSuchProcess:
            pass
    return False


def test_two_learners_killed_and_resumed_give_the_uninterrupted_runs_metrics(tmp_path, saved_generator):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"env": {"layouts_per_iter": 2, "group_size": 2, "num_steps": 3},
                                      "eval": {"layouts": 5, "batch_size": 5, "grid": 4}, "checkpoint_every": 1,
                                      "algo": {"minibatch_size": 3}}))  # minibatches of 3 and 1 rows: uneven shards
    args = ["train", "--model", str(saved_generator), "--algo", "ppo", "--config", str(config), "--iterations", "4",
            "--learners", "2", "--quiet"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    result = subprocess.run([sys.executable, "-m", "diffrl.cli", *args, "--out", str(whole)], env=ENV,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == ["checkpoint-000003", "checkpoint-000004"]

    # a learner killed once iteration 1 is written: the driver sees it and goes on from its last checkpoint by
    # itself — the same `train(resume=True)` that --resume runs — and is SIGKILLed the moment it says so, mid-run
    # (a group start, ~20 s here, saved: the resume below runs that path to the end); then the run is resumed
    log = tmp_path / "part.log"
    with open(log, "w") as stderr:
        code = _kill_when([*args, "--out", str(part)], lambda: RESTARTS in log.read_text(), timeout=900,
                          before=lambda process: _complete_lines(part) >= 1 and _kill_a_learner(process), stderr=stderr)
    assert code == -signal.SIGKILL
    assert _complete_lines(part) < 4, "the kill came too late to interrupt the run"
    _resume(part)

    got, want = _lines(part), _lines(whole)
    assert [line["iteration"] for line in got] == [1, 2, 3, 4]
    assert [{k: v for k, v in line.items() if k not in TIMING} for line in got] == \
           [{k: v for k, v in line.items() if k not in TIMING} for line in want]
    assert all(line["allreduce_bytes"] > 0 for line in got)
    assert json.loads((part / "summary.json").read_text())["final"] == json.loads((whole / "summary.json").read_text())["final"]


def test_a_checkpoint_keeps_a_jsonl_sources_position_mid_pass(tmp_path):
    """The data order continues exactly after a resume, also for --data FILE.jsonl (its pending shuffle)."""
    import torch

    from diffrl.algos.checkpoint import capture_rng, restore_rng
    from diffrl.envs.datasets import JsonlLayouts
    from diffrl.shapes.world import sample_layouts

    data = tmp_path / "layouts.jsonl"
    data.write_text("".join(json.dumps(layout.to_dict()) + "\n" for layout in sample_layouts(7, [2, 3], seed=0)))
    running, noise = JsonlLayouts(data, seed=3), torch.Generator()
    running.sample(5)  # part-way through the first shuffled pass
    state = capture_rng(noise, running, torch.device("cpu"))
    resumed = JsonlLayouts(data, seed=3)
    restore_rng(state, torch.Generator(), resumed, torch.device("cpu"))
    assert resumed.sample(9) == running.sample(9)  # the rest of this pass, then the next shuffle
