"""Every checkpoint of a pretraining run scored on all of its corpus's held-out examples at one setting, beside the
run's own held-out evaluation, as a table, a JSON file and a plot.

    python benchmarks/heldout_curve.py runs/books/mini-final --out docs/books-mini/heldout.json

A run evaluates itself as it trains: its masking (rate, kind, mix) and its first --eval-batches held-out batches.
Here each checkpoint is scored by `score_held_out` instead: every held-out example of the run's prepared corpus, at
the run's length and objective, with token masking at --mask-prob (15%, the paper's rate, by default) drawn with
seed 0, the same positions for every checkpoint and every run on that corpus. A run trained at another masking rate
is thereby read at the paper's, and two runs compare. Checkpoints already in --out are not scored again.

--objective reads a run in another objective's input form: an MLM-only run on NSP's pairs gives its masked LM on the
very examples an MLM+NSP run is read on (its untrained sentence head is not scored). A run that continued another
run's checkpoint (`bertkit pretrain --model-dir RUN/checkpoints/step-N`) counts that run's N steps in its tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import machine  # noqa: E402

from bertkit.checkpoint import checkpoint_step, list_checkpoints  # noqa: E402
from bertkit.errors import BertkitError  # noqa: E402
from bertkit.train.logs import read_csv  # noqa: E402
from bertkit.train.pretrain import CONFIG_NAME, PretrainConfig, phases, score_held_out  # noqa: E402

SCORES = ("masked_lm_loss", "masked_lm_accuracy", "next_sentence_accuracy")


def read_run(run_dir: Path) -> tuple[dict, list[Path]]:
    """A pretraining run folder's config and its complete checkpoints, oldest first; exits with a message if the
    folder is not a run or has no checkpoint."""
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise SystemExit(f"error: {run_dir}: no {CONFIG_NAME}; expected a folder written by `bertkit pretrain`")
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        raise SystemExit(f"error: {run_dir / 'checkpoints'}: no complete checkpoint to score")
    return json.loads(config_path.read_text()), checkpoints


def run_phases(config: dict) -> list:
    """The phases of a run (its flags, then --then's), from its saved config."""
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    return phases(PretrainConfig(**{k: v for k, v in config.items() if k in known}))


def tokens_at(config: dict, step: int) -> int:
    """Token positions the run trained on in its first `step` optimizer steps, each phase (--then) at its own batch
    and length."""
    return sum(max(0, min(step, p.end) - p.first_step) * p.cfg.batch_size * p.cfg.grad_accum * p.cfg.max_length
               for p in run_phases(config))


def prior_tokens(config: dict) -> int:
    """Token positions the run's starting weights had already trained on: the steps of the run whose checkpoint it
    continued (--model-dir .../checkpoints/step-N of a run folder), and of the runs that one continued; else 0."""
    start = Path(config["model_dir"]) if config.get("model_dir") else None
    step = checkpoint_step(start) if start else None
    if step is None or not (start.parent.parent / CONFIG_NAME).is_file():
        return 0
    earlier = json.loads((start.parent.parent / CONFIG_NAME).read_text())
    return tokens_at(earlier, step) + prior_tokens(earlier)


def own_curve(run_dir: Path) -> dict[int, dict[str, float]]:
    """The run's own held-out evaluation (eval.csv), by step."""
    path = run_dir / "eval.csv"
    if not path.is_file():
        return {}
    return {int(row["step"]): {k: float(row[k]) for k in SCORES if row.get(k)} for row in read_csv(path)}


def table(result: dict) -> str:
    own_rate = result["run"]["mask_prob"]
    rate = result["mask_prob"]
    lines = [f"| step | tokens (M) | MLM loss ({own_rate:.0%}, own) | MLM acc | NSP acc | MLM loss ({rate:.0%}, all) "
             f"| MLM acc | NSP acc |", "|---|---|---|---|---|---|---|---|"]
    def cell(scores: dict, key: str) -> str:
        if key not in scores:
            return "-"
        return f"{scores[key]:.3f}" if key == "masked_lm_loss" else f"{100 * scores[key]:.1f}"

    for row in result["rows"]:
        cells = [cell(row.get("own", {}), k) for k in SCORES] + [cell(row, k) for k in SCORES]
        lines.append(f"| {row['step']:,} | {row['tokens'] / 1e6:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tokens = [r["tokens"] / 1e6 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in zip(axes, ("next_sentence_accuracy", "masked_lm_accuracy"), ("NSP", "masked LM")):
        own = [(t, 100 * r["own"][key]) for t, r in zip(tokens, rows) if key in r.get("own", {})]
        if own:
            ax.plot(*zip(*own), "o-", label=f"own evaluation ({result['run']['mask_prob']:.0%} masking)")
        scored = [(t, 100 * r[key]) for t, r in zip(tokens, rows) if key in r]
        if scored:  # none for a sentence task the run has not trained
            ax.plot(*zip(*scored), "s-", label=f"all held-out examples, {result['mask_prob']:.0%} masking")
        if key == "masked_lm_accuracy":
            ax.plot(tokens, [100 * r["unigram_baseline_accuracy"] for r in rows], ":", color="gray",
                    label="most frequent token")
        ax.set(title=f"held-out {title} accuracy", xlabel="token positions trained (M)", ylabel="%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a pretraining run folder (pretrain_config.json, checkpoints/)")
    parser.add_argument("--mask-prob", type=float, default=0.15, help="share of tokens masked for the scores")
    parser.add_argument("--objective", default=None, help="input form to score in (default: the run's own, its "
                        "last phase's with --then), e.g. "
                        "mlm+nsp to read an MLM-only run on the pairs an MLM+NSP run is read on")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, required=True, help="JSON of the scores; the plot is written beside it")
    args = parser.parse_args()

    config, checkpoints = read_run(args.run_dir)
    own_objective = run_phases(config)[-1].cfg.objective
    objective = args.objective or own_objective
    # a run that built its vocabulary and prepared corpus from --corpus (`bertkit pretrain` with no arguments) keeps
    # them in its folder, and its config says null
    tokenizer, data = config["tokenizer"] or args.run_dir / "tokenizer", config["data"] or args.run_dir / "data"
    # a sentence head the run never trained (an MLM-only run read on pairs) has no score worth reading
    keep = SCORES if objective == own_objective else SCORES[:2]
    torch.set_num_threads(args.threads)
    done = {}
    if args.out.is_file():
        earlier = json.loads(args.out.read_text())
        if earlier.get("mask_prob") == args.mask_prob and earlier.get("objective", objective) == objective:
            done = {row["step"]: row for row in earlier["rows"]}
    own = own_curve(args.run_dir)
    before = prior_tokens(config)
    rows = []
    for checkpoint in checkpoints:
        step = checkpoint_step(checkpoint)
        if step not in done:
            try:
                scores = score_held_out(checkpoint, tokenizer, data, objective=objective,
                                        max_length=config["max_length"], mask_prob=args.mask_prob)
            except BertkitError as e:
                raise SystemExit(f"error: {checkpoint}: {e}") from None
            done[step] = {"step": step, **{k: scores[k] for k in (*keep, "unigram_baseline_accuracy",
                                                                  "examples") if k in scores}}
            print(f"step {step:,}: " + ", ".join(f"{k} {scores[k]:.4f}" for k in keep if k in scores), flush=True)
        rows.append({**done[step], "tokens": before + tokens_at(config, step), "own": own.get(step, {})})
    # a run that continued a --model-dir is named by that folder (runs saved before 2026-12 recorded --model's unused
    # default there)
    names = ("out_dir", "model_dir" if config["model_dir"] else "model", "objective", "masking", "mask_prob",
             "max_length", "max_steps", "seed")
    names += ("then",) if config.get("then") else ()
    result = {"machine": machine(), "run": {k: config[k] for k in names},
              "objective": objective, "mask_prob": args.mask_prob, "tokens_before": before, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(table(result))


if __name__ == "__main__":
    main()
