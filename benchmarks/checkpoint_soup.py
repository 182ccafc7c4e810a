"""Latest weight averaging along a pretraining run: is the average of a run's last checkpoints (`bertkit soup
--data`) a better model than the newest one alone, and where along the run?

Kaddour 2022 ("Stop wasting my time! Saving days of ImageNet and BERT training with latest weight averaging")
averaged the last k checkpoints of BERT pretraining and reached a given held-out loss in fewer steps, the gain
shrinking as the learning rate decays. This asks it at CPU scale: `tiny` (L2 H128) pretrained on the books corpus
with the budget recipe's settings (MLM + NSP, 30% masking, dropout 0, peak lr 1e-3, 10% warm-up then linear decay
to 0, batch 32 x 128 tokens) for --steps steps, a checkpoint every --every steps, at --seeds seeds (one thread each,
side by side). At every checkpoint from the k-th on, `bertkit soup` averages the last k checkpoints for each k of
--windows (uniform: latest weight averaging; greedy beside it) and scores each checkpoint and both soups by masked-LM
loss on the same 640 held-out sequences with the same masks (15%, seed 0: `bertkit perplexity`'s reading).

--vocab and --corpus are a books vocabulary and a corpus prepared with it (`bertkit vocab train --vocab-size 16000`,
`bertkit prepare`, as the README's pretraining section builds them). The runs are in --out/seed-N (resumed, or kept
when done), the soups in --out/seed-N/soup-wK-STEP (kept when done). The summary goes to --summary
(docs/checkpoint-soup/tiny.json, a cell per window, seed and step), its plot beside it (tiny.png); the tables are
printed.

    python benchmarks/checkpoint_soup.py --vocab runs/vocab-16k --corpus runs/corpus-16k --seeds 0 1
"""

from __future__ import annotations

import json
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from bertkit.tasks.soup import SoupConfig, soup
from bertkit.train.pretrain import PretrainConfig, pretrain
from run import study_parser


def pretrain_run(vocab: Path, corpus: Path, out: Path, seed: int, steps: int, every: int) -> Path:
    """One pretraining run keeping every checkpoint (resumed where it stopped, kept when done)."""
    done = out / "checkpoints" / f"step-{steps:08d}" / "COMPLETE"
    if not done.is_file():
        pretrain(PretrainConfig(model="tiny", tokenizer=str(vocab), data=str(corpus), max_steps=steps, seed=seed,
                                save_every=every, keep_last=0, eval_every=0, threads=1, out_dir=str(out),
                                resume="auto" if (out / "checkpoints").is_dir() else None))
    return out


def soups(run: Path, corpus: Path, steps: int, every: int, window: int) -> dict:
    """For every checkpoint from the window-th on: it alone, and the last `window` checkpoints averaged."""
    cells = {}
    for step in range(window * every, steps + 1, every):
        out = run / f"soup-w{window}-{step}"
        if not (out / "soup.json").is_file():
            runs = [str(run / "checkpoints" / f"step-{s:08d}") for s in range(step - (window - 1) * every, step + 1,
                                                                                every)]
            soup(SoupConfig(runs=runs, out=str(out), data=str(corpus), recipe="uniform", threads=1, overwrite=True))
        result = json.loads((out / "soup.json").read_text())
        loss = {r["step"]: r["metrics"]["masked_lm_loss"] for r in result["runs"]}
        cells[step] = {"newest": loss[step], "uniform": result["uniform"]["metrics"]["masked_lm_loss"],
                       "greedy": result["greedy"]["metrics"]["masked_lm_loss"],
                       "greedy_kept": [result["runs"][i]["step"] for i in result["greedy"]["runs"]],
                       "window_losses": loss}
    return cells


def markdown(summary: dict, window: str) -> str:
    """Per step: the newest checkpoint's held-out MLM loss and the uniform average's, mean over seeds."""
    by_seed = summary["windows"][window]
    steps = sorted({int(s) for cells in by_seed.values() for s in cells})
    lines = [f"| step | newest checkpoint | last {window} averaged | difference | greedy soup |",
             "|---|---|---|---|---|"]
    for step in steps:
        cells = [by_seed[s][str(step)] for s in by_seed if str(step) in by_seed[s]]
        newest = statistics.mean(c["newest"] for c in cells)
        uniform = statistics.mean(c["uniform"] for c in cells)
        greedy = statistics.mean(c["greedy"] for c in cells)
        lines.append(f"| {step} | {newest:.4f} | {uniform:.4f} | {uniform - newest:+.4f} | {greedy:.4f} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (window, by_seed) in enumerate(summary["windows"].items()):
        for j, seed in enumerate(sorted(by_seed, key=int)):
            cells = by_seed[seed]
            steps = sorted(cells, key=int)
            ax.plot([int(s) for s in steps], [cells[s]["uniform"] - cells[s]["newest"] for s in steps],
                    color=f"C{i}", linestyle="-" if j == 0 else "--",
                    label=f"last {window} averaged ({summary['every'] * (int(window) - 1)} steps), seed {seed}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out MLM loss: average - newest")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"tiny on the books corpus, lr {summary['lr']:g} decayed linearly to 0 at step {summary['steps']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = study_parser(__doc__, "checkpoint-soup", "checkpoint-soup/tiny.json")
    parser.add_argument("--vocab", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--windows", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--pretrain-only", action="store_true")
    args = parser.parse_args()

    with ProcessPoolExecutor(len(args.seeds)) as pool:
        jobs = {pool.submit(pretrain_run, args.vocab, args.corpus, args.out / f"seed-{s}", s, args.steps,
                            args.every): s for s in args.seeds}
        for job in as_completed(jobs):
            print("pretrained", jobs[job], job.result(), flush=True)
    if args.pretrain_only:
        return
    summary = {"model": "tiny", "steps": args.steps, "every": args.every, "lr": PretrainConfig().lr,
               "torch": torch.__version__, "windows": {str(w): {} for w in args.windows}}
    with ProcessPoolExecutor(len(args.seeds)) as pool:
        jobs = {pool.submit(soups, args.out / f"seed-{s}", args.corpus, args.steps, args.every, w): (w, s)
                for w in args.windows for s in args.seeds}
        for job in as_completed(jobs):
            window, seed = jobs[job]
            summary["windows"][str(window)][str(seed)] = {str(k): v for k, v in job.result().items()}
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.summary.with_suffix(".png"))
    for window in summary["windows"]:
        print(f"\nlast {window}:\n" + markdown(summary, window))


if __name__ == "__main__":
    main()
