"""Structured pruning on SST-2 (`bertkit prune`): how much of a fine-tuned MiniLM can go, and what fine-tuning the
pruned model again (on the labels, or from the unpruned run as a teacher) gets back.

The setting of distill_sst2.py: all-MiniLM-L6-v2 fine-tuned on the first --labelled SST-2 training sentences
(lr 1e-4, 3 epochs) is the run pruned. Cells, each skipped when its output exists (a stopped study resumes):

- prune-L<layers>-W<width>[-top|-iter]: `bertkit prune` of the run to <layers> blocks (the least important removed
  at once, the top ones, or the least important one at a time: --iterative) of <width> feed-forward units (MiniLM has
  6 of 1,536), scored on dev without training again;
- <cell>+labels: the pruned folder fine-tuned again on the same sentences (--recover-epochs, the same lr);
- <cell>+teacher: the same, distilled from the unpruned run (`--teacher`);
- first-L<n>: MiniLM's first n pretrained blocks fine-tuned on the sentences as the run was: a model of the pruned
  one's depth that never saw the full model's fine-tuning.

Dev: SST-2's 872 sentences. Each cell's accuracy is its last epoch's (and the best epoch's beside it: chosen on dev).
The speed of each pruned model is prune's own measurement (seconds per batch of 128 dev sentences, the full model
timed in turn with it, --threads). The summary goes to --summary (docs/prune/sst2.json), the plot beside it.

    python benchmarks/prune_study.py --threads 1
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bertkit.tasks.finetune import FinetuneConfig, finetune
from bertkit.tasks.prune import PruneConfig, prune
from distill_sst2 import first_layers, write_csv
from run import study_parser

GRID = [(6, 768, "importance"), (6, 384, "importance"), (6, 192, "importance"), (4, 1536, "importance"),
        (4, 1536, "top"), (3, 1536, "importance"), (3, 1536, "top"), (4, 768, "importance"), (3, 384, "importance"),
        (2, 768, "importance"), (4, 1536, "iterative"), (3, 1536, "iterative"), (3, 384, "iterative"),
        (2, 1536, "importance"), (2, 1536, "iterative")]
RECOVERED = ["prune-L6-W384", "prune-L6-W192", "prune-L4-W1536", "prune-L4-W1536-top", "prune-L3-W1536",
             "prune-L3-W1536-top", "prune-L3-W384", "prune-L4-W1536-iter", "prune-L3-W1536-iter",
             "prune-L3-W384-iter", "prune-L2-W1536", "prune-L2-W1536-iter"]
FIRST_LAYERS = (4, 3)


def cell_name(layers: int, width: int, drop: str) -> str:
    return f"prune-L{layers}-W{width}" + {"top": "-top", "iterative": "-iter"}.get(drop, "")


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

    def tuned(model: str, out: Path, epochs: int, **extra) -> dict:
        if not (out / "metrics.json").exists():
            finetune(FinetuneConfig(model_dir=model, out_dir=str(out), task="custom", text_a="text", train_file=train,
                                    eval_file=dev, lr=args.lr, epochs=epochs, seed=0, threads=args.threads,
                                    resume="auto", **extra))
        return run_record(out)

    teacher = args.out / "run"
    save("run", tuned(str(minilm), teacher, args.epochs))
    for layers, width, drop in GRID:
        name = cell_name(layers, width, drop)
        out = args.out / name
        if not (out / "prune.json").exists():
            prune(PruneConfig(run=str(teacher), out=str(out), layers=layers, intermediate_size=width,
                              drop_layers="top" if drop == "top" else "importance", iterative=drop == "iterative",
                              threads=args.threads, overwrite=True))
        pruned = json.loads((out / "prune.json").read_text())
        save(name, {"layers": layers, "intermediate_size": width, "drop_layers": drop,
                    "kept_layers": pruned["kept_layers"], "accuracy": pruned["after"]["accuracy"],
                    "parameters": pruned["parameters"]["after"],
                    "encoder_parameters": pruned["encoder_parameters"]["after"],
                    "speedup": round(pruned["seconds_per_batch"]["before"] / pruned["seconds_per_batch"]["after"], 3),
                    "seconds_per_batch": pruned["seconds_per_batch"]})
    for name in RECOVERED:
        save(f"{name}+labels", tuned(str(args.out / name), args.out / f"{name}+labels", args.recover_epochs))
        save(f"{name}+teacher", tuned(str(args.out / name), args.out / f"{name}+teacher", args.recover_epochs,
                                      teacher=str(teacher)))
    for n in FIRST_LAYERS:
        model = first_layers(minilm, n, args.out / f"minilm-L{n}")
        save(f"first-L{n}", tuned(model, args.out / f"first-L{n}", args.epochs))
    plot(summary, args.summary.with_suffix(".png"))


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summary["cells"]
    full = cells["run"]["accuracy"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    pruned = {n: c for n, c in cells.items() if n.startswith("prune-") and "+" not in n}
    for label, suffix, marker in (("pruned", "", "o"), ("pruned, fine-tuned again", "+labels", "s"),
                                  ("pruned, distilled from the run", "+teacher", "^")):
        points = [(c["speedup"], cells[n + suffix]["accuracy"]) for n, c in pruned.items() if n + suffix in cells]
        ax.scatter(*zip(*points), marker=marker, label=label)
        for n, c in pruned.items():
            if n + suffix in cells and suffix == "":
                ax.annotate(n.removeprefix("prune-"), (c["speedup"], c["accuracy"]), fontsize=7,
                            xytext=(3, -9), textcoords="offset points")
    ax.axhline(full, color="grey", linestyle="--", label=f"the run (6 blocks, 1,536 units): {full:.1f}")
    ax.set_xlabel("speed-up over the run (dev batches of 128, CPU)")
    ax.set_ylabel("SST-2 dev accuracy (last epoch)")
    ax.set_title(f"Pruning MiniLM fine-tuned on {summary['labelled']:,} SST-2 sentences")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
