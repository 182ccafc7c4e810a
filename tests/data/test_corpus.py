"""Corpus reading: the three layouts, .gz, folders and globs, and every kind of bad input."""

import gzip
import json

import pytest

from bertkit.data import corpus
from bertkit.data.corpus import (
    MAX_LINE_CHARS,
    FileReader,
    Skips,
    detect_format,
    expand_inputs,
    iter_documents,
    split_sentences,
)
from bertkit.errors import BertkitError
from conftest import data_path

BERT_TEXT = "First sentence.\nSecond sentence.\n\n  \nAnother document.\n\n\nThird document.\nIts end.\n"
BERT_DOCS = [["First sentence.", "Second sentence."], ["Another document."], ["Third document.", "Its end."]]
DOCS_TEXT = "First sentence. Second sentence.\nAnother document.\nThird document. Its end.\n"
JSONL_TEXT = "".join(json.dumps({"id": i, "body": " ".join(d)}) + "\n" for i, d in enumerate(BERT_DOCS))


def write(path, text: str | bytes, compress: bool = False):
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def read(path, **kwargs):
    skips = Skips()
    return list(FileReader(path, skips=skips, **kwargs)), skips


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "name, text, fmt, kwargs",
    [
        ("a.txt", BERT_TEXT, "bert", {}),
        ("a.txt", DOCS_TEXT, "docs", {}),
        ("a.jsonl", JSONL_TEXT, "jsonl", {"text_field": "body"}),
        ("a.data", JSONL_TEXT, "jsonl", {"text_field": "body"}),  # sniffed from the leading '{'
    ],
)
def test_each_format_auto_detected_plain_and_gz(tmp_path, compress, name, text, fmt, kwargs):
    path = write(tmp_path / (name + ".gz" if compress else name), text, compress)
    reader = FileReader(path, **kwargs)
    assert reader.fmt == fmt
    assert list(reader) == BERT_DOCS
    assert reader.skips.total == 0


def test_explicit_format_overrides_detection(tmp_path):
    path = write(tmp_path / "a.txt", BERT_TEXT)
    assert detect_format(path) == "bert"
    documents, _ = read(path, fmt="docs")  # every line its own document
    assert documents == [[s] for d in BERT_DOCS for s in d]
    with pytest.raises(BertkitError, match="format 'csv'"):
        FileReader(path, fmt="csv")


@pytest.mark.parametrize("compress", [False, True])
def test_a_first_document_past_the_old_64_kib_window_is_still_detected_as_bert(tmp_path, compress, caplog):
    """The layout was guessed from the first 64 KiB alone: a BERT-layout file whose first document (a long book
    chapter) filled them was read as "docs", every sentence its own document; the blank line after it decides."""
    first = [f"Sentence {i} of a very long first chapter, which goes on and on." for i in range(2000)]
    text = "\n".join(first) + "\n\nShort.\nDocument.\n"
    path = write(tmp_path / ("a.txt.gz" if compress else "a.txt"), text, compress)
    assert len("\n".join(first).encode()) > 1 << 16  # the old window
    documents, skips = read(path)
    assert documents == [first, ["Short.", "Document."]] and skips.total == 0
    assert not caplog.records


def test_a_json_lines_file_whose_first_record_passes_64_kib_is_detected_by_its_brace(tmp_path):
    records = [{"text": "Long. " * 20000}, {"text": "Short one."}]
    path = write(tmp_path / "a.data", "".join(json.dumps(r) + "\n" for r in records))
    documents, _ = read(path)
    assert [len(d) for d in documents] == [20000, 1]


def test_a_bert_layout_file_whose_first_sentence_starts_with_a_brace_is_not_taken_for_json_lines(tmp_path):
    """The footnotes of a chapter of the books corpus, "{1} Black races are ...", were detected as JSON lines by
    their first character and every line skipped as bad JSON. A damaged first record still leaves JSON lines."""
    notes = ["{1} Black races are evidently known to the writer as stretching all across Africa.",
             "{2} The original use of the footstool was probably less to rest the feet."]
    path = write(tmp_path / "notes.txt", "\n".join(notes) + "\n\nNext chapter.\n")
    documents, skips = read(path)
    assert documents == [notes, ["Next chapter."]] and skips.total == 0
    assert detect_format(write(tmp_path / "one.txt", notes[0] + "\n")) == "docs"
    damaged = write(tmp_path / "damaged.txt", '{"text": "Cut off\n' + JSONL_TEXT)
    documents, skips = read(damaged, text_field="body")
    assert documents == BERT_DOCS and skips.counts == {"bad JSON": 1}


def test_a_file_undecided_at_the_sniff_bound_is_read_as_docs_with_a_warning_naming_the_format_flag(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(corpus, "_LAYOUT_SNIFF_BYTES", 1 << 20)
    small = write(tmp_path / "small.txt", DOCS_TEXT)
    assert detect_format(small) == "docs" and not caplog.records  # seen to its end: a genuine one-document-per-line
    big = write(tmp_path / "big.txt", DOCS_TEXT * 20000)
    assert detect_format(big) == "docs"
    assert [r.getMessage() for r in caplog.records] == [
        f"{big}: no blank line between text lines in the first 1 MiB: read as one document per line (pass --format "
        "bert for one sentence per line, --format docs to silence this)"
    ]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name", ["a.jsonl", "a.txt"])
def test_a_byte_order_mark_loses_no_json_lines_document_and_leaves_detection_alone(tmp_path, name, compress):
    path = write(tmp_path / name, "\ufeff" + JSONL_TEXT, compress)
    documents, skips = read(path, text_field="body")
    assert detect_format(path) == "jsonl"
    assert documents == BERT_DOCS and skips.total == 0


def test_split_sentences_rules():
    text = (
        'It works. Dr. Smith, e.g. here, met J. R. Tolkien in the U.S. Army! "Quoted." Version 3.11. '
        "Then 42 more? yes, lower case goes on.\nA new line starts one.\u7b2c\u4e00\u3002\u7b2c\u4e8c"
    )
    assert split_sentences(text) == [
        "It works.",
        "Dr. Smith, e.g. here, met J. R. Tolkien in the U.S. Army!",
        '"Quoted."',
        "Version 3.11.",
        "Then 42 more? yes, lower case goes on.",
        "A new line starts one.\u7b2c\u4e00\u3002",
        "\u7b2c\u4e8c",
    ]


def test_folders_recursive_globs_and_order(tmp_path):
    write(tmp_path / "b.txt", "b.\n")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    write(tmp_path / "sub" / "a.txt", "a.\n")
    write(tmp_path / "sub" / "deeper" / "c.txt.gz", "c.\n", compress=True)
    write(tmp_path / "sub" / ".hidden", b"\x00\x01binary")  # hidden files are not corpus text
    (tmp_path / ".git").mkdir()
    write(tmp_path / ".git" / "index", b"\x00")
    assert [p.name for p in expand_inputs([tmp_path])] == ["b.txt", "a.txt", "c.txt.gz"]
    assert [p.name for p in expand_inputs([str(tmp_path / "**" / "*.txt*")])] == ["b.txt", "a.txt", "c.txt.gz"]
    files = expand_inputs([str(tmp_path / "*.txt"), tmp_path / "b.txt", tmp_path / "sub"])
    assert [p.name for p in files] == ["b.txt", "a.txt", "c.txt.gz"]  # each file once
    assert list(iter_documents([tmp_path])) == [["b."], ["a."], ["c."]]


def test_a_file_whose_name_looks_like_a_glob_is_read_as_named(tmp_path):
    """"notes [draft].txt" was taken as a pattern (matching "notesd.txt") and refused: "pattern matched no files"."""
    write(tmp_path / "notes [draft].txt", "a.\n")
    (tmp_path / "data [v2]").mkdir()
    write(tmp_path / "data [v2]" / "b.txt", "b.\n")
    assert [p.name for p in expand_inputs([str(tmp_path / "notes [draft].txt")])] == ["notes [draft].txt"]
    assert [p.name for p in expand_inputs([str(tmp_path / "data [v2]")])] == ["b.txt"]
    assert [p.name for p in expand_inputs([str(tmp_path / "notes*.txt")])] == ["notes [draft].txt"]  # still a glob


def test_no_files_matched_refused(tmp_path):
    with pytest.raises(BertkitError, match=r"nothing\*\.txt: pattern matched no files"):
        expand_inputs([str(tmp_path / "nothing*.txt")])
    with pytest.raises(BertkitError, match="missing.txt: no such file"):
        expand_inputs([tmp_path / "missing.txt"])
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(BertkitError, match="empty_folder"):
        expand_inputs([tmp_path / "empty_folder"])


@pytest.mark.parametrize("compress", [False, True])
def test_binary_file_refused_before_reading(tmp_path, compress):
    write(tmp_path / "good.txt", BERT_TEXT)
    binary = write(tmp_path / "model.bin", bytes(range(256)) * 64, compress)
    with pytest.raises(BertkitError, match=r"model\.bin: binary data"):
        FileReader(binary)
    documents = iter_documents([tmp_path / "good.txt", binary])
    with pytest.raises(BertkitError, match="binary"):
        next(documents)  # refused before the first document, not after the good file was read


def test_control_bytes_without_nul_refused(tmp_path):
    path = write(tmp_path / "blob.txt", bytes(range(1, 32)) * 100)
    with pytest.raises(BertkitError, match="characters are control characters or bytes that are not UTF-8; expected UTF-8 text"):
        FileReader(path)


def test_invalid_utf8_line_skipped_with_location(tmp_path):
    path = write(tmp_path / "a.txt", b"Good one.\nBad \xff\xfe byte.\nStill good.\n\nNext doc.\n")
    documents, skips = read(path)
    assert documents == [["Good one.", "Still good."], ["Next doc."]]
    assert skips.counts == {"invalid UTF-8": 1}
    assert skips.first["invalid UTF-8"] == [f"{path}:2"]
    assert "invalid UTF-8 1 (first at" in skips.summary() and "a.txt:2" in skips.summary()


@pytest.mark.parametrize("newline_at_end", [True, False])
def test_over_long_line_skipped(tmp_path, newline_at_end):
    long_line = "x" * (MAX_LINE_CHARS + 1)
    path = write(tmp_path / "a.txt", f"Short.\n{long_line}\nAfter.\n\nDoc two.\n{long_line}" + "\n" * newline_at_end)
    documents, skips = read(path, fmt="bert")
    assert documents == [["Short.", "After."], ["Doc two."]]
    assert skips.counts == {"over-long line": 2}
    assert skips.first["over-long line"] == [f"{path}:2", f"{path}:6"]


def test_huge_line_skipped_in_bounded_pieces(tmp_path):
    path = write(tmp_path / "a.txt", "Before.\n" + "y" * (5 * MAX_LINE_CHARS) + "\nAfter.\n")
    documents, skips = read(path, fmt="bert")
    assert documents == [["Before.", "After."]] and skips.counts == {"over-long line": 1}


def test_over_long_sentence_in_document_line_skipped(tmp_path):
    path = write(tmp_path / "a.txt", "Fine one. " + "Z" * (MAX_LINE_CHARS + 1) + "\nSecond doc.\n")
    documents, skips = read(path, fmt="docs")
    assert documents == [["Fine one."], ["Second doc."]]
    assert skips.first["over-long sentence"] == [f"{path}:1"]


def test_bad_json_and_missing_field_skipped(tmp_path):
    lines = ['{"text": "One. Two."}', "{not json", '{"other": 1}', '["a list"]', '{"text": 5}', '{"text": "Three."}']
    path = write(tmp_path / "a.jsonl", "\n".join(lines) + "\n")
    documents, skips = read(path)
    assert documents == [["One.", "Two."], ["Three."]]
    assert skips.counts == {"bad JSON": 1, "no string field 'text'": 3}
    assert skips.first["bad JSON"] == [f"{path}:2"]
    assert skips.first["no string field 'text'"] == [f"{path}:3", f"{path}:4", f"{path}:5"]


def test_truncated_gzip_counted_not_crashed(tmp_path):
    data = gzip.compress(("".join(f"Sentence {i} is here.\n" for i in range(20000))).encode())
    path = write(tmp_path / "cut.txt.gz", data[: len(data) // 2])
    documents, skips = read(path, fmt="bert")
    assert 0 < len(documents[0]) < 20000
    assert list(skips.counts) == ["corrupt gzip (rest of file)"]


def test_empty_file_counted_and_empty_corpus_refused(tmp_path):
    empty = write(tmp_path / "empty.txt", "")
    blank = write(tmp_path / "blank.txt", "\n  \n\n")
    good = write(tmp_path / "good.txt", "Some text.\n")
    skips = Skips()
    assert list(iter_documents([empty, blank, good], skips=skips)) == [["Some text."]]
    assert skips.counts == {"empty file": 2} and skips.first["empty file"] == [str(empty), str(blank)]
    with pytest.raises(BertkitError, match=r"no documents in 2 file\(s\) \(skipped 2: empty file 2"):
        list(iter_documents([empty, blank]))


def test_skips_merge_and_json_round_trip():
    a, b = Skips(), Skips()
    for line in range(1, 5):
        a.add("bad JSON", "a.jsonl", line)
    for line in range(1, 4):
        b.add("bad JSON", "b.jsonl", line)
    a.merge(b)
    assert a.counts == {"bad JSON": 7} and len(a.first["bad JSON"]) == 5  # only the first few locations kept
    assert Skips.from_json(json.loads(json.dumps(a.to_json()))) == a


def test_real_corpus_reads_as_manifest_says():
    path = data_path("corpus", "python-docs-3.11.txt")
    reader = FileReader(path)
    documents = list(reader)
    assert reader.fmt == "bert" and reader.skips.total == 0
    assert sum(map(len, documents)) == 33975  # MANIFEST.md's sentence count


def test_deeply_nested_or_huge_number_json_lines_are_skipped_as_bad_json(tmp_path):
    lines = ['{"text": "One."}', "[" * 100_000, '{"text": ' + "[" * 5000 + "]" * 5000 + "}",
             '{"n": ' + "9" * 5000 + "}", '{"text": "Two."}']
    path = write(tmp_path / "deep.jsonl", "\n".join(lines) + "\n")
    documents, skips = read(path)
    assert documents == [["One."], ["Two."]]
    assert skips.counts == {"bad JSON": 3} and skips.first["bad JSON"] == [f"{path}:2", f"{path}:3", f"{path}:4"]


def test_empty_text_fields_in_json_lines_are_skipped_and_counted(tmp_path):
    path = write(tmp_path / "empty.jsonl", '{"text": ""}\n{"text": "Kept."}\n{"text": "  \\n "}\n')
    documents, skips = read(path)
    assert documents == [["Kept."]]
    assert skips.counts == {"empty field 'text'": 2} and skips.first["empty field 'text'"] == [f"{path}:1", f"{path}:3"]


def test_lone_surrogates_escaped_in_json_become_u_fffd(tmp_path):
    path = write(tmp_path / "s.jsonl", '{"text": "Caf\\ud800 ok. Emoji \\ud83d\\ude00 kept."}\n')
    documents, skips = read(path)
    assert documents == [["Caf\ufffd ok.", "Emoji \U0001f600 kept."]] and skips.total == 0
    "\n".join(documents[0]).encode("utf-8")  # now UTF-8 (and the tokenizer backend) can take it
