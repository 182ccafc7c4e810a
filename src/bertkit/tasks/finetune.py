"""Fine-tuning as in the paper: a pretrained encoder plus a task head, AdamW with linear warm-up and decay,
scored on dev after every epoch, the best epoch's model kept. Also `evaluate` and `predict` on the result.

A run folder is a model folder (HF layout: config.json, model.safetensors, tokenizer files, id2label) plus the
run's record: finetune_config.json, metrics.json, results.md, train.csv/eval.csv, and SQuAD's predictions.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bertkit.config import BertConfig
from bertkit.data.batching import collate, length_grouped_batches
from bertkit.errors import BertkitError
from bertkit.model import compile_blocks
from bertkit.tasks.classification import TextTask, is_blank, load_text_task, parse_lines, read_input_lines
from bertkit.tasks.inference import to_device
from bertkit.tasks.squad import SquadTask, load_squad_task, parse_questions
from bertkit.tokenizer import Tokenizer
from bertkit.train.logs import RunLogger
from bertkit.train.optim import build_optimizer, warmup_linear, warmup_steps_for

log = logging.getLogger("bertkit")

CONFIG_FILE = "finetune_config.json"
SQUAD_TASKS = ("squad1", "squad2")


def option(default, help: str):
    """A dataclass field whose help text becomes its CLI flag's."""
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneConfig:
    """A fine-tuning run; the CLI's `finetune` flags are these fields, and the run folder keeps them as JSON."""

    model_dir: str = option("", "pretrained model folder (HF layout) to start from")
    from_scratch: bool = option(False, "use only the folder's architecture and tokenizer, with random weights (the "
                                "'no pretraining' baseline)")
    task: str = option("", "a GLUE task (SST-2, MRPC, STS-B, MNLI, ...), squad1, squad2, or custom for your own files")
    out_dir: str = option("runs/finetune", "run folder: the best checkpoint, metrics.json, results.md")
    data_dir: str | None = option(None, "the task's data folder (GLUE: train.tsv, dev.tsv, test.tsv; MRPC may hold "
                                      "Microsoft's msr_paraphrase_*.txt; SQuAD: train-v*.json, dev-v*.json)")
    train_file: str | None = option(None, "training file, instead of the one in --data-dir (custom: .csv/.tsv/.jsonl)")
    eval_file: str | None = option(None, "labelled evaluation file, instead of the dev file in --data-dir")
    test_file: str | None = option(None, "GLUE test file for --predict, instead of the one in --data-dir")
    text_a: str = option("sentence", "custom files: the column of the (first) text")
    text_b: str | None = option(None, "custom files: the column of the second text of a pair")
    label: str = option("label", "custom files: the label column")
    regression: bool = option(False, "custom files: the label is a number to regress (one output, MSE)")
    train_articles: int | None = option(None, "SQuAD: split one file by article, the first N to train, the rest to score")
    lr: float = option(3e-5, "peak learning rate (the paper searches 5e-5, 4e-5, 3e-5, 2e-5)")
    batch_size: int = option(32, "training batch size")
    epochs: int = option(3, "passes over the training data")
    warmup: float = option(0.1, "linear warm-up: a fraction of all steps (<1) or a step count")
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    max_length: int | None = option(None, "tokens per example or window (default: 128, SQuAD 384)")
    doc_stride: int = option(128, "SQuAD: step between the starts of a long context's windows")
    max_query_length: int = option(64, "SQuAD: question tokens kept")
    null_threshold: float = option(0.0, "SQuAD v2.0: answer '' when null score - best span score exceeds this")
    seed: int = option(42, "seed for the head's initialisation, dropout and the batch order")
    eval_batch_size: int = option(128, "evaluation batch size")
    limit_train_examples: int | None = option(None, "train on the first N examples only (for quick runs)")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")
    device: str = option("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)")
    compile: bool = option(False, "torch.compile the encoder blocks (dynamic shapes): faster steps after a first, "
                           "compiling one (tens of seconds; on CPU a C++ compiler is needed)")
    predict: bool = option(False, "GLUE: after training, write the leaderboard file for test.tsv with the best model")

    def __post_init__(self):
        self.task = self.task.strip()
        if self.max_length is None:
            self.max_length = 384 if self.task.lower() in SQUAD_TASKS else 128

    def check(self, training: bool = True) -> None:
        """Raise on values no run can use, before any data or model is read."""
        if training and not self.model_dir:
            raise BertkitError("no model: expected --model-dir, a pretrained model folder (config.json + weights)")
        positive = ["batch_size", "eval_batch_size", "max_length", "doc_stride", "max_query_length"]
        positive += ["epochs"] if training else []
        for name in positive:
            if getattr(self, name) < 1:
                raise BertkitError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected a positive number")
        for name in ("lr", "warmup", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise BertkitError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected zero or more")
        if self.limit_train_examples is not None and self.limit_train_examples < 1:
            raise BertkitError(f"--limit-train-examples is {self.limit_train_examples}; expected at least 1")

    def save(self, directory: Path) -> None:
        (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> FinetuneConfig | None:
        """The config a run folder was trained with, or None for a model folder that bertkit did not fine-tune."""
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            return cls(**values)
        except (json.JSONDecodeError, TypeError) as e:
            raise BertkitError(f"{path}: not a fine-tuning config ({e}); expected the JSON `finetune` writes") from None


def load_task(config: FinetuneConfig, need_train: bool = True, labels=None) -> TextTask | SquadTask:
    """The task's data, read as the config names it."""
    if config.task.lower() in SQUAD_TASKS:
        config.task = config.task.lower()
        return load_squad_task(config, need_train)
    return load_text_task(config, need_train, labels)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BertkitError(f"--device {name!r} is not a device; expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BertkitError(f"--device {name}: no CUDA device here; expected cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class BestCheckpoint:
    """The best headline score so far; a later epoch replaces the kept checkpoint only by beating it."""

    def __init__(self):
        self.score = -math.inf
        self.epoch: int | None = None

    def update(self, score: float, epoch: int) -> bool:
        """True when this epoch is the new best (so its model should be saved)."""
        if math.isnan(score) or score <= self.score:
            return False
        self.score, self.epoch = score, epoch
        return True


def train_epoch(model, rows, batches, optimizer, scheduler, config, pad_id, device, bar, logger, step) -> tuple[float, int]:
    """One pass over `batches` of row indices; returns the mean training loss and the global step."""
    model.train()
    total, running = 0.0, []
    for indices in batches:
        batch = to_device(collate([rows[i] for i in indices], pad_id), device)
        loss = model(**batch).loss
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        value = loss.item()
        total += value
        running.append(value)
        bar.update(len(indices))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(running):.4f}")
            logger.log("train", step, {"loss": float(np.mean(running)), "lr": scheduler.get_last_lr()[0]})
            running = []
    return total / max(1, len(batches)), step


def finetune(config: FinetuneConfig) -> dict:
    """Fine-tune `config.model_dir` on the task, keep the best epoch's model in `config.out_dir`; returns metrics."""
    config.check()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    out = Path(config.out_dir)
    task = load_task(config)  # bad data fails before the model is loaded
    if config.limit_train_examples:
        task.train = task.train[: config.limit_train_examples]
    out.mkdir(parents=True, exist_ok=True)
    config.save(out)
    seed_everything(config.seed)
    tokenizer = Tokenizer.from_pretrained(config.model_dir)
    model = task.model_class.from_pretrained(config.model_dir, load_weights=not config.from_scratch,
                                             **task.model_overrides()).to(device)
    if config.compile:
        compile_blocks(model)
    rows = task.train_rows(tokenizer, config)
    lengths = [len(r["input_ids"]) for r in rows]

    steps = config.epochs * math.ceil(len(rows) / config.batch_size)
    optimizer = build_optimizer(model, "adamw", config.lr, config.weight_decay)
    scheduler = warmup_linear(optimizer, warmup_steps_for(steps, config.warmup), steps)
    logger = RunLogger(out, tensorboard=False)
    for stale in ("train.csv", "eval.csv"):  # a rerun into the same folder starts a fresh record
        (out / stale).unlink(missing_ok=True)
    best = BestCheckpoint()
    record = {"task": task.name, "model_dir": str(config.model_dir), "train_examples": len(task.train),
              "train_rows": len(rows), "eval_examples": _eval_size(task), "best_epoch": None, "best": {},
              "epochs": []}
    step = 0
    for epoch in range(1, config.epochs + 1):
        batches = length_grouped_batches(lengths, config.batch_size, seed=config.seed + epoch)
        with tqdm(total=len(rows), desc=f"{task.name} epoch {epoch}/{config.epochs}", unit="ex", file=sys.stderr,
                  mininterval=1.0, dynamic_ncols=True) as bar:
            # CPU time too: on a shared machine it shows the work done, which wall time blurs with waiting
            start, start_cpu = time.perf_counter(), time.process_time()
            loss, step = train_epoch(model, rows, batches, optimizer, scheduler, config, tokenizer.pad_id, device,
                                     bar, logger, step)
            train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        start = time.perf_counter()
        metrics, write_outputs = task.evaluate(model, tokenizer, config, device)
        eval_seconds = time.perf_counter() - start
        logger.log("eval", step, metrics)
        row = {"epoch": epoch, "train_loss": loss, "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
               "train_examples_per_second": len(rows) / train_seconds, "eval_seconds": eval_seconds, **metrics}
        record["epochs"].append(row)
        if best.update(task.headline(metrics), epoch):
            model.save_pretrained(out, tokenizer=tokenizer)
            write_outputs(out)
            record["best_epoch"], record["best"] = epoch, metrics
        log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        _write_json(out / "metrics.json", record)  # after every epoch, so a long run shows its progress
    logger.close()
    if config.predict and isinstance(task, TextTask) and task.tests:
        model = task.model_class.from_pretrained(out).to(device)
        record["submissions"] = [str(p) for p in task.write_test_predictions(model, tokenizer, config, device, out)]
        _write_json(out / "metrics.json", record)
    table = results_table(config, task, record)
    (out / "results.md").write_text(table, encoding="utf-8")
    print(table)
    return record


def _eval_size(task) -> int:
    return len(task.evals) if isinstance(task, SquadTask) else len(next(iter(task.evals.values())))


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m {seconds:02d}s"


def results_table(config: FinetuneConfig, task, record: dict) -> str:
    """The run in markdown: hyper-parameters, one row per epoch (best marked), the best scores."""
    columns = [m for m in task.table_metrics if m in record["best"]]
    lines = [
        f"# Fine-tuning {task.name} from {Path(config.model_dir).name}",
        "",
        f"lr {config.lr:g}, batch {config.batch_size}, {config.epochs} epoch(s), warm-up {config.warmup:g}, "
        f"weight decay {config.weight_decay:g}, max length {config.max_length}, seed {config.seed}; "
        f"{record['train_examples']:,} training examples"
        + (f" ({record['train_rows']:,} windows)" if isinstance(task, SquadTask) else "")
        + f", {record['eval_examples']:,} scored.",
        "",
        "| epoch | train loss | " + " | ".join(columns) + " | train time | train ex/s | eval time |",
        "|---" * (len(columns) + 5) + "|",
    ]
    for row in record["epochs"]:
        mark = " (best)" if row["epoch"] == record["best_epoch"] else ""
        lines.append(
            f"| {row['epoch']}{mark} | {row['train_loss']:.4f} | "
            + " | ".join(f"{row[m]:.2f}" for m in columns)
            + f" | {_duration(row['train_seconds'])} | {row['train_examples_per_second']:.1f} | "
            f"{_duration(row['eval_seconds'])} |"
        )
    if record["best_epoch"] is not None:
        best = ", ".join(f"{m} {record['best'][m]:.2f}" for m in columns)
        lines += ["", f"Best: epoch {record['best_epoch']} ({best}), kept in {config.out_dir}."]
    for path in record.get("submissions", []):
        lines.append(f"Submission file: {path}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Using a fine-tuned model


def _run_config(model_dir, overrides: dict, default_task: str = "") -> FinetuneConfig:
    """The config of the run that made the folder, with the given overrides."""
    saved = FinetuneConfig.load(model_dir)
    values = dataclasses.asdict(saved) if saved else {"task": default_task}
    if overrides.get("eval_file") or overrides.get("data_dir"):
        values["train_articles"] = None  # new eval data replaces the run's by-article split
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["model_dir"] = str(model_dir)
    config = FinetuneConfig(**values)
    config.check(training=False)
    return config


def _label_names(model_config: BertConfig) -> list[str]:
    if model_config.id2label:
        return [model_config.id2label[i] for i in sorted(model_config.id2label)]
    return [f"LABEL_{i}" for i in range(model_config.num_labels)]


def evaluate(model_dir, task: str | None = None, out_dir=None, **overrides) -> dict:
    """Re-score a fine-tuned model on its task's eval data (or the data given); returns the metrics.

    The task, data and lengths default to those of the run that made the folder (its finetune_config.json).
    """
    model_config = BertConfig.load(model_dir)
    config = _run_config(model_dir, {"task": task, **overrides})
    if not config.task and not config.eval_file:
        raise BertkitError(f"{model_dir}: no {CONFIG_FILE}; expected --task and the data to score on")
    if config.threads:
        torch.set_num_threads(config.threads)
    data = load_task(config, need_train=False, labels=_label_names(model_config))
    _check_head(data, model_config, model_dir)
    device = resolve_device(config.device)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = data.model_class.from_pretrained(model_dir).to(device)
    metrics, write_outputs = data.evaluate(model, tokenizer, config, device)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_outputs(out_dir)
        _write_json(Path(out_dir) / "eval_metrics.json", metrics)
    return metrics


def _check_head(task, model_config, model_dir) -> None:
    """Raise when the folder's model cannot do the task (wrong head or number of labels)."""
    architectures = model_config.extra.get("architectures") or []
    if architectures and task.model_class.__name__ not in architectures:
        raise BertkitError(f"{model_dir}/config.json: architecture {', '.join(architectures)}; expected "
                           f"{task.model_class.__name__} for {task.name} (fine-tune it first)")
    if isinstance(task, TextTask) and model_config.num_labels != max(1, len(task.labels)):
        raise BertkitError(f"{model_dir}/config.json: {model_config.num_labels} labels; {task.name} has "
                           f"{max(1, len(task.labels))}")


def predict(model_dir, inputs, source: str = "<stdin>", **overrides) -> list[dict]:
    """Label texts (`text` or `text<TAB>pair` lines) or answer questions (JSON lines with question and context).

    `inputs` is a file path, a binary stream or an iterable of lines; what the model folder's head is decides
    which. A classifier gives one result per line, in order: a blank line's has label (or score) None and an
    "error" saying so.
    """
    if isinstance(inputs, (str, Path)):
        source = str(inputs)
    inputs = read_input_lines(inputs, source)
    model_config = BertConfig.load(model_dir)
    architectures = model_config.extra.get("architectures") or ["BertForSequenceClassification"]
    is_qa = "BertForQuestionAnswering" in architectures
    config = _run_config(model_dir, overrides, default_task="squad1" if is_qa else "")
    device = resolve_device(config.device)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    if is_qa:
        examples = parse_questions(inputs, source)
        task = SquadTask(config.task if config.task in SQUAD_TASKS else "squad1")
        threshold = _tuned_threshold(model_dir, config)
        model = task.model_class.from_pretrained(model_dir).to(device)
        answers, null_odds = task.answer(model, tokenizer, examples, config, device, threshold)
        return [{"id": e.id, "question": e.question, "answer": answers[e.id]}
                | ({"null_odds": null_odds[e.id]} if task.version2 else {}) for e in examples]
    if "BertForSequenceClassification" not in architectures:
        raise BertkitError(f"{model_dir}/config.json: architecture {', '.join(architectures)}; expected a fine-tuned "
                           "BertForSequenceClassification or BertForQuestionAnswering")
    examples = parse_lines(inputs, source)  # every line, so that the results stay one per input line
    labels = _label_names(model_config) if model_config.num_labels > 1 else []
    task = TextTask("predict", labels, ())
    model = task.model_class.from_pretrained(model_dir).to(device)
    predictions, probabilities = task.predict(model, tokenizer, [e for e in examples if not is_blank(e)], config, device)
    labelled = zip(predictions, probabilities)
    results = []
    for example in examples:
        text = {"text": example.text_a} | ({"pair": example.text_b} if example.text_b is not None else {})
        if is_blank(example):
            nothing = {"score": None} if task.is_regression else {"label": None, "probability": None}
            results.append(text | nothing | {"error": "blank line: no text to label"})
            continue
        p, probs = next(labelled)
        if task.is_regression:
            results.append(text | {"score": float(p)})
        else:
            results.append(text | {"label": labels[int(p)], "probability": float(probs[int(p)])})
    return results


def _tuned_threshold(model_dir, config: FinetuneConfig) -> float:
    """SQuAD v2.0: the null-odds threshold that scored best on the run's eval data (best_f1_thresh, which gives
    best_f1 there, all null at 0.0), else exp(--null-threshold); questions whose null odds exceed it get ""."""
    from bertkit.data.squad import null_odds

    path = Path(model_dir) / "metrics.json"
    if config.task == "squad2" and path.is_file():
        best = json.loads(path.read_text(encoding="utf-8")).get("best", {})
        if "best_f1_thresh" in best:
            return float(best["best_f1_thresh"])
    return null_odds(config.null_threshold)
