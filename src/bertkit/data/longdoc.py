"""A long-document classification task from the shared books corpus: which book a passage of about 4,000 tokens
comes from (`bertkit longdoc`).

The books are the N with the most words among those of different authors (one book an author, so that the task is
not only telling an author's style apart). Each book's chapters are dealt to the two splits, every k-th chapter to
dev, so that no passage of dev shares a sentence with one of train; inside a split a book's chapters are read in order and cut
into consecutive passages of --words words at sentence ends. Every book gives as many passages as the book with the
fewest, so the classes are balanced and a constant guess scores 1/N. The files are JSON lines, one passage a line
({"sentence": ..., "label": ...}), which `bertkit finetune --task custom` reads as they are.

What makes it a long-document task: a passage is 8 times the 512 tokens BERT reads, and the evidence (names, places,
style) is spread over all of it, so a model that reads the whole passage has more to go on than one that reads its
first 512 tokens. What does not: character names recur across a book's chapters, so even 512 tokens often tell the
book; the scores say how much the rest of the passage adds.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from bertkit.config import option
from bertkit.errors import BertkitError, where
from bertkit.train.rundir import check_output_path, make_dir


def _data_root() -> Path:
    return Path(os.environ.get("BERTKIT_DATA") or Path("..", "shared", "data"))


@dataclass
class LongDocConfig:
    """`bertkit longdoc`: the CLI's flags are these fields."""

    out: str = option("runs/book-id", "folder for train.jsonl, dev.jsonl and books.json")
    books: int = option(8, "books to tell apart (the longest, one per author)")
    words: int = option(3000, "words per passage (about 4,000 WordPiece tokens)")
    dev_every: int = option(4, "every this-many-th chapter of a book goes to dev, the rest to train")
    corpus: str | None = option(None, "the books corpus folder (default: $BERTKIT_DATA/corpus, its "
                                "gutenberg-en-*.txt.gz)")
    books_tsv: str | None = option(None, "the book list (default: $BERTKIT_DATA/meta/gutenberg-en-books.tsv)")


def read_books(corpus: Path, books_tsv: Path) -> list[dict]:
    """Every book of the list with its chapters (lists of sentences), in corpus order."""
    from bertkit.data.corpus import iter_documents

    try:
        with open(books_tsv, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            lines, rows = [], []
            for row in reader:
                lines.append(reader.line_num)
                rows.append(row)
    except OSError as e:
        raise BertkitError(f"{books_tsv}: cannot read the book list ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise BertkitError(f"{books_tsv}: not UTF-8 text; expected the book list as a UTF-8 TSV") from None
    except csv.Error as e:
        raise BertkitError(f"{where(books_tsv, reader.line_num)}: {e}; expected a TSV book list") from None
    needed = {"piece", "ebook", "author", "title", "documents", "words"}
    if not rows or not needed <= set(rows[0]):
        raise BertkitError(f"{books_tsv}: expected a TSV with the columns {', '.join(sorted(needed))}")
    for line, row in zip(lines, rows):  # named here: the counts are summed and compared with the corpus below
        if None in row.values():  # DictReader fills a short row's missing fields with None
            fields = sum(v is not None for v in row.values())
            raise BertkitError(f"{where(books_tsv, line)}: {fields} tab-separated fields; expected "
                               f"{len(reader.fieldnames)}, as in the header")
        for column in ("documents", "words"):
            if not row[column].strip().isdecimal():
                raise BertkitError(f"{where(books_tsv, line)}: {column} is {row[column]!r}; expected a whole number")
    files = sorted(corpus.glob("gutenberg-en-*.txt.gz"))
    if not files:
        raise BertkitError(f"{corpus}: no gutenberg-en-*.txt.gz; expected the shared books corpus")
    documents = list(iter_documents([str(f) for f in files], fmt="bert"))
    if len(documents) != sum(int(r["documents"]) for r in rows):
        raise BertkitError(f"{corpus}: {len(documents)} documents, the book list {books_tsv} counts "
                           f"{sum(int(r['documents']) for r in rows)}; expected the corpus the list describes")
    books, at = [], 0
    for row in rows:
        n = int(row["documents"])
        books.append({"ebook": row["ebook"], "author": row["author"], "title": row["title"],
                      "words": int(row["words"]), "chapters": documents[at:at + n]})
        at += n
    return books


def passages(chapters: list[list[str]], words: int) -> list[str]:
    """Consecutive passages of at least `words` words, cut at sentence ends, from chapters read in order."""
    out, current, count = [], [], 0
    for chapter in chapters:
        for sentence in chapter:
            current.append(sentence)
            count += len(sentence.split())
            if count >= words:
                out.append(" ".join(current))
                current, count = [], 0
    return out


def build_longdoc(config: LongDocConfig) -> dict:
    """Write the task's files; returns what was written (books, passages per split, words per passage)."""
    root = _data_root()
    check_output_path(Path(config.out), "--out", {})  # a file there is named before the corpus is read
    corpus = Path(config.corpus) if config.corpus else root / "corpus"
    books_tsv = Path(config.books_tsv) if config.books_tsv else root / "meta" / "gutenberg-en-books.tsv"
    if config.books < 2 or config.words < 1 or config.dev_every < 2:
        raise BertkitError(f"--books {config.books}, --words {config.words}, --dev-every {config.dev_every}; "
                           "expected at least 2 books, 1 word and a dev share of every 2nd chapter or rarer")
    candidates = [b for b in read_books(corpus, books_tsv) if len(b["chapters"]) >= config.dev_every]
    chosen, authors = [], set()
    for book in sorted(candidates, key=lambda b: (-b["words"], b["ebook"])):
        if book["author"] not in authors:
            chosen.append(book)
            authors.add(book["author"])
        if len(chosen) == config.books:
            break
    if len(chosen) < config.books:
        raise BertkitError(f"{books_tsv}: {len(chosen)} books by different authors with {config.dev_every} "
                           f"chapters or more; expected --books {len(chosen)} or fewer")
    titles = [b["title"] for b in chosen]
    splits = {"train": {}, "dev": {}}
    for book in chosen:
        dev = [c for i, c in enumerate(book["chapters"]) if i % config.dev_every == config.dev_every - 1]
        train = [c for i, c in enumerate(book["chapters"]) if i % config.dev_every != config.dev_every - 1]
        # the label is the title; two books of one title ("Poems") would be one class, one book's passages lost
        label = book["title"] if titles.count(book["title"]) == 1 else f"{book['title']} ({book['author']})"
        splits["train"][label] = passages(train, config.words)
        splits["dev"][label] = passages(dev, config.words)
    counts = {}
    for split, by_book in splits.items():  # every split checked before any file is written: no half-made task
        counts[split] = min(len(p) for p in by_book.values())
        if counts[split] == 0:
            short = min(by_book, key=lambda t: len(by_book[t]))
            raise BertkitError(f"{short!r} gives no {split} passage of {config.words} words; expected fewer --words")
    out = Path(config.out)
    make_dir(out, "--out")
    for split, by_book in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(counts[split]):  # interleaved, book by book, so that a prefix of the file is still balanced
                for label, texts in by_book.items():
                    f.write(json.dumps({"sentence": texts[i], "label": label}, ensure_ascii=False) + "\n")
    report = {"books": [{k: b[k] for k in ("ebook", "author", "title", "words")} | {"chapters": len(b["chapters"])}
                        for b in chosen],
              "passages_per_book": counts, "words_per_passage": config.words, "dev_every": config.dev_every,
              "out": str(out)}
    (out / "books.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return report
