"""k-fold cross-validation (`bertkit crossval`): what a labelled file too small to spare a dev set says about a model,
with its spread, and which of its labels the models disagree with most.

The training file is cut into --folds folds stratified by label (`stratified_order`); fold k's run trains on the
others and is scored on fold k (`finetune --folds K --fold k`, run folder OUT/fold-k, resumed or kept when done).
Each fold keeps its last epoch by default (`--keep last`), so no choice is made on the rows it is scored on. Every
row of the file is then predicted once, by the model that did not see it: out_of_fold.jsonl, and its metrics
pooled over the whole file beside the mean and spread of the per-fold scores. The rows whose gold label the
out-of-fold model finds least likely are listed first in crossval.md: where label errors are to be looked for
(the idea of Northcutt et al.'s confident learning, in its plainest form: ranked by the loss).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from bertkit import hub
from bertkit.checkpoint import atomic_write_text
from bertkit.config import write_json
from bertkit.errors import BertkitError
from bertkit.tasks.classification import HELD_OUT, TextTask
from bertkit.tasks.distill import check_teacher_data
from bertkit.tasks.finetune import FinetuneConfig, finetune, load_task, plural, resolve_device
from bertkit.train import distributed
from bertkit.train.rundir import check_output_path, make_dir

SUSPECTS = 20  # rows crossval.md lists, least likely gold label first


def crossval(config: FinetuneConfig) -> dict:
    """Run every fold of `config.folds` into OUT/fold-k, predict each row of the training file out of fold, and
    write crossval.json, crossval.md and out_of_fold.jsonl into `config.out_dir`; returns the summary."""
    if config.folds < 2:
        raise BertkitError(f"--folds is {config.folds}; expected 2 or more folds to cross-validate over")
    config.check()
    root = Path(config.out_dir)
    check_output_path(root, "--out-dir", {"--model-dir": config.model_dir})
    runs = [dataclasses.replace(config, fold=k, out_dir=str(root / f"fold-{k}"),
                                resume=None if config.overwrite else "auto") for k in range(1, config.folds + 1)]
    task = load_task(runs[0])  # the data and the split, checked before the first fold trains
    if config.teacher:  # a teacher fine-tuned on the whole file has seen every fold's held-out rows
        for run in runs:
            check_teacher_data(run)
    if not isinstance(task, TextTask):
        raise BertkitError(f"--task {config.task}: cross-validation is for a GLUE task or custom files")
    make_dir(root, "--out-dir")
    records = [finetune(run) for run in runs]
    with distributed.torch_threads(config.threads, 1):
        rows = [row for run in runs for row in out_of_fold(run)]
    rows.sort(key=lambda r: r["index"])
    summary = summarise(config, task, records, rows)
    atomic_write_text(root / "out_of_fold.jsonl", "".join(_json_line(r) for r in rows))
    write_json(root / "crossval.json", summary)
    table = crossval_table(config, summary, rows)
    atomic_write_text(root / "crossval.md", table)
    return summary | {"table": table}


def out_of_fold(run: FinetuneConfig) -> list[dict]:
    """The held-out rows of one fold, each predicted by that fold's kept model: its place in the training file
    (`index`) and line, text, gold label, the prediction (as `predict` gives it) and the loss of the gold label."""
    from bertkit.model import BertForSequenceClassification
    from bertkit.tokenizer import Tokenizer

    task = load_task(run, need_train=False)
    examples = task.evals[HELD_OUT]
    device = resolve_device(run.device)
    model = BertForSequenceClassification.from_pretrained(run.out_dir).to(device).eval()
    tokenizer = Tokenizer.from_pretrained(run.out_dir)
    logits = task.logits(model, tokenizer, examples, run, device)
    predictions, probabilities = task.decide(logits, run)
    gold = torch.tensor(task.gold(examples), dtype=torch.float32 if task.is_regression or task.multi_label else
                        torch.long)
    if task.is_regression:
        losses = (logits[:, 0] - gold) ** 2
    elif task.multi_label:
        losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, gold, reduction="none").mean(-1)
    else:
        losses = torch.nn.functional.cross_entropy(logits, gold, reduction="none")
    return [{"index": index, "line": e.line, "fold": run.fold, "text": e.text_a,
             **({"pair": e.text_b} if e.text_b is not None else {}), "gold": _gold(task, e.label),
             **task.result(prediction, p), "loss": loss, "_prediction": np.asarray(prediction).tolist(), "_gold": g}
            for index, e, prediction, p, loss, g in zip(task.held_out, examples, predictions, probabilities,
                                                         losses.tolist(), task.gold(examples))]


def summarise(config: FinetuneConfig, task: TextTask, records: list[dict], rows: list[dict]) -> dict:
    """Each fold's scores, their mean and standard deviation, and the metrics of the out-of-fold predictions pooled
    over the whole training file."""
    from bertkit.tasks.metrics import compute_metrics

    folds = [{"fold": k, "train_examples": r["train_examples"], "scored": r["eval_examples"],
              "epoch": r["best_epoch"], **{m: r["best"].get(m) for m in task.metrics}}
             for k, r in enumerate(records, start=1)]
    spread = {}
    for m in task.metrics:
        values = [f[m] for f in folds if f[m] is not None and not math.isnan(f[m])]
        spread[m] = {"mean": statistics.mean(values) if values else math.nan,
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    predictions = np.array([r["_prediction"] for r in rows])
    gold = np.array([r["_gold"] for r in rows])
    pooled = compute_metrics(task.metrics, predictions, gold)
    return {"task": task.name, "model_dir": str(config.model_dir), "folds": config.folds,
            "split_seed": config.split_seed, "keep": config.keep, "examples": len(rows), "per_fold": folds,
            "mean": {m: v["mean"] for m, v in spread.items()}, "std": {m: v["std"] for m, v in spread.items()},
            "pooled": pooled}


def crossval_table(config: FinetuneConfig, summary: dict, rows: list[dict]) -> str:
    """crossval.md: the folds, the mean ± std and the pooled scores, then the rows with the least likely gold label."""
    metrics = list(summary["mean"])
    which = "its last epoch" if config.keep == "last" else "its best epoch on the fold it is scored on (optimistic)"
    lines = [f"# {config.folds}-fold cross-validation: {summary['task']}, {hub.model_name(config.model_dir)}", "",
             f"{summary['examples']:,} labelled examples in {config.folds} folds stratified by label (split seed "
             f"{config.split_seed}); each fold scored by a model trained on the others "
             f"({plural(config.epochs, 'epoch')}, lr {config.lr:g}, seed {config.seed}), keeping {which}.", "",
             "| fold | trained on | scored | epoch | " + " | ".join(metrics) + " |",
             "|---" * (len(metrics) + 4) + "|"]
    for f in summary["per_fold"]:
        lines.append(f"| {f['fold']} | {f['train_examples']:,} | {f['scored']:,} | {f['epoch']} | "
                     + " | ".join(f"{f[m]:.2f}" if f[m] is not None else "-" for m in metrics) + " |")
    lines.append("| mean ± std | | | | " + " | ".join(f"{summary['mean'][m]:.2f} ± {summary['std'][m]:.2f}"
                                                      for m in metrics) + " |")
    lines.append("| pooled (out of fold) | | " + f"{summary['examples']:,} | | "
                 + " | ".join(f"{summary['pooled'][m]:.2f}" for m in metrics) + " |")
    lines += ["", f"Every example's out-of-fold prediction: out_of_fold.jsonl. The {SUSPECTS} whose gold label the "
              "model that did not train on them finds least likely (highest loss), where label errors are to be "
              "looked for first:", "", "| line | gold | predicted | loss | text |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["loss"])[:SUSPECTS]:
        predicted = r.get("label", r.get("labels", r.get("score")))
        text = r["text"] + (f" ‖ {r['pair']}" if "pair" in r else "")
        text = (text[:117] + "...") if len(text) > 120 else text
        lines.append(f"| {r['line'] if r['line'] is not None else '-'} | {_cell(r['gold'])} | {_cell(predicted)} | "
                     f"{r['loss']:.3f} | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def _gold(task: TextTask, label):
    if task.is_regression:
        return float(label)
    if task.multi_label:
        return [task.labels[i] for i in label]
    return task.labels[label]


def _cell(value) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else f"{value:.3g}" if isinstance(value, float) \
        else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _json_line(row: dict) -> str:
    import json

    return json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, ensure_ascii=False) + "\n"
