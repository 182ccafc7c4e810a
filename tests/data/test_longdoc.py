"""The long-document task from the books corpus: balanced, labelled by book, train and dev from different chapters."""

import gzip
import json

import pytest

from bertkit.cli import main
from bertkit.data.longdoc import LongDocConfig, build_longdoc, passages
from bertkit.errors import BertkitError
from conftest import data_path


def corpus(tmp_path, books):
    """A books corpus in the shared layout: books = [(author, title, chapters, words a sentence)]."""
    (tmp_path / "corpus").mkdir()
    rows, text = ["piece\tebook\tauthor\ttitle\tdocuments\tsentences\twords"], []
    for number, (author, title, chapters, width) in enumerate(books):
        for c in range(chapters):
            text.append("\n".join(" ".join([f"{title[:3]}{c}s{s}"] * width) for s in range(10)) + "\n")
        rows.append(f"00\t{number}\t{author}\t{title}\t{chapters}\t{10 * chapters}\t{10 * chapters * width}")
    with gzip.open(tmp_path / "corpus" / "gutenberg-en-00.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(text))
    (tmp_path / "books.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return LongDocConfig(out=str(tmp_path / "task"), corpus=str(tmp_path / "corpus"),
                         books_tsv=str(tmp_path / "books.tsv"), books=2, words=30, dev_every=4)


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_passages_are_balanced_by_book_and_splits_share_no_chapter(tmp_path):
    config = corpus(tmp_path, [("A", "Alpha", 8, 5), ("A", "Another", 40, 5), ("B", "Beta", 12, 5),
                               ("C", "Gamma", 4, 5)])
    report = build_longdoc(config)
    assert [b["title"] for b in report["books"]] == ["Another", "Beta"]  # the longest, one book an author
    train, dev = read(tmp_path / "task" / "train.jsonl"), read(tmp_path / "task" / "dev.jsonl")
    for rows, n in ((train, report["passages_per_book"]["train"]), (dev, report["passages_per_book"]["dev"])):
        assert [r["label"] for r in rows] == ["Another", "Beta"] * n
    chapters = lambda rows: {w.split("s")[0] for r in rows for w in r["sentence"].split()}  # noqa: E731
    assert chapters(train) & chapters(dev) == set()
    assert {"Ano3", "Ano7", "Bet3"} <= chapters(dev) and "Ano0" in chapters(train)
    assert all(len(r["sentence"].split()) >= 30 for r in train + dev)


def test_books_of_one_title_stay_apart(tmp_path):
    """Two chosen books titled alike ("Poems") were one label: the second book's passages replaced the first's, so
    the files held 2 classes where the report said 3 books."""
    config = corpus(tmp_path, [("A", "Poems", 8, 5), ("B", "Poems", 12, 5), ("C", "Gamma", 6, 5)])
    config.books = 3
    report = build_longdoc(config)
    assert [b["title"] for b in report["books"]] == ["Poems", "Poems", "Gamma"]
    for split in ("train", "dev"):
        rows = read(tmp_path / "task" / f"{split}.jsonl")
        assert [r["label"] for r in rows] == ["Poems (B)", "Poems (A)", "Gamma"] * report["passages_per_book"][split]


def test_passages_cut_at_sentence_ends():
    chapters = [["one two three", "four five"], ["six seven eight nine"]]
    assert passages(chapters, 4) == ["one two three four five", "six seven eight nine"]


def test_bad_requests_are_named(tmp_path):
    config = corpus(tmp_path, [("A", "Alpha", 8, 5), ("B", "Beta", 8, 5)])
    config.books = 3
    with pytest.raises(BertkitError, match="2 books by different authors .*; expected --books 2 or fewer"):
        build_longdoc(config)
    config.books, config.words = 2, 10_000
    with pytest.raises(BertkitError, match="expected fewer --words"):
        build_longdoc(config)
    (tmp_path / "books.tsv").write_text((tmp_path / "books.tsv").read_text().replace("\t8\t", "\t9\t", 1))
    with pytest.raises(BertkitError, match="expected the corpus the list describes"):
        build_longdoc(config)
    (tmp_path / "afile").write_text("keep me")  # found by the fuzz suite: a FileExistsError traceback before
    config.out = str(tmp_path / "afile")
    with pytest.raises(BertkitError, match="afile: a file, not a folder; expected a folder for --out"):
        build_longdoc(config)
    assert (tmp_path / "afile").read_text() == "keep me"



def test_a_bad_book_list_is_named_with_its_line(tmp_path):
    """A count that is not a number, a short row or a list that is not UTF-8 raised a ValueError, TypeError or
    UnicodeDecodeError traceback (int() of the cell) instead of naming the file and line."""
    config = corpus(tmp_path, [("A", "Alpha", 8, 5), ("B", "Beta", 8, 5)])
    good = (tmp_path / "books.tsv").read_text()
    lines = good.splitlines()
    for bad, message in ((lines[2].replace("\t8\t", "\tx8\t"), r"books.tsv:3: documents is 'x8'; expected a whole"),
                         (lines[2].replace("\t80\t400", "\t80\t4.5e2"), r"books.tsv:3: words is '4.5e2'; expected"),
                         ("\t".join(lines[2].split("\t")[:4]), r"books.tsv:3: 4 tab-separated fields; expected 7")):
        (tmp_path / "books.tsv").write_text("\n".join([*lines[:2], bad]) + "\n")
        with pytest.raises(BertkitError, match=message):
            build_longdoc(config)
    (tmp_path / "books.tsv").write_bytes(good.replace("Beta", "B\xe9ta").encode("latin-1"))
    with pytest.raises(BertkitError, match="books.tsv: not UTF-8 text; expected"):
        build_longdoc(config)
    assert not (tmp_path / "task").exists()

def test_words_too_many_for_dev_leave_the_earlier_task_whole(tmp_path):
    """Train had passages of 120 words and dev none: train.jsonl was rewritten before the error, beside the earlier
    run's dev.jsonl and books.json of 30 words."""
    config = corpus(tmp_path, [("A", "Alpha", 8, 5), ("B", "Beta", 8, 5)])
    build_longdoc(config)
    before = {p.name: p.read_bytes() for p in (tmp_path / "task").iterdir()}
    config.words = 120
    with pytest.raises(BertkitError, match="'Alpha' gives no dev passage of 120 words"):
        build_longdoc(config)
    assert {p.name: p.read_bytes() for p in (tmp_path / "task").iterdir()} == before
    config.out, config.words = str(tmp_path / "new"), 10_000
    with pytest.raises(BertkitError, match="expected fewer --words"):
        build_longdoc(config)
    assert not (tmp_path / "new").exists()


def test_the_real_corpus_gives_eight_books_of_long_passages(tmp_path, capsys):
    data_path("corpus", "gutenberg-en-00.txt.gz")
    assert main(["longdoc", "--out", str(tmp_path / "task")]) in (0, None)
    assert "45 passages a book" in capsys.readouterr().out
    dev = read(tmp_path / "task" / "dev.jsonl")
    assert len(dev) == 8 * 11 and len({r["label"] for r in dev}) == 8
    assert min(len(r["sentence"].split()) for r in dev) >= 3000
