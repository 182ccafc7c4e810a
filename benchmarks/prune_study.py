"""Structured pruning on SST-2 (`bertkit prune`): how much of a fine-tuned MiniLM can go, and what fine-tuning the
pruned model again (on the labels, or from the unpruned run as a teacher) gets back.

The setting of distill_sst2.py: all-MiniLM-L6-v2 fine-tuned on the first --labelled SST-2 training sentences
(lr 1e-4, 3 epochs) is the run pruned. Cells, each skipped when its output exists (a stopped study resumes):

- prune-L<layers>-W<width>[-top]: `bertkit prune` of the run to <layers> blocks (the least important removed, or the
  top ones) of <width> feed-forward units (MiniLM has 6 of 1,536), scored on dev without training again;
- <cell>+labels: the pruned folder fine-tuned again on the same sentences (--recover-epochs, the same lr);
- <cell>+teacher: the same, distilled from the unpruned run (`--teacher`);
- first-L<n>: MiniLM's first n pretrained blocks fine-tuned on the sentences as the run was: a model of the pruned
  one's depth that never saw the full model's fine-tuning.

Dev: SST-2's 872 sentences. Each cell's accuracy is its last epoch's (and the best epoch's beside it: chosen on dev).
The speed of each pruned model is prune's own measurement (seconds per batch of 128 dev sentences, the full model
timed in turn with it, --threads). The summary goes to --summary (docs/prune/sst2.json), the plot (.png) and the
table (.md) beside it. --seeds runs the fine-tuned cells at more seeds (named -s<seed>); a second process with
--reverse takes them last to first, each skipping a cell the other is running, and a last invocation collects all.
The summary's -iter cells were pruned by `bertkit prune --iterative` (blocks removed one at a time, the importances
measured again after each; commit d7c4ec2), an option removed since: it did not pay once fine-tuned again.

    python benchmarks/prune_study.py --threads 1
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bertkit.errors import BertkitError
from bertkit.tasks.finetune import FinetuneConfig, finetune
from bertkit.tasks.prune import PruneConfig, prune
from bertkit.train.rundir import check_not_in_use
from distill_sst2 import first_layers, write_csv
from run import study_parser

GRID = [(6, 768, "importance"), (6, 384, "importance"), (6, 192, "importance"), (4, 1536, "importance"),
        (4, 1536, "top"), (3, 1536, "importance"), (3, 1536, "top"), (4, 768, "importance"), (3, 384, "importance"),
        (2, 768, "importance"), (2, 1536, "importance")]
RECOVERED = ["prune-L6-W384", "prune-L6-W192", "prune-L4-W1536", "prune-L4-W1536-top", "prune-L3-W1536",
             "prune-L3-W1536-top", "prune-L3-W384", "prune-L2-W1536"]
FIRST_LAYERS = (4, 3)


def cell_name(layers: int, width: int, drop: str) -> str:
    return f"prune-L{layers}-W{width}" + ("-top" if drop == "top" else "")


def run_record(out: Path) -> dict:
    record = json.loads((out / "metrics.json").read_text())
    return {"accuracy": record["epochs"][-1]["accuracy"], "best_epoch_accuracy": record["best"]["accuracy"],
            "best_epoch": record["best_epoch"],
            "train_seconds": round(sum(e.get("train_seconds", 0) for e in record["epochs"]), 1)}


def main() -> None:
    parser = study_parser(__doc__, "prune", "prune/sst2.json")
    parser.add_argument("--labelled", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--recover-epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the runs fine-tuned again")
    parser.add_argument("--reverse", action="store_true", help="the fine-tuned cells last to first (a second "
                        "process of the study beside the first; cells one is running the other skips)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    glue = args.data / "glue" / "SST-2"
    rows = [line.rstrip("\n").split("\t") for line in open(glue / "train.tsv", encoding="utf-8")][1:]
    train = write_csv(args.out / "labelled.csv", rows[:args.labelled])
    dev = write_csv(args.out / "dev.csv", [tuple(line.rstrip("\n").split("\t")) for line in
                                           open(glue / "dev.tsv", encoding="utf-8")][1:])
    minilm = args.data / "checkpoints" / "all-MiniLM-L6-v2"
    summary = {"model": minilm.name, "labelled": args.labelled, "dev": "SST-2 dev (872)", "lr": args.lr,
               "epochs": args.epochs, "recover_epochs": args.recover_epochs, "threads": args.threads,
               "torch": torch.__version__, "cells": {}}
    if args.summary.exists():
        summary["cells"] = json.loads(args.summary.read_text())["cells"]

    def save(name: str, record: dict) -> None:
        summary["cells"][name] = record
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
        print(name, record, flush=True)

    def tuned(name: str, model: str, epochs: int, seed: int = 0, **extra) -> None:
        out = args.out / name
        if not (out / "metrics.json").exists():
            try:
                check_not_in_use(out)
            except BertkitError:  # another process of the study runs it: collected by a later invocation
                print(name, "skipped: in use", flush=True)
                return
            finetune(FinetuneConfig(model_dir=model, out_dir=str(out), task="custom", text_a="text", train_file=train,
                                    eval_file=dev, lr=args.lr, epochs=epochs, seed=seed, threads=args.threads,
                                    resume="auto", **extra))
        save(name, run_record(out))

    teacher = args.out / "run"
    tuned("run", str(minilm), args.epochs)
    for layers, width, drop in GRID:
        name = cell_name(layers, width, drop)
        out = args.out / name
        if not (out / "prune.json").exists():
            prune(PruneConfig(run=str(teacher), out=str(out), layers=layers, intermediate_size=width,
                              drop_layers=drop, threads=args.threads, overwrite=True))
        pruned = json.loads((out / "prune.json").read_text())
        save(name, {"layers": layers, "intermediate_size": width, "drop_layers": drop,
                    "kept_layers": pruned["kept_layers"], "accuracy": pruned["after"]["accuracy"],
                    "parameters": pruned["parameters"]["after"],
                    "encoder_parameters": pruned["encoder_parameters"]["after"],
                    "speedup": round(pruned["seconds_per_batch"]["before"] / pruned["seconds_per_batch"]["after"], 3),
                    "seconds_per_batch": pruned["seconds_per_batch"]})
    cells = [(f"{name}+{how}", str(args.out / name), args.recover_epochs,
              {"teacher": str(teacher)} if how == "teacher" else {})
             for name in RECOVERED for how in ("labels", "teacher")]
    cells += [(f"first-L{n}", first_layers(minilm, n, args.out / f"minilm-L{n}"), args.epochs, {})
              for n in FIRST_LAYERS]
    for name, model, epochs, extra in cells[::-1] if args.reverse else cells:
        for seed in args.seeds:
            tuned(name + (f"-s{seed}" if seed else ""), model, epochs, seed, **extra)
    plot(summary, args.summary.with_suffix(".png"))
    args.summary.with_suffix(".md").write_text(table(summary))
    print(table(summary))


def seeds_of(cells: dict, name: str) -> list[float]:
    """The accuracies of a fine-tuned cell at every seed run (seed 0 unsuffixed, the others -s<seed>)."""
    return [c["accuracy"] for n, c in cells.items() if n == name or n.startswith(name + "-s")]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def table(summary: dict) -> str:
    """docs/prune/sst2.md: a row per pruned cell: what was kept, its size and speed-up, its accuracy as pruned and
    fine-tuned again (mean over the seeds run, each seed in brackets)."""
    cells = summary["cells"]

    def shown(name: str) -> str:
        values = seeds_of(cells, name)
        if not values:
            return ""
        each = f" ({', '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else ""
        return f"{mean(values):.1f}{each}"

    lines = [f"Unpruned run: {cells['run']['best_epoch_accuracy']:.2f} (the kept epoch, chosen on dev; last epoch "
             f"{cells['run']['accuracy']:.2f}).", "",
             "| cell | blocks kept | units | parameters | speed-up | pruned | + labels | + teacher |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in cells.items():
        if name.startswith("prune-") and "+" not in name:
            lines.append(f"| {name.removeprefix('prune-')} | {', '.join(map(str, c['kept_layers']))} | "
                         f"{c['intermediate_size']:,} | {c['parameters'] / 1e6:.1f}M | {c['speedup']:.2f}x | "
                         f"{c['accuracy']:.1f} | {shown(name + '+labels')} | {shown(name + '+teacher')} |")
    for n in FIRST_LAYERS:
        if seeds_of(cells, f"first-L{n}"):
            lines.append(f"| MiniLM's first {n} blocks, fine-tuned | {', '.join(map(str, range(n)))} | 1,536 | | | | "
                         f"{shown(f'first-L{n}')} | |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summary["cells"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    pruned = {n: c for n, c in cells.items() if n.startswith("prune-") and "+" not in n}
    for label, suffix, marker in (("pruned", "", "o"), ("pruned, fine-tuned again", "+labels", "s"),
                                  ("pruned, distilled from the run", "+teacher", "^")):
        points = [(c["speedup"], mean(seeds_of(cells, n + suffix)) if suffix else c["accuracy"])
                  for n, c in pruned.items() if not suffix or seeds_of(cells, n + suffix)]
        ax.scatter(*zip(*points), marker=marker, label=label)
    for n, c in pruned.items():
        ax.annotate(n.removeprefix("prune-"), (c["speedup"], c["accuracy"]), fontsize=6, xytext=(3, -8),
                    textcoords="offset points")
    first = [(pruned[f"prune-L{n}-W1536"]["speedup"], mean(seeds_of(cells, f"first-L{n}"))) for n in FIRST_LAYERS
             if seeds_of(cells, f"first-L{n}") and f"prune-L{n}-W1536" in pruned]
    if first:
        ax.scatter(*zip(*first), marker="x", color="black", label="MiniLM's first blocks, fine-tuned")
    full = cells["run"]["best_epoch_accuracy"]
    ax.axhline(full, color="grey", linestyle="--", label=f"the run (6 blocks, 1,536 units): {full:.1f}")
    ax.set_xlabel("speed-up over the run (dev batches of 128, CPU, one thread)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title(f"Pruning MiniLM fine-tuned on {summary['labelled']:,} SST-2 sentences")
    ax.legend(fontsize=8, loc=(0.36, 0.03))  # the empty corner below the middle
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
