"""Fine-tuning side by side: bertkit's `finetune` against a plain transformers loop on SST-2 and MRPC.

Same checkpoint, seed, data, optimizer (AdamW, eps 1e-6, weight decay 0.01 except biases and LayerNorm),
schedule (10% linear warm-up, linear decay), gradient clipping (1.0), batch size and max length. The transformers
side is the loop of its `run_glue_no_trainer.py` example: shuffled batches padded to their longest row by
DataCollatorWithPadding. bertkit's side is the library's own `finetune` (length-grouped batches, padding removed in
the encoder). Scores are the last epoch's on both sides; times are the training part of each epoch (no
evaluation, no tokenization), wall and CPU. The two tasks run in opposite orders (SST-2 bertkit first, MRPC
transformers first) so that a busier stretch of a shared machine does not always fall on the same side.

    python benchmarks/finetune_vs_transformers.py --threads 1 --sst2-examples 8000

prints a table and writes (or replaces) the "Fine-tuning vs transformers" section of benchmarks/RESULTS.md.
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


def run_bertkit(args, task: str, n_train: int | None, epochs: int) -> dict:
    train_file, eval_file = task_files(args.data, task)
    config = FinetuneConfig(
        model_dir=str(args.model_dir), task=task, train_file=str(train_file), eval_file=str(eval_file),
        out_dir=str(args.out / f"bertkit-{task}"), lr=args.lr, batch_size=args.batch_size, epochs=epochs,
        max_length=args.max_length, seed=args.seed, eval_batch_size=args.eval_batch_size,
        limit_train_examples=n_train, threads=args.threads, device="cpu",
    )
    record = finetune(config)
    last = record["epochs"][-1]
    metric_names = get_task(task).metrics
    return {"scores": {m: last[m] for m in metric_names},
            "epoch_seconds": [e["train_seconds"] for e in record["epochs"]],
            "epoch_cpu_seconds": [e["train_cpu_seconds"] for e in record["epochs"]],
            "train_examples": record["train_examples"]}


def run_transformers(args, task: str, n_train: int | None, epochs: int) -> dict:
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
    torch.manual_seed(args.seed)
    model = BertForSequenceClassification.from_pretrained(args.model_dir, num_labels=len(spec.labels))
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, eps=1e-6)
    steps = epochs * math.ceil(len(train_rows) / args.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.1 * steps), steps)
    result = {"epoch_seconds": [], "epoch_cpu_seconds": [], "train_examples": len(train_rows)}
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        start, start_cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(order), args.batch_size):
            batch = collator([train_rows[j] for j in order[i : i + args.batch_size]])
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        result["epoch_seconds"].append(time.perf_counter() - start)
        result["epoch_cpu_seconds"].append(time.process_time() - start_cpu)
        model.eval()
        predictions = []
        with torch.no_grad():
            for i in range(0, len(eval_rows), args.eval_batch_size):
                logits = model(**collator(eval_rows[i : i + args.eval_batch_size])).logits
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


def section(args, results: dict, command: str) -> str:
    import transformers

    lines = [
        HEADING,
        "",
        f"Machine: {os.cpu_count()}-core CPU ({cpu_model()}), shared with other jobs; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {args.threads} torch thread(s) on both sides.",
        f"Command: `{command}`",
        "",
        f"Checkpoint {args.model_dir.name}, seed {args.seed}, lr {args.lr:g}, batch {args.batch_size}, max length "
        f"{args.max_length}, AdamW (eps 1e-6, weight decay 0.01), 10% warm-up then linear decay, clipping 1.0. "
        "Scores: the last epoch, SST-2 on its dev set, MRPC trained on msr_paraphrase_train.txt and scored on "
        "msr_paraphrase_test.txt. Time: training only, per epoch (mean over epochs); ratio = transformers / bertkit.",
        "",
        "| task | train examples | epochs | bertkit | transformers | bertkit s/epoch (CPU s) "
        "| transformers s/epoch (CPU s) | speed-up wall | speed-up CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, r in results.items():
        ours, theirs = r["bertkit"], r["transformers"]

        def score(x):
            return "/".join(f"{x['scores'][m]:.2f}" for m in get_task(task).metrics)

        def mean(x, key):
            return sum(x[key]) / len(x[key])

        names = "/".join(get_task(task).metrics)
        lines.append(
            f"| {task} | {ours['train_examples']:,} | {len(ours['epoch_seconds'])} | {score(ours)} ({names}) | "
            f"{score(theirs)} | {mean(ours, 'epoch_seconds'):.0f} ({mean(ours, 'epoch_cpu_seconds'):.0f}) | "
            f"{mean(theirs, 'epoch_seconds'):.0f} ({mean(theirs, 'epoch_cpu_seconds'):.0f}) | "
            f"{mean(theirs, 'epoch_seconds') / mean(ours, 'epoch_seconds'):.2f}x | "
            f"{mean(theirs, 'epoch_cpu_seconds') / mean(ours, 'epoch_cpu_seconds'):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of RESULTS.md, or append it; other sections are left as they are."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
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
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_vs_transformers"))
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    results = {}
    for index, task in enumerate(args.tasks):
        task = get_task(task).name
        n_train = args.sst2_examples if task == "SST-2" else args.mrpc_examples
        epochs = args.sst2_epochs if task == "SST-2" else args.mrpc_epochs
        sides = [("bertkit", run_bertkit), ("transformers", run_transformers)]
        results[task] = {}
        for side, run in sides if index % 2 == 0 else sides[::-1]:
            results[task][side] = run(args, task, n_train, epochs)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    command = "python benchmarks/finetune_vs_transformers.py " + shlex.join(sys.argv[1:])
    text = section(args, results, command.strip())
    print(text)
    if not args.no_write:
        write_section(args.results, text)


if __name__ == "__main__":
    main()
