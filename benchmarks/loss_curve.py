"""No lost accuracy: a short pretraining run of bertkit's fast path drawn on top of the reference path's curve.

    python benchmarks/loss_curve.py --device cuda --preset base --steps 300 --batch-size 64
    python benchmarks/loss_curve.py --device cuda --compile static --bucket 64
    python benchmarks/loss_curve.py --preset tiny --steps 50 --batch-size 8          # CPU, fp32

Both models start from the same weights (bertkit's initialisation, copied into transformers' BertForPreTraining
with its SDPA attention), take the same MLM+NSP batches of real text in the same order (benchmarks/run.py's
pipeline, each batch's masks drawn once), the same AdamW and warm-up schedule, under bf16 autocast on CUDA and in
fp32 on the CPU (bf16 there too with --bf16). Dropout is off by default (the budget recipe pretrains without it),
so the two runs compute the same function and the curves differ only by rounding; with dropout on they would also
differ by their random masks.
bertkit runs with the kernel choices and compile mode given (default: as shipped, "auto"), so every fast path it
takes on that device is inside the comparison. Writes a JSON of both curves and a plot of the two losses and their
difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import run
from bertkit.config import PRESETS
from bertkit.train.optim import build_optimizer, warmup_linear


def pretraining_loss(side: str, model, batch: dict) -> torch.Tensor:
    if side == "bertkit":
        return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], labels=batch["labels"],
                     next_sentence_label=batch["next_sentence_label"], masked_positions=batch["labels"] != -100).loss
    return model(**batch).loss


def train(bench: run.Bench, side: str, model, batches: list[dict], steps: int, lr: float) -> tuple[list[float], float]:
    """`steps` optimizer steps over `batches` in order (cycled); the loss of each step and the seconds per step."""
    model.train()
    optimizer = build_optimizer(model, "adamw", lr, 0.01)
    schedule = warmup_linear(optimizer, max(1, steps // 10), steps)
    losses = []
    bench.sync()
    start = time.perf_counter()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with bench.autocast():
            loss = pretraining_loss(side, model, batches[step % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
    bench.sync()
    return [float(x) for x in losses], (time.perf_counter() - start) / steps


def summarise(curves: dict[str, list[float]], tail: int) -> dict:
    ours, theirs = curves["bertkit"], curves["transformers"]
    diff = [a - b for a, b in zip(ours, theirs)]
    end = slice(len(ours) - tail, None)
    return {
        "first_loss": {"bertkit": ours[0], "transformers": theirs[0]},
        "final_loss": {"bertkit": statistics.fmean(ours[end]), "transformers": statistics.fmean(theirs[end])},
        "max_abs_difference": max(abs(d) for d in diff),
        "mean_abs_difference": statistics.fmean(abs(d) for d in diff),
        "final_mean_difference": statistics.fmean(diff[end]),  # bertkit - transformers over the last `tail` steps
        "tail_steps": tail,
    }


def plot(curves: dict[str, list[float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = range(1, len(curves["bertkit"]) + 1)
    top.plot(steps, curves["transformers"], color="0.6", lw=3, label="transformers (reference)")
    top.plot(steps, curves["bertkit"], color="C0", lw=1, label="bertkit")
    top.set_ylabel("MLM + NSP training loss")
    top.set_title(title, fontsize=9)
    top.legend()
    bottom.plot(steps, [a - b for a, b in zip(curves["bertkit"], curves["transformers"])], color="C3", lw=1)
    bottom.axhline(0, color="0.5", lw=0.5)
    bottom.set_ylabel("bertkit - ref.")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: both sides under bf16 autocast")
    parser.add_argument("--preset", default="base", choices=list(PRESETS),
                        help="model size (bertkit.BertConfig presets)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per side")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    parser.add_argument("--max-length", type=int, default=128, help="sequence length of the pretraining examples")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (10%% warm-up, then linear decay)")
    parser.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout of both models")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--out", default=str(run.HERE / "results"), help="folder for the JSON and the plot")
    run.add_kernel_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = run.bench_from(parser, args, args.device)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1")
    config = run.config_for(args.preset, hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    models = run.twin_models(bench, "BertForPreTraining", config)
    available = len(run.pretraining_dataset(args.max_length))
    n_batches = min(args.steps, available // args.batch_size)
    if n_batches < 1:
        parser.error(f"--batch-size {args.batch_size}: the benchmark corpus has only {available} examples")
    batches = [bench.on_device(b) for b in run.pretraining_batches(args.batch_size, n_batches, args.max_length)]
    curves, seconds = {}, {}
    for side in run.SIDES:
        torch.manual_seed(0)
        curves[side], seconds[side] = train(bench, side, models[side], batches, args.steps, args.lr)
        print(f"{side:12s} loss {curves[side][0]:.3f} -> {curves[side][-1]:.3f}  ({seconds[side] * 1e3:.0f} ms/step)",
              flush=True)
    summary = summarise(curves, tail=max(1, args.steps // 10))
    precision = "bf16 autocast" if bench.bf16 else "fp32"
    what = (f"{args.preset}, batch {args.batch_size} x length {args.max_length}, {args.steps} steps, lr {args.lr:g}, "
            f"dropout {args.dropout:g}, {precision}, bertkit kernels {bench.kernels or 'auto'}"
            + (f", compiled {args.compile}" if args.compile else ""))
    print(f"{what}\nfinal loss (mean of the last {summary['tail_steps']} steps): bertkit "
          f"{summary['final_loss']['bertkit']:.4f}, transformers {summary['final_loss']['transformers']:.4f}; "
          f"largest step difference {summary['max_abs_difference']:.2g}, mean {summary['mean_abs_difference']:.2g}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {"machine": run.machine(bench), "args": vars(args), "what": what, "summary": summary,
              "seconds_per_step": seconds, "curves": curves}
    (out / f"loss-curve-{stamp}.json").write_text(json.dumps(result, indent=2))
    plot(curves, what, out / f"loss-curve-{stamp}.png")
    print(f"wrote {out / f'loss-curve-{stamp}.json'} and its .png")


if __name__ == "__main__":
    main()
