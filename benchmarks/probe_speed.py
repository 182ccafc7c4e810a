"""The probe fit of `bertkit probe` against scikit-learn's, on the same features: time and agreement.

all-MiniLM-L6-v2's mean-pooled output at --layer for the first --examples SST-2 training sentences (and the 872 dev
sentences) is computed once; then, at each L2 strength of `bertkit probe`'s default grid, bertkit's LinearProbe
(L-BFGS in float64 on standardized features, from zeros, to a gradient of 1e-6) and scikit-learn's
LogisticRegression (lbfgs, C = 1 / (l2 x N), tol 1e-6: the same model, tests/tasks/test_probe.py) fit the same rows,
alternately, --rounds times each; the fastest round of each is kept. Also the
whole L2 search as `bertkit probe` runs it (fits chained from the strongest penalty down, each from the last one's
optimum) against the same six cold scikit-learn fits. Reported: seconds, the ratio, the largest difference of their
dev probabilities and both dev accuracies. One thread each (--threads).

    python benchmarks/probe_speed.py --out benchmarks/probe_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from bertkit.data.glue import read_glue_file
from bertkit.model import BertModel
from bertkit.tasks.classification import encode
from bertkit.tasks.probe import LinearProbe, ProbeConfig, layer_features
from bertkit.tokenizer import Tokenizer
from run import machine


def features(model_dir: Path, data: Path, examples: int, layer: int):
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir).eval()
    train = read_glue_file("SST-2", data / "train.tsv")[:examples]
    dev = read_glue_file("SST-2", data / "dev.tsv")

    def of(rows):
        encoded = encode(rows, tokenizer, 128, with_labels=False)
        return torch.from_numpy(layer_features(model, encoded, "mean", 64, tokenizer.pad_id, "features")[layer])

    return (of(train).double(), torch.tensor([e.label for e in train]), of(dev).double(),
            np.array([e.label for e in dev]))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = Path(os.environ.get("BERTKIT_DATA", "../shared/data"))
    parser.add_argument("--model-dir", type=Path, default=data / "checkpoints" / "all-MiniLM-L6-v2")
    parser.add_argument("--data", type=Path, default=data / "glue" / "SST-2")
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)  # scikit-learn's BLAS and OpenMP, as torch's

    x, y, dev_x, dev_y = features(args.model_dir, args.data, args.examples, args.layer)
    mean, std = x.mean(0), x.std(0, correction=0).clamp(min=1e-6)
    z, dev_z = ((x - mean) / std).numpy(), ((dev_x - mean) / std).numpy()
    grid, n = ProbeConfig().l2, len(x)
    rows, ours_total, theirs_total = [], 0.0, 0.0
    for l2 in grid:
        ours_times, theirs_times = [], []
        for _ in range(args.rounds):
            seconds, ours = timed(lambda: LinearProbe.fit(x, y, "classes", l2, 2))
            ours_times.append(seconds)
            seconds, theirs = timed(lambda: LogisticRegression(C=1 / (l2 * n), tol=1e-6, max_iter=10_000).fit(
                z, y.numpy()))
            theirs_times.append(seconds)
        probabilities = torch.softmax(ours.logits(dev_x), -1).numpy()
        row = {"l2": l2, "bertkit_s": min(ours_times), "sklearn_s": min(theirs_times),
               "max_probability_difference": float(np.abs(probabilities - theirs.predict_proba(dev_z)).max()),
               "bertkit_dev_accuracy": float((probabilities.argmax(-1) == dev_y).mean() * 100),
               "sklearn_dev_accuracy": float((theirs.predict(dev_z) == dev_y).mean() * 100),
               "sklearn_iterations": int(theirs.n_iter_[0])}
        row["ratio"] = row["sklearn_s"] / row["bertkit_s"]
        theirs_total += row["sklearn_s"]
        rows.append(row)
        print(json.dumps(row))

    def chained():
        start = None
        for l2 in sorted(grid, reverse=True):
            start = LinearProbe.fit(x, y, "classes", l2, 2, start)

    ours_total = min(timed(chained)[0] for _ in range(args.rounds))
    result = {"machine": machine(), "model": str(args.model_dir), "examples": n, "layer": args.layer,
              "threads": args.threads, "rows": rows,
              "search": {"bertkit_chained_s": ours_total, "sklearn_cold_s": theirs_total,
                         "ratio": theirs_total / ours_total}}
    print(json.dumps(result["search"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
