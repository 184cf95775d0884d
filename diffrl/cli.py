"""The ``diffrl`` command: train, eval, pretrain, sweep, export, serve-reward, list.

Errors a user can cause (unknown name, bad layout file, bad config key, missing weights) print one
line on stderr and exit with code 2; tracebacks are for diffrl's own bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffrl.allocator import tune_malloc
from diffrl.errors import UserError
from diffrl.layout import LayoutError

REWARD_MODEL_HELP = "gdino/cycle detector: local folder, hub id or 'shapes' (default IDEA-Research/grounding-dino-tiny)"
EPILOG_OVERRIDES = "Any config field can be overridden as section.field=value, e.g. algo.lr=1e-4 env.group_size=8."


def _registries():
    import diffrl.algos.trainer  # noqa: F401  (imports every registered class)
    from diffrl.registry import ALL

    return ALL


def _names(registry) -> str:
    return ", ".join(registry.names())


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (a UserError), like every other user error."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def add_serve_reward(sub) -> None:
    """The ``serve-reward`` subcommand. It needs only `diffrl.rewards` (no torchrl, diffusers, Ray), so that a
    reward's own environment can serve it; `main` builds it alone when the command line starts with it."""
    import diffrl.rewards  # noqa: F401  (registers the rewards)
    from diffrl.registry import REWARDS

    sr = sub.add_parser("serve-reward", help="serve a reward over HTTP, for `--reward http://HOST:PORT/score` "
                        "(a reward in its own process or environment)")
    sr.add_argument("name", metavar="NAME", help=f"the reward ({_names(REWARDS)}), or weighted parts: gdino=1,cycle=0.5")
    sr.add_argument("--reward-model", metavar="DIR|HUB_ID", help=REWARD_MODEL_HELP)
    sr.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; the "
                    "server has no authentication)")
    sr.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed)")
    sr.add_argument("--device", default="cpu", help="where the reward scores: cpu, cuda, cuda:1 …")
    sr.add_argument("--max-request-mb", type=float, default=64, help="largest request body in MiB; a larger one gets "
                    "413 unread (default 64)")
    sr.add_argument("--stop-after", type=float, default=0, metavar="SECONDS", help="stop serving after this long "
                    "(default 0: until interrupted)")
    sr.add_argument("--quiet", action="store_true", help="no line per request")


def build_parser() -> argparse.ArgumentParser:
    """The ``diffrl`` parser, one subcommand at a time (each ``add_<command>`` below)."""
    _registries()
    parser = Parser(prog="diffrl", description="RL fine-tuning of layout-to-image generators.")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,pretrain,sweep,export,serve-reward,list}",
                                parser_class=Parser)
    add_train(sub)
    add_eval(sub)
    add_pretrain(sub)
    add_sweep(sub)
    add_export(sub)
    add_serve_reward(sub)
    sub.add_parser("list", help="print every registry")
    return parser


def add_train(sub) -> None:
    """The ``train`` subcommand: named flags for the common settings, ``section.field=value`` for every other."""
    from diffrl.config import field_help
    from diffrl.registry import ALGOS, DATASETS, ENVS, MODELS, REWARDS

    keys = "\n".join(f"  {key} = {default!r}  — {help}" for key, default, help in field_help())
    train = sub.add_parser(
        "train", help="fine-tune a generator with RL",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{EPILOG_OVERRIDES}\nConfig keys (default — meaning):\n{keys}",
    )
    train.add_argument("--env", help=f"environment ({_names(ENVS)})")
    train.add_argument("--data", help=f"layouts: a dataset ({_names(DATASETS)}) or a .jsonl file")
    train.add_argument("--model", help=f"generator: {_names(MODELS)}, a local folder (a diffrl generator, or a "
                       "diffusers SD3/SD3.5, FLUX.1 or SD1.x pipeline) or a hub id already in the local HF cache")
    train.add_argument("--reward", help=f"reward ({_names(REWARDS)}), weighted parts: gdino=1,cycle=0.5, or a reward "
                       "server's URL: http://HOST:PORT/score (see `diffrl serve-reward`)")
    train.add_argument("--reward-model", metavar="DIR|HUB_ID", help=REWARD_MODEL_HELP)
    train.add_argument("--algo", help=f"learner ({_names(ALGOS)})")
    train.add_argument("--iterations", type=int, help="training iterations")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--out", help="run folder (default runs/<algo>-<time>)")
    train.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    train.add_argument("--config", metavar="FILE.yaml", help="config file; flags and overrides win over it")
    train.add_argument("--device", help="cpu, cuda, cuda:1 …")
    train.add_argument("--workers", type=int, metavar="N", help="Ray rollout workers (default 0: no Ray, one process)")
    train.add_argument("--reward-workers", type=int, metavar="N",
                       help="Ray actors scoring the reward on their own device while rollouts go on (default 0)")
    train.add_argument("--learners", type=int, metavar="N", help="processes the update runs on, data-parallel on Ray "
                       "Train (default 1: this process; see docs/scaling.md)")
    train.add_argument("--address", metavar="HOST:PORT", help="join this Ray cluster (`ray start --head` prints it; "
                       "default: a local Ray when --workers or --reward-workers is set)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("overrides", nargs="*", metavar="section.field=value")


def add_eval(sub) -> None:
    """The ``eval`` subcommand: a generator or a run, judged by a reward or COCO-MIG's protocol."""
    from diffrl.config import TrainConfig
    from diffrl.eval.readers import FORMATS
    from diffrl.registry import MODELS, REWARDS

    ev = sub.add_parser("eval", help="ISR / mIoU per level (and Shapes attribute leakage) of a generator or a run")
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--model", help=f"generator: {_names(MODELS)} or a local folder (default: `diffrl train`'s, "
                        f"{TrainConfig().model.name})")
    source.add_argument("--checkpoint", metavar="RUN", help="a run folder: its model with its last checkpoint")
    ev.add_argument("--data", help="a Shapes world (shapes, shapes-loose: its held-out set), or a file of layouts: "
                    "diffrl .jsonl, COCO-MIG (.yaml, .txt, .json) or LayoutSAM-eval rows (.parquet, .jsonl, .json) "
                    "(default: with --checkpoint the run's own evaluation set, its eval.data; else `diffrl train`'s)")
    ev.add_argument("--format", choices=FORMATS, default="auto", help="how to read --data (auto: by its extension and keys)")
    ev.add_argument("--levels", type=int, nargs="+", default=[2, 3, 4, 5, 6], help="Shapes levels (instance counts)")
    ev.add_argument("--layouts", type=int, default=250, help="how many Shapes layouts")
    ev.add_argument("--seed", type=int, default=1234, help="seed of the held-out set and its noise")
    ev.add_argument("--judge", choices=("reward", "cocomig"), default="reward",
                    help="reward: score with --reward; cocomig: COCO-MIG's protocol (Grounding DINO from --reward-model "
                         "+ HSV colour check), also writes an HTML report beside eval.json")
    ev.add_argument("--reward", help=f"reward judge's scorer ({_names(REWARDS)}), or parts: gdino=1,cycle=0.5 "
                    "(default shapes)")
    ev.add_argument("--reward-model", metavar="DIR|HUB_ID", help=REWARD_MODEL_HELP)
    ev.add_argument("--sam-model", metavar="DIR|HUB_ID", help="cocomig judge: SAM weights for the object masks (the "
                    "benchmark's: facebook/sam-vit-huge); without it the detected box is the object's region")
    ev.add_argument("--hsv-table", metavar="COMMIT", help="cocomig judge: eval_mig.py's colour table, by the "
                    "LeyRio/MIG_Bench commit that runs it: 7f5da08 (default, the current one) or 723d10e (the first)")
    ev.add_argument("--steps", type=int, default=10, help="sampling steps")
    ev.add_argument("--leakage", type=int, metavar="N", help="attribute leakage on N Shapes probe layouts of adjacent or "
                    "overlapping same-shape, different-colour pairs (default with --data shapes: min(64, --layouts); "
                    "0: skip)")
    ev.add_argument("--out", help="where to write eval.json (default: beside the checkpoint, else stdout only); "
                    "the cocomig report goes beside it with the suffix .html")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("overrides", nargs="*", metavar="reward.options.key=value",
                    help="the reward's constructor options, as `diffrl train` takes them")


def add_pretrain(sub) -> None:
    """The ``pretrain`` subcommand: the tiny Shapes generator by flow matching."""
    pre = sub.add_parser("pretrain", help="train the tiny Shapes generator from scratch by flow matching")
    pre.add_argument("--data", default="shapes", help="only 'shapes' (rendered pairs)")
    pre.add_argument("--out", default="runs/pretrain", help="folder for the generator")
    pre.add_argument("--steps", type=int, default=4000, help="optimiser steps")
    pre.add_argument("--batch-size", type=int, default=64, help="pairs per step")
    pre.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3], help="instance counts to train on")
    pre.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    pre.add_argument("--warmup", type=int, default=200, help="linear warm-up steps before the cosine decay")
    pre.add_argument("--seed", type=int, default=0, help="random seed")
    pre.add_argument("--eval-every", type=int, default=1000, help="steps between quick evaluations (0: none)")
    pre.add_argument("--init", default="", help="continue from this generator (a registered name such as shapes-tiny, "
                     "or a folder) instead of a fresh model")
    pre.add_argument("--idm", action="store_true", help="give the layout adapter I-DRUID's Instance-Disentangled Module "
                     "and train on L_ldm + λ_dis·L_dis (with --init, a folder without IDM gets a fresh one)")
    pre.add_argument("--world", default="classic", choices=["classic", "loose"], help="box rules of the layouts "
                     "(classic: shapes-tiny's 7–19 px, apart; loose: 9–19 px, may touch)")
    pre.add_argument("--loose", type=float, default=0.0, metavar="M", help="condition on boxes grown by up to M × "
                     "their size per side, while the render fills the exact box (0: exact boxes)")
    pre.add_argument("--mislabel", type=float, default=0.0, metavar="P", help="condition on phrases whose colour word "
                     "is swapped for its look-alike with probability P, while the render keeps the true colour")
    pre.add_argument("--shift", type=float, default=0.0, metavar="PX", help="condition on boxes moved PX grid cells "
                     "right and down, while the render fills the exact box (0: exact boxes)")
    pre.add_argument("--dis-coef", type=float, metavar="λ_dis", help="weight of the IDC loss L_dis (needs --idm; "
                     "default 0.1 with it)")


def add_sweep(sub) -> None:
    """The ``sweep`` subcommand: a grid of train runs on Ray Tune."""
    sw = sub.add_parser(
        "sweep", help="a grid of train runs × seeds on Ray Tune, with a results table and plot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="FILE.yaml: base (a train config), seeds, rows (label → overrides), optional grid, models (prepared "
               "by `diffrl pretrain`), leakage_layouts, cpus_per_trial, gpus_per_trial, metrics; see "
               "examples/ablation_idruid.yaml. Running the same command again resumes: finished trials are kept.",
    )
    sw.add_argument("file", metavar="FILE.yaml", help="the sweep file")
    sw.add_argument("--out", metavar="DIR", help="sweep folder (default runs/sweep-<file name>); an existing one "
                    "resumes")
    sw.add_argument("--address", metavar="HOST:PORT", help="run the trials on this Ray cluster (default: a local Ray "
                    "on this machine); the sweep folder must be on storage every node sees")
    sw.add_argument("--cpus-per-trial", type=float, metavar="N", help="CPUs (and torch threads) per trial; trials run "
                    "side by side as the CPUs allow (default: the file's cpus_per_trial, else 1)")


def add_export(sub) -> None:
    """The ``export`` subcommand: a run's LoRA, layout adapter and model card."""
    ex = sub.add_parser("export", help="a run's LoRA (loadable by diffusers' load_lora_weights), layout adapter and "
                        "model card")
    ex.add_argument("run", metavar="RUN", help="a run folder of `diffrl train`")
    ex.add_argument("--out", required=True, help="folder to write (must be new or empty)")


def cmd_train(args) -> int:
    from diffrl.algos.trainer import train
    from diffrl.config import build_config, load_yaml, parse_override, upgrade_saved

    yaml_data = {}
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise UserError(f"--resume {run}: no config.yaml there; pass the folder of an earlier run")
        yaml_data = upgrade_saved(load_yaml(run / "config.yaml"))
    if args.config:
        yaml_data.update(load_yaml(args.config))
    flags = {"env.name": args.env, "env.data": args.data, "model.name": args.model, "reward.name": args.reward,
             "reward.model": args.reward_model,
             "algo.name": args.algo, "iterations": args.iterations, "seed": args.seed, "out": args.out,
             "model.device": args.device, "ray.workers": args.workers, "ray.reward_workers": args.reward_workers,
             "ray.address": args.address, "ray.learners": args.learners}
    if args.resume:
        flags["out"] = args.resume
    overrides = [(k, v) for k, v in flags.items() if v is not None] + [parse_override(o) for o in args.overrides]
    cfg = build_config(yaml_data, overrides)
    from diffrl.registry import ALGOS, ENVS
    from diffrl.rewards import parse_reward_spec

    for registry, name in ((ENVS, cfg.env.name), (ALGOS, cfg.algo.name)):
        registry.get(name)  # fail before any work on an unknown name
    parse_reward_spec(cfg.reward.name)  # the same for --reward (its weights load in train(), before the run folder)
    if args.resume and _finished(Path(args.resume), cfg.iterations):
        return 0
    if cfg.ray.learners > 1:  # a learner process that dies: the run goes on from its last checkpoint
        from diffrl.distributed.learners import restarting

        run = restarting(train, cfg, resume=bool(args.resume), progress=not args.quiet)
    else:
        run = train(cfg, resume=bool(args.resume), progress=not args.quiet)
    summary = json.loads((run / "summary.json").read_text())
    print(_summary_table(summary))
    print(f"run folder: {run}")
    return 0


def _finished(run: Path, iterations: int) -> bool:
    """A run whose summary.json already covers ``iterations``: say so and how to extend it, instead of redoing its
    final evaluation."""
    summary_file = run / "summary.json"
    if not summary_file.is_file():
        return False
    summary = json.loads(summary_file.read_text())
    if iterations > summary["iterations"]:
        return False
    print(_summary_table(summary))
    print(f"diffrl: run {run} is finished ({summary['iterations']} iterations), nothing to do; to train it further "
          f"pass more, e.g. `diffrl train --resume {run} iterations={summary['iterations'] + 10}`", file=sys.stderr)
    return True


def _eval_layouts(args) -> tuple[list, int]:
    """``diffrl eval``'s layouts and leakage probe count: ``--data`` read as `diffrl train`'s eval.data is
    (`diffrl.eval.data.load_layouts`); with ``--checkpoint`` and no ``--data``, the run's own evaluation set."""
    from diffrl.config import TrainConfig
    from diffrl.envs.datasets import make_source, model_data, shapes_world
    from diffrl.eval.data import eval_data, load_layouts

    if args.leakage is not None and args.leakage < 0:
        raise UserError(f"--leakage: must be ≥ 0, got {args.leakage}")
    run_cfg = None
    if args.checkpoint and args.data is None and (Path(args.checkpoint) / "config.yaml").is_file():
        from diffrl.config import build_config, load_yaml, upgrade_saved

        run_cfg = build_config(upgrade_saved(load_yaml(Path(args.checkpoint) / "config.yaml")))
    if run_cfg is not None and not (run_cfg.eval.data in ("", "shapes") and shapes_world(run_cfg.env.data)):
        evaluation = eval_data(run_cfg)  # the layouts its summary.json was scored on
        print(f"evaluating on {evaluation.name} (the run's eval.data; pass --data to choose another)", file=sys.stderr)
        return evaluation.layouts, 0
    data = args.data or (run_cfg.env.data if run_cfg is not None else model_data(args.model or TrainConfig().model.name))
    if shapes_world(data) is not None:
        make_source(data, args.levels, seed=args.seed)  # checks the levels
        layouts = load_layouts(data, layouts=args.layouts, levels=args.levels, seed=args.seed)
        return layouts, min(64, args.layouts) if args.leakage is None else args.leakage
    if args.leakage:
        raise UserError("--leakage measures the Shapes world's colours: it needs --data shapes (or another Shapes world)")
    if not Path(args.data).is_file():
        raise UserError(f"--data {args.data}: no such file")
    return load_layouts(args.data, args.format), 0


def _reward_options(overrides: list[str]) -> dict:
    """``diffrl eval``'s ``reward.options.key=value`` overrides → the reward's constructor options, read as `diffrl
    train` reads them (`diffrl.config.parse_override`, `set_value`); any other key is a user error."""
    from diffrl.config import TrainConfig, parse_override, set_value

    cfg = TrainConfig()
    for text in overrides:
        key, value = parse_override(text)
        if key.split(".")[:2] != ["reward", "options"]:
            raise UserError(f"diffrl eval: {key}: only the reward's constructor options (reward.options.key=value) "
                            "are set on its command line")
        set_value(cfg, key, value)
    return cfg.reward.options


def cmd_eval(args) -> int:
    """Generate the layouts with the generator (or run), judge them, print the table, write eval.json (and the
    COCO-MIG report)."""
    from diffrl.eval.evaluate import evaluate, generate

    layouts, leakage_layouts = _eval_layouts(args)
    judge = _eval_judge(args, layouts)
    generator, out = _eval_generator(args)
    images = verdicts = None
    if args.judge == "cocomig":
        from diffrl.eval.cocomig import cocomig_metrics

        images = generate(generator, layouts, num_steps=args.steps, seed=args.seed, progress=not args.quiet)
        verdicts = judge(images, layouts, progress=not args.quiet)
        metrics = {**cocomig_metrics(verdicts, layouts), "hsv_table": judge.hsv_table}
    else:
        metrics, _ = evaluate(generator, judge, layouts, num_steps=args.steps, seed=args.seed,
                              progress=not args.quiet)
    print(_metrics_table(metrics))
    print(", ".join(f"{label}: {n}" for label, n in metrics["verdicts"].items()))
    if leakage_layouts:
        from diffrl.eval.leakage import evaluate_leakage

        metrics["leakage"] = evaluate_leakage(generator, leakage_layouts, num_steps=args.steps, seed=args.seed,
                                              progress=not args.quiet)
        m = metrics["leakage"]
        print(f"attribute leakage {m['leakage']:.3f}   own colour {m['own_colour']:.3f}   neighbour pixels "
              f"{m['neighbour_pixels']:.3f}   ({m['instances']} instances in {m['layouts']} adjacent/overlapping "
              "same-shape pairs)")
    _write_eval(args, out, metrics, images, layouts, verdicts)
    return 0


def _eval_judge(args, layouts):
    """``diffrl eval``'s judge: the COCO-MIG protocol (`CocoMigJudge`), or the reward ``--reward`` names with its
    ``reward.options``. Settings that do not fit the judge, and phrases it cannot read, fail before weights load."""
    from diffrl.rewards import build_reward

    if args.judge == "cocomig":
        from diffrl.eval.cocomig import HSV_TABLE, CocoMigJudge, SamSegmenter, cocomig_grounder

        if args.reward is not None or args.overrides:
            what = "--reward" if args.reward is not None else "reward.options"
            raise UserError(f"{what} has no effect with --judge cocomig, which grounds with --reward-model")
        table = args.hsv_table or HSV_TABLE
        CocoMigJudge.check(layouts, table)  # an unknown table, or phrases it cannot read, fail before weights load
        return CocoMigJudge(cocomig_grounder(args.reward_model), SamSegmenter(args.sam_model) if args.sam_model else None,
                            hsv_table=table)
    for flag, value in (("--sam-model", args.sam_model), ("--hsv-table", args.hsv_table)):
        if value:
            raise UserError(f"{flag} is for --judge cocomig")
    return build_reward(args.reward or "shapes", args.reward_model, _reward_options(args.overrides))


def _eval_generator(args):
    """→ (the generator ``diffrl eval`` judges, where eval.json goes): ``--checkpoint``'s run with its last
    checkpoint's weights (eval.json beside it by default), or ``--model``."""
    from diffrl.config import TrainConfig
    from diffrl.policies.generator import load_generator

    out = Path(args.out) if args.out else None
    if not args.checkpoint:
        return load_generator(args.model or TrainConfig().model.name), out
    from diffrl.algos.checkpoint import latest_checkpoint
    from diffrl.algos.export import load_run

    run = Path(args.checkpoint)
    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is None or not (run / "config.yaml").is_file():
        raise UserError(f"--checkpoint {run}: no config.yaml and checkpoints/ there; pass a run folder")
    _, generator = load_run(run)  # its model, LoRA and settings, with the last checkpoint's weights
    return generator, out or run / "eval.json"


def _write_eval(args, out: Path | None, metrics: dict, images, layouts, verdicts) -> None:
    """eval.json at ``out`` and, for the cocomig judge, its HTML report beside it."""
    from diffrl.config import TrainConfig

    if not out:
        if args.judge == "cocomig":
            print("(pass --out FILE.json to write eval.json and its HTML report)")
        return
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {out}")
    if args.judge == "cocomig":
        from diffrl.eval.report import write_report

        settings = {"judge": "cocomig (LeyRio/MIG_Bench eval_mig.py protocol, commit 7f5da08)",
                    "data": args.data or "the Shapes held-out set",
                    "generator": args.checkpoint or args.model or TrainConfig().model.name, "steps": args.steps,
                    "seed": args.seed, "grounder": args.reward_model or "IDEA-Research/grounding-dino-tiny",
                    "object mask": f"SAM {args.sam_model}" if args.sam_model else "detected box (no --sam-model)",
                    "HSV table": f"{metrics['hsv_table']} (the color_dict of eval_mig.py at MIG_Bench commit "
                                 f"{metrics['hsv_table']})"}
        print(f"wrote {write_report(out.with_suffix('.html'), images, layouts, verdicts, metrics, settings)}")


def cmd_pretrain(args) -> int:
    from diffrl.algos.pretrain import PretrainConfig, pretrain

    from diffrl.registry import MODELS

    if args.init and args.init not in MODELS and not (Path(args.init) / "model_index.json").is_file():
        raise UserError(f"--init {args.init}: not a registered model ({_names(MODELS)}) nor a generator folder "
                        "(no model_index.json)")
    if args.data != "shapes":
        raise UserError("diffrl pretrain trains the embedded Shapes generator: only --data shapes is supported")
    if args.dis_coef is not None and not args.idm:
        raise UserError("--dis-coef weighs the IDC loss of IDM: add --idm")
    if args.dis_coef is not None and args.dis_coef < 0:
        raise UserError(f"--dis-coef: must be ≥ 0, got {args.dis_coef}")
    cfg = PretrainConfig(out=args.out, steps=args.steps, batch_size=args.batch_size, levels=tuple(args.levels),
                         lr=args.lr, seed=args.seed, eval_every=args.eval_every, init=args.init, idm=args.idm,
                         world=args.world, loose=args.loose, shift=args.shift, mislabel=args.mislabel,
                         warmup=args.warmup,
                         **({"dis_coef": args.dis_coef} if args.dis_coef is not None else {}))
    print(f"saved generator to {pretrain(cfg)}")
    return 0


def cmd_sweep(args) -> int:
    from diffrl.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.file)
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{Path(args.file).stem}"
    outcome = run_sweep(sweep, out, address=args.address or "", cpus_per_trial=args.cpus_per_trial)
    for trial, error in outcome.failed.items():
        print(f"trial {trial} failed: {error}", file=sys.stderr)
    if outcome.written:
        print((outcome.folder / "results.md").read_text().rstrip())
        print("wrote " + ", ".join(str(p) for p in outcome.written))
    if outcome.unfinished:
        print(f"{len(outcome.unfinished)} of {len(sweep.trials)} trials unfinished; run the same command again to "
              "resume (finished trials are kept)", file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    from diffrl.algos.export import export_run

    for path in export_run(args.run, args.out):
        print(f"wrote {path}")
    return 0


def cmd_serve_reward(args) -> int:
    from diffrl.registry import REWARDS
    from diffrl.rewards import build_reward
    from diffrl.rewards.compose import is_url
    from diffrl.rewards.serve import is_loopback, make_server, serve

    if any(is_url(part) or part.partition("=")[0].strip() == "http" for part in args.name.split(",")):
        here = ", ".join(name for name in REWARDS.names() if name != "http")
        raise UserError(f"serve-reward {args.name}: name a reward computed here ({here}), not a reward server")
    if args.max_request_mb <= 0 or args.stop_after < 0:
        raise UserError("--max-request-mb must be > 0 and --stop-after ≥ 0")
    reward = build_reward(args.name, args.reward_model)  # weights load (or fail in one line) before the port opens
    server = make_server(reward, name=args.name, host=args.host, port=args.port, device=args.device,
                         max_request_bytes=int(args.max_request_mb * 2**20), quiet=args.quiet)
    if not is_loopback(args.host):
        print(f"diffrl serve-reward: warning: listening on {args.host}, which other machines may reach; the server has "
              "no authentication", file=sys.stderr)
    print(f"serving reward {args.name} on {server.url} (GET /health); Ctrl-C stops", flush=True)
    serve(server, args.stop_after)
    return 0


def cmd_list(args) -> int:
    for registry in _registries():
        print(f"{registry.kind} ({registry.flag}): {_names(registry)}")
    return 0


def _num(value) -> str:
    return "  –  " if value is None else f"{value:.3f}"


def _metrics_table(m: dict) -> str:
    if m["isr"] is None:  # a reward with per-image scores only
        lines = ["level   reward  layouts"]
        lines += [f"{level:<7} {v['reward']:.3f}   {v['layouts']}" for level, v in m["per_level"].items()]
        return "\n".join(lines + [f"{'all':<7} {m['reward']:.3f}", f"({m['note']})"])
    lines = ["level   ISR     mIoU    instances"]
    for level, v in m["per_level"].items():
        lines.append(f"{level:<7} {v['isr']:.3f}   {v['miou']:.3f}   {v.get('instances', '')}")
    reward = f"   reward {m['reward']:.3f}" if m["reward"] is not None else ""
    lines.append(f"{'all':<7} {m['isr']:.3f}   {m['miou']:.3f}{reward}")
    return "\n".join(lines)


def _summary_table(s: dict) -> str:
    b, f = s["base"], s["final"]
    verdicts = bool(b.get("verdicts") and f.get("verdicts"))  # none in a run resumed from before they were counted
    head = "            ISR     mIoU    reward" + ("   ok / missed / wrong box / wrong attribute" if verdicts else "")

    def row(name: str, m: dict) -> str:
        counts = "   " + " / ".join(str(n) for n in m["verdicts"].values()) if verdicts else ""
        return f"{name:<12}{_num(m['isr'])}   {_num(m['miou'])}   {_num(m['reward'])}{counts}"

    judged = f"judged by the {s['judge']}" if "judge" in s else ""
    where = s.get("eval_data", f"{s['eval_layouts']} held-out layouts")
    note = f"\n({f['note']})" if f.get("note") else ""
    return (f"{head}\n{row('base', b)}\n{row('final', f)}\n"
            f"({s['iterations']} iterations, {s['wall_seconds']:.0f} s; evaluated on {where}{', ' if judged else ''}"
            f"{judged}){note}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "pretrain": cmd_pretrain, "sweep": cmd_sweep, "export": cmd_export,
            "serve-reward": cmd_serve_reward, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    tune_malloc()  # before the first tensor: keeps freed memory in the process (see diffrl.allocator)
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        if argv[:1] == ["serve-reward"]:  # the rewards' imports only: a reward environment may lack the rest
            parser = Parser(prog="diffrl")
            add_serve_reward(parser.add_subparsers(dest="command", parser_class=Parser))
        else:
            parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        overrides = [e for e in extra if "=" in e and not e.startswith("-")]
        unknown = [e for e in extra if e not in overrides]
        if unknown or (overrides and args.command not in ("train", "eval")):
            parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
        if args.command in ("train", "eval"):
            args.overrides = args.overrides + overrides
        if args.command is None:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except (UserError, LayoutError) as err:
        print(f"diffrl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
