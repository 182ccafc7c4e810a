"""SST-2 along a pretraining run: does the pretrained encoder fine-tune better or worse the longer it pretrains?

    python benchmarks/sst2_by_step.py runs/books/mini-final --steps 800 1600 3200 4800 6400 \\
        --out docs/suite/sst2-by-step.json

For each chosen checkpoint, the SST-2 cells of `bertkit suite` (the same 8,000 training sentences, budget, seeds
and lrs as the suite's SST-2 column, kept in --suite-dir/suite.json, one row per step, so a rerun adds only what is
missing) and the linear probes of `feature_probe.py` on its frozen features. Beside them, the same network from
random weights: its suite row (--from-scratch) and its probes. Writes a table, --out as JSON and a plot beside it.

It tests the reading of docs/findings.md ("Why SST-2 loses") that more pretraining tokens would close the gap
between the pretrained and the from-scratch `mini` on SST-2: if so, the fine-tuned score should rise with the step.
`--beside` draws other runs' results (this script's JSON, e.g. the same recipe with another --objective) on the
fine-tuned panel, so two pretraining objectives can be read off one plot:

    python benchmarks/sst2_by_step.py runs/books/mini-mlm --steps 2400 3200 --suite-dir runs/sst2-mlm \\
        --out docs/suite/sst2-by-step-mlm.json --beside docs/suite/sst2-by-step.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from feature_probe import KIND_NAMES, KINDS, probe_data, probe_model  # noqa: E402
from heldout_curve import prior_tokens, read_run, tokens_at  # noqa: E402
from run import machine  # noqa: E402

from bertkit.checkpoint import checkpoint_step  # noqa: E402
from bertkit.tasks.suite import SuiteConfig, suite, summarize  # noqa: E402

SCRATCH = "no pretraining"


def step_label(step: int) -> str:
    return f"step {step:,}"


def fine_tuned(config: SuiteConfig) -> dict:
    """The row's SST-2 cells, run where missing, summarised at its best lr."""
    row = suite(config)["results"][config.row]
    best = summarize(row["cells"], "SST-2")
    mean, std = best["metrics"]["accuracy"]
    return {"accuracy": mean, "std": std, "seeds": best["seeds"], "lr": best["lr"], "lrs": best["lrs"]}


def table(result: dict) -> str:
    lines = ["| weights | tokens (M) | SST-2 fine-tuned (acc) | best lr | probe: " + " | ".join(KIND_NAMES.values())
             + " |", "|---" * (4 + len(KINDS)) + "|"]
    for row in result["rows"]:
        tuned, probes = row["fine_tuned"], row["probes"]
        tokens = "-" if row["step"] is None else f"{row['tokens'] / 1e6:.1f}"
        lines.append(f"| {row['label']} | {tokens} | {tuned['accuracy']:.1f} ± {tuned['std']:.1f} | {tuned['lr']} | "
                     + " | ".join(f"{probes[f'probe_{kind}']:.1f}" for kind in KINDS) + " |")
    return "\n".join(lines)


def run_name(result: dict) -> str:
    """A result's name in a legend: its pretraining objective where recorded, else its run folder."""
    return result.get("objective") or Path(result["run_dir"]).name


def plot(result: dict, path: Path, beside: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in result["rows"] if r["step"] is not None]
    scratch = next(r for r in result["rows"] if r["step"] is None)
    tokens = [r["tokens"] / 1e6 for r in steps]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    for other in [result, *beside]:
        points = [r for r in other["rows"] if r["step"] is not None]
        ax.errorbar([r["tokens"] / 1e6 for r in points], [r["fine_tuned"]["accuracy"] for r in points],
                    [r["fine_tuned"]["std"] for r in points], fmt="o-", capsize=3,
                    label=f"pretrained ({run_name(other)}), fine-tuned")
    mean, std = scratch["fine_tuned"]["accuracy"], scratch["fine_tuned"]["std"]
    ax.axhline(mean, color="gray", ls="--", label=f"{SCRATCH}, fine-tuned")
    ax.axhspan(mean - std, mean + std, color="gray", alpha=0.2)
    ax.set(title=f"SST-2 dev accuracy, fine-tuned ({steps[0]['fine_tuned']['seeds']} seeds, best lr)",
           xlabel="pretraining token positions (M)", ylabel="%")
    ax = axes[1]
    for kind, name in KIND_NAMES.items():
        line, = ax.plot(tokens, [r["probes"][f"probe_{kind}"] for r in steps], "o-", label=name)
        ax.axhline(scratch["probes"][f"probe_{kind}"], color=line.get_color(), ls=":")
    ax.set(title=f"linear probes on frozen features, {run_name(result)} (dotted: random init)",
           xlabel="pretraining token positions (M)", ylabel="SST-2 dev accuracy (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a pretraining run folder (pretrain_config.json, checkpoints/)")
    parser.add_argument("--steps", type=int, nargs="+", required=True, help="checkpoint steps to fine-tune and probe")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4], help="the suite's lr grid")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per lr")
    parser.add_argument("--jobs", type=int, default=2, help="fine-tuning cells at once (one process each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell and for the probes")
    parser.add_argument("--probe-sentences", type=int, default=4000, help="SST-2 training sentences for the probes")
    parser.add_argument("--suite-dir", type=Path, default=Path("runs/sst2-by-step"), help="the suite's --out-dir")
    parser.add_argument("--out", type=Path, required=True, help="JSON of the results; the plot is written beside it")
    parser.add_argument("--beside", type=Path, nargs="+", default=[],
                        help="other results of this script to draw on the fine-tuned panel (e.g. another objective)")
    args = parser.parse_args(argv)
    for path in args.beside:  # a wrong path fails before any work
        if not path.is_file():
            raise SystemExit(f"error: --beside {path}: no such file; expected a JSON this script wrote (--out)")
    beside = [json.loads(path.read_text()) for path in args.beside]

    config, found = read_run(args.run_dir)
    checkpoints = {checkpoint_step(c): c for c in found}
    missing = [s for s in args.steps if s not in checkpoints]
    if missing:
        raise SystemExit(f"error: {args.run_dir / 'checkpoints'}: no checkpoint at step {missing}; it has "
                         f"{sorted(checkpoints)}")
    before = prior_tokens(config)  # a continued run counts its start
    common = {"tasks": ["SST-2"], "lrs": args.lrs, "seeds": args.seeds, "jobs": args.jobs, "threads": args.threads,
              "out_dir": str(args.suite_dir)}
    train, dev = probe_data(None, args.probe_sentences)
    done = {}
    if args.out.is_file():  # probes already run are read back (the fine-tuning cells are, by the suite)
        earlier = json.loads(args.out.read_text())
        if earlier["probe_train_sentences"] == len(train[0]):
            done = {row["label"]: row["probes"] for row in earlier["rows"]}
    torch.set_num_threads(args.threads)
    rows = []
    last = checkpoints[max(args.steps)]
    for step, model_dir, scratch in [(s, checkpoints[s], False) for s in sorted(args.steps)] + [(None, last, True)]:
        label = SCRATCH if scratch else step_label(step)
        tuned = fine_tuned(SuiteConfig(model_dir=str(model_dir), from_scratch=scratch, label=label, **common))
        probes = done.get(label) or probe_model(model_dir, train, dev, load_weights=not scratch)
        rows.append({"label": label, "step": step, "tokens": None if scratch else before + tokens_at(config, step),
                     "fine_tuned": tuned, "probes": probes})
        print(f"{label}: SST-2 {tuned['accuracy']:.1f} ± {tuned['std']:.1f} (lr {tuned['lr']}), probes "
              + ", ".join(f"{k} {probes[f'probe_{k}']:.1f}" for k in KINDS), flush=True)
    result = {"machine": machine(), "run_dir": str(args.run_dir), "objective": config["objective"], "lrs": args.lrs,
              "seeds": args.seeds, "probe_train_sentences": len(train[0]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"), beside)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
