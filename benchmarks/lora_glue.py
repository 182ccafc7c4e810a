"""LoRA against full fine-tuning on five GLUE tasks (`finetune --lora-rank`): what a few hundred thousand trained
parameters give up, and what they save in time.

all-MiniLM-L6-v2 (6 layers, 384 wide, 22.7M parameters) on CoLA, SST-2 (its first --sst2-examples training
sentences), MRPC (Microsoft's train and test files), STS-B and RTE, scored on each dev set, 3 epochs, batch 32. Arms:

- full: every weight trained, lr 1e-4 (the rate every MiniLM run in docs/findings.md uses);
- lora-qv: LoRA rank 8, alpha 8 on the query and value projections (Hu et al. 2021's GLUE setting), the task head
  trained too, lr 5e-4 (their RoBERTa-base rate);
- lora-all: the same on every Linear of the encoder blocks;
- lora-qv-10ep: lora-qv for 10 epochs instead of 3 (the LoRA paper trained 25 to 80 epochs on GLUE), run on CoLA and
  SST-2 only (`--tasks`): whether the gap to full fine-tuning is the epochs'.

The rates are fixed beforehand, not searched on dev. Each cell is a `bertkit finetune` run in --out, skipped when
its metrics.json exists (a stopped study resumes cell by cell); the summary (each cell's best and last epoch, its
training time and trained parameters) goes to --summary (docs/lora/glue.json).

    python benchmarks/lora_glue.py --threads 1 --seeds 0 1 --arms full
"""

from __future__ import annotations

import json

import torch

from bertkit.tasks.finetune import FinetuneConfig, finetune
from run import study_parser

TASKS = {"CoLA": "mcc", "SST-2": "accuracy", "MRPC": "f1", "STS-B": "spearman", "RTE": "accuracy"}
ARMS = {"full": {"lr": 1e-4},
        "lora-qv": {"lr": 5e-4, "lora_rank": 8, "lora_alpha": 8.0, "lora_targets": "query,value"},
        "lora-all": {"lr": 5e-4, "lora_rank": 8, "lora_alpha": 8.0, "lora_targets": "all"},
        "lora-qv-10ep": {"lr": 5e-4, "lora_rank": 8, "lora_alpha": 8.0, "lora_targets": "query,value", "epochs": 10}}


def main() -> None:
    parser = study_parser(__doc__, "lora", "lora/glue.json")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--sst2-examples", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    model = args.data / "checkpoints" / "all-MiniLM-L6-v2"
    summary = {"model": model.name, "epochs": args.epochs, "batch_size": 32, "sst2_examples": args.sst2_examples,
               "arms": ARMS, "torch": torch.__version__, "cells": {}}
    if args.summary.exists():  # the cells of earlier runs of the study (other arms, seeds) stay
        summary["cells"] = json.loads(args.summary.read_text())["cells"]
    for seed in args.seeds:
        for arm in args.arms:
            for task in args.tasks:
                key = f"{task}-{arm}-s{seed}"
                out = args.out / key
                threads = summary["cells"].get(key, {}).get("threads", args.threads)  # of the invocation that ran it
                if not (out / "metrics.json").exists():
                    threads = args.threads
                    limit = args.sst2_examples if task == "SST-2" else None
                    finetune(FinetuneConfig(model_dir=str(model), out_dir=str(out), task=task,
                                            data_dir=str(args.data / "glue" / task), seed=seed,
                                            limit_train_examples=limit, threads=args.threads, resume="auto",
                                            **{"epochs": args.epochs, **ARMS[arm]}))
                record = json.loads((out / "metrics.json").read_text())
                metric = TASKS[task]
                summary["cells"][key] = {
                    "task": task, "arm": arm, "seed": seed, metric: record["best"][metric],
                    "best_epoch": record["best_epoch"], f"last_epoch_{metric}": record["epochs"][-1][metric],
                    "train_rows": record["train_rows"], "trained_parameters": record.get("trained_parameters"),
                    "train_seconds": round(sum(e.get("train_seconds", 0) for e in record["epochs"]), 1),
                    "threads": threads}
                args.summary.parent.mkdir(parents=True, exist_ok=True)
                args.summary.write_text(json.dumps(summary, indent=2) + "\n")
                print(key, summary["cells"][key], flush=True)


if __name__ == "__main__":
    main()
