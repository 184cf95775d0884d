"""`diffrl sweep`: prepare the sweep's models, run its unfinished trials as Ray Tune trials, write the results.

A sweep folder holds:
    sweep.yaml            the sweep file it was started with
    models/<name>/        each prepared generator (`diffrl pretrain`), built once and reused
    trials/<trial>/       one `diffrl train` run folder per (row, seed), plus
        trial.json        what the trial is (row, seed, resolved config): a resumed sweep must match it
        result.json       its metrics: the final evaluation (also per level) and the attribute leakage
    tune/                 Ray Tune's experiment state and per-trial logs (error.txt of a failed trial)
    results.csv, results.md, results.png

**Done-ness is the trial's own result.json**, written atomically after everything else, not Tune's
experiment state: running the same command again runs only the trials without one, as a fresh Tune
experiment. A trial interrupted mid-training continues from its run's last checkpoint (`train(resume=True)`),
one killed after training but before its leakage skips straight to the leakage.

Each trial is a function trainable that calls `diffrl.algos.trainer.train` in the trial's Ray worker process
with ``torch.set_num_threads(cpus_per_trial)``; Tune runs as many at once as the cluster's CPUs (and GPUs)
allow. Ray is started (or joined, ``--address``) by `diffrl.distributed.ray_workers.start_ray`, as for
``diffrl train --workers``. With ``--address``, the sweep folder must be on storage every node sees.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from diffrl.config import upgrade_saved
from diffrl.errors import UserError
from diffrl.files import atomic_write_text
from diffrl.sweep.report import aggregate, markdown, plot, write_csv
from diffrl.sweep.spec import Sweep, Trial


@dataclass
class Outcome:
    folder: Path
    ran: list[str] = field(default_factory=list)  # trials this call started (Tune trials)
    skipped: list[str] = field(default_factory=list)  # trials already finished before this call
    failed: dict[str, str] = field(default_factory=dict)  # trial → the first line of its error
    unfinished: list[str] = field(default_factory=list)  # trials without a result after this call
    written: list[Path] = field(default_factory=list)  # results.csv, .md, .png (none if no trial finished)


def require_extra() -> None:
    try:
        import matplotlib  # noqa: F401
        import ray.tune  # noqa: F401
    except ImportError as err:
        raise UserError(f"diffrl sweep needs Ray Tune and matplotlib ({err.name} is missing): "
                        "pip install 'diffrl[sweep]'") from None


def run_sweep(sweep: Sweep, folder: str | Path, *, address: str = "", cpus_per_trial: float | None = None,
              say: Callable[[str], None] = print) -> Outcome:
    require_extra()
    folder = Path(folder).resolve()
    cpus = sweep.cpus_per_trial if cpus_per_trial is None else cpus_per_trial
    if cpus <= 0:
        raise UserError(f"--cpus-per-trial: must be > 0, got {cpus}")
    folder.mkdir(parents=True, exist_ok=True)
    specs = {t.id: _spec(t, sweep, folder, cpus) for t in sweep.trials}
    for trial in sweep.trials:  # a resumed sweep whose file changed under a finished trial would mix two configs
        known = folder / "trials" / trial.id / "trial.json"
        if known.is_file() and upgrade_saved(json.loads(known.read_text())["config"]) != specs[trial.id]["config"]:
            raise UserError(f"{known.parent} was run with another config than {sweep.file} now gives it; pass another "
                            "--out, or delete that trial folder to run it again")
    if sweep.file.is_file():
        shutil.copyfile(sweep.file, folder / "sweep.yaml")
    for name, pretrain_cfg in sweep.models.items():
        if any(t.model == name for t in sweep.trials):
            prepare_model(name, pretrain_cfg, folder / "models", say)

    outcome = Outcome(folder)
    pending = [t for t in sweep.trials if not (folder / "trials" / t.id / "result.json").is_file()]
    outcome.skipped = [t.id for t in sweep.trials if t not in pending]
    if outcome.skipped:
        say(f"{len(outcome.skipped)} of {len(sweep.trials)} trials finished before; running the other {len(pending)}")
    if pending:
        for t in pending:
            run = folder / "trials" / t.id
            run.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run / "trial.json", json.dumps(specs[t.id], indent=2) + "\n")
        outcome.ran = [t.id for t in pending]
        outcome.failed = _tune(sweep, [specs[t.id] for t in pending], folder, address, cpus, say)

    results = [json.loads(p.read_text()) for t in sweep.trials if (p := folder / "trials" / t.id / "result.json").is_file()]
    done = {r["trial"] for r in results}
    outcome.unfinished = [t.id for t in sweep.trials if t.id not in done]
    if results:
        outcome.written = write_results(sweep, results, folder)
    return outcome


def write_results(sweep: Sweep, results: list[dict], folder: Path) -> list[Path]:
    every = [k for k in results[0] if isinstance(results[0][k], (int, float)) and k not in ("seed", "iterations")]
    every = list(dict.fromkeys(sweep.metrics + every))  # the chosen metrics first, then the rest
    table = aggregate(results, list(sweep.rows), every)
    title = f"{sweep.name}: {len({r['trial'] for r in results})} of {len(sweep.trials)} trials"
    return [write_csv(folder / "results.csv", results, table, every),
            atomic_write_text(folder / "results.md", markdown(table, sweep.metrics, title, sweep.rows)),
            plot(folder / "results.png", table, sweep.metrics, title)]


def prepare_model(name: str, cfg, models: Path, say: Callable[[str], None]) -> Path:
    """Build a sweep's model with `diffrl pretrain`'s own function, once: a folder whose pretrain.json says
    the same settings is reused; one with other settings is a user error (its trials used it)."""
    from diffrl.algos.pretrain import pretrain

    out = models / name
    wanted = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k != "out"}
    if (out / "pretrain.json").is_file():
        had = {k: v for k, v in json.loads((out / "pretrain.json").read_text())["config"].items() if k != "out"}
        if had != wanted:
            raise UserError(f"models {name}: {out} was built with other pretrain settings; pass another --out, or "
                            "delete it and the trials that used it")
        return out
    default = {k: v for k, v in json.loads(json.dumps(asdict(type(cfg)()))).items()}
    say(f"preparing model {name!r} with diffrl pretrain ({', '.join(f'{k}={v}' for k, v in wanted.items() if default[k] != v)})")
    partial = models / f".{name}.partial"  # renamed into place only once complete
    shutil.rmtree(partial, ignore_errors=True)
    tic = time.time()
    cfg.out = str(partial)
    pretrain(cfg)
    os.replace(partial, out)
    say(f"model {name!r} ready in {time.time() - tic:.0f} s: {out}")
    return out


def _spec(trial: Trial, sweep: Sweep, folder: Path, cpus: float) -> dict:
    """What a Tune trial receives: everything `run_trial` needs, JSON-able."""
    config = json.loads(json.dumps(trial.config))
    if trial.model is not None:
        config["model"]["name"] = str(folder / "models" / trial.model)
    return {"trial": trial.id, "row": trial.row, "seed": trial.seed, "config": config,
            "run": str(folder / "trials" / trial.id), "leakage_layouts": sweep.leakage_layouts,
            "threads": max(1, math.floor(cpus)), "cwd": os.getcwd()}


def run_trial(spec: dict) -> dict:
    """One trial, in whatever process runs it: train (or continue training) its run, measure the leakage of the
    trained generator, write result.json. → the result."""
    import threading

    import torch
    from tqdm import tqdm

    from diffrl.algos.trainer import train
    from diffrl.config import build_config

    # tqdm's default lock is a multiprocessing one, whose resource-tracker process does not survive a Ray worker
    # (a KeyError traceback in the driver's log); these processes write no bars, a thread lock is enough
    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(spec["threads"])
    if os.path.isdir(spec["cwd"]):
        os.chdir(spec["cwd"])  # Tune starts trials in their own folder; relative paths mean the user's
    run = Path(spec["run"])
    if (run / "result.json").is_file():
        return json.loads((run / "result.json").read_text())
    tic = time.time()
    cfg = build_config(spec["config"], [("out", str(run))])
    if not (run / "summary.json").is_file():
        train(cfg, resume=True, progress=False)  # resume=True: the folder holds trial.json, maybe a checkpoint
    summary = json.loads((run / "summary.json").read_text())
    final = summary["final"]
    result = {"trial": spec["trial"], "row": spec["row"], "seed": spec["seed"],
              "isr": final["isr"], "miou": final["miou"], "reward": final["reward"],
              # a reward with per-image scores only has no ISR / mIoU (None, shown as a dash in the report)
              **{f"{m}_{level}": block.get(m) for level, block in final["per_level"].items() for m in ("isr", "miou")},
              "base_isr": summary["base"]["isr"], "base_miou": summary["base"]["miou"],
              "base_reward": summary["base"]["reward"], "iterations": summary["iterations"],
              "train_seconds": summary["wall_seconds"]}
    if spec["leakage_layouts"]:
        from diffrl.eval.leakage import evaluate_leakage

        leak = evaluate_leakage(trained_generator(run, cfg), spec["leakage_layouts"], num_steps=cfg.env.num_steps,
                                shift=cfg.env.shift, seed=cfg.eval.seed, batch_size=cfg.eval.batch_size, progress=False)
        result.update({k: leak[k] for k in ("leakage", "own_colour", "neighbour_pixels")})
    result["seconds"] = time.time() - tic  # this attempt's
    atomic_write_text(run / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def trained_generator(run: Path, cfg):
    """The run's generator with its last checkpoint's weights (`diffrl.algos.export.load_run`, as `diffrl eval
    --checkpoint` loads it), or the base model as the trainer builds it when the run trained 0 iterations."""
    import torch

    from diffrl.algos.checkpoint import latest_checkpoint
    from diffrl.algos.export import load_run
    from diffrl.policies.generator import build_generator

    if latest_checkpoint(run / "checkpoints") is not None:
        generator = load_run(run)[1]
    else:
        generator = build_generator(cfg.model, cfg.policy.train)
    return generator.to(torch.device(cfg.model.device))


def _trainable(config: dict) -> None:
    from ray import tune

    tune.report(run_trial(config["trial"]))


def _tune(sweep: Sweep, specs: list[dict], folder: Path, address: str, cpus: float,
          say: Callable[[str], None]) -> dict[str, str]:
    """Run ``specs`` as one Tune experiment under folder/tune → trial id → first error line of each failed trial."""
    import ray
    from ray import tune

    from diffrl.config import TrainConfig
    from diffrl.distributed.ray_workers import start_ray

    ray_cfg = TrainConfig()  # start_ray's view: join --address, or a local Ray with room for one trial at least
    ray_cfg.ray.address, ray_cfg.ray.workers, ray_cfg.ray.worker_cpus = address, 1, cpus
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no experiment banner, only our lines
    owns = start_ray(ray_cfg)
    try:
        have = ray.cluster_resources()
        for kind, want in (("CPU", cpus), ("GPU", sweep.gpus_per_trial)):
            if want > have.get(kind, 0) + 1e-9:
                raise UserError(f"each trial asks for {want:g} {kind}s but the Ray cluster has {have.get(kind, 0):g}; "
                                f"lower {'--cpus-per-trial' if kind == 'CPU' else 'gpus_per_trial'}")
        total = len(sweep.trials)
        before = total - len(specs)
        progress = _progress_class()(say, before, total)
        tuner = tune.Tuner(
            tune.with_resources(_trainable, {"cpu": cpus, "gpu": sweep.gpus_per_trial}),
            param_space={"trial": tune.grid_search(specs)},
            tune_config=tune.TuneConfig(trial_name_creator=_trial_id, trial_dirname_creator=_trial_id,
                                        reuse_actors=True),  # one process runs trial after trial: no restarts
            run_config=tune.RunConfig(name=f"{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(folder / "tune"),
                                      verbose=0, callbacks=[progress],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid = tuner.fit()
        failed = {}
        for result in grid:
            if result.error is not None:
                trial_id = result.config["trial"]["trial"]
                failed[trial_id] = _first_line(result.error)
        return failed
    finally:
        if owns:
            ray.shutdown()


def _trial_id(trial) -> str:
    return trial.config["trial"]["trial"]


def trial_line(r: dict, done: int, total: int) -> str:
    """The progress line of a finished trial's result ``r``; a metric it lacks (None: ISR and mIoU of a reward with
    per-image scores only) reads "–"."""
    def num(key: str) -> str:
        return "–" if r.get(key) is None else f"{r[key]:.3f}"

    leak = f"  leakage {num('leakage')}  neighbour px {num('neighbour_pixels')}" if "leakage" in r else ""
    return (f"[{done}/{total}] {r['row']} seed {r['seed']}: ISR {num('isr')}  mIoU {num('miou')}  reward "
            f"{num('reward')}{leak}  ({r['seconds']:.0f} s)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    lines = [line for line in text if line.strip()]
    return lines[-1].removeprefix("diffrl.errors.UserError: ") if lines else type(err).__name__


def _progress_class():
    from ray import tune

    class Progress(tune.Callback):
        """A line per finished (or failed) trial, in the driver."""

        def __init__(self, say, done: int, total: int):
            self.say, self.done, self.total = say, done, total

        def __getstate__(self):  # Tune pickles its callbacks with the experiment; `say` need not travel
            return {**self.__dict__, "say": print}

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            self.done += 1
            if "isr" in r:
                self.say(trial_line(r, self.done, self.total))

        def on_trial_error(self, iteration, trials, trial, **info):
            spec = trial.config["trial"]
            self.say(f"[failed] {spec['row']} seed {spec['seed']}: see {trial.path}/error.txt")

    return Progress
