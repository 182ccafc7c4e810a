"""How calibrated are fine-tuned classifiers, and what does temperature scaling (`evaluate --calibrate`) buy, fitted
honestly? Reads the run folders of benchmarks/lora_glue.py (all-MiniLM-L6-v2 on CoLA, SST-2, MRPC and RTE, fully
fine-tuned and with LoRA, two seeds) and scores each dev set's probabilities as they are and after temperature
scaling cross-fitted in two folds: the dev examples split by parity, T fitted on one half scores the other, so no
example is scored by a temperature fitted on it. The folders are read, never changed.

Writes --summary (docs/calibration/glue.json): per cell the dev accuracy, ECE (15 bins) and NLL before and after,
and the two folds' temperatures.

    python benchmarks/calibration_glue.py --runs runs/lora --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from scipy.special import softmax

from bertkit.config import BertConfig
from bertkit.tasks.evaluation import label_names, label_order, loaded
from bertkit.tasks.finetune import FinetuneConfig, load_task
from bertkit.tasks.metrics import calibration_scores, fit_temperature
from bertkit.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
TASKS = ("CoLA", "SST-2", "MRPC", "RTE")


def dev_logits(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's model's logits on its task's dev split, and the gold classes."""
    config = dataclasses.replace(FinetuneConfig.load(run), model_dir=str(run))
    model_config = BertConfig.load(run)
    task = load_task(config, need_train=False, labels=label_names(model_config))
    tokenizer = Tokenizer.from_pretrained(run)
    model = loaded(task.model_class, run, torch.device("cpu"), False, label_order(task, model_config, run))
    examples = next(iter(task.evals.values()))
    logits = task.logits(model, tokenizer, examples, config, torch.device("cpu"))
    return logits.double().numpy(), np.asarray(task.gold(examples))


def cross_fitted(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Each example's probabilities under the temperature fitted on the other half of the examples."""
    halves = [np.arange(len(y)) % 2 == k for k in (0, 1)]
    probabilities, temperatures = np.zeros_like(z), []
    for fit, score in (halves, halves[::-1]):
        t = fit_temperature(z[fit], y[fit])
        probabilities[score] = softmax(z[score] / t, axis=1)
        temperatures.append(t)
    return probabilities, temperatures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/lora"))
    parser.add_argument("--summary", type=Path, default=HERE.parent / "docs" / "calibration" / "glue.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cells = {}
    for run in sorted(p for p in args.runs.iterdir() if any(p.name.startswith(f"{t}-") for t in TASKS)):
        if not (run / "results.md").is_file():
            continue  # a cell still training (metrics.json is written after every epoch, results.md at the end)
        z, y = dev_logits(run)
        before = calibration_scores(softmax(z, axis=1), y)
        probabilities, temperatures = cross_fitted(z, y)
        after = calibration_scores(probabilities, y)
        cells[run.name] = {"examples": len(y), "accuracy": 100 * float((z.argmax(1) == y).mean()),
                           "ece": before["ece"], "nll": before["nll"], "calibrated_ece": after["ece"],
                           "calibrated_nll": after["nll"], "temperatures": temperatures}
        print(run.name, {k: round(v, 3) if isinstance(v, float) else v for k, v in cells[run.name].items()}, flush=True)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps({"runs": str(args.runs), "bins": 15, "torch": torch.__version__,
                                        "cells": cells}, indent=2) + "\n")


if __name__ == "__main__":
    main()
