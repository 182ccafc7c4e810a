"""Fine-tuning side by side: bertkit's `finetune` against a plain transformers loop on SST-2 and MRPC.

Same checkpoint, seed, data, optimizer (torch's fused AdamW, as bertkit and transformers' Trainer use by default;
eps 1e-6, weight decay 0.01 except biases and LayerNorm),
schedule (10% linear warm-up, linear decay), gradient clipping (1.0), batch size and max length. The transformers
side is the loop of its `run_glue_no_trainer.py` example: shuffled batches padded to their longest row by
DataCollatorWithPadding. bertkit's side is the library's own `finetune` (length-grouped batches, padding removed in
the encoder). Both sides of a run take the same seed. Scores are the last epoch's on both sides; times are the training part of each epoch (no
evaluation, no tokenization), wall and CPU. Consecutive runs alternate which side goes first, so that a busier
stretch of a shared machine does not always fall on the same side.

    python benchmarks/finetune_vs_transformers.py --threads 1 --sst2-examples 8000
    python benchmarks/finetune_vs_transformers.py --device cuda --sst2-examples 67349 --seeds 1 2 3   # on a GPU, fp32

prints a table and writes (or replaces) the "Fine-tuning vs transformers" section of benchmarks/RESULTS.md. Runs
accumulate in --out/results.json per task and seed, so a later invocation with other --seeds adds to the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from bertkit.data.glue import get_task, read_glue_file
from bertkit.tasks.finetune import FinetuneConfig, finetune
from bertkit.tasks.metrics import glue_metrics

HEADING = "## Fine-tuning vs transformers"


def task_files(data: Path, task: str) -> tuple[Path, Path]:
    if task == "MRPC":  # Microsoft's release: train on its train file, score on its test file
        return data / "glue/MRPC/msr_paraphrase_train.txt", data / "glue/MRPC/msr_paraphrase_test.txt"
    return data / f"glue/{task}/train.tsv", data / f"glue/{task}/dev.tsv"


def run_bertkit(args, task: str, n_train: int | None, epochs: int, seed: int) -> dict:
    train_file, eval_file = task_files(args.data, task)
    config = FinetuneConfig(
        model_dir=str(args.model_dir), task=task, train_file=str(train_file), eval_file=str(eval_file),
        out_dir=str(args.out / f"bertkit-{task}-seed{seed}"), lr=args.lr, batch_size=args.batch_size, epochs=epochs,
        max_length=args.max_length, seed=seed, eval_batch_size=args.eval_batch_size,
        limit_train_examples=n_train, threads=args.threads, device=args.device,
        overwrite=True,  # the folder of an earlier invocation with other settings, whose row main() starts afresh
        save_every=0,  # mid-epoch checkpoints would be timed as training; the transformers loop writes none
    )
    record = finetune(config)
    last = record["epochs"][-1]
    metric_names = get_task(task).metrics
    return {"scores": {m: last[m] for m in metric_names},
            "epoch_seconds": [e["train_seconds"] for e in record["epochs"]],
            "epoch_cpu_seconds": [e["train_cpu_seconds"] for e in record["epochs"]],
            "train_examples": record["train_examples"]}


def run_transformers(args, task: str, n_train: int | None, epochs: int, seed: int) -> dict:
    """The plain transformers loop: shuffle, pad each batch to its longest row, step; score after each epoch."""
    from transformers import AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding
    from transformers import get_linear_schedule_with_warmup

    spec = get_task(task)
    train_file, eval_file = task_files(args.data, task)
    train = read_glue_file(task, train_file)[:n_train]
    evals = read_glue_file(task, eval_file)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)

    def features(examples, with_labels):
        pairs = [e.text_b for e in examples] if spec.text_b else None
        enc = tokenizer([e.text_a for e in examples], pairs, truncation=True, max_length=args.max_length)
        rows = [{k: enc[k][i] for k in enc} for i in range(len(examples))]
        if with_labels:
            for row, e in zip(rows, examples):
                row["labels"] = e.label
        return rows

    train_rows, eval_rows = features(train, True), features(evals, False)
    collator = DataCollatorWithPadding(tokenizer)
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(args.model_dir, num_labels=len(spec.labels),
                                                          dtype=torch.float32).to(args.device)
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, eps=1e-6, fused=True)
    steps = epochs * math.ceil(len(train_rows) / args.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.1 * steps), steps)
    result = {"epoch_seconds": [], "epoch_cpu_seconds": [], "train_examples": len(train_rows)}
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        start, start_cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(order), args.batch_size):
            batch = collator([train_rows[j] for j in order[i : i + args.batch_size]]).to(args.device)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        result["epoch_seconds"].append(time.perf_counter() - start)
        result["epoch_cpu_seconds"].append(time.process_time() - start_cpu)
        model.eval()
        predictions = []
        with torch.no_grad():
            for i in range(0, len(eval_rows), args.eval_batch_size):
                logits = model(**collator(eval_rows[i : i + args.eval_batch_size]).to(args.device)).logits
                predictions += logits.argmax(-1).tolist()
        result["scores"] = glue_metrics(task, predictions, [e.label for e in evals])
        print(f"transformers {task} epoch {epoch}: {result['scores']}, {result['epoch_seconds'][-1]:.0f}s",
              file=sys.stderr)
    return result


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return platform.processor() or "unknown"


def heading(args) -> str:
    return HEADING + (" (GPU)" if args.device == "cuda" else "")


def section(args, results: dict) -> str:
    """The RESULTS.md section: one row per task, scores and times averaged over the seeds run."""
    import transformers

    if args.device == "cuda":
        machine = (f"Machine: {torch.cuda.get_device_name()} (fp32, TF32 off, both sides), {os.cpu_count()} CPU cores; "
                   f"torch {torch.__version__}, transformers {transformers.__version__}.")
    else:
        machine = (f"Machine: {os.cpu_count()}-core CPU ({cpu_model()}), shared with other jobs; torch "
                   f"{torch.__version__}, transformers {transformers.__version__}, {args.threads} torch thread(s) on "
                   "both sides.")
    lines = [
        heading(args),
        "",
        machine,
        "Commands:",
        *(f"`{command}`" + ("  " if i < len(results["commands"]) - 1 else "") for i, command in enumerate(results["commands"])),
        "",
        f"Checkpoint {args.model_dir.name}, lr {args.lr:g}, batch {args.batch_size}, max length {args.max_length}, "
        "AdamW (eps 1e-6, weight decay 0.01), 10% warm-up then linear decay, clipping 1.0; both sides take the same "
        "seed per run. Scores: the last epoch, mean over the seeds (each seed in brackets); SST-2 on its dev set, MRPC "
        "trained on msr_paraphrase_train.txt and scored on msr_paraphrase_test.txt. Time: training only, mean per "
        "epoch over all runs, wall (CPU); speed-up = transformers / bertkit.",
        "",
        "| task | train examples | epochs | seeds | bertkit | transformers | bertkit s/epoch "
        "| transformers s/epoch | speed-up wall | speed-up CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, by_seed in results["runs"].items():
        metrics = get_task(task).metrics
        runs = list(by_seed.values())

        def score(side):
            per_seed = [[r[side]["scores"][m] for m in metrics] for r in runs]
            mean = "/".join(f"{sum(s[i] for s in per_seed) / len(per_seed):.2f}" for i in range(len(metrics)))
            each = ", ".join("/".join(f"{v:.2f}" for v in s) for s in per_seed)
            return mean + (f" [{each}]" if len(runs) > 1 else "")

        def seconds(side, key):
            values = [t for r in runs for t in r[side][key]]
            return sum(values) / len(values)

        ours, theirs = (seconds(side, "epoch_seconds") for side in ("bertkit", "transformers"))
        ours_cpu, theirs_cpu = (seconds(side, "epoch_cpu_seconds") for side in ("bertkit", "transformers"))
        first = runs[0]["bertkit"]
        lines.append(
            f"| {task} | {first['train_examples']:,} | {len(first['epoch_seconds'])} | {', '.join(by_seed)} | "
            f"{score('bertkit')} ({'/'.join(metrics)}) | {score('transformers')} | {ours:.0f} ({ours_cpu:.0f}) | "
            f"{theirs:.0f} ({theirs_cpu:.0f}) | {theirs / ours:.2f}x | {theirs_cpu / ours_cpu:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str, title: str) -> None:
    """Replace this benchmark's section of RESULTS.md, or append it; other sections are left as they are."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new, encoding="utf-8")


def main() -> None:
    data = Path(os.environ.get("BERTKIT_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=data, help="the shared data folder (BERTKIT_DATA)")
    parser.add_argument("--model-dir", type=Path, default=data / "checkpoints/all-MiniLM-L6-v2")
    parser.add_argument("--tasks", nargs="+", default=["SST-2", "MRPC"])
    parser.add_argument("--sst2-examples", type=int, default=8000, help="SST-2 training subset (first N rows)")
    parser.add_argument("--sst2-epochs", type=int, default=1)
    parser.add_argument("--mrpc-examples", type=int, default=None, help="MRPC training subset (default: all 4,076)")
    parser.add_argument("--mrpc-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one run per seed on each side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides train (fp32)")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_vs_transformers"))
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the same fp32 maths on both sides
    args.out.mkdir(parents=True, exist_ok=True)

    # runs accumulate per (task, seed) over invocations, so more seeds can be added to a table later
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}, "commands": []}
    command = "python benchmarks/finetune_vs_transformers.py " + shlex.join(sys.argv[1:])
    results["commands"] = [c for c in results["commands"] if c != command.strip()] + [command.strip()]
    pairs = [(get_task(task).name, seed) for task in args.tasks for seed in args.seeds]
    for index, (task, seed) in enumerate(pairs):
        n_train = args.sst2_examples if task == "SST-2" else args.mrpc_examples
        epochs = args.sst2_epochs if task == "SST-2" else args.mrpc_epochs
        sides = [("bertkit", run_bertkit), ("transformers", run_transformers)]
        run = {side: fn(args, task, n_train, epochs, seed) for side, fn in (sides if index % 2 == 0 else sides[::-1])}
        earlier = results["runs"].setdefault(task, {})
        if any(r["bertkit"]["train_examples"] != run["bertkit"]["train_examples"]
               or len(r["bertkit"]["epoch_seconds"]) != epochs for r in earlier.values()):
            earlier.clear()  # other settings: the task's row starts afresh rather than mixing the two
        earlier[str(seed)] = run
        path.write_text(json.dumps(results, indent=2) + "\n")

    text = section(args, results)
    print(text)
    if not args.no_write:
        write_section(args.results, text, heading(args))


if __name__ == "__main__":
    main()
