"""The downstream suite: one model folder fine-tuned on the shared GLUE tasks and a SQuAD v1.1 article split, over
several seeds and a small learning-rate grid, summed up as one paper-style table (mean ± std over seeds).

Each (task, lr, seed) is one `finetune` run, a "cell". Cells are kept in OUT_DIR/suite.json under the row's label,
so a suite interrupted or extended later (more seeds, another model, `--from-scratch`) reruns nothing already
there. Per task the lr whose mean over seeds is best on dev is reported, as the paper picks its lr on dev.

The budgets (which data, how much, how long) are fixed per task below, sized so that the whole suite for `mini`
(3 seeds x 2 lrs) runs in under an hour on two CPU cores. The subsets are drawn once with a fixed seed and
written into OUT_DIR/data, so every row and every seed trains and scores on the same examples.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bertkit import hub
from bertkit.checkpoint import atomic_write_text
from bertkit.config import learning_rates, option, parse_json
from bertkit.errors import BertkitError
from bertkit.tasks.finetune import FinetuneConfig
from bertkit.train.rundir import check_output_path, make_dir

RESULTS_FILE = "suite.json"
TABLE_FILE = "suite.md"
SUBSET_SEED = 0


@dataclass(frozen=True)
class SuiteTask:
    """One column of the table: the data a cell trains and scores on, its budget, and the metric shown."""

    name: str  # GLUE's spelling, or squad1
    column: str  # the table's heading
    metric: str  # the metric the paper reports for it (the headline for picking the lr is the task's own)
    epochs: int
    max_length: int
    train_examples: int | None = None  # a random subset of this many (None: the whole training file)
    split_dev: int | None = None  # no training file: this many dev examples train, the rest are scored
    glue: bool = True  # counted in the GLUE average (WNLI is not, as in the paper)


# Budgets measured for `mini` at one thread (about 3,000 tokens/s of training, 2,400 on CoLA's short sentences): one
# (lr, seed) of every task takes about 1,000 s, so 3 seeds x 2 lrs on two cores take about 50 minutes.
TASKS: dict[str, SuiteTask] = {t.name: t for t in [
    SuiteTask("CoLA", "CoLA (MCC)", "mcc", epochs=2, max_length=128),
    SuiteTask("SST-2", "SST-2 (acc)", "accuracy", epochs=2, max_length=128, train_examples=8000),
    SuiteTask("MRPC", "MRPC (F1)", "f1", epochs=2, max_length=128),
    SuiteTask("STS-B", "STS-B (Spearman)", "spearman", epochs=2, max_length=128),
    SuiteTask("QNLI", "QNLI* (acc)", "accuracy", epochs=2, max_length=128, split_dev=2000),
    SuiteTask("RTE", "RTE (acc)", "accuracy", epochs=2, max_length=128),
    SuiteTask("WNLI", "WNLI (acc)", "accuracy", epochs=2, max_length=128, glue=False),
    # SQuAD: no training set is shared, so dev-v1.1 is split by article: the first `train_examples` questions of
    # the first 38 articles train, the last 10 articles (1,988 questions) are scored; 256 tokens hold most
    # paragraphs whole.
    SuiteTask("squad1", "SQuAD v1.1* (F1)", "f1", epochs=1, max_length=256, train_examples=2000, glue=False),
]}
SQUAD_TRAIN_ARTICLES = 38


def _default_data_dir() -> str:
    return os.environ.get("BERTKIT_DATA") or str(Path("..", "shared", "data"))


@dataclass
class SuiteConfig:
    """The `suite` command's flags; the table and the cells go to OUT_DIR."""

    model_dir: str = option("", "model folder (HF layout, with its tokenizer) or Hub model id to fine-tune on "
                            "every task")
    from_scratch: bool = option(False, "the same architecture and tokenizer with random weights: the "
                                "'no pretraining' row")
    bilstm: bool = option(False, "every cell with a randomly initialised BiLSTM under its head (the paper's "
                          "'+ BiLSTM' row)")
    label: str | None = option(None, "the row's name in the table (default: the folder's name, plus "
                               "'(from scratch)')")
    data_dir: str = field(default_factory=_default_data_dir, metadata={
        "help": "the shared data folder holding glue/ and squad/ (default: $BERTKIT_DATA, else ../shared/data)"})
    out_dir: str = option("runs/suite", "folder of suite.json, suite.md and one run folder per cell")
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={
        "help": f"columns to run, of {', '.join(TASKS)}"})
    seeds: int = option(3, "fine-tuning seeds per task and lr (seeds 1..N)")
    lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4], metadata={
        "help": "learning rates tried per task; the best mean over seeds on dev is reported"})
    batch_size: int = option(32, "training batch size of every cell")
    jobs: int = option(2, "cells run at once, each in its own process")
    threads: int = option(1, "torch threads per cell")
    keep_models: bool = option(False, "keep each cell's fine-tuned weights (they take disk: the metrics are kept "
                               "either way)")

    def __post_init__(self):
        self.lrs = learning_rates(self.lrs)  # flags arrive as strings
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise BertkitError(f"--tasks {' '.join(unknown)}: unknown; expected some of {', '.join(TASKS)}")
        bad = [f"{name}={getattr(self, name)}" for name in ("seeds", "batch_size", "jobs", "threads")
               if getattr(self, name) < 1]
        if bad or not self.lrs or any(not 0 < lr < 1 for lr in self.lrs):
            raise BertkitError(f"suite: {', '.join(bad) or f'lrs={self.lrs}'}; expected positive counts and "
                               "learning rates in (0, 1)")

    @property
    def row(self) -> str:
        name = self.label or hub.model_name(Path(self.model_dir).resolve())
        suffix = (" (from scratch)" if self.from_scratch else "") + (" + BiLSTM" if self.bilstm else "")
        return name + ("" if self.label else suffix)


# ---------------------------------------------------------------------------------------------------------------
# Data: the subsets every row and seed share


def _write_rows(path: Path, header: str | None, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(([header] if header is not None else []) + rows)
    atomic_write_text(path, text)  # suites started at once: same rows


def _lines(path: Path, header: bool) -> tuple[str | None, list[str]]:
    if not path.is_file():
        raise BertkitError(f"{path}: missing; expected the shared data folder's GLUE files (--data-dir)")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines = [line if line.endswith("\n") else line + "\n" for line in lines if line.strip()]
    return (lines[0], lines[1:]) if header else (None, lines)


def task_files(task: SuiteTask, data_dir: Path, out_dir: Path) -> dict:
    """The FinetuneConfig fields that point a cell at its data (subsets written once into OUT_DIR/data)."""
    if task.name == "squad1":
        source = data_dir / "squad" / "dev-v1.1.json"
        if not source.is_file():
            raise BertkitError(f"{source}: missing; expected the shared data folder's SQuAD files (--data-dir)")
        return {"train_file": str(source), "train_articles": SQUAD_TRAIN_ARTICLES,
                "limit_train_examples": task.train_examples}
    folder = data_dir / "glue" / task.name
    if task.split_dev:
        header, rows = _lines(folder / "dev.tsv", header=True)
        order = np.random.default_rng(SUBSET_SEED).permutation(len(rows))
        train, evals = out_dir / "data" / task.name / "train.tsv", out_dir / "data" / task.name / "eval.tsv"
        if not train.is_file() or not evals.is_file():
            _write_rows(train, header, [rows[i] for i in sorted(order[: task.split_dev])])
            _write_rows(evals, header, [rows[i] for i in sorted(order[task.split_dev :])])
        return {"train_file": str(train), "eval_file": str(evals)}
    if task.train_examples:
        header, rows = _lines(folder / "train.tsv", header=task.name != "CoLA")
        subset = out_dir / "data" / task.name / "train.tsv"
        if not subset.is_file():
            chosen = np.random.default_rng(SUBSET_SEED).choice(len(rows), min(task.train_examples, len(rows)),
                                                               replace=False)
            _write_rows(subset, header, [rows[i] for i in sorted(chosen)])
        return {"data_dir": str(folder), "train_file": str(subset)}
    if not folder.is_dir():
        raise BertkitError(f"{folder}: no such folder; expected the shared data folder's GLUE tasks (--data-dir)")
    return {"data_dir": str(folder)}


# ---------------------------------------------------------------------------------------------------------------
# Cells


def cell_key(task: str, lr: float, seed: int) -> str:
    return f"{task}/lr={lr:g}/seed={seed}"


_suite_pid: int | None = None  # in a cell's process: the suite's process, which started it


def _cell_process(suite_pid: int) -> None:
    """The start of each cell's process: it ends with the suite's. A suite killed alone (SIGKILL, the OOM killer, a
    SIGTERM sent to it) left its cells' processes training on with no one to take their results, holding the cells'
    folders (the suite run again was refused: "in use by process N"), then waiting forever for another cell."""
    global _suite_pid
    _suite_pid = suite_pid

    def watch() -> None:
        while os.getppid() == suite_pid:
            time.sleep(1)
        # a cell that is training saves a checkpoint at the end of its step and stops (`_run_cell` then exits, for
        # the suite run again to continue it); a process between cells ends at once
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def _cell_pool(jobs: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_cell_process,
                               initargs=(os.getpid(),))


def _run_cell(finetune_config: FinetuneConfig, log_path: str, keep_model: bool) -> dict:
    """One fine-tuning run in a worker process; its printing goes to the cell's log, not the terminal."""
    import torch

    from bertkit.tasks.finetune import finetune

    torch.set_num_threads(finetune_config.threads)
    started = time.perf_counter()
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            stdout, stderr = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = log
            try:
                record = finetune(finetune_config)
            finally:
                sys.stdout, sys.stderr = stdout, stderr
    finally:
        if _suite_pid is not None and os.getppid() != _suite_pid:  # stopped as the suite is gone: nothing to return to
            os._exit(128 + signal.SIGTERM)
    if not keep_model:
        (Path(finetune_config.out_dir) / "model.safetensors").unlink(missing_ok=True)
    return {"best": record["best"], "best_epoch": record["best_epoch"], "seconds": time.perf_counter() - started,
            "train_examples": record["train_examples"], "eval_examples": record["eval_examples"]}


def read_results(path: Path, what: str = "the suite's results") -> dict:
    """A results file of keyed entries (suite.json, ablate.json); {} when there is none yet."""
    if not path.is_file():
        return {}
    return parse_json(path.read_text(encoding="utf-8"), path, what)


def save_entry(path: Path, key: str, value: dict, merge: Callable[[dict, dict], dict] | None = None) -> None:
    """Write one entry (a suite's row, an ablation's cell) into a results file. The file is read again under a lock
    and only this entry replaced, so two runs at once into one folder keep each other's entries; with `merge`, the
    entry is `merge(stored, value)` where the file holds one under `key` already."""
    with path.with_name(path.name + ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        results = read_results(path)
        if merge is not None and key in results:
            value = merge(results[key], value)
        text = json.dumps({**results, key: value}, indent=1) + "\n"
        atomic_write_text(path, text)


def suite(config: SuiteConfig) -> dict:
    """Run the cells this row still lacks; returns {"results": every row's cells, "table": the markdown table}."""
    from bertkit.config import BertConfig

    if not config.model_dir:
        raise BertkitError("no model: expected --model-dir, a model folder (config.json + weights + tokenizer)")
    BertConfig.load(config.model_dir)  # a wrong folder fails here, not in every cell
    data_dir, out = Path(config.data_dir), Path(config.out_dir)
    check_output_path(out, "--out-dir", {})
    make_dir(out, "--out-dir")
    results_path = out / RESULTS_FILE
    results = read_results(results_path)
    row = results.setdefault(config.row, {"model_dir": str(config.model_dir), "from_scratch": config.from_scratch,
                                          **({"bilstm": True} if config.bilstm else {}),
                                          "batch_size": config.batch_size, "cells": {}})
    if (row["from_scratch"] != config.from_scratch or row.get("bilstm", False) != config.bilstm
            or Path(row["model_dir"]).resolve() != Path(config.model_dir).resolve()):
        raise BertkitError(f"{results_path}: row {config.row!r} holds {row['model_dir']} (from scratch: "
                           f"{row['from_scratch']}, BiLSTM: {row.get('bilstm', False)}); expected another --label "
                           "for this model")
    # a cell's key holds no batch size: another one would pass the row's cells off as its own, or mix the two
    if row.get("batch_size", config.batch_size) != config.batch_size:  # rows written before it was kept: unchecked
        raise BertkitError(f"{results_path}: row {config.row!r} was fine-tuned at --batch-size {row['batch_size']}; "
                           f"now {config.batch_size}; expected the same --batch-size, or another --label for this one")
    todo = []
    for name in config.tasks:
        task = TASKS[name]
        files = task_files(task, data_dir, out)
        for lr in config.lrs:
            for seed in range(1, config.seeds + 1):
                key = cell_key(name, lr, seed)
                if key in row["cells"]:
                    continue
                cell_dir = out / "cells" / _slug(config.row) / name / f"lr-{lr:g}" / f"seed-{seed}"
                cell_dir.mkdir(parents=True, exist_ok=True)
                # the cell's folder is the suite's: a cell stopped part way continues from its checkpoint (finetune
                # still refuses a folder holding another config's run)
                fc = FinetuneConfig(
                    model_dir=config.model_dir, from_scratch=config.from_scratch, task=name, out_dir=str(cell_dir),
                    lr=lr, batch_size=config.batch_size, epochs=task.epochs, max_length=task.max_length, seed=seed,
                    threads=config.threads, device="cpu" if config.jobs > 1 else "auto", bilstm=config.bilstm,
                    resume="auto", **files,
                )
                todo.append((key, fc, str(cell_dir / "finetune.log")))
    if todo:
        started = time.perf_counter()
        pool = _cell_pool(config.jobs)
        futures = {pool.submit(_run_cell, fc, log, config.keep_models): (key, log) for key, fc, log in todo}
        try:
            with tqdm(total=len(todo), desc=f"suite {config.row}", unit="cell", file=sys.stderr) as bar:
                for future in as_completed(futures):
                    key, log = futures[future]
                    try:
                        row["cells"][key] = future.result()
                    except BertkitError:
                        raise
                    except Exception as e:  # name the cell and its log; the cells done so far are kept
                        raise BertkitError(f"suite cell {key} failed ({type(e).__name__}: {e}); see {log}") from None
                    row["wall_seconds"] = row.get("wall_seconds", 0.0) + time.perf_counter() - started
                    started = time.perf_counter()
                    save_entry(results_path, config.row, row, _with_stored_cells)
                    bar.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on an error, the cells not yet started are dropped
            # ... but those already running finish during the shutdown: their runs are kept, not thrown away
            late = {futures[f][0]: f.result() for f in futures
                    if f.done() and not f.cancelled() and f.exception() is None and futures[f][0] not in row["cells"]}
            if late:
                row["cells"].update(late)
                row["wall_seconds"] = row.get("wall_seconds", 0.0) + time.perf_counter() - started  # the wait too
                save_entry(results_path, config.row, row, _with_stored_cells)
    results = {**read_results(results_path), config.row: row}  # with the rows other suites added meanwhile
    table = results_table(results, config.seeds)
    (out / TABLE_FILE).write_text(table, encoding="utf-8")
    return {"results": results, "table": table}


def _with_stored_cells(stored: dict, row: dict) -> dict:
    """`row` with the cells that another suite on the same row (`--tasks CoLA` beside `--tasks SST-2`) saved
    meanwhile: saving this process's copy of the row alone dropped them from the results file."""
    row["cells"] = {**stored.get("cells", {}), **row["cells"]}
    return row


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "row"


# ---------------------------------------------------------------------------------------------------------------
# The table


def summarize(cells: dict, task: str) -> dict | None:
    """The lr whose mean headline over seeds is best, and its mean/std per metric; None if the task has no cells."""
    from bertkit.tasks.metrics import headline_score

    by_lr: dict[str, list[dict]] = {}
    seconds = 0.0
    for key, cell in cells.items():
        name, lr, _ = key.split("/")
        if name == task:
            by_lr.setdefault(lr.removeprefix("lr="), []).append(cell["best"])
            seconds += cell["seconds"]
    if not by_lr:
        return None

    def mean_headline(runs):
        return float(np.mean([headline_score(_headline_metrics(task, r)) for r in runs]))

    # a tie (WNLI at the majority class at every lr) goes to the lowest lr: the cells' order is the order they
    # finished, which differs between two runs of one grid
    lr = max(sorted(by_lr, key=float), key=lambda lr: mean_headline(by_lr[lr]))
    runs = by_lr[lr]
    # the metrics every seed has: a cell recorded before a metric existed (a classifier's ece) lacks it
    common = [m for m in runs[0] if all(m in r for r in runs)]
    metrics = {m: (float(np.mean([r[m] for r in runs])), float(np.std([r[m] for r in runs], ddof=1)) if len(runs) > 1
                   else 0.0) for m in common}
    return {"lr": lr, "seeds": len(runs), "metrics": metrics, "seconds": seconds,
            "lrs": {k: mean_headline(v) for k, v in by_lr.items()}}


def _headline_metrics(task: str, best: dict) -> dict:
    """The metrics that pick the best lr: the task's own (MRPC's F1 and accuracy, SQuAD's EM and F1)."""
    keys = ("exact", "f1") if task == "squad1" else tuple(k for k in best if k in ("accuracy", "f1", "mcc", "pearson",
                                                                                 "spearman"))
    return {k: best[k] for k in keys}


def results_table(results: dict, seeds: int) -> str:
    """Rows = models, columns = tasks: mean ± std over seeds at each task's best lr, marked (n=K) where a cell has
    another number of seeds than the `seeds` asked; the GLUE average (WNLI left out, as in the paper); SQuAD; the
    total fine-tuning time."""
    columns = [t for t in TASKS.values() if any(k.split("/")[0] == t.name for r in results.values() for k in r["cells"])]
    head = ["model"] + [t.column for t in columns if t.glue] + ["GLUE avg"] + [t.column for t in columns if not t.glue]
    lines = ["| " + " | ".join(head + ["fine-tuning time"]) + " |", "|---" * (len(head) + 1) + "|"]
    chosen = []
    for label, row in results.items():
        summaries = {t.name: summarize(row["cells"], t.name) for t in columns}
        cells, glue_means = [label], []
        for t in [t for t in columns if t.glue] + [None] + [t for t in columns if not t.glue]:
            if t is None:
                complete = all(summaries[c.name] for c in columns if c.glue)
                cells.append(f"**{np.mean(glue_means):.1f}**" if glue_means and complete else "-")
                continue
            s = summaries[t.name]
            if s is None:
                cells.append("-")
                continue
            mean, std = s["metrics"][t.metric]
            cells.append(f"{mean:.1f} ± {std:.1f}" + ("" if s["seeds"] == seeds else f" (n={s['seeds']})"))
            if t.glue:
                glue_means.append(mean)
        cells.append(f"{row.get('wall_seconds', 0) / 60:.0f} min")
        lines.append("| " + " | ".join(cells) + " |")
        chosen.append(f"{label}: " + ", ".join(f"{n} {s['lr']}" for n, s in summaries.items() if s))
    sizes = {}
    for row in results.values():
        for key, cell in row["cells"].items():
            sizes.setdefault(key.split("/")[0], (cell["train_examples"], cell["eval_examples"]))
    notes = [
        "",
        f"Each cell: mean ± sample std over seeds (n={seeds} unless marked), at the lr with the best mean on dev. "
        "Fine-tuning time: wall time of the row's cells, run two at a time on one thread each unless "
        "`--jobs`/`--threads` said otherwise. Chosen lrs:",
        *[f"- {c}" for c in chosen],
        "",
        "Examples (train / scored): " + "; ".join(f"{n} {a:,} / {b:,}" for n, (a, b) in sizes.items()) + ". "
        "SST-2 trains on sentences drawn at random (seed 0) from train.tsv; QNLI* is its dev file split at random "
        "(seed 0); SQuAD v1.1* is dev-v1.1 split by article (the first questions of the first 38 articles train, "
        "the last 10 articles are scored); MRPC trains on Microsoft's train file and is scored on its test file. "
        "Starred columns are not comparable with published dev scores. The GLUE average leaves WNLI out, as the "
        "paper does.",
    ]
    return "\n".join(lines + notes) + "\n"
