"""Fine-tuning on 1,000 examples, over seeds: do re-initialising the top block (`finetune --reinit-layers`) and
layer-wise lr decay (`--layer-lr-decay`) make small-data fine-tuning better or steadier?

Zhang et al. 2021 ("Revisiting Few-sample BERT Fine-tuning") and Mosbach et al. 2021 found BERT-Large's fine-tuning
on a thousand examples unstable from seed to seed, and steadier with the top layers drawn afresh; ELECTRA's recipe
trains lower layers at lower rates. This repeats the question at a small scale: all-MiniLM-L6-v2 (6 blocks, 384
wide) on the first --examples training rows of RTE, MRPC (Microsoft's train file; scored on its test file), STS-B
and CoLA, each scored on all its dev data, 3 epochs, batch 32, lr 1e-4 (the rate of every MiniLM run in
docs/findings.md), --seeds. Arms, fixed beforehand and not searched on dev:

- baseline: the paper's recipe (torch's AdamW, which corrects Adam's bias, unlike BERT's original optimiser);
- reinit-1: the top block of six and the pooler re-initialised (Zhang et al.'s best for BERT-Large were the top
  3 to 6 of 24 blocks: a sixth to a quarter);
- llrd-0.8: layer-wise lr decay 0.8 (ELECTRA's factor for Base: the embeddings train at 0.8^7 = 0.21 x lr);
- both: reinit-1 and llrd-0.8.

A cell is one `bertkit finetune` run in --out, resumed or skipped when done (a stopped study goes on cell by cell);
--workers runs take one thread each. The summary (each cell's last and best epoch's score, its time) goes to
--summary (docs/few-sample/glue-1k.json); --plot draws each arm's scores per task (docs/few-sample/glue-1k.png), and
the table of means, spreads and worst seeds is printed.

    python benchmarks/few_sample.py --seeds 0 1 2 3 4 --workers 2
"""

from __future__ import annotations

import json
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from bertkit.tasks.finetune import FinetuneConfig, finetune
from run import study_parser

TASKS = {"RTE": "accuracy", "MRPC": "f1", "STS-B": "spearman", "CoLA": "mcc"}
ARMS = {"baseline": {}, "reinit-1": {"reinit_layers": 1}, "llrd-0.8": {"layer_lr_decay": 0.8},
        "both": {"reinit_layers": 1, "layer_lr_decay": 0.8}}
SETTINGS = {"lr": 1e-4, "epochs": 3, "batch_size": 32}


def run_cell(model: Path, data: Path, out: Path, task: str, arm: str, seed: int, examples: int) -> dict:
    """One fine-tuning run (resumed where it stopped); its record."""
    finetune(FinetuneConfig(model_dir=str(model), out_dir=str(out), task=task, data_dir=str(data / "glue" / task),
                            seed=seed, limit_train_examples=examples, threads=1, resume="auto",
                            **SETTINGS, **ARMS[arm]))
    return json.loads((out / "metrics.json").read_text())


def summarise(cells: dict) -> dict:
    """Per task and arm: the mean, standard deviation, minimum and maximum of the last epoch's score over seeds."""
    table: dict = {}
    for cell in cells.values():
        table.setdefault(cell["task"], {}).setdefault(cell["arm"], []).append(cell["last"])
    return {task: {arm: {"seeds": len(v), "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                         "min": min(v), "max": max(v)} for arm, v in arms.items()} for task, arms in table.items()}


def markdown(summary: dict) -> str:
    """The table docs/findings.md shows: per task and arm, the last epoch's mean ± std over seeds [worst seed]."""
    tasks = [t for t in TASKS if t in summary["summary"]]
    lines = ["| arm | " + " | ".join(f"{t}-1k ({TASKS[t]})" for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for arm in ARMS:
        cells = [summary["summary"][t].get(arm) for t in tasks]
        lines.append(f"| {arm} | " + " | ".join(f"{c['mean']:.1f} ± {c['std']:.1f} [{c['min']:.1f}]" if c else "-"
                                               for c in cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(c["task"] == t for c in summary["cells"].values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.4))
    for ax, task in zip(axes if len(tasks) > 1 else [axes], tasks):
        for i, arm in enumerate(ARMS):
            scores = [c["last"] for c in summary["cells"].values() if c["task"] == task and c["arm"] == arm]
            if scores:
                ax.scatter([i] * len(scores), scores, s=18, alpha=0.7)
                ax.hlines(statistics.mean(scores), i - 0.3, i + 0.3, color="black")
        ax.set_xticks(range(len(ARMS)), list(ARMS), rotation=30, fontsize=8)
        ax.set_title(f"{task}-1k ({TASKS[task]}, last epoch)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"all-MiniLM-L6-v2 on {summary['examples']:,} examples: each dot a seed, bar the mean", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = study_parser(__doc__, "few-sample", "few-sample/glue-1k.json")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of every cell's score (default: beside "
                        "--summary)")
    args = parser.parse_args()

    model = args.data / "checkpoints" / "all-MiniLM-L6-v2"
    summary = {"model": model.name, "examples": args.examples, **SETTINGS, "arms": ARMS, "torch": torch.__version__,
               "cells": {}}
    if args.summary.exists():  # the cells of earlier runs of the study (other arms, seeds) stay
        summary["cells"] = json.loads(args.summary.read_text())["cells"]
    todo = [(task, arm, seed) for seed in args.seeds for task in args.tasks for arm in args.arms
            if f"{task}-{arm}-s{seed}" not in summary["cells"]]
    with ProcessPoolExecutor(args.workers) as pool:
        jobs = {pool.submit(run_cell, model, args.data, args.out / f"{t}-{a}-s{s}", t, a, s, args.examples): (t, a, s)
                for t, a, s in todo}
        for job in as_completed(jobs):
            task, arm, seed = jobs[job]
            record, metric = job.result(), TASKS[task]
            summary["cells"][f"{task}-{arm}-s{seed}"] = {
                "task": task, "arm": arm, "seed": seed, "last": record["epochs"][-1][metric],
                "best": record["best"][metric], "best_epoch": record["best_epoch"],
                "train_seconds": round(sum(e.get("train_seconds", 0) for e in record["epochs"]), 1)}
            summary["summary"] = summarise(summary["cells"])
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(json.dumps(summary, indent=2) + "\n")
            print(task, arm, seed, summary["cells"][f"{task}-{arm}-s{seed}"], flush=True)
    if summary["cells"]:
        summary["summary"] = summarise(summary["cells"])
        plot(summary, args.plot or args.summary.with_suffix(".png"))
        print(markdown(summary))


if __name__ == "__main__":
    main()
