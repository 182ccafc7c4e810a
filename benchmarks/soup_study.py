"""Model soups on GLUE: does averaging the weights of runs fine-tuned from one start (`bertkit soup`) beat the best
of them, and how close does it come to their ensemble?

Wortsman et al. 2022 ("Model soups") averaged fine-tuned models that differ in hyper-parameters: the uniform soup
(every run) and the greedy soup (runs added best first, each kept only if the held-out score does not drop). This
asks the question at a small scale: all-MiniLM-L6-v2 fine-tuned on the first --examples training rows of STS-B,
SST-2 and MRPC (Microsoft's train file; its test file is the dev data; RTE is there too, left out by default: at this
size MiniLM barely learns it, docs/findings.md), 3 epochs, batch 32, over a grid of
learning rates (3e-5, 5e-5, 8e-5, 1.2e-4) and seeds (1, 2): eight ingredients per task. Each run holds out a share of
its training file (--eval-split, split seed 0: the same rows for every run, none of them trained on) and keeps its
best epoch there. Everything is chosen on those held-out rows and reported on the dev data, which no choice sees:

- best single: the ingredient with the best held-out score (what an lr and seed search keeps);
- uniform soup: every ingredient's weights averaged;
- greedy soup: `bertkit soup`'s default recipe, selected on the held-out rows;
- ensemble: the ingredients' logits averaged (eight models at inference; a soup costs one).

The same four recipes are also made of each seed's four runs alone: `--seed` draws the classifier's initial weights,
so the runs of one seed start from the same head, those of two seeds from two (Wortsman et al.'s ingredients
shared their head's start).

The ingredients are `bertkit finetune` runs in --out/TASK/lr-X-sN (resumed, or kept when done); a task's soups are
one `bertkit soup` in --out/TASK/greedy (each seed's: greedy-sN, kept when done), which scores the uniform soup and
the ensemble beside the greedy one. The best run on dev is recorded too, as a ceiling no method reaches without
seeing dev. The summary goes to --summary
(docs/soups/glue.json, a task per --tasks entry, other tasks kept); the plot beside it (glue.png); the table is
printed. --train-only trains the ingredients and stops.

    python benchmarks/soup_study.py --workers 2
"""

from __future__ import annotations

import json
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from bertkit.tasks.finetune import FinetuneConfig, finetune, plural
from bertkit.tasks.soup import SoupConfig, soup
from run import study_parser

TASKS = {"STS-B": 0.1, "SST-2": 0.01, "MRPC": 0.1, "RTE": 0.1}  # the held-out share of each training file
LRS = (3e-5, 5e-5, 8e-5, 1.2e-4)
SEEDS = (1, 2)
SETTINGS = {"epochs": 3, "batch_size": 32, "split_seed": 0}
METRIC = {"STS-B": "spearman", "SST-2": "accuracy", "MRPC": "f1", "RTE": "accuracy"}  # Table 1's columns


def ingredient(model: Path, data: Path, out: Path, task: str, lr: float, seed: int, examples: int) -> Path:
    """One fine-tuning run (resumed where it stopped, kept when done); its folder."""
    finetune(FinetuneConfig(model_dir=str(model), out_dir=str(out), task=task, data_dir=str(data / "glue" / task),
                            lr=lr, seed=seed, eval_split=TASKS[task], limit_train_examples=examples, threads=1,
                            resume="auto", **SETTINGS))
    return out


def main() -> None:
    parser = study_parser(__doc__, "soups", "soups/glue.json")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["STS-B", "SST-2", "MRPC"])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--train-only", action="store_true", help="train the ingredients, make no soup")
    args = parser.parse_args()

    model = args.data / "checkpoints" / "all-MiniLM-L6-v2"
    todo = [(task, lr, seed) for task in args.tasks for seed in SEEDS for lr in LRS]
    with ProcessPoolExecutor(args.workers) as pool:
        jobs = {pool.submit(ingredient, model, args.data, args.out / t / f"lr-{lr:g}-s{s}", t, lr, s, args.examples):
                (t, lr, s) for t, lr, s in todo}
        for job in as_completed(jobs):
            print("trained", *jobs[job], job.result(), flush=True)
    if args.train_only:
        return
    summary = {"model": model.name, "examples": args.examples, "lrs": LRS, "seeds": SEEDS, **SETTINGS,
               "torch": torch.__version__, "tasks": {}}
    if args.summary.exists():  # the tasks of earlier runs of the study stay
        summary["tasks"] = json.loads(args.summary.read_text())["tasks"]
    with ProcessPoolExecutor(args.workers) as pool:
        jobs = {pool.submit(cook, args.out / task, task): task for task in args.tasks}
        for job in as_completed(jobs):
            summary["tasks"][jobs[job]] = job.result()
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(json.dumps(summary, indent=2) + "\n")
            print(jobs[job], json.dumps(summary["tasks"][jobs[job]]), flush=True)
    plot(summary, args.summary.with_suffix(".png"))
    for cell in ("all", *(f"seed {s}" for s in SEEDS)):
        print(f"\n{cell}:\n" + markdown(summary, cell))


def cook(folder: Path, task: str) -> dict:
    """The task's soups of all eight runs and of each seed's four (whose heads started alike); each model's held-out
    and dev scores by the task's GLUE metric."""
    cells = {"all": recipes(folder / "greedy", [folder / f"lr-{lr:g}-s{s}" for s in SEEDS for lr in LRS], task)}
    for seed in SEEDS:
        cells[f"seed {seed}"] = recipes(folder / f"greedy-s{seed}", [folder / f"lr-{lr:g}-s{seed}" for lr in LRS],
                                        task)
    return cells


def recipes(out: Path, runs: list[Path], task: str) -> dict:
    """One `bertkit soup` of `runs` into `out` (kept when done): the greedy soup, with the uniform soup and the
    ensemble scored beside it."""
    if not (out / "soup.json").is_file():
        soup(SoupConfig(runs=[str(r) for r in runs], out=str(out), threads=1, overwrite=True))
    result = json.loads((out / "soup.json").read_text())
    metric = METRIC[task]
    score = {"held_out": lambda m: m[metric], "dev": lambda m: m[f"dev_{metric}"]}
    runs_scored = [{"run": Path(r["run"]).name, **{k: f(r["metrics"]) for k, f in score.items()}}
                   for r in result["runs"]]
    best = runs_scored[result["ranking"][0]]
    return {"metric": metric, "runs": runs_scored, "best_single": best,
            "best_dev_single": max(r["dev"] for r in runs_scored),  # chosen on dev itself: a ceiling, not a method
            **{name: {"runs": len(result[name]["runs"]), **{k: f(result[name]["metrics"]) for k, f in score.items()}}
               for name in ("uniform", "greedy", "ensemble")},
            "greedy_kept": [Path(result["runs"][i]["run"]).name for i in result["greedy"]["runs"]],
            # each step's score: what the greedy soup goes by, the task's metrics averaged (STS-B: Pearson's and
            # Spearman's; MRPC: F1 and accuracy), on the held-out rows
            "greedy_steps": [{"run": Path(result["runs"][s["run"]]["run"]).name, "kept": s["kept"],
                              "held_out_headline": s["score"]} for s in result["greedy"]["steps"]]}


def markdown(summary: dict, cell: str = "all") -> str:
    """The table docs/findings.md shows: per task, the dev score of each way of using the runs of `cell` (all eight,
    or one seed's four)."""
    tasks = [t for t in TASKS if t in summary["tasks"]]
    summary = {"tasks": {t: summary["tasks"][t][cell] for t in tasks}}
    n = len(summary["tasks"][tasks[0]]["runs"]) if tasks else 0
    rows = {"best single (held-out)": "best_single", "uniform soup": "uniform", "greedy soup": "greedy",
            f"ensemble of {n}": "ensemble"}
    lines = ["| dev score | " + " | ".join(f"{t} ({summary['tasks'][t]['metric']})" for t in tasks) + " |",
             "|---" * (len(tasks) + 1) + "|"]
    lines.append(f"| the {n} runs: mean [min, max] | " + " | ".join(
        f"{statistics.mean(r['dev'] for r in summary['tasks'][t]['runs']):.2f} "
        f"[{min(r['dev'] for r in summary['tasks'][t]['runs']):.2f}, "
        f"{max(r['dev'] for r in summary['tasks'][t]['runs']):.2f}]" for t in tasks) + " |")
    for name, key in rows.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{summary['tasks'][t][key]['dev']:.2f}" + (f" ({plural(summary['tasks'][t][key]['runs'], 'run')})"
                                                       if key == "greedy" else "") for t in tasks) + " |")
    lines.append("| best run on dev (a ceiling: chosen on dev) | " + " | ".join(
        f"{summary['tasks'][t]['best_dev_single']:.2f}" for t in tasks) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if t in summary["tasks"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.3 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cell = summary["tasks"][task]["all"]
        ax.scatter([r["held_out"] for r in cell["runs"]], [r["dev"] for r in cell["runs"]], s=16, color="grey",
                   label="runs")
        for key, marker in (("best_single", "o"), ("uniform", "s"), ("greedy", "*"), ("ensemble", "D")):
            ax.scatter(cell[key]["held_out"], cell[key]["dev"], marker=marker, s=60 if key == "greedy" else 36,
                       label=key.replace("_", " "))
        ax.set_xlabel(f"held-out {cell['metric']}", fontsize=8)
        ax.set_ylabel(f"dev {cell['metric']}", fontsize=8)
        ax.set_title(task, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"all-MiniLM-L6-v2, {summary['examples']:,} training rows, 8 runs (4 lrs x 2 seeds) per task",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
