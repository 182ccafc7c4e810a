"""The budget-recipe study: short pretraining runs of one model that differ in one setting, at equal tokens.

    python benchmarks/recipe_study.py --tokenizer T --data D --variants bert no-dropout --jobs 2
    python benchmarks/recipe_study.py --tokenizer T --data D   # no variants: the common evaluation, table, plot

Each variant is `bertkit pretrain` with the base flags plus its own, for the same number of tokens (--examples
sequences of 128 tokens, whatever the variant's length and batch), with the schedule ending at that budget, as a
budget-aware recipe does. Runs go to RUNS/<variant>; a variant whose result is in --results is not rerun, so the
study can be extended run by run. The held-out numbers are those of `bertkit pretrain`'s final evaluation (the
same held-out chapters for every variant).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "docs" / "recipe" / "study.json"

# Spelled out in full (not left to `bertkit pretrain`'s defaults, which this study later changed to its winners).
BASE = ["--model", "mini", "--max-length", "128", "--batch-size", "32", "--lr", "5e-4", "--warmup", "0.1",
        "--dropout", "0.1", "--mask-prob", "0.15", "--schedule", "linear", "--objective", "mlm+nsp",
        "--eval-batches", "25", "--keep-last", "1"]

# The settings Cramming, MosaicBERT and the 24-hour academic BERT changed, one at a time where possible. Later
# variants build on the earlier winners (named in their flags), so the list reads as the order they were run in.
VARIANTS: dict[str, list[str]] = {
    "bert": [],  # the paper's recipe at small scale: dropout 0.1, lr 5e-4 (ELECTRA-Small's), 10% warm-up
    "no-dropout": ["--dropout", "0"],
    "no-dropout-lr1e-3": ["--dropout", "0", "--lr", "1e-3"],
    "no-dropout-lr2e-3": ["--dropout", "0", "--lr", "2e-3"],
    # on the winner of the above (no dropout, lr 1e-3), one change each:
    "triangle": ["--dropout", "0", "--lr", "1e-3", "--schedule", "triangle"],
    "ramp-to-128": ["--dropout", "0", "--lr", "1e-3", "--grad-accum", "4", "--batch-ramp", "0.6"],
    "batch-128": ["--dropout", "0", "--lr", "2e-3", "--grad-accum", "4"],
    "mask-30": ["--dropout", "0", "--lr", "1e-3", "--mask-prob", "0.3"],
    "mlm-only": ["--dropout", "0", "--lr", "1e-3", "--objective", "mlm"],
    "length-64": ["--dropout", "0", "--lr", "1e-3", "--max-length", "64", "--batch-size", "64"],
}


def flag(flags: list[str], name: str, default: str) -> str:
    return flags[flags.index(name) + 1] if name in flags else default


def steps_for(flags: list[str], examples: int) -> int:
    """Optimizer steps that make `examples` sequences of 128 tokens at this variant's length, batch and ramp."""
    length, batch = int(flag(flags, "--max-length", "128")), int(flag(flags, "--batch-size", "32"))
    accum, ramp = int(flag(flags, "--grad-accum", "1")), float(flag(flags, "--batch-ramp", "0"))
    target = examples * 128 / length

    def seen(steps: int) -> int:  # examples read in `steps` steps: PretrainBatches.accumulation, summed
        ramp_steps = round(ramp * steps)
        return sum(batch * (accum if s >= ramp_steps else 1 + (accum - 1) * s // ramp_steps) for s in range(steps))

    low, high = 1, max(1, round(target / batch))
    while low < high:  # the fewest steps that read the budget
        mid = (low + high) // 2
        low, high = (mid + 1, high) if seen(mid) < target else (low, mid)
    return low


def run_variant(name: str, args) -> dict:
    flags = BASE + VARIANTS[name]  # the variant's flags come last, and argparse keeps the last
    steps = steps_for(flags, args.examples)
    run_dir = Path(args.runs) / name
    command = [sys.executable, "-m", "bertkit.cli", "pretrain", *flags, "--tokenizer", args.tokenizer, "--data",
               args.data, "--out-dir", str(run_dir), "--max-steps", str(steps), "--eval-every", str(max(steps // 8, 1)),
               "--save-every", "0", "--threads", str(args.threads), "--seed", str(args.seed), "--resume", "auto"]
    started = time.time()
    with open(Path(args.runs) / f"{name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.time() - started) / 60
    evals = list(csv.DictReader(open(run_dir / "eval.csv")))
    trains = list(csv.DictReader(open(run_dir / "train.csv")))
    final = {k: float(v) for k, v in evals[-1].items() if v not in ("", None)}
    tokens_per_s = [float(r["tokens_per_s"]) for r in trains[1:]] or [0.0]
    return {"flags": VARIANTS[name], "steps": steps, "examples": args.examples, "minutes": round(minutes, 1),
            "tokens_per_s": round(sum(tokens_per_s) / len(tokens_per_s)), "final": final,
            "curve": [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in evals],
            "threads": args.threads, "seed": args.seed}


def common_eval(name: str, args) -> dict:
    """The variant's final model on every held-out example at one setting for all (length 128, 15% token masking,
    NSP pairs): its own held-out numbers are not comparable across masking rates, lengths and objectives."""
    import torch

    from bertkit.train.pretrain import score_held_out

    torch.set_num_threads(args.threads)
    return score_held_out(Path(args.runs) / name, args.tokenizer, args.data, objective="mlm+nsp")


def report(results: dict) -> str:
    lines = ["| variant | flags | steps | held-out MLM loss | MLM acc | NSP acc | own MLM loss | own NSP acc | tok/s | "
             "minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        f, c = r["final"], r.get("common", {})
        nsp = f.get("next_sentence_accuracy")
        common = (f"{c['masked_lm_loss']:.3f} | {100 * c['masked_lm_accuracy']:.1f} | "
                  + ("-" if "mlm-only" in name else f"{100 * c['next_sentence_accuracy']:.1f}")) if c else "- | - | -"
        lines.append(f"| {name} | `{' '.join(r['flags']) or '(base)'}` | {r['steps']} | {common} | "
                     f"{f['masked_lm_loss']:.3f} | {'-' if nsp is None else f'{100 * nsp:.1f}'} | "
                     f"{r['tokens_per_s']:,} | {r['minutes']} |")
    return "\n".join(lines) + "\n\n" + COLUMNS


COLUMNS = """Held-out MLM loss / MLM acc / NSP acc: every held-out example (28 chapters the runs never saw, ~800 pairs)
at length 128, 15% token masking, NSP pairs, the same for every variant (the unigram baseline is 6.0% MLM
accuracy); `own`: the run's final evaluation at its own settings (its masking rate, length and objective), not
comparable across those. tok/s and minutes: two single-threaded runs side by side on the 2-core CPU, with other
work on the machine for part of the time (compare quality, not speed, here).
"""


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = [row["step"] / r["steps"] for row in r["curve"]]
        ax1.plot(steps, [row["masked_lm_loss"] for row in r["curve"]], label=name)
        if "next_sentence_accuracy" in r["curve"][0]:
            ax2.plot(steps, [row["next_sentence_accuracy"] for row in r["curve"]], label=name)
    ax1.set(xlabel="share of the token budget", ylabel="held-out MLM loss", title="masked LM")
    ax2.set(xlabel="share of the token budget", ylabel="held-out NSP accuracy", title="next sentence")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=[], help=f"of: {', '.join(VARIANTS)}")
    parser.add_argument("--tokenizer", help="tokenizer folder")
    parser.add_argument("--data", help="prepared corpus folder")
    parser.add_argument("--runs", default="runs/recipe", help="folder of the run folders")
    parser.add_argument("--examples", type=int, default=28_000, help="budget, in sequences of 128 tokens")
    parser.add_argument("--jobs", type=int, default=2, help="variants run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    todo = [v for v in args.variants if v not in results]
    if todo:
        Path(args.runs).mkdir(parents=True, exist_ok=True)

        def one(name):
            result = run_variant(name, args)
            results[name] = result  # the dict is only ever extended, one key per thread
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n")
            print(f"{name}: {result['final']}", flush=True)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, todo))
    for name in [n for n in results if "common" not in results[n] and args.tokenizer and args.data]:
        results[name]["common"] = common_eval(name, args)
        args.results.write_text(json.dumps(results, indent=1) + "\n")
    if results:
        table = report(results)
        (args.results.parent / "study.md").write_text(table)
        plot(results, args.results.parent / "study.png")
        print(table)


if __name__ == "__main__":
    main()
