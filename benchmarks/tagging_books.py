"""A tagging task from real text, for `finetune --task ner` where no NER data is at hand: proper nouns in books.

No labelled NER data (CoNLL-2003 and the like) is in the shared data. This builds a tagging task whose labels come
from the authors themselves: in the books corpus, a run of capitalised words inside a sentence (not its first word,
not "I") is a NAME chunk (IOB2); the model reads the words lower-cased (all-MiniLM-L6-v2 is uncased), so it must
tell proper nouns from context alone. The labels are silver: a sentence split in the wrong place, a capitalised
title word ("the Fairy folk") or a quotation's first word inside a sentence are tagged NAME too. Train sentences
come from pieces 00-05 of the corpus, dev sentences from piece 06, other books.

    python benchmarks/tagging_books.py --threads 1 --train 4000 --dev 1000

fine-tunes all-MiniLM-L6-v2 and the same architecture from random weights (`--from-scratch`, the no-pretraining
baseline) on it, and writes the CoNLL files, both runs' metrics and a summary to --out (JSON), the summary also to
docs/tagging/books-names.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
from pathlib import Path

from bertkit.tasks.finetune import FinetuneConfig, finetune

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("BERTKIT_DATA", "../shared/data")))
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--dev", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/tagging-books"))
    args = parser.parse_args()
    corpus = sorted((args.data / "corpus").glob("gutenberg-en-*.txt.gz"))
    args.out.mkdir(parents=True, exist_ok=True)
    write_conll(args.out / "train.txt", sentences(corpus[:-1], args.train, seed=0))
    write_conll(args.out / "dev.txt", sentences(corpus[-1:], args.dev, seed=1))
    model = args.data / "checkpoints" / "all-MiniLM-L6-v2"
    summary = {"task": "NAME chunks from the capitals of books, read lower-cased", "train_sentences": args.train,
               "dev_sentences": args.dev, "epochs": args.epochs, "lr": args.lr, "runs": {}}
    for name, scratch in (("all-MiniLM-L6-v2", False), ("same, random weights", True)):
        config = FinetuneConfig(model_dir=str(model), from_scratch=scratch, task="ner", data_dir=str(args.out),
                                out_dir=str(args.out / ("scratch" if scratch else "pretrained")), lr=args.lr,
                                epochs=args.epochs, threads=args.threads, seed=0, resume="auto")
        record = finetune(config)
        summary["runs"][name] = {"best": record["best"], "best_epoch": record["best_epoch"],
                                 "f1_by_epoch": [round(e["f1"], 2) for e in record["epochs"]],
                                 "train_minutes": round(sum(e["train_seconds"] for e in record["epochs"]) / 60, 1)}
    text = json.dumps(summary, indent=2) + "\n"
    (args.out / "summary.json").write_text(text, encoding="utf-8")
    target = Path(__file__).resolve().parent.parent / "docs" / "tagging" / "books-names.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
