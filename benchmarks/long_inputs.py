"""Inputs longer than 512: time and peak memory of one forward + backward of the encoder at lengths 512 .. 8,192,
full attention against windowed attention, bertkit against transformers in the same run.

    python benchmarks/long_inputs.py                       # mini, lengths 512 1024 2048 4096 8192, window 512
    python benchmarks/long_inputs.py --model base --lengths 512 2048 --repeats 1

Sides (the same config, batch 1, the same token ids):
- bertkit-full: bertkit's encoder, full attention (SDPA; training with dropout on takes its math path on the CPU,
  which holds the T x T probabilities for the backward, as eager attention does)
- bertkit-window: the same weights with attention_window (local window plus [CLS] global)
- hf-bert-sdpa: transformers' BertModel, SDPA attention (full)
- hf-bert-eager: transformers' BertModel, eager attention (the T x T scores held for the backward)
- hf-longformer: transformers' LongformerModel, the same window ([CLS] global): the peer of bertkit-window

Every (side, length) runs alone in a fresh subprocess: one warm-up step, then --repeats timed steps (median);
memory is the peak resident set during the steps minus the resident set before the first. A case that fails
(out of memory, killed) or passes --timeout is reported as such. The loss is the mean square of the last hidden
state, so the benchmark measures the encoder alone. Results: JSON and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SIDES = ("bertkit-full", "bertkit-window", "hf-bert-sdpa", "hf-bert-eager", "hf-longformer")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(side: str, model: str, length: int, window: int):
    """The side's model on the preset's config, with positions for `length` tokens."""
    from bertkit import BertConfig
    from bertkit.model import BertModel

    config = BertConfig.from_preset(model, max_position_embeddings=length,
                                    attention_window=window if side == "bertkit-window" else 0)
    if side.startswith("bertkit"):
        return BertModel(config, add_pooling_layer=False)
    import transformers

    shape = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                 num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size)
    if side == "hf-longformer":
        return transformers.LongformerModel(transformers.LongformerConfig(
            **shape, attention_window=window, max_position_embeddings=length + 2, type_vocab_size=2),
            add_pooling_layer=False)
    implementation = "sdpa" if side == "hf-bert-sdpa" else "eager"
    hf_config = transformers.BertConfig(**shape, max_position_embeddings=length)
    hf_config._attn_implementation = implementation  # what from_pretrained(attn_implementation=) sets
    return transformers.BertModel(hf_config, add_pooling_layer=False)


def one_case(side: str, model: str, length: int, window: int, repeats: int) -> dict:
    """Run in the child: build, warm up, time; returns seconds per step and peak memory above the start."""
    torch.manual_seed(0)
    net = build(side, model, length, window).train()
    ids = torch.randint(1000, 20000, (1, length))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if side == "hf-longformer":
        glob = torch.zeros_like(ids)
        glob[:, 0] = 1
        kwargs["global_attention_mask"] = glob

    def step():
        out = net(**kwargs)
        out.last_hidden_state.float().pow(2).mean().backward()
        net.zero_grad(set_to_none=True)

    before = rss_bytes()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times), "peak_mib": (peak - before) / 2**20}


def run_case(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--model", args.model, "--lengths", str(args.length),
           "--window", str(args.window), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"over {args.timeout} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
        killed = done.returncode < 0 or "memory" in tail.lower()
        return {"status": "out of memory" if killed else f"failed: {tail[:200]}"}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for side in SIDES:
        rows = [(int(n), r) for n, r in results["cases"].get(side, {}).items() if r["status"] == "ok"]
        if not rows:
            continue
        lengths = [n for n, _ in rows]
        style = "-" if side.startswith("bertkit") else "--"
        axes[0].plot(lengths, [r["seconds"] for _, r in rows], style, marker="o", label=side)
        axes[1].plot(lengths, [r["peak_mib"] for _, r in rows], style, marker="o", label=side)
    for ax, label in zip(axes, ("seconds per forward + backward", "peak memory above the model (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['model']}, batch 1, window {results['window']}: full vs windowed attention")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: dict) -> str:
    """Markdown: per length, each side's seconds and MiB, and the two ratios that matter."""
    cases = results["cases"]
    sides = [s for s in SIDES if s in cases]
    lengths = sorted({int(n) for rows in cases.values() for n in rows})

    def cell(side, n):
        r = cases.get(side, {}).get(str(n))
        if r is None:
            return "-"
        return f"{r['seconds']:.2f} s, {r['peak_mib']:,.0f} MiB" if r["status"] == "ok" else r["status"]

    def ratio(a, b, n, key):
        ra, rb = cases.get(a, {}).get(str(n)), cases.get(b, {}).get(str(n))
        if not ra or not rb or ra["status"] != "ok" or rb["status"] != "ok":
            return "-"
        return f"{rb[key] / ra[key]:.2f}x"

    head = ["tokens", *sides, "window vs full: time", "memory", "bertkit vs Longformer: time", "memory"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for n in lengths:
        row = [f"{n:,}", *(cell(s, n) for s in sides),
               ratio("bertkit-window", "bertkit-full", n, "seconds"), ratio("bertkit-window", "bertkit-full", n, "peak_mib"),
               ratio("bertkit-window", "hf-longformer", n, "seconds"), ratio("bertkit-window", "hf-longformer", n, "peak_mib")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini", help="bertkit preset of every side (default: mini)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--window", type=int, default=512, help="attention window of the windowed sides (default: 512)")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per case after one warm-up (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a case may take (default: 900)")
    parser.add_argument("--out", default=str(HERE / "results" / "long_inputs.json"))
    parser.add_argument("--resume", action="store_true", help="keep the cases of --out that succeeded (same model and "
                        "window) and run the others again, e.g. one that ran out of memory beside another job")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(one_case(args.child, args.model, args.lengths[0], args.window, args.repeats)))
        return

    sys.path.insert(0, str(HERE))
    from run import machine

    out = Path(args.out)
    results = {"model": args.model, "window": args.window, "threads": args.threads, "repeats": args.repeats,
               "machine": machine(), "cases": {}}
    if args.resume and out.exists():
        before = json.loads(out.read_text())
        if (before["model"], before["window"]) != (args.model, args.window):
            raise SystemExit(f"{out}: model {before['model']}, window {before['window']}; expected --model "
                             f"{args.model} --window {args.window} to resume it")
        results["cases"] = {side: {n: r for n, r in rows.items() if r["status"] == "ok"}
                            for side, rows in before["cases"].items()}
    for length in args.lengths:  # short lengths first: a side that fails at one length is not tried longer
        for side in args.sides:
            earlier = results["cases"].get(side, {})
            if str(length) in earlier:
                continue
            if any(r["status"] != "ok" for n, r in earlier.items() if int(n) < length):
                earlier[str(length)] = {"status": "not run (failed at a shorter length)"}
                continue
            args.length = length
            row = run_case(side, args)
            results["cases"].setdefault(side, {})[str(length)] = row
            shown = f"{row['seconds']:8.2f} s {row['peak_mib']:9.0f} MiB" if row["status"] == "ok" else row["status"]
            print(f"{length:6d} {side:15s} {shown}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(table(results), encoding="utf-8")
    print(table(results))
    print(f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
