"""Long-context SQuAD: the paper's 512-token windows with a stride against a windowed model extended past 512,
the same starting checkpoint, the same questions, the same optimiser settings, scored with the official metric.

    python benchmarks/long_squad.py --baseline-model MODEL_512 --long-model MODEL_4096 --out-dir runs/long-squad

The task is built from SQuAD v1.1 dev (the only SQuAD file shared here): each article's context is its first
paragraphs, joined with a blank line, up to --context-tokens tokens (SQuAD v1.1 dev: 1,730 to 2,000 for 2,000),
and every question asked about those paragraphs is asked about the whole of it, its answers moved to where they
now start. The first --train-articles articles give the training questions (--train-per-article drawn from each
with --seed), the rest the scored ones (--dev-per-article each). Both files are written to --out-dir, in the
official format, so evaluate-v1.1.py can score the predictions too.

Arms (each a `bertkit finetune` run in its own folder; an arm whose folder holds the scores of the same command
on the same task files is not run again):
- strided: --baseline-model at --max-length 512 with windows every --doc-stride tokens (Google BERT's doc_stride:
  the step between window starts), the best span over all windows;
- long: --long-model (from `bertkit extend`, usually after `bertkit pretrain --model-dir ... --objective mlm`) reading
  the whole context in one window of --long-max-length tokens, windowed attention with the question tokens global.
Both train one pass over the same questions with the same --lr and warm-up, and about the same tokens per
optimiser step (--batch-size windows of 512 against --long-batch-size whole contexts). Writes long_squad.json and
long_squad.md in --out-dir: EM, F1, training and scoring time, windows read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path


def build(squad_file: Path, tokenizer_dir: Path, out_dir: Path, context_tokens: int, train_articles: int,
          train_per_article: int, dev_per_article: int, seed: int) -> dict:
    """Write train.json and dev.json (the long-context task) into out_dir; returns their sizes."""
    from bertkit.data.squad import read_squad, whole_articles
    from bertkit.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    by_article: dict[int, list] = {}
    for example in read_squad(squad_file):
        by_article.setdefault(example.article, []).append(example)
    rng = random.Random(seed)
    splits: dict[str, list] = {"train": [], "dev": []}
    context_lengths = []
    for index, examples in by_article.items():
        kept, used = set(), 0
        for paragraph in dict.fromkeys(e.context for e in examples):  # the article's paragraphs, in file order
            n = len(tokenizer.tokenize(paragraph))
            if kept and used + n > context_tokens:
                break
            kept.add(paragraph)
            used += n
        joined = whole_articles([e for e in examples if e.context in kept])  # one context, the answers moved
        keep = train_per_article if index < train_articles else dev_per_article
        questions = sorted(rng.sample(joined, min(keep, len(joined))), key=lambda e: e.id)
        context = joined[0].context
        context_lengths.append(len(tokenizer.tokenize(context)))
        qas = [{"id": e.id, "question": e.question, "answers": [{"text": a.text, "answer_start": a.start}
                                                                for a in e.answers]} for e in questions]
        splits["train" if index < train_articles else "dev"].append(
            {"title": examples[0].title, "paragraphs": [{"context": context, "qas": qas}]})
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, data in splits.items():
        path, text = out_dir / f"{split}.json", json.dumps({"version": "1.1", "data": data})
        if not path.exists() or path.read_text() != text:  # a second arm's run leaves the first's files alone
            path.write_text(text)
        sizes[f"{split}_questions"] = sum(len(a["paragraphs"][0]["qas"]) for a in data)
        sizes[f"{split}_articles"] = len(data)
    sizes["context_tokens"] = {"min": min(context_lengths), "max": max(context_lengths),
                               "mean": round(sum(context_lengths) / len(context_lengths))}
    return sizes


def run_arm(name: str, model: str, out_dir: Path, data_dir: Path, args, extra: list[str]) -> dict:
    run_dir = out_dir / name
    metrics_file = run_dir / "metrics.json"
    command = [sys.executable, "-m", "bertkit.cli", "finetune", "--task", "squad1", "--model-dir", model,
               "--train-file", str(data_dir / "train.json"), "--eval-file", str(data_dir / "dev.json"),
               "--out-dir", str(run_dir), "--epochs", "1", "--lr", str(args.lr), "--warmup", "0.1",
               "--seed", str(args.seed), "--threads", str(args.threads), "--overwrite", *extra]
    # what the arm's scores depend on: its command but --threads, and the task's files, which another
    # --context-tokens or --train-articles rewrites under the same names; a run of other inputs is run again
    inputs = {"command": command[:command.index("--threads")] + command[command.index("--threads") + 2:],
              "data": {f: hashlib.sha256((data_dir / f).read_bytes()).hexdigest() for f in ("train.json", "dev.json")}}
    inputs_file = run_dir / "long_squad_inputs.json"
    if not (metrics_file.exists() and inputs_file.exists() and json.loads(inputs_file.read_text()) == inputs):
        print(" ".join(command), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        (run_dir / "wall_s.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
        inputs_file.write_text(json.dumps(inputs, indent=1) + "\n")
    metrics = json.loads(metrics_file.read_text())
    wall = run_dir / "wall_s.txt"
    return {"model": model, "flags": extra, "metrics": metrics,
            "wall_s": float(wall.read_text()) if wall.exists() else None}


def write_report(out_dir: Path, result: dict) -> None:
    (out_dir / "long_squad.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Long-context SQuAD v1.1 (first paragraphs of each dev article up to {result['args']['context_tokens']:,} "
             f"tokens; contexts {result['data']['context_tokens']['min']:,}-{result['data']['context_tokens']['max']:,} "
             f"tokens): {result['data']['train_questions']} training questions from {result['data']['train_articles']} "
             f"articles, {result['data']['dev_questions']} scored from {result['data']['dev_articles']} others.",
             "", "| arm | model | max length | training windows | EM | F1 | train time | scoring time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, arm in result["arms"].items():
        m = arm["metrics"]
        epoch = m["epochs"][m["best_epoch"] - 1]
        length = arm["flags"][arm["flags"].index("--max-length") + 1]
        model = Path(arm["model"])
        model = f"{model.parent.parent.name}/{model.name}" if model.parent.name == "checkpoints" else model.name
        lines.append(f"| {name} | {model} | {length} | {m['train_rows']:,} | {m['best']['exact']:.2f} | "
                     f"{m['best']['f1']:.2f} | {epoch['train_seconds']:.0f} s | {epoch['eval_seconds']:.0f} s |")
    (out_dir / "long_squad.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-model", required=True, help="the 512-position starting model folder")
    parser.add_argument("--long-model", required=True, help="the same model extended (and continued) past 512")
    parser.add_argument("--squad-file", default=None, help="SQuAD v1.1 dev (default: $BERTKIT_DATA/squad/dev-v1.1.json)")
    parser.add_argument("--out-dir", default="runs/long-squad")
    parser.add_argument("--context-tokens", type=int, default=2000)
    parser.add_argument("--train-articles", type=int, default=40)
    parser.add_argument("--train-per-article", type=int, default=5)
    parser.add_argument("--dev-per-article", type=int, default=25)
    parser.add_argument("--doc-stride", type=int, default=256, help="strided arm: step between window starts")
    parser.add_argument("--batch-size", type=int, default=16, help="strided arm: 512-token windows per step")
    parser.add_argument("--long-max-length", type=int, default=2112, help="long arm: tokens per whole-context window")
    parser.add_argument("--long-batch-size", type=int, default=4, help="long arm: whole contexts per step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=["strided", "long"], choices=["strided", "long"])
    args = parser.parse_args(argv)

    squad_file = Path(args.squad_file or Path(os.environ.get("BERTKIT_DATA", "../shared/data")) / "squad/dev-v1.1.json")
    out_dir = Path(args.out_dir)
    data_dir = out_dir / "data"
    sizes = build(squad_file, Path(args.baseline_model), data_dir, args.context_tokens, args.train_articles,
                  args.train_per_article, args.dev_per_article, args.seed)
    print(f"long-context SQuAD: {sizes}", flush=True)
    arms = {}
    flags = {"strided": (args.baseline_model, ["--max-length", "512", "--doc-stride", str(args.doc_stride),
                                               "--batch-size", str(args.batch_size), "--eval-batch-size", "32"]),
             "long": (args.long_model, ["--max-length", str(args.long_max_length), "--doc-stride",
                                        str(args.long_max_length), "--batch-size", str(args.long_batch_size),
                                        "--eval-batch-size", "4"])}
    for name in args.arms:
        model, extra = flags[name]
        arms[name] = run_arm(name, model, out_dir, data_dir, args, extra)
        write_report(out_dir, {"args": vars(args), "data": sizes, "arms": arms})


if __name__ == "__main__":
    main()
