"""A multiple-choice task from real text, for `finetune --task swag` where SWAG is not at hand: what comes next in
a book.

SWAG asks which of four endings continues a sentence; its files are not in the shared data. This builds the same
kind of task from the books corpus, with the authors' own text as the answer: each example is a sentence, its true
next sentence and three other sentences of the same chapter (same characters, same style), in random order,
written in SWAG's regular layout (sent1 the sentence, sent2 empty, ending0-3, label). Training examples come from
pieces 00-05 of the corpus, dev examples from piece 06 (other books). Sentences of 4 to 40 words.

    python benchmarks/choice_books.py --threads 1 --train 1000 --dev 400

fine-tunes all-MiniLM-L6-v2 and the same network from random weights with `bertkit finetune --task swag`, and the
same checkpoint with transformers' multiple-choice loop (its run_swag_no_trainer.py example's: the pairs
(sent1, sent2 + " " + ending), batches padded by DataCollatorForMultipleChoice; the optimizer, schedule, clipping,
batch size, epochs, lr and seed of bertkit's run, as in tagging_books.py), and writes the files, the runs' metrics
and a summary to --out, the summary also to --summary (docs/choice/books-next-sentence.json).
"""

from __future__ import annotations

import csv
import gzip
import random
from pathlib import Path

import torch

from bertkit.tasks.choice import read_choices
from tagging_books import HERE, arguments, compare, train_transformers


def chapters(pieces: list[Path]) -> list[list[str]]:
    """Each chapter's sentences (a blank line ends a document in the corpus)."""
    found, current = [], []
    for piece in pieces:
        with gzip.open(piece, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    current.append(line.strip())
                elif current:
                    found.append(current)
                    current = []
    return found + ([current] if current else [])


def examples(pieces: list[Path], count: int, seed: int) -> list[tuple[str, list[str], int]]:
    rng = random.Random(seed)
    fits = lambda s: 4 <= len(s.split()) <= 40  # noqa: E731
    found = []
    for sentences in chapters(pieces):
        usable = [s for s in sentences if fits(s)]
        for i in range(len(sentences) - 1):
            context, right = sentences[i], sentences[i + 1]
            others = [s for s in usable if s not in (context, right)]
            if fits(context) and fits(right) and len(others) >= 3:
                found.append((context, right, others))
    rows = []
    for context, right, others in rng.sample(found, count):
        endings = rng.sample(others, 3)
        label = rng.randrange(4)
        endings.insert(label, right)
        rows.append((context, endings, label))
    return rows


def write_swag(path: Path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["fold-ind", "sent1", "sent2", "ending0", "ending1", "ending2", "ending3", "label"])
        for i, (context, endings, label) in enumerate(rows):
            writer.writerow([i, context, "", *endings, label])


def run_transformers(args, model: Path) -> dict:
    """transformers' multiple-choice loop on the same files."""
    from transformers import BertForMultipleChoice, BertTokenizerFast
    from transformers.data.data_collator import DataCollatorForMultipleChoice

    train, dev = read_choices(args.out / "train.csv"), read_choices(args.out / "val.csv")
    tokenizer = BertTokenizerFast.from_pretrained(str(model))

    def features(examples):
        enc = tokenizer([e.context for e in examples for _ in e.endings],
                        [c for e in examples for c in e.continuations()], truncation=True, max_length=128)
        n = len(examples[0].endings)
        return [{k: enc[k][i * n:(i + 1) * n] for k in enc} | {"labels": e.label} for i, e in enumerate(examples)]

    dev_rows = features(dev)
    collator = DataCollatorForMultipleChoice(tokenizer)

    def score(net) -> dict:
        right = 0
        for i in range(0, len(dev_rows), 64):
            batch = collator([dict(r) for r in dev_rows[i:i + 64]])
            right += int((net(**batch).logits.argmax(-1) == batch["labels"]).sum())
        return {"accuracy": 100.0 * right / len(dev_rows)}

    torch.manual_seed(0)
    net = BertForMultipleChoice.from_pretrained(str(model), dtype=torch.float32)
    return train_transformers(net, features(train), collator, args, score)


def main() -> None:
    args, corpus = arguments(__doc__, 1000, 400, 2, 16, "runs/choice-books",
                             HERE.parent / "docs" / "choice" / "books-next-sentence.json")
    write_swag(args.out / "train.csv", examples(corpus[:-1], args.train, seed=0))
    write_swag(args.out / "val.csv", examples(corpus[-1:], args.dev, seed=1))
    summary = {"task": "the next sentence of a book among four of its chapter", "train_examples": args.train,
               "dev_examples": args.dev, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
               "runs": {}}
    compare(args, "swag", "accuracy", args.data / "checkpoints" / "all-MiniLM-L6-v2", summary, run_transformers,
            args.summary)


if __name__ == "__main__":
    main()
