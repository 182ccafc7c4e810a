"""The paper's GLUE protocol: fine-tune one model on each task over a small lr grid, keep the best lr on dev,
and print Table 1 (one column per task, the paper's metric for it, and their average)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from bertkit import hub
from bertkit.config import learning_rates, option, write_json
from bertkit.data.glue import TASKS, get_task
from bertkit.errors import BertkitError
from bertkit.tasks.finetune import FinetuneConfig, finetune, load_task, plural
from bertkit.train.rundir import check_output_path, make_dir

logger = logging.getLogger("bertkit")

# Table 1's columns: the metric the paper reports per task (F1 for QQP/MRPC, Spearman for STS-B, MCC for CoLA)
# and the training-set sizes it prints under the names (bertkit's table prints the sizes it trained on). WNLI is left
# out of the average, as in the paper.
PAPER_COLUMNS = {
    "MNLI": ("MNLI-(m/mm)", ("accuracy", "dev_mismatched_accuracy"), "392k"),
    "QQP": ("QQP", ("f1",), "363k"),
    "QNLI": ("QNLI", ("accuracy",), "108k"),
    "SST-2": ("SST-2", ("accuracy",), "67k"),
    "CoLA": ("CoLA", ("mcc",), "8.5k"),
    "STS-B": ("STS-B", ("spearman",), "5.7k"),
    "MRPC": ("MRPC", ("f1",), "3.5k"),
    "RTE": ("RTE", ("accuracy",), "2.5k"),
    "WNLI": ("WNLI", ("accuracy",), "634"),
}


@dataclass
class GlueConfig:
    """A GLUE sweep: the `glue` command's flags; kept as glue_config.json in the output folder."""

    model_dir: str = option("", "pretrained model folder (HF layout) or Hub model id to fine-tune on every task")
    data_dir: str = option("", "GLUE data folder with one sub-folder per task (SST-2/, MRPC/, ...)")
    out_dir: str = option("runs/glue", "folder for one run per task and lr, and the GLUE table")
    tasks: list[str] = option([], "tasks to run; none: every task folder in --data-dir")
    lrs: list[float] = option([5e-5, 4e-5, 3e-5, 2e-5], "learning rates tried per task; the best on dev is reported")
    batch_size: int = option(32, "training batch size")
    epochs: int = option(3, "epochs per run")
    max_length: int = option(128, "tokens per example")
    seed: int = option(42, "seed of every run")
    limit_train_examples: int | None = option(None, "train on the first N examples of each task (for quick runs)")
    lora_rank: int = option(0, "every run with LoRA of this rank (finetune's --lora-rank; 0: every weight trains); "
                            "LoRA wants larger rates than full fine-tuning: give --lrs (the LoRA paper used 4e-4 to "
                            "5e-4 for RoBERTa-base)")
    lora_alpha: float = option(8.0, "--lora-rank: finetune's --lora-alpha")
    lora_targets: str = option("query,value", "--lora-rank: finetune's --lora-targets")
    layer_lr_decay: float = option(1.0, "every run with this layer-wise lr decay (finetune's --layer-lr-decay)")
    reinit_layers: int = option(0, "every run with its top N blocks re-initialised (finetune's --reinit-layers)")
    threads: int | None = option(None, "CPU threads for torch (default: the cores that the last minute's load average "
                                 "leaves idle, 1 to 16)")
    device: str = option("auto", "cpu, cuda, ... (auto: cuda when available)")
    predict: bool = option(False, "write each task's leaderboard file for its test.tsv with the best lr's model")
    overwrite: bool = option(False, "redo the runs already in --out-dir (without it, a rerun continues interrupted "
                             "runs and keeps finished ones, as `finetune --resume auto` does)")

    def __post_init__(self):
        self.lrs = learning_rates(self.lrs, "5e-5 3e-5")  # flags arrive as strings
        for name in ("batch_size", "epochs", "max_length"):
            if getattr(self, name) < 1:
                raise BertkitError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected a positive number")
        self.tasks = [get_task(t).name for t in self.tasks]


def glue(config: GlueConfig) -> dict:
    """Fine-tune `config.model_dir` on each task with every lr, pick the best lr on dev; writes the table and the
    results (glue_results.md / .json) and returns the results with the table under "table"."""
    root, out = Path(config.data_dir), Path(config.out_dir)
    if not config.model_dir:
        raise BertkitError("no model: expected --model-dir, a pretrained model folder (config.json + weights)")
    if not config.data_dir:
        raise BertkitError("no data: expected --data-dir, the GLUE data folder (SST-2/, MRPC/, ...)")
    if not root.is_dir():
        raise BertkitError(f"{root}: no such folder; expected the GLUE data folder (SST-2/, MRPC/, ...)")
    names = config.tasks or [name for name in TASKS if (root / name).is_dir()]
    missing = [name for name in names if not (root / name).is_dir()]
    if not names or missing:
        raise BertkitError(f"{root}: no folder for {', '.join(missing or ['any GLUE task'])}; expected one per task "
                           f"named {', '.join(TASKS)}")
    check_output_path(out, "--out-dir", {})

    def run(name: str, lr: float) -> FinetuneConfig:
        return FinetuneConfig(
            model_dir=config.model_dir, task=name, data_dir=str(root / name), out_dir=str(out / name / f"lr-{lr:g}"),
            lr=lr, batch_size=config.batch_size, epochs=config.epochs, max_length=config.max_length,
            seed=config.seed, limit_train_examples=config.limit_train_examples, threads=config.threads,
            device=config.device, predict=config.predict, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
            lora_targets=config.lora_targets, layer_lr_decay=config.layer_lr_decay,
            reinit_layers=config.reinit_layers, overwrite=config.overwrite, resume=None if config.overwrite else "auto",
        )

    # every task's data is read once before the first run: a task folder without train.tsv (the shared data's QNLI)
    # or a malformed row failed the sweep only when its turn came, after the tasks before it had been fine-tuned
    run(names[0], config.lrs[0]).check()  # a bad LoRA or other finetune setting, before any data is read
    for name in names:
        try:
            load_task(run(name, config.lrs[0]))
        except BertkitError as e:
            leave_out = "" if config.tasks else f" (or leave {name} out: --tasks names the tasks to run)"
            raise BertkitError(f"{e}{leave_out}") from None
    make_dir(out, "--out-dir")
    write_json(out / "glue_config.json", dataclasses.asdict(config))
    runs: dict[str, dict[float, dict]] = {}
    for name in names:
        runs[name] = {lr: finetune(run(name, lr)) for lr in config.lrs}
    result = {"model_dir": config.model_dir, "tasks": {}}
    for name, by_lr in runs.items():
        best_lr = max(by_lr, key=lambda lr: _headline(name, by_lr[lr]["best"]))
        result["tasks"][name] = {"best_lr": best_lr, "best": by_lr[best_lr]["best"],
                                 "train_examples": by_lr[best_lr]["train_examples"],
                                 "run_dir": str(out / name / f"lr-{best_lr:g}"),
                                 "by_lr": {f"{lr:g}": r["best"] for lr, r in by_lr.items()}}
    table = glue_table(result, hub.model_name(config.model_dir), config)
    (out / "glue_results.md").write_text(table, encoding="utf-8")
    write_json(out / "glue_results.json", result)
    return {**result, "table": table}


def _headline(task: str, metrics: dict) -> float:
    """The number that picks the lr: the mean of the task's GLUE metrics on its (first) dev split."""
    names = get_task(task).metrics
    return sum(metrics[m] for m in names) / len(names)


def _size(n: int | None) -> str:
    """Training-set sizes as the paper prints them: 634, 2.5k, 67k."""
    if n is None:
        return ""
    return str(n) if n < 1000 else f"{n / 1000:.1f}k" if n < 10_000 else f"{n / 1000:.0f}k"


def glue_table(result: dict, model_name: str, config: GlueConfig) -> str:
    """Table 1 of the paper for the tasks run, then every lr's score per task."""
    tasks = result["tasks"]
    columns = [t for t in PAPER_COLUMNS if t in tasks]
    averaged = [t for t in columns if t != "WNLI"]
    cells, scores = [], []
    for task in columns:
        values = [tasks[task]["best"][m] for m in PAPER_COLUMNS[task][1] if m in tasks[task]["best"]]
        cells.append("/".join(f"{v:.1f}" for v in values))
        if task in averaged:
            scores.extend(values)  # the paper averages MNLI-m and MNLI-mm as two columns (BERT-Base: 79.6)
    average = f"{sum(scores) / len(scores):.1f}" if scores else "-"  # WNLI alone: nothing is averaged
    lines = [
        f"# GLUE: {model_name}",
        "",
        "| System | " + " | ".join(PAPER_COLUMNS[t][0] for t in columns) + " | Average |",
        "|---" * (len(columns) + 2) + "|",
        "| | " + " | ".join(_size(tasks[t].get("train_examples")) or PAPER_COLUMNS[t][2] for t in columns)
        + " | - |",
        f"| bertkit {model_name} | " + " | ".join(cells) + f" | {average} |",
        "",
        f"Dev-set scores of the best lr per task among {', '.join(f'{lr:g}' for lr in config.lrs)} (batch "
        f"{config.batch_size}, {plural(config.epochs, 'epoch')}, max length {config.max_length}, seed {config.seed}"
        + (f", LoRA rank {config.lora_rank} alpha {config.lora_alpha:g} on {config.lora_targets}" if config.lora_rank
           else "")
        + (f", top {config.reinit_layers} re-initialised" if config.reinit_layers else "")
        + (f", layer-wise lr decay {config.layer_lr_decay:g}" if config.layer_lr_decay != 1 else "") + "; "
        "the second row is the training examples each task was trained on); F1 for "
        "QQP and MRPC, Spearman for STS-B, Matthews correlation for CoLA, accuracy otherwise; the average leaves out "
        "WNLI, as the paper does. MRPC read from Microsoft's release is scored on msr_paraphrase_test.txt.",
        "",
        "| task | " + " | ".join(f"lr {lr:g}" for lr in config.lrs) + " | best |",
        "|---" * (len(config.lrs) + 2) + "|",
    ]
    for task in columns:
        by_lr = tasks[task]["by_lr"]
        row = [f"{_headline(task, by_lr[f'{lr:g}']):.2f}" for lr in config.lrs]
        lines.append(f"| {task} | " + " | ".join(row) + f" | {tasks[task]['best_lr']:g} |")
    return "\n".join(lines) + "\n"
