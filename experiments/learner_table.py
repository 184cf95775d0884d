"""The learner comparison: one table and one picture from finished `diffrl train` runs.

    python experiments/learner_table.py RUN [RUN ...] [--headroom best_of_n.json] [--plot docs/learners.png]
                                        [--json PATH]

Groups the runs by learner (``algo.name`` in each run's config.yaml) and prints, per learner, the mean ± sd over
its runs (seeds) of the final held-out ISR / mIoU / reward and their change from the base, the samples the run
learned from (iterations × layouts × group) and its wall time (both evaluations included), as a Markdown table.
With ``--headroom`` (the JSON of `experiments/best_of_n.py` for the runs' base model) it adds the fraction of the
best-of-N-by-reward headroom each learner captured: (final ISR − base ISR) / (best-by-reward ISR − base ISR).
``--plot`` draws held-out ISR against training seconds, one line per run, from the runs' ``eval_isr`` columns
(runs made with ``eval.every=N``) between the base and the final evaluation. ``--json`` (default
``experiments/learner_table.json``) writes the table's numbers per learner, unrounded, and each run's record.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from _results import add_json_option, write_json  # this folder's module (a script's folder is on sys.path)


def read_run(run: Path) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve, seconds = [(0.0, summary["base"]["isr"])], 0.0
    for line in metrics:
        seconds += line["seconds"]
        if "eval_isr" in line:
            curve.append((seconds, line["eval_isr"]))
    curve.append((seconds, summary["final"]["isr"]))
    samples = cfg["iterations"] * cfg["env"]["layouts_per_iter"] * cfg["env"]["group_size"]
    return {"run": str(run), "algo": cfg["algo"]["name"], "seed": cfg["seed"], "base": summary["base"],
            "final": summary["final"], "wall": summary["wall_seconds"], "samples": samples, "curve": curve}


def mean_sd(values: list[float], sign: bool = False) -> str:
    fmt = "{:+.3f}" if sign else "{:.3f}"
    if len(values) < 2:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {statistics.stdev(values):.3f}"


def table(runs: list[dict], headroom: dict | None) -> str:
    by_algo = defaultdict(list)
    for r in runs:
        by_algo[r["algo"]].append(r)
    base = runs[0]["base"]
    head = "| learner | seeds | ISR | ΔISR | mIoU | reward | Δreward | wrong box | wrong attribute | samples | wall s |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    rows.append(f"| base | | {base['isr']:.3f} | | {base['miou']:.3f} | {base['reward']:.3f} | | "
                f"{base['verdicts']['wrong box']} | {base['verdicts']['wrong attribute']} | | |")
    for algo, rs in sorted(by_algo.items()):
        isr = [r["final"]["isr"] for r in rs]
        rows.append(
            f"| {algo} | {', '.join(str(r['seed']) for r in rs)} | {mean_sd(isr)} | "
            f"{mean_sd([r['final']['isr'] - r['base']['isr'] for r in rs], True)} | "
            f"{mean_sd([r['final']['miou'] for r in rs])} | {mean_sd([r['final']['reward'] for r in rs])} | "
            f"{mean_sd([r['final']['reward'] - r['base']['reward'] for r in rs], True)} | "
            f"{statistics.mean(r['final']['verdicts']['wrong box'] for r in rs):.0f} | "
            f"{statistics.mean(r['final']['verdicts']['wrong attribute'] for r in rs):.0f} | "
            f"{rs[0]['samples']:,} | {', '.join('%.0f' % r['wall'] for r in rs)} |")
    out = "\n".join(rows)
    if headroom:
        best = headroom["best_by_reward"]
        out += f"\n\nbest of {headroom['n']} by reward: ISR {best:.3f} (one sample {headroom['one_sample']:.3f})\n"
        for algo, rs in sorted(by_algo.items()):
            gain = statistics.mean(r["final"]["isr"] - r["base"]["isr"] for r in rs)
            out += f"{algo}: captured {gain / (best - base['isr']):.0%} of the best-of-{headroom['n']} headroom\n"
    return out


def learners(runs: list[dict], headroom: dict | None) -> dict:
    """The table's numbers per learner, unrounded: each column's per-seed values with their mean and sd."""
    by_algo = defaultdict(list)
    for r in runs:
        by_algo[r["algo"]].append(r)
    columns = {"isr": lambda r: r["final"]["isr"], "delta_isr": lambda r: r["final"]["isr"] - r["base"]["isr"],
               "miou": lambda r: r["final"]["miou"], "reward": lambda r: r["final"]["reward"],
               "delta_reward": lambda r: r["final"]["reward"] - r["base"]["reward"],
               "wrong_box": lambda r: r["final"]["verdicts"]["wrong box"],
               "wrong_attribute": lambda r: r["final"]["verdicts"]["wrong attribute"], "wall": lambda r: r["wall"]}
    out = {}
    for algo, rs in sorted(by_algo.items()):
        row = {"seeds": [r["seed"] for r in rs], "samples": rs[0]["samples"]}
        for name, get in columns.items():
            values = [get(r) for r in rs]
            row[name] = {"values": values, "mean": statistics.mean(values),
                         "sd": statistics.stdev(values) if len(values) > 1 else None}
        if headroom:
            row["captured"] = row["delta_isr"]["mean"] / (headroom["best_by_reward"] - runs[0]["base"]["isr"])
        out[algo] = row
    return out


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ppo": "tab:blue", "grpo": "tab:orange", "awm": "tab:green", "nft": "tab:red"}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    seen = set()
    for r in runs:
        xs, ys = zip(*r["curve"])
        label = r["algo"] if r["algo"] not in seen else None
        seen.add(r["algo"])
        ax.plot(xs, ys, marker="o", ms=3, color=colours.get(r["algo"]), label=label, alpha=0.8)
    ax.set_xlabel("training seconds (evaluations excluded)")
    ax.set_ylabel("held-out ISR")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--headroom", help="best_of_n.py's JSON for the runs' base model")
    parser.add_argument("--plot")
    add_json_option(parser, __file__)
    args = parser.parse_args(argv)
    runs = [read_run(Path(r)) for r in args.runs]
    headroom = None
    if args.headroom:
        headroom = next(iter(json.loads(Path(args.headroom).read_text())["results"].values()))
    print(table(runs, headroom))
    if args.plot:
        plot(runs, args.plot)
        print(f"wrote {args.plot}")
    write_json(args, __file__, base=runs[0]["base"], headroom=headroom, learners=learners(runs, headroom), runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
