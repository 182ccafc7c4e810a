"""What `bertkit crossval` tells about a small labelled file: is its estimate the score on unseen data, and do the
out-of-fold losses find wrong labels?

all-MiniLM-L6-v2 on the first --examples rows of a training file, 5 folds (3 epochs, batch 32, lr 1e-4, the last
epoch kept), each fold's model also scored on the task's real dev data in the same run:

- SST-2 clean: the labels as SST-2 has them. The cross-validation estimate (mean ± std over folds, and pooled) beside
  the same fold models' dev accuracy (872 sentences), and beside one model trained on all the rows and scored on dev.
  SST-2's training rows are phrases of the treebank's sentences (9 words on average against dev's 20, and some rows
  inside others), its dev rows whole sentences;
- SST-2 noisy: the same rows with --noise of their labels flipped (seeded): of the rows ranked by out-of-fold loss,
  how many of the first N (N = the number flipped) are flipped ones (precision = recall at N; chance: the noise
  rate), the area under the ROC curve of the loss as a detector, and the dev accuracy the noise costs;
- SST-2 grouped: the clean rows with a phrase and any row it is inside (as whole words) in one group, held out
  together (`--group`): the estimate without a phrase's longer phrase on the training side;
- MRPC clean: Microsoft's training file, whose test file (the dev data here, 1,725 pairs) was drawn from the same
  pairs: the estimate where the file and the unseen data are alike (F1 and accuracy).

The cells are `crossval` / `finetune` runs in --out (resumed or kept when done); the summary goes to --summary
(docs/crossval/glue.json, a cell per --cells entry, other cells kept), the ranking plot beside it (NAME-ranking.png).

    python benchmarks/crossval_study.py --threads 1 --cells SST-2-clean SST-2-noisy SST-2-grouped MRPC-clean
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


LABEL_COLUMN = {"SST-2": 1, "MRPC": 0}  # SST-2's train.tsv: sentence, label; Microsoft's MRPC file: Quality first
TRAIN_FILE = {"SST-2": "train.tsv", "MRPC": "msr_paraphrase_train.txt"}


def write_subset(task: str, source, path, examples: int, noise: float, seed: int = 0) -> list[int]:
    """The header and first `examples` rows of a task's training file, with `noise` of their labels flipped; the
    flipped rows."""
    with open(source, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, rows = rows[0], rows[1:examples + 1]
    flipped = sorted(random.Random(seed).sample(range(len(rows)), round(noise * len(rows)))) if noise else []
    column = LABEL_COLUMN[task]
    for i in flipped:
        rows[i][column] = "1" if rows[i][column] == "0" else "0"
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


def plot(task: str, rows: list[dict], flipped: set[int], path) -> None:
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
    ax.set_title(f"{task}: {len(ranked):,} training rows, {len(flipped)} labels flipped; ranked by out-of-fold loss",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


CELLS = {"SST-2-clean": ("SST-2", 0.0), "SST-2-noisy": ("SST-2", None), "MRPC-clean": ("MRPC", 0.0),
         "SST-2-grouped": ("SST-2", 0.0)}


def write_grouped(subset, path) -> int:
    """SST-2's rows as a custom file with a `doc` column: rows one of which is inside the other (as whole words),
    and so on through their chains, share a doc, so that a phrase and the longer phrase it was cut from are never on
    both sides of a split; the number of docs."""
    with open(subset, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    texts = [f" {r[0].strip()} " for r in rows]
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, t in enumerate(texts):
        for j, u in enumerate(texts):
            if len(t) < len(u) and t in u:
                parent[root(i)] = root(j)
    path.write_text("sentence\tlabel\tdoc\n" + "".join(f"{r[0]}\t{r[1]}\tdoc-{root(i)}\n" for i, r in enumerate(rows)),
                    encoding="utf-8")
    return len({root(i) for i in range(len(rows))})


def main() -> None:
    parser = study_parser(__doc__, "crossval", "crossval/glue.json")
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    model = args.data / "checkpoints" / "all-MiniLM-L6-v2"
    summary = {"model": model.name, "examples": args.examples, "folds": args.folds, "noise": args.noise, **SETTINGS,
               "torch": torch.__version__, "cells": {}}
    if args.summary.exists():
        summary["cells"] = json.loads(args.summary.read_text()).get("cells", {})
    for name in args.cells:
        task, noise = CELLS[name]
        noise = args.noise if noise is None else noise
        data = args.data / "glue" / task
        train = args.out / f"{name}.tsv"
        flipped = write_subset(task, data / TRAIN_FILE[task], train, args.examples, noise)
        common = dict(model_dir=str(model), task=task, train_file=str(train), data_dir=str(data),
                      threads=args.threads, **SETTINGS)
        cell = {"task": task, "noise": noise}
        if name.endswith("-grouped"):  # the same rows as a custom file with a doc column, dev.tsv scored after
            grouped = args.out / f"{name}-docs.tsv"
            cell["docs"] = write_grouped(train, grouped)
            common |= {"task": "custom", "train_file": str(grouped), "data_dir": None,
                       "eval_file": str(data / "dev.tsv"), "group": "doc"}
        result = crossval(FinetuneConfig(out_dir=str(args.out / name), folds=args.folds, **common))
        metric = "f1" if task == "MRPC" else "accuracy"
        folds = [json.loads((args.out / name / f"fold-{k}" / "metrics.json").read_text())
                 for k in range(1, args.folds + 1)]
        # one model on every row, scored on dev: not for the grouped rows, which are the clean cell's
        whole = None if "group" in common else finetune(FinetuneConfig(out_dir=str(args.out / f"{name}-whole"),
                                                                       resume="auto", **common))
        cell |= {"metric": metric, "examples": result["examples"]}
        for m in result["mean"]:
            dev_scores = [f["epochs"][-1][f"dev_{m}"] for f in folds]
            cell[m] = {"cv_mean": result["mean"][m], "cv_std": result["std"][m], "cv_pooled": result["pooled"][m],
                       "per_fold_cv": [f[m] for f in result["per_fold"]], "per_fold_dev": dev_scores,
                       "fold_dev_mean": float(np.mean(dev_scores)), "fold_dev_std": float(np.std(dev_scores, ddof=1)),
                       "whole_dev": whole["epochs"][-1][m] if whole else None}  # no split there: dev first
        if flipped:
            rows = [json.loads(line) for line in (args.out / name / "out_of_fold.jsonl").read_text().splitlines()]
            bad = set(flipped)
            ranked = sorted(rows, key=lambda r: -r["loss"])
            top = sum(r["index"] in bad for r in ranked[:len(bad)])
            cell |= {"flipped": len(bad), "found_in_top_n": top, "precision_at_n": 100 * top / len(bad),
                     "found_in_top_2n": sum(r["index"] in bad for r in ranked[:2 * len(bad)]),
                     "auroc": auroc([r["loss"] for r in rows], [r["index"] in bad for r in rows]),
                     "chance_precision": 100 * len(bad) / len(rows)}
            plot(task, rows, bad, args.summary.with_name(f"{name}-ranking.png"))
        summary["cells"][name] = cell
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
        print(name, cell, flush=True)


if __name__ == "__main__":
    main()
