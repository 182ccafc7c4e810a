"""What the layers of a BERT hold about GLUE tasks, read by linear probes (`bertkit probe`), and when pretraining puts
it there.

Two parts, each a `bertkit probe` per task (--out/PART/TASK, kept when done: a rerun probes only what is missing):

- `pretrained`: all-MiniLM-L6-v2 (L6 H384, the shared real checkpoint) and its architecture with random weights
  (the control), on SST-2, CoLA, STS-B, MRPC (Microsoft's train file; the test file is the dev data) and RTE, each
  on its first --limit training rows (all of the smaller files), scored on dev; and on `names`, a tag per word:
  benchmarks/tagging_books.py's silver task (capitalised words inside a sentence, read lower-cased: 4,000 training
  sentences, 1,000 dev sentences from other books), scored by entity F1. A score above the control's is what
  the pretrained weights add to what a random encoder's features already give a linear model.
- `trajectory`: the checkpoints of one pretraining run (--run, RUN/checkpoints/step-N; the README's `mini` on the
  books corpus), every one probed on --tasks, to see at which step, and in which layer, a task's signal appears.

Each probe: mean pooling (a word: its first piece), logistic (ridge for STS-B) regression per layer on standardized
features, L2 chosen from 1e-4 ... 10 by the loss on a tenth of the training rows. The summary (a task per entry:
each model's score per layer, the majority class) goes to --summary (docs/probe/PART.json), the plot beside it
(PART.png); the tables are printed.

    python benchmarks/probe_study.py pretrained
    python benchmarks/probe_study.py trajectory --run runs/mini --tasks SST-2 CoLA
"""

from __future__ import annotations

import json
from pathlib import Path

from bertkit.checkpoint import checkpoint_step
from bertkit.tasks.finetune import FinetuneConfig
from bertkit.tasks.probe import CONTROL, ProbeConfig, column_names, headline, probe
from run import study_parser

TASKS = ("SST-2", "CoLA", "STS-B", "MRPC", "RTE", "names")


def names_task(data: Path, out: Path) -> Path:
    """benchmarks/tagging_books.py's silver task, names in books: 4,000 training sentences from pieces 00-05 of the
    corpus, 1,000 dev sentences from piece 06 (other books), written once as CoNLL files."""
    from tagging_books import sentences, write_conll

    if not (out / "dev.txt").is_file():
        corpus = sorted((data / "corpus").glob("gutenberg-en-*.txt.gz"))
        out.mkdir(parents=True, exist_ok=True)
        write_conll(out / "train.txt", sentences(corpus[:-1], 4000, seed=0))
        write_conll(out / "dev.txt", sentences(corpus[-1:], 1000, seed=1))
    return out


def probe_task(task: str, models: list[str], data: Path, out: Path, limit: int, threads: int) -> dict:
    """One `bertkit probe` of `models` on `task`'s first `limit` training rows (kept when done)."""
    config = ProbeConfig(models=models, out=str(out / task), threads=threads)
    if task == "names":
        return probe(config, FinetuneConfig(task="ner", data_dir=str(names_task(data, out.parent / "names-data")),
                                            limit_train_examples=limit))
    return probe(config, FinetuneConfig(task=task, data_dir=str(data / "glue" / task), limit_train_examples=limit))


def task_summary(result: dict) -> dict:
    """What the plot and the findings read: each model's score per layer, the L2 chosen, the majority class."""
    names = column_names(result)
    return {"metrics": result["settings"]["metrics"], "train_examples": result["settings"]["train_examples"],
            "eval_examples": result["settings"]["eval_examples"],
            "majority": headline(result, result["majority"]) if result.get("majority") else None,
            "models": {names[m]: {"folder": r["folder"] if m != CONTROL else CONTROL,
                                  "scores": [round(headline(result, c["metrics"]), 3) for c in r["layers"]],
                                  "l2": [c["l2"] for c in r["layers"]]}
                       for m, r in result["models"].items()}}


def checkpoints(run: Path) -> list[str]:
    """The run's complete checkpoints, oldest first."""
    found = [(checkpoint_step(p), p) for p in (run / "checkpoints").glob("step-*")]
    return [str(p) for step, p in sorted((s, p) for s, p in found if s is not None)]


def plot(summary: dict, path: Path, trajectory: bool) -> None:
    """A panel per task: score by layer per model (pretrained), or by step per layer (trajectory: step 0 is the
    random control)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks):
        cell = summary["tasks"][task]
        if trajectory:
            models = cell["models"]
            steps = {name: 0 if name == CONTROL else checkpoint_step(Path(r["folder"])) for name, r in models.items()}
            order = sorted(models, key=steps.get)
            for layer in range(len(models[order[0]]["scores"])):
                ax.plot([steps[m] for m in order], [models[m]["scores"][layer] for m in order], marker="o",
                        markersize=3, label=f"layer {layer}")
            ax.set_xlabel("pretraining step (0: random weights)")
        else:
            for name, record in cell["models"].items():
                style = {"linestyle": "--", "color": "gray"} if name == CONTROL else {}
                ax.plot(range(len(record["scores"])), record["scores"], marker="o", markersize=3, label=name, **style)
            ax.set_xlabel("layer (0: embeddings)")
        if cell["majority"] is not None:
            ax.axhline(cell["majority"], linestyle=":", color="black", label="majority class")
        ax.set_title(f"{task} ({' / '.join(cell['metrics'])})", fontsize=9)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("dev score of a linear probe")
    axes.flat[len(tasks) - 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = study_parser(__doc__, "probe", "probe")
    parser.add_argument("part", choices=("pretrained", "trajectory"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--limit", type=int, default=10_000, help="training rows (names: sentences) per task, the "
                        "first N")
    parser.add_argument("--run", type=Path, help="trajectory: a pretraining run folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.part == "trajectory":
        if args.run is None:
            parser.error("trajectory needs --run, a pretraining run folder")
        models = checkpoints(args.run)
    else:
        models = [str(args.data / "checkpoints" / "all-MiniLM-L6-v2")]
    summary_path = args.summary / f"{args.part}.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"tasks": {}}
    if args.run:
        summary["run"] = str(args.run)
    for task in args.tasks:
        result = probe_task(task, models, args.data, args.out / args.part, args.limit, args.threads)
        summary["tasks"][task] = task_summary(result)
        print(result["table"])
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        plot(summary, summary_path.with_suffix(".png"), args.part == "trajectory")


if __name__ == "__main__":
    main()
