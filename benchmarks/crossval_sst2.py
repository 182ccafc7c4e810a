"""What `bertkit crossval` tells about a small labelled file: is its estimate the dev score, and do the out-of-fold
losses find wrong labels?

all-MiniLM-L6-v2 on the first --examples sentences of SST-2's training file, 5 folds (3 epochs, batch 32, lr 1e-4,
the last epoch kept), each fold's model also scored on the real dev set (872 sentences) in the same run:

- clean: the labels as SST-2 has them. The cross-validation estimate (mean ± std over folds, and pooled) beside the
  same fold models' dev accuracy, and beside one model trained on all the sentences and scored on dev;
- noisy: the same sentences with --noise of their labels flipped (seeded): of the rows ranked by out-of-fold loss,
  how many of the first N (N = the number flipped) are flipped ones (precision = recall at N; chance: the noise
  rate), the area under the ROC curve of the loss as a detector, and the dev accuracy the noise costs.

The cells are `crossval` / `finetune` runs in --out (resumed or kept when done); the summary goes to --summary
(docs/crossval/sst2.json), the ranking plot beside it.

    python benchmarks/crossval_sst2.py --threads 1
"""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import torch

from bertkit.tasks.crossval import crossval
from bertkit.tasks.finetune import FinetuneConfig, finetune
from run import study_parser

SETTINGS = {"lr": 1e-4, "epochs": 3, "batch_size": 32, "seed": 0, "keep": "last"}


def write_subset(source, path, examples: int, noise: float, seed: int = 0) -> list[int]:
    """The first `examples` rows of SST-2's train.tsv, with `noise` of their labels flipped; the flipped rows."""
    with open(source, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, rows = rows[0], rows[1:examples + 1]
    flipped = sorted(random.Random(seed).sample(range(len(rows)), round(noise * len(rows)))) if noise else []
    for i in flipped:
        rows[i][1] = "1" if rows[i][1] == "0" else "0"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in [header, *rows]), encoding="utf-8")
    return flipped


def auroc(scores: list[float], positive: list[bool]) -> float:
    """The probability that a positive row outranks a negative one (ties: a half)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    values = np.asarray(scores)
    for v in np.unique(values):  # average ranks over ties
        tie = values == v
        ranks[tie] = ranks[tie].mean()
    pos = np.asarray(positive)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def plot(rows: list[dict], flipped: set[int], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = sorted(rows, key=lambda r: -r["loss"])
    found = np.cumsum([r["index"] in flipped for r in ranked])
    n = np.arange(1, len(ranked) + 1)
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.plot(n, found / len(flipped), label="rows ranked by out-of-fold loss")
    ax.plot(n, n / len(ranked), "--", color="grey", label="random order")
    ax.axvline(len(flipped), color="black", lw=0.6)
    ax.set_xlabel("rows checked (most suspect first)")
    ax.set_ylabel("share of the flipped labels found")
    ax.set_title(f"SST-2, {len(ranked):,} sentences, {len(flipped)} labels flipped", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = study_parser(__doc__, "crossval", "crossval/sst2.json")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    model = args.data / "checkpoints" / "all-MiniLM-L6-v2"
    dev = args.data / "glue" / "SST-2"
    summary = {"model": model.name, "examples": args.examples, "folds": args.folds, "noise": args.noise, **SETTINGS,
               "torch": torch.__version__}
    for arm, noise in (("clean", 0.0), ("noisy", args.noise)):
        train = args.out / f"{arm}.tsv"
        flipped = write_subset(dev / "train.tsv", train, args.examples, noise)
        common = dict(model_dir=str(model), task="SST-2", train_file=str(train), data_dir=str(dev),
                      threads=args.threads, **SETTINGS)
        result = crossval(FinetuneConfig(out_dir=str(args.out / arm), folds=args.folds, **common))
        folds = [json.loads((args.out / arm / f"fold-{k}" / "metrics.json").read_text())
                 for k in range(1, args.folds + 1)]
        dev_scores = [f["epochs"][-1]["dev_accuracy"] for f in folds]
        whole = finetune(FinetuneConfig(out_dir=str(args.out / f"{arm}-whole"), resume="auto", **common))
        cell = {"cv_mean": result["mean"]["accuracy"], "cv_std": result["std"]["accuracy"],
                "cv_pooled": result["pooled"]["accuracy"], "fold_dev_mean": float(np.mean(dev_scores)),
                "fold_dev_std": float(np.std(dev_scores, ddof=1)),
                "per_fold_cv": [f["accuracy"] for f in result["per_fold"]],
                "per_fold_dev": dev_scores, "whole_dev": whole["epochs"][-1]["accuracy"]}  # no split: dev first
        if flipped:
            rows = [json.loads(line) for line in (args.out / arm / "out_of_fold.jsonl").read_text().splitlines()]
            bad = set(flipped)
            ranked = sorted(rows, key=lambda r: -r["loss"])
            top = sum(r["index"] in bad for r in ranked[:len(bad)])
            cell |= {"flipped": len(bad), "found_in_top_n": top, "precision_at_n": 100 * top / len(bad),
                     "found_in_top_2n": sum(r["index"] in bad for r in ranked[:2 * len(bad)]),
                     "auroc": auroc([r["loss"] for r in rows], [r["index"] in bad for r in rows]),
                     "chance_precision": 100 * len(bad) / len(rows)}
            plot(rows, bad, args.summary.with_suffix(".png"))
        summary[arm] = cell
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
        print(arm, cell, flush=True)


if __name__ == "__main__":
    main()
