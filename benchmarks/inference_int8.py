"""int8 and ONNX Runtime against bertkit float32 and transformers: inference examples/s and task accuracy, all from
the same fine-tuned models.

    python benchmarks/inference_int8.py --sst2 RUN_SST2 --mrpc RUN_MRPC     # run folders of `bertkit finetune`
    python benchmarks/inference_int8.py --sst2 ... --mrpc ... --quick        # small settings: checks the script

Five sides, each from the same model folder: bertkit float32; bertkit int8 (`--int8`, bertkit.quantize); ONNX
Runtime float32 and int8 (the two files `bertkit export` writes, exported here); transformers float32
(BertForSequenceClassification with SDPA attention, the folder loaded as it is).

Speed: SST-2 dev sentences through the SST-2 model, in batches of 1 and of 32 consecutive sentences padded to their
longest (every side gets the same batches; what a side does with the padding is its own business), at each
--threads. The sides alternate round by round (each runs all its batches in turn), in reversed order every other
round; the first round is a warm-up and not counted. Examples/s come from wall time, and at one thread also from the
CPU time of the calling thread (every side then computes on that one thread), which other processes on the same core
do not inflate.

Accuracy: every side scores the whole SST-2 dev set with the SST-2 model and the whole MRPC test set with the MRPC
model, in batches of 32 in file order (int8 results depend a little on a batch's other rows: activations are
quantized with one scale per call).

--base: also time bertkit float32 against int8 on a network of BERT-Base's shape (L12 H768 A12, random weights,
2 labels) on the same batches of 32: speed only, to see how the int8 gain depends on the size (the attention, which
stays in float32, is a larger share of a small model's time).

--gemm: only the ceiling: int8 against float32 GEMMs alone (torch's dynamic int8 Linear and nn.Linear, alternated,
one thread) at the linear layers' shapes of MiniLM and BERT-Base for 32 rows of 30 tokens. The end-to-end int8 gain
cannot exceed it, since the rest (attention, GELU, LayerNorm) stays float32; on a CPU without AVX-512 VNNI it is far
lower than with it, and on one with AMX oneDNN's kernels are far faster than fbgemm's (both engines are timed, with
inputs in 8 bits). No model folders needed.

Writes benchmarks/results/inference_int8.json and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import machine  # noqa: E402  (the CPU, cores, torch and transformers versions, as the other benchmarks)

SIDES = ("bertkit fp32", "bertkit int8", "onnxruntime fp32", "onnxruntime int8", "transformers fp32")


def load_side(name: str, model_dir: Path, onnx_dir: Path, threads: int):
    """A function from a padded batch (numpy int64 arrays) to logits (numpy), for one side at `threads`."""
    from bertkit import BertForSequenceClassification

    if name.startswith("onnxruntime"):
        from bertkit.export import session

        sess = session(onnx_dir / ("model.int8.onnx" if name.endswith("int8") else "model.onnx"), threads)
        return lambda batch: sess.run(None, batch)[0]
    if name.startswith("transformers"):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    else:
        model = BertForSequenceClassification.from_pretrained(model_dir).eval()
        if name.endswith("int8"):
            from bertkit.quantize import to_int8

            model = to_int8(copy.deepcopy(model))

    def run(batch):
        torch.set_num_threads(threads)
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()

    return run


def batches_of(rows: list[dict], size: int, pad_id: int) -> list[dict]:
    """Consecutive rows in batches of `size`, padded to each batch's longest, as numpy int64 arrays."""
    from bertkit.data.batching import collate

    out = []
    for start in range(0, len(rows), size):
        batch = collate([{k: r[k] for k in ("input_ids", "token_type_ids")} for r in rows[start:start + size]], pad_id)
        out.append({k: batch[k].numpy().astype(np.int64) for k in ("input_ids", "token_type_ids", "attention_mask")})
    return out


def task_data(model_dir: Path, limit: int | None):
    """The run's eval examples (SST-2 dev, MRPC test), encoded; the tokenizer's pad id; the run's metric names."""
    from bertkit.tasks.classification import encode
    from bertkit.tasks.finetune import FinetuneConfig, load_task
    from bertkit.tokenizer import Tokenizer

    config = FinetuneConfig.load(model_dir)
    if config is None:
        sys.exit(f"{model_dir}: no finetune_config.json; expected a run folder of `bertkit finetune`")
    from bertkit.config import BertConfig

    id2label = BertConfig.load(model_dir).id2label
    task = load_task(config, need_train=False, labels=[id2label[i] for i in sorted(id2label)])
    examples = next(iter(task.evals.values()))[:limit]
    tokenizer = Tokenizer.from_pretrained(model_dir)
    rows = encode(examples, tokenizer, config.max_length, with_labels=True)
    return rows, tokenizer.pad_id, task.metrics


def score(side, rows, pad_id, metrics) -> dict:
    from bertkit.tasks.metrics import compute_metrics

    predictions = np.concatenate([side(b).argmax(-1) for b in batches_of(rows, 32, pad_id)])
    return compute_metrics(metrics, predictions, [r["labels"] for r in rows])


def measure(units: dict, rounds: int) -> dict:
    """Alternate the sides round by round (each runs all its units in turn, reversed every other round); round 0 is a
    warm-up. Per side: examples, wall seconds, CPU seconds of this thread."""
    totals = {name: {"examples": 0, "wall": 0.0, "cpu": 0.0, "unit_wall": []} for name in units}
    names = list(units)
    for r in range(rounds + 1):
        for name in names if r % 2 == 0 else names[::-1]:
            for fn, batch, n in units[name]:
                wall, cpu = time.perf_counter(), time.thread_time()
                fn(batch)
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                if r > 0:
                    t = totals[name]
                    t["examples"] += n
                    t["wall"] += wall
                    t["cpu"] += cpu
                    t["unit_wall"].append(wall)
    return {name: {"examples": t["examples"], "examples_per_s": t["examples"] / t["wall"],
                   "examples_per_cpu_s": t["examples"] / t["cpu"], "median_unit_s": statistics.median(t["unit_wall"])}
            for name, t in totals.items()}


def base_speed(batches: list[dict], threads: list[int], rounds: int) -> dict:
    """Batch-32 examples/s of bertkit float32 and int8 on a randomly initialised BERT-Base-shaped classifier."""
    from bertkit import BertConfig, BertForSequenceClassification
    from bertkit.quantize import to_int8

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, num_labels=2)
    fp32 = BertForSequenceClassification(config).eval()
    models = {"bertkit fp32": fp32, "bertkit int8": to_int8(copy.deepcopy(fp32))}
    out = {}
    for t in threads:
        def side(model):
            def run(batch):
                torch.set_num_threads(t)
                with torch.no_grad():
                    return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits
            return run
        units = {name: [(side(m), b, len(b["input_ids"])) for b in batches] for name, m in models.items()}
        out[f"{t}"] = measure(units, rounds)
    return out


def base_table(result: dict) -> str:
    lines = ["| BERT-Base shape, batch 32 | " + " | ".join(f"{t} thread{'s' * (int(t) > 1)}" for t in result) + " |",
             "|---" * (len(result) + 1) + "|"]
    for name in ("bertkit fp32", "bertkit int8"):
        cells = [f"{r[name]['examples_per_s']:.1f} ({r[name]['examples_per_s'] / r['bertkit fp32']['examples_per_s']:.2f}×)"
                 for r in result.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(result: dict) -> str:
    threads = result["settings"]["threads"]
    speed = result["speed"]
    head = "| side | " + " | ".join(f"{t} thread{'s' * (t > 1)}, batch {b}" for t in threads for b in (1, 32))
    lines = [head + " | SST-2 dev accuracy | MRPC test accuracy / F1 |", "|---" * (2 * len(threads) + 3) + "|"]
    for name in SIDES:
        cells = []
        for t in threads:
            for b in (1, 32):
                s, base = speed[f"{t}"][f"{b}"][name], speed[f"{t}"][f"{b}"]["bertkit fp32"]
                cell = f"{s['examples_per_s']:.1f} ({s['examples_per_s'] / base['examples_per_s']:.2f}×)"
                if t == 1:
                    cell += f" [CPU {s['examples_per_cpu_s'] / base['examples_per_cpu_s']:.2f}×]"
                cells.append(cell)
        acc = result["accuracy"][name]
        mrpc = acc["mrpc"]
        cells += [f"{acc['sst2']['accuracy']:.2f}", f"{mrpc['accuracy']:.2f} / {mrpc['f1']:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gemm_ceiling(rounds: int = 5) -> str:
    """int8 / float32 speed of the GEMMs alone, at the encoder's linear shapes, through each int8 engine this torch
    has among x86 (fbgemm) and onednn (AMX where the CPU has it); a markdown table."""
    import torch

    from bertkit.quantize import Int8Linear

    torch.set_num_threads(1)
    torch.manual_seed(0)
    engines = [e for e in ("x86", "onednn") if e in torch.backends.quantized.supported_engines]
    columns = " | ".join(f"int8 {e} GOP/s (× float32)" for e in engines)
    lines = [f"| network | shape (in -> out) | float32 GFLOP/s | {columns} |", "|---|---|---|" + "---|" * len(engines)]
    for network, hidden in (("MiniLM", 384), ("BERT-Base", 768)):
        for n_in, n_out in ((hidden, 3 * hidden), (hidden, 4 * hidden), (4 * hidden, hidden)):
            x = torch.randn(32 * 30, n_in)
            fp32 = torch.nn.Linear(n_in, n_out).eval()
            units = {"fp32": [(fp32, x, 1)] * 4}
            for e in engines:
                units[e] = [(Int8Linear(fp32, reduce_range=False, engine=e), x, 1)] * 4
            with torch.no_grad():
                r = measure(units, rounds)
            ops = 2 * x.shape[0] * n_in * n_out
            speed = {name: r[name]["examples_per_cpu_s"] * ops / 1e9 for name in units}
            lines.append(f"| {network} | {n_in} -> {n_out} | {speed['fp32']:.0f} | " + " | ".join(
                f"{speed[e]:.0f} ({speed[e] / speed['fp32']:.2f}×)" for e in engines) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sst2", type=Path, help="a run folder of `bertkit finetune --task SST-2`")
    parser.add_argument("--mrpc", type=Path, help="a run folder of `bertkit finetune --task MRPC`")
    parser.add_argument("--gemm", action="store_true", help="only time int8 against float32 GEMMs (no folders)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch / ONNX Runtime threads")
    parser.add_argument("--batches", type=int, default=8, help="batches of 32 per side and round (default: 8)")
    parser.add_argument("--singles", type=int, default=64, help="batches of 1 per side and round (default: 64)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds, after one warm-up round")
    parser.add_argument("--accuracy-threads", type=int, default=2, help="threads while scoring accuracy")
    parser.add_argument("--base", action="store_true", help="also time fp32 and int8 on a BERT-Base-shaped network")
    parser.add_argument("--quick", action="store_true", help="2 batches, 8 singles, 1 round, 64 examples scored")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "inference_int8.json")
    args = parser.parse_args(argv)
    if args.gemm:
        import torch

        torch.set_num_threads(1)
        print(f"{machine()}\n" + gemm_ceiling(args.rounds), end="")
        return 0
    if not (args.sst2 and args.mrpc):
        parser.error("--sst2 and --mrpc are required (or --gemm alone)")
    limit = None
    if args.quick:
        args.batches, args.singles, args.rounds, limit = 2, 8, 1, 64
    from bertkit.export import ExportConfig, export

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        onnx = {}
        for task, folder in (("sst2", args.sst2), ("mrpc", args.mrpc)):
            onnx[task] = Path(tmp) / task
            report = export(ExportConfig(model_dir=str(folder), out=str(onnx[task])))
            print(f"exported {folder} in {report['seconds']} s; ONNX Runtime vs bertkit: float32 "
                  f"{report['check']['float32']['max_abs_diff']:.2g}, int8 {report['check']['int8']['max_abs_diff']:.2g}",
                  file=sys.stderr)

        accuracy = {name: {} for name in SIDES}
        for task, folder in (("sst2", args.sst2), ("mrpc", args.mrpc)):
            rows, pad_id, metrics = task_data(folder, limit)
            for name in SIDES:
                side = load_side(name, folder, onnx[task], args.accuracy_threads)
                accuracy[name][task] = score(side, rows, pad_id, metrics)
                print(f"{task} {name}: {accuracy[name][task]}", file=sys.stderr)

        rows, pad_id, _ = task_data(args.sst2, None)
        singles = batches_of(rows[: args.singles], 1, pad_id)
        thirty_twos = batches_of(rows[: 32 * args.batches], 32, pad_id)
        speed = {}
        for threads in args.threads:
            sides = {name: load_side(name, args.sst2, onnx["sst2"], threads) for name in SIDES}
            speed[f"{threads}"] = {}
            for size, batches in ((1, singles), (32, thirty_twos)):
                units = {name: [(fn, b, len(b["input_ids"])) for b in batches] for name, fn in sides.items()}
                speed[f"{threads}"][f"{size}"] = measure(units, args.rounds)
                print(f"{threads} thread(s), batch {size}: " + ", ".join(
                    f"{n} {s['examples_per_s']:.1f}/s" for n, s in speed[f"{threads}"][f"{size}"].items()),
                    file=sys.stderr)
        base = base_speed(thirty_twos[: max(1, args.batches // 2)], args.threads, args.rounds) if args.base else None
    result = {
        "machine": machine() | {"load_average_before": [round(x, 2) for x in load],
                                "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"threads": args.threads, "batches_of_32": args.batches, "batches_of_1": args.singles,
                     "rounds": args.rounds, "sst2": str(args.sst2), "mrpc": str(args.mrpc), "quick": args.quick},
        "speed": speed,
        "accuracy": accuracy,
        "base_shape_speed": base,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result), end="")
    if base:
        print("\n" + base_table(base), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
