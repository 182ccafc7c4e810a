"""Sentence embeddings trained by `finetune --task embedding`, scored on STS-B dev (Spearman's correlation of the
pairs' cosines with the gold scores, x 100), against sentence-transformers' own trainer on the same data.

Arms (each a cell of --summary, skipped when recorded: a stopped study resumes cell by cell):
- minilm-zero: all-MiniLM-L6-v2 as it is (no training), scored by `bertkit evaluate` and by sentence-transformers'
  EmbeddingSimilarityEvaluator on the same pairs (the metric checked against theirs);
- minilm-cosent: all-MiniLM-L6-v2 trained on STS-B's 5,749 training pairs by CoSENT, 4 epochs, batch 16, lr 2e-5,
  10% warm-up, weight decay 0.01 (sentence-transformers' training_stsbenchmark.py settings), the best epoch on dev
  kept; per seed;
- minilm-cosent-st: the same with sentence-transformers' SentenceTransformerTrainer and CoSENTLoss (its model, its
  batches, its schedule), scored after every epoch by its evaluator;
- books-zero, books-simcse, books-cosent, books-simcse-cosent: bertkit's own `mini` pretrained on the books corpus by
  masked LM alone (benchmarks/long_phase.py's length-128 checkpoint, --books-model): as it is; after unsupervised
  SimCSE on --simcse-sentences sentences of a held-out books shard (1 epoch, batch 64); after CoSENT on STS-B train;
  after SimCSE then CoSENT. lr 1e-4 for both (fixed beforehand, not searched);
- minilm-mrpc-zero, books-mrpc-zero, books-mrpc, books-simcse-mrpc: the pairs path (in-batch negatives, no
  scores) on real paraphrases: Microsoft's MRPC, its 2,753 training pairs marked paraphrases, scored by retrieval of
  each of the 1,147 test paraphrase pairs' second sentence among all of them (MRR@10); books-mrpc trains the books
  model on them (4 epochs, batch 32, lr 1e-4), books-simcse-mrpc the books-simcse model. Their cells go to
  --summary's sibling mrpc.json.

    python benchmarks/embedding_sts.py --threads 1 --arms minilm-zero minilm-cosent books-zero books-simcse \
        books-cosent books-simcse-cosent --seeds 0 1
    python benchmarks/embedding_sts.py --threads 1 --arms minilm-cosent-st --seeds 0 1   # beside it, its own core
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import torch

from bertkit.tasks.evaluation import evaluate
from bertkit.tasks.finetune import FinetuneConfig, finetune
from run import study_parser

ARMS = ("minilm-zero", "minilm-cosent", "minilm-cosent-st", "books-zero", "books-simcse", "books-cosent",
        "books-simcse-cosent", "minilm-mrpc-zero", "books-mrpc-zero", "books-mrpc", "books-simcse-mrpc")
MINILM = {"epochs": 4, "batch_size": 16, "lr": 2e-5, "warmup": 0.1, "weight_decay": 0.01}
BOOKS_LR = 1e-4


def stsb(path: Path) -> tuple[list[str], list[str], list[float]]:
    """STS-B's GLUE file: first sentences, second sentences, scores."""
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    return [r[7] for r in rows], [r[8] for r in rows], [float(r[9]) for r in rows]


def sentences(path: Path, count: int, out: Path) -> Path:
    """The first `count` lines of a books shard with 6 to 60 words, one per line, into `out`."""
    if not out.exists():
        kept = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if 6 <= len(line.split()) <= 60:
                    kept.append(line.strip())
                    if len(kept) == count:
                        break
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return out


def mrpc_paraphrases(data: Path, out: Path) -> dict[str, str]:
    """Microsoft's MRPC train and test pairs marked paraphrases, as a, b .tsv files in `out` (split -> path)."""
    from bertkit.data.glue import read_glue_file

    files = {}
    for split, name in (("train", "msr_paraphrase_train.txt"), ("test", "msr_paraphrase_test.txt")):
        path = out / f"mrpc-paraphrases-{split}.tsv"
        if not path.exists():
            pairs = [e for e in read_glue_file("MRPC", data / "glue" / "MRPC" / name) if e.label == 1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("a\tb\n" + "".join(f"{e.text_a}\t{e.text_b}\n" for e in pairs), encoding="utf-8")
        files[split] = str(path)
    return files


def bertkit_run(model: str, out: Path, threads: int, seed: int, metric: str = "spearman", **values) -> dict:
    start = time.perf_counter()
    record = finetune(FinetuneConfig(model_dir=model, task="embedding", out_dir=str(out), threads=threads,
                                     seed=seed, **values))
    epochs = [{k: row[k] for k in ("epoch", "train_loss", "train_seconds", *record["best"])}
              for row in record["epochs"]]
    return {"best_epoch": record["best_epoch"], "best": record["best"][metric],
            "last": epochs[-1][metric], "epochs": epochs, "seconds": time.perf_counter() - start}


def sentence_transformers_run(model: str, out: Path, data: Path, threads: int, seed: int) -> dict:
    """sentence-transformers' own trainer, the settings of `MINILM`."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator
    from sentence_transformers.losses import CoSENTLoss

    torch.set_num_threads(threads)
    a, b, score = stsb(data / "train.tsv")
    da, db, dscore = stsb(data / "dev.tsv")
    st = SentenceTransformer(model, device="cpu")
    st.max_seq_length = 128
    evaluator = EmbeddingSimilarityEvaluator(da, db, [s / 5 for s in dscore], name="sts-dev")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out), num_train_epochs=MINILM["epochs"], per_device_train_batch_size=MINILM["batch_size"],
        learning_rate=MINILM["lr"], warmup_ratio=MINILM["warmup"], weight_decay=MINILM["weight_decay"], seed=seed,
        eval_strategy="epoch", save_strategy="no", report_to="none", use_cpu=True, logging_steps=50,
        dataloader_num_workers=0)
    trainer = SentenceTransformerTrainer(
        model=st, args=args, loss=CoSENTLoss(st), evaluator=evaluator,
        train_dataset=Dataset.from_dict({"sentence1": a, "sentence2": b, "score": [s / 5 for s in score]}))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    epochs = [{"epoch": round(row["epoch"]), "spearman": 100 * row["eval_sts-dev_spearman_cosine"]}
              for row in trainer.state.log_history if "eval_sts-dev_spearman_cosine" in row]
    best = max(epochs, key=lambda row: row["spearman"])
    return {"best_epoch": best["epoch"], "best": best["spearman"], "last": epochs[-1]["spearman"], "epochs": epochs,
            "seconds": seconds}


def zero_shot(model: str, data: Path, threads: int, with_st: bool) -> dict:
    metrics = evaluate(model, task="embedding", data_dir=str(data), threads=threads)
    cell = {"spearman": metrics["spearman"], "pearson": metrics["pearson"]}
    if with_st:  # the same pairs through sentence-transformers' evaluator
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

        a, b, score = stsb(data / "dev.tsv")
        scores = EmbeddingSimilarityEvaluator(a, b, score, name="d")(SentenceTransformer(model, device="cpu"))
        cell["sentence_transformers_spearman"] = 100 * scores["d_spearman_cosine"]
    return cell


def main() -> None:
    parser = study_parser(__doc__, "embedding", "embedding/sts.json")
    parser.add_argument("--books-model", type=Path,
                        default=Path("runs/long-phase/len128/checkpoints/step-00002800"))
    parser.add_argument("--books-shard", default="gutenberg-en-06.txt.gz")
    parser.add_argument("--simcse-sentences", type=int, default=30000)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    sts = args.data / "glue" / "STS-B"
    minilm = str(args.data / "checkpoints" / "all-MiniLM-L6-v2")
    books = str(args.books_model)
    mrpc_arms = [arm for arm in args.arms if "mrpc" in arm]
    if mrpc_arms and len(mrpc_arms) < len(args.arms):
        parser.error("the mrpc arms run on their own (their cells go to mrpc.json)")
    summary_path = (args.summary.with_name(args.summary.stem + "-st.json") if args.arms == ["minilm-cosent-st"]
                    else args.summary.with_name("mrpc.json") if mrpc_arms
                    else args.summary)  # each stream writes its own file, so two streams never write one
    summary = {"minilm": MINILM, "books_lr": BOOKS_LR, "simcse_sentences": args.simcse_sentences,
               "torch": torch.__version__, "cells": {}}
    if summary_path.exists():
        summary["cells"] = json.loads(summary_path.read_text())["cells"]
    simcse_file = sentences(args.data / "corpus" / args.books_shard, args.simcse_sentences,
                            args.out / "simcse-sentences.txt")
    mrpc = mrpc_paraphrases(args.data, args.out)
    pairs = {"train_file": mrpc["train"], "eval_file": mrpc["test"], "text_a": "a", "text_b": "b"}
    for seed in args.seeds:
        for arm in args.arms:
            name = arm if arm.endswith("zero") else f"{arm}-s{seed}"
            if name in summary["cells"]:
                continue
            print(f"== {name}", flush=True)
            if arm.endswith("mrpc-zero"):
                cell = evaluate(minilm if arm.startswith("minilm") else books, task="embedding",
                                eval_file=mrpc["test"], text_a="a", text_b="b", threads=args.threads)
            elif arm.endswith("mrpc"):
                start = books if arm == "books-mrpc" else str(args.out / f"books-simcse-s{seed}")
                if not (Path(start) / "config.json").exists():
                    print(f"skipped {name}: books-simcse-s{seed} first")
                    continue
                cell = bertkit_run(start, args.out / name, args.threads, seed, metric="mrr@10", epochs=4,
                                   batch_size=32, lr=BOOKS_LR, **pairs)
            elif arm == "minilm-zero":
                cell = zero_shot(minilm, sts, args.threads, with_st=True)
            elif arm == "books-zero":
                cell = zero_shot(books, sts, args.threads, with_st=False)
            elif arm == "minilm-cosent":
                cell = bertkit_run(minilm, args.out / name, args.threads, seed, data_dir=str(sts), **MINILM)
            elif arm == "minilm-cosent-st":
                cell = sentence_transformers_run(minilm, args.out / name, sts, args.threads, seed)
            elif arm == "books-simcse":
                cell = bertkit_run(books, args.out / name, args.threads, seed, train_file=str(simcse_file),
                                   eval_file=None, data_dir=str(sts), epochs=1, batch_size=64, lr=BOOKS_LR)
            elif arm == "books-cosent":
                cell = bertkit_run(books, args.out / name, args.threads, seed, data_dir=str(sts), epochs=4,
                                   batch_size=16, lr=BOOKS_LR)
            else:  # books-simcse-cosent: CoSENT from the SimCSE run's model
                start = args.out / f"books-simcse-s{seed}"
                if not (start / "results.md").exists():
                    print(f"skipped {name}: books-simcse-s{seed} first")
                    continue
                cell = bertkit_run(str(start), args.out / name, args.threads, seed, data_dir=str(sts), epochs=4,
                                   batch_size=16, lr=BOOKS_LR)
            summary["cells"][name] = cell
            summary_path.parent.mkdir(parents=True, exist_ok=True)
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
            print(name, json.dumps({k: v for k, v in cell.items() if k != "epochs"}), flush=True)


if __name__ == "__main__":
    main()
