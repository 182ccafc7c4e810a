"""A tagging task from real text, for `finetune --task ner` where no NER data is at hand: proper nouns in books.

No labelled NER data (CoNLL-2003 and the like) is in the shared data. This builds a tagging task whose labels come
from the authors themselves: in the books corpus, a run of capitalised words inside a sentence (not its first word,
not "I") is a NAME chunk (IOB2); the model reads the words lower-cased (all-MiniLM-L6-v2 is uncased), so it must
tell proper nouns from context alone. The labels are silver: a sentence split in the wrong place, a capitalised
title word ("the Fairy folk") or a quotation's first word inside a sentence are tagged NAME too. Train sentences
come from pieces 00-05 of the corpus, dev sentences from piece 06, other books.

    python benchmarks/tagging_books.py --threads 1 --train 4000 --dev 1000

fine-tunes all-MiniLM-L6-v2 and the same architecture from random weights (`--from-scratch`, the no-pretraining
baseline) on it with `bertkit finetune`, and the same checkpoint with a plain transformers loop (its
run_ner_no_trainer.py example's: shuffled batches padded by DataCollatorForTokenClassification, each word's label
on its first sub-token; the same optimizer, schedule, clipping, batch size, epochs, lr and seed), scored the same
way (bertkit's conlleval scoring on the same dev words); and writes the CoNLL files, the runs' metrics and a summary
to --out (JSON), the summary also to --summary (docs/tagging/books-names.json). Times are the training part of
each epoch.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import re
import time
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

from bertkit.tasks.finetune import FinetuneConfig, finetune
from bertkit.tasks.metrics import chunk_scores
from bertkit.tasks.tagging import read_conll, tag_names

HERE = Path(__file__).resolve().parent
WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")
NAME = re.compile(r"[A-Z][a-z]+(?:'s)?")
OPENERS = {'"', "'", "(", "[", "-", "_"}


def tags_of(words: list[str]) -> list[str]:
    tags = []
    for i, word in enumerate(words):
        inside = i > 0 and words[i - 1] not in OPENERS and not all(w in OPENERS for w in words[:i])
        if inside and NAME.fullmatch(word) and word not in ("I", "I'm", "I'll", "I've", "I'd"):
            tags.append("I-NAME" if tags and tags[-1] != "O" else "B-NAME")
        else:
            tags.append("O")
    return tags


def sentences(pieces: list[Path], count: int, seed: int) -> list[list[str]]:
    found = []
    for piece in pieces:
        with gzip.open(piece, "rt", encoding="utf-8") as f:
            found += [words for line in f if 5 <= len(words := WORD.findall(line)) <= 40]
    return random.Random(seed).sample(found, count)


def write_conll(path: Path, rows: list[list[str]]) -> None:
    path.write_text("".join("".join(f"{w} {t}\n" for w, t in zip(words, tags_of(words))) + "\n" for words in rows),
                    encoding="utf-8")


def train_transformers(net, rows: list[dict], collator, args, score) -> dict:
    """The plain transformers loop (as its no_trainer examples): shuffled batches of 32 padded by `collator`, AdamW
    (eps 1e-6, weight decay 0.01 but for biases and LayerNorm), 10% linear warm-up then decay, clipping 1.0;
    `score(net)` after every epoch. Returns the best epoch's scores on dev (by their first value), every epoch's
    first value and the epochs' training time."""
    no_decay = [p for n, p in net.named_parameters() if p.ndim < 2 or "LayerNorm" in n]
    decay = [p for n, p in net.named_parameters() if not (p.ndim < 2 or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, eps=1e-6, fused=True)
    steps = args.epochs * math.ceil(len(rows) / args.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.1 * steps), steps)
    result = {"by_epoch": [], "epoch_seconds": []}
    for epoch in range(1, args.epochs + 1):
        net.train()
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(epoch)).tolist()
        start = time.perf_counter()
        for i in range(0, len(order), args.batch_size):
            loss = net(**collator([rows[j] for j in order[i:i + args.batch_size]])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        result["epoch_seconds"].append(time.perf_counter() - start)
        net.eval()
        with torch.no_grad():
            scores = score(net)
        headline = next(iter(scores.values()))
        if headline > next(iter(result.get("best", {"": -1.0}).values())):  # the best epoch on dev, as bertkit's
            result["best"] = scores
        result["by_epoch"].append(round(headline, 2))
        print(f"transformers epoch {epoch}: {scores}, {result['epoch_seconds'][-1]:.0f}s", flush=True)
    return result


def run_transformers(args, model: Path) -> dict:
    """transformers' token-classification loop on the same files, scored by bertkit's conlleval scoring."""
    from transformers import BertForTokenClassification, BertTokenizerFast, DataCollatorForTokenClassification

    train, dev = read_conll(args.out / "train.txt"), read_conll(args.out / "dev.txt")
    labels = tag_names(train)
    index = {tag: i for i, tag in enumerate(labels)}
    tokenizer = BertTokenizerFast.from_pretrained(str(model))

    def features(sentences):
        enc = tokenizer([s.words for s in sentences], is_split_into_words=True, truncation=True, max_length=128)
        rows = []
        for i, s in enumerate(sentences):
            words, previous, row_labels = enc.word_ids(i), None, []
            for w in words:  # the first sub-token of a word carries its label, the others and [CLS]/[SEP] -100
                row_labels.append(-100 if w is None or w == previous else index.get(s.tags[w], 0))
                previous = w
            rows.append({k: enc[k][i] for k in enc} | {"labels": row_labels})
        return rows

    dev_rows = features(dev)
    collator = DataCollatorForTokenClassification(tokenizer)

    def score(net) -> dict:
        predicted = []
        for i in range(0, len(dev_rows), 128):
            batch = [dict(r) for r in dev_rows[i:i + 128]]
            best = net(**collator(batch)).logits.argmax(-1)
            for row, choice in zip(batch, best.tolist()):
                predicted.append([labels[c] for c, label in zip(choice, row["labels"]) if label != -100])
        return chunk_scores([s.tags for s in dev], predicted)[0]

    torch.manual_seed(0)
    net = BertForTokenClassification.from_pretrained(str(model), num_labels=len(labels), dtype=torch.float32)
    return train_transformers(net, features(train), collator, args, score)


def compare(args, task: str, metric: str, model: Path, summary: dict, theirs, target: Path) -> None:
    """bertkit's `finetune --task TASK` from `model` and from random weights on args.out's files, then `theirs(args,
    model)` (a `train_transformers` run); the summary, scores by epoch and training time beside the time ratio,
    written to args.out/summary.json and to `target`."""
    for name, scratch in (("all-MiniLM-L6-v2", False), ("same, random weights", True))[:1 if args.no_scratch else 2]:
        config = FinetuneConfig(model_dir=str(model), from_scratch=scratch, task=task, data_dir=str(args.out),
                                out_dir=str(args.out / ("scratch" if scratch else "pretrained")), lr=args.lr,
                                batch_size=args.batch_size, epochs=args.epochs, threads=args.threads, seed=0,
                                resume="auto")
        record = finetune(config)
        if not scratch:
            our_seconds = sum(e["train_seconds"] for e in record["epochs"])
        summary["runs"][f"bertkit, {name}"] = {
            "best": record["best"], "best_epoch": record["best_epoch"],
            f"{metric}_by_epoch": [round(e[metric], 2) for e in record["epochs"]],
            "train_minutes": round(sum(e["train_seconds"] for e in record["epochs"]) / 60, 1)}
    result = theirs(args, model)
    summary["runs"]["transformers, all-MiniLM-L6-v2"] = {
        "best": result["best"], f"{metric}_by_epoch": result["by_epoch"],
        "train_minutes": round(sum(result["epoch_seconds"]) / 60, 1)}
    # from the seconds, not the rounded minutes
    summary["transformers_over_bertkit_train_time"] = round(sum(result["epoch_seconds"]) / our_seconds, 2)
    summary["threads"] = args.threads
    text = json.dumps(summary, indent=2) + "\n"
    (args.out / "summary.json").write_text(text, encoding="utf-8")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    print(text)


def arguments(doc: str, train: int, dev: int, epochs: int, batch_size: int, out: str, summary: Path):
    """The command line of a books task (the defaults given), threads set; and the corpus's pieces, in order."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("BERTKIT_DATA", "../shared/data")))
    parser.add_argument("--train", type=int, default=train)
    parser.add_argument("--dev", type=int, default=dev)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--summary", type=Path, default=summary)
    parser.add_argument("--no-scratch", action="store_true", help="leave out the run from random weights (to time "
                        "the two sides alone)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return args, sorted((args.data / "corpus").glob("gutenberg-en-*.txt.gz"))


def main() -> None:
    args, corpus = arguments(__doc__, 4000, 1000, 3, 32, "runs/tagging-books",
                             HERE.parent / "docs" / "tagging" / "books-names.json")
    write_conll(args.out / "train.txt", sentences(corpus[:-1], args.train, seed=0))
    write_conll(args.out / "dev.txt", sentences(corpus[-1:], args.dev, seed=1))
    summary = {"task": "NAME chunks from the capitals of books, read lower-cased", "train_sentences": args.train,
               "dev_sentences": args.dev, "epochs": args.epochs, "lr": args.lr, "runs": {}}
    compare(args, "ner", "f1", args.data / "checkpoints" / "all-MiniLM-L6-v2", summary, run_transformers, args.summary)


if __name__ == "__main__":
    main()
