"""Pretraining text in: files, folders, globs, .gz; BERT layout, one document per line, or JSON lines.

A document is a list of sentence strings. Three layouts are read:
  "bert"   one sentence per line, a blank line between documents (Google's create_pretraining_data input);
  "docs"   one document per line, split into sentences by `split_sentences`;
  "jsonl"  one JSON object per line, its text field (default "text") split into sentences the same way.
Files are streamed line by line with a bounded read, so neither a huge file nor a huge line is held in memory.
Bad lines (invalid UTF-8, over-long, bad or too deeply nested JSON, a JSON record whose text field is missing,
not a string or empty) are skipped and counted in a `Skips`; input that cannot be read at all (no files matched,
binary data, an entirely empty corpus) raises BertkitError. Lone surrogates that JSON escapes can put in a string
(`"\\ud800"`; no UTF-8 text holds them) are replaced by U+FFFD.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bertkit.errors import BertkitError, where

logger = logging.getLogger("bertkit")

FORMATS = ("bert", "docs", "jsonl")
# A sentence this long is not prose (a minified blob, a base64 dump): it would be truncated to nothing useful.
MAX_LINE_CHARS = 100_000
# A document line ("docs", "jsonl") holds a whole document; long articles are legitimate, blobs past this are not.
MAX_DOCUMENT_CHARS = 10_000_000
_SNIFF_BYTES = 1 << 16
# How far format sniffing reads for the blank line that ends a BERT-layout file's first document: a whole book.
_LAYOUT_SNIFF_BYTES = 1 << 22
_GZIP_MAGIC = b"\x1f\x8b"
_FIRST_LOCATIONS = 5


@dataclass
class Skips:
    """Lines skipped while reading, counted by reason, with the first few file:line locations of each."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: Path | str, line: int | None = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        locations = self.first.setdefault(reason, [])
        if len(locations) < _FIRST_LOCATIONS:
            locations.append(where(path, line))

    def merge(self, other: Skips) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            locations = self.first.setdefault(reason, [])
            locations.extend(other.first.get(reason, [])[: _FIRST_LOCATIONS - len(locations)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: 'skipped N: reason count (first at a:1, b:2); ...', or 'skipped nothing'."""
        if not self.counts:
            return "skipped nothing"
        parts = [f"{reason} {count} (first at {', '.join(self.first[reason])})" for reason, count in self.counts.items()]
        return f"skipped {self.total}: " + "; ".join(parts)

    def to_json(self) -> dict:
        return {"counts": dict(self.counts), "first": {k: list(v) for k, v in self.first.items()}}

    @classmethod
    def from_json(cls, data: dict) -> Skips:
        return cls(dict(data.get("counts", {})), {k: list(v) for k, v in data.get("first", {}).items()})


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files named by paths, folders (recursively, hidden entries left out) and globs; sorted, each once."""
    if not inputs:
        raise BertkitError("no corpus inputs given; expected files, folders or glob patterns")
    files: dict[Path, None] = {}
    for item in inputs:
        text = str(item)
        # a path that exists is taken as it is: "notes [draft].txt" names that file, not a pattern matching "notesd.txt"
        pattern = glob.has_magic(text) and not Path(text).exists()
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True)) if pattern else [Path(text)]
        found = []
        for path in matches:
            if path.is_dir():
                # Hidden files (.DS_Store, .git/) are never corpus text and would be refused as binary.
                found += sorted(
                    p for p in path.rglob("*")
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            elif path.is_file():
                found.append(path)
        if not found:
            what = "pattern matched no files" if pattern else "no such file or folder (or it is empty)"
            raise BertkitError(f"{text}: {what}; expected corpus text files")
        files.update(dict.fromkeys(found))
    return list(files)


_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD (a surrogate pair becomes its character): Python strings
    can hold them (JSON escapes, `surrogateescape` decoding), UTF-8 and the tokenizer backend cannot."""
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


_SENTENCE_END = re.compile(r"([.!?]+)([\"'\u201d\u2019)\]]*)\s+")
_CJK_END = re.compile(r"(?<=[\u3002\uff01\uff1f])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf fig figs no nos vol inc ltd co corp approx dept est jan feb "
    "mar apr jun jul aug sep sept oct nov dec".split()
)
_INITIALS = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")


def _is_abbreviation(before: str) -> bool:
    """Whether the word ending right before a '.' is an abbreviation or an initial (so no sentence ends there)."""
    words = before.split()
    if not words:
        return False
    word = words[-1].lstrip("\"'(\u201c\u2018[")
    return word.lower() in _ABBREVIATIONS or _INITIALS.fullmatch(word) is not None


def split_sentences(text: str) -> list[str]:
    """Split a document into sentences by rule: line breaks, then '.', '!' or '?' (plus closing quotes or
    brackets) followed by white space and an upper-case letter, a digit or an opening quote/bracket, unless the
    word before the '.' is a known abbreviation or an initial ("Dr.", "e.g.", "J.", "U.S."); CJK '。！？' always."""
    sentences = []
    for line in text.splitlines():
        for piece in _CJK_END.split(line):
            start = 0
            for m in _SENTENCE_END.finditer(piece):
                following = piece[m.end() : m.end() + 1]
                if not (following.isupper() or following.isdigit() or following in "\"'(\u201c\u2018["):
                    continue
                if m.group(1) == "." and _is_abbreviation(piece[start : m.start()]):
                    continue
                sentences.append(piece[start : m.end()].strip())
                start = m.end()
            tail = piece[start:].strip()
            if tail:
                sentences.append(tail)
    return [s for s in sentences if s]


def _open_binary(path: Path):
    """Open raw bytes, transparently gunzipping when the file starts with the gzip magic number."""
    raw = open(path, "rb")
    if raw.read(2) == _GZIP_MAGIC:
        raw.seek(0)
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    raw.seek(0)
    return raw, raw


def _read_head(path: Path) -> bytes:
    """The first bytes of the (decompressed) file, for binary detection and format sniffing."""
    raw, stream = _open_binary(path)
    try:
        return stream.read(_SNIFF_BYTES)
    except (EOFError, OSError, zlib.error) as e:
        raise BertkitError(f"{where(path)}: cannot decompress ({e}); expected a valid gzip file") from e
    finally:
        raw.close()


def _check_text(path: Path, head: bytes) -> None:
    """Refuse a binary file up front, instead of skipping every one of its lines."""
    nul = head.find(b"\x00")
    if nul >= 0:
        raise BertkitError(f"{where(path)}: binary data (NUL byte at offset {nul}); expected UTF-8 text")
    text = head.decode("utf-8", errors="replace")
    bad = sum(1 for c in text if c == "\ufffd" or (c < " " and c not in "\t\n\r\f\v"))
    # A Latin-1 text has a few percent of bad bytes and is read with those lines skipped; a binary has many.
    if text and bad > 0.1 * len(text):
        raise BertkitError(
            f"{where(path)}: {bad} of the first {len(text)} characters are control characters or bytes that are not "
            "UTF-8; expected UTF-8 text"
        )


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def detect_format(path: Path) -> str:
    """Guess the layout: .jsonl/.json/.ndjson, or a first (or, after a damaged one, second) text line that is a JSON
    object -> "jsonl"; a text line after a blank line after text -> "bert"; otherwise "docs" (one document per
    line). The file is streamed up to that text line, at most 4 MiB (_LAYOUT_SNIFF_BYTES): still undecided there, it
    is "docs", with a warning."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raw, stream = _open_binary(path)
    seen, state = 0, "start"  # (-> "brace") -> "text" -> "blank after text" -> a text line again means "bert"
    try:
        while seen < _LAYOUT_SNIFF_BYTES:
            try:
                line = stream.readline(_LAYOUT_SNIFF_BYTES - seen)
            except (EOFError, OSError, zlib.error):
                break  # a corrupt gzip stream: decided on what came before; the reader counts the rest as skipped
            if not line:
                break
            text = line.decode("utf-8", errors="replace")
            text = (text.removeprefix("\ufeff") if seen == 0 else text).strip()
            seen += len(line)
            if text and state in ("start", "brace") and text.startswith("{"):
                # a sentence can start with "{" too ("{1} Black races are ...", a book's footnotes): only a JSON
                # object, or a record too long to see whole, makes the file JSON lines
                if _is_json_object(text) or (seen >= _LAYOUT_SNIFF_BYTES and not line.endswith(b"\n")):
                    return "jsonl"
                if state == "start":
                    state = "brace"  # text, or JSON lines whose first record is damaged: the next line decides
                    continue
            if text and state == "blank after text":
                return "bert"
            if text:
                state = "text"
            elif state in ("text", "brace"):
                state = "blank after text"
    finally:
        raw.close()
    if seen >= _LAYOUT_SNIFF_BYTES:
        logger.warning("%s: no blank line between text lines in the first %d MiB: read as one document per line "
                       "(pass --format bert for one sentence per line, --format docs to silence this)",
                       path, _LAYOUT_SNIFF_BYTES >> 20)
    return "docs"


class FileReader:
    """The documents of one file, streamed; `bytes_read` follows progress (compressed bytes for .gz)."""

    def __init__(self, path: str | Path, fmt: str = "auto", text_field: str = "text", skips: Skips | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise BertkitError(f"{where(self.path)}: no such file; expected a corpus text file")
        if fmt not in FORMATS + ("auto",):
            raise BertkitError(f"format {fmt!r}; expected one of auto, {', '.join(FORMATS)}")
        head = _read_head(self.path)
        _check_text(self.path, head)
        self.fmt = detect_format(self.path) if fmt == "auto" else fmt
        self.text_field = text_field
        self.skips = Skips() if skips is None else skips
        self.size = self.path.stat().st_size
        self.bytes_read = 0
        self.documents = 0

    def _lines(self, max_chars: int) -> Iterator[tuple[int, str]]:
        """(line number, text) of each readable line; over-long and invalid UTF-8 lines are skipped and counted."""
        limit = 4 * max_chars + 2  # UTF-8 takes at most 4 bytes a character, plus "\r\n"
        raw, stream = _open_binary(self.path)
        number = 0
        try:
            while True:
                try:
                    line = stream.readline(limit)
                except (EOFError, OSError, zlib.error):
                    self.skips.add("corrupt gzip (rest of file)", self.path, number + 1)
                    return
                self.bytes_read = raw.tell()
                if not line:
                    return
                number += 1
                if len(line) == limit and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # read past the rest of the line, a bounded piece at a time
                        line = stream.readline(limit)
                    self.skips.add("over-long line", self.path, number)
                    continue
                try:
                    text = line.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    self.skips.add("invalid UTF-8", self.path, number)
                    continue
                if number == 1:  # the byte-order mark Windows editors write: not text, and not JSON
                    text = text.removeprefix("\ufeff")
                if len(text) > max_chars:
                    self.skips.add("over-long line", self.path, number)
                    continue
                yield number, text
        finally:
            raw.close()

    def _sentences(self, text: str, number: int) -> list[str]:
        """Split one document line into sentences, skipping (and counting) over-long ones."""
        sentences = []
        for sentence in split_sentences(text):
            if len(sentence) > MAX_LINE_CHARS:
                self.skips.add("over-long sentence", self.path, number)
            else:
                sentences.append(sentence)
        return sentences

    def _documents(self) -> Iterator[list[str]]:
        if self.fmt == "bert":
            document: list[str] = []
            for _, text in self._lines(MAX_LINE_CHARS):
                text = text.strip()
                if text:
                    document.append(text)
                elif document:
                    yield document
                    document = []
            if document:
                yield document
            return
        for number, text in self._lines(MAX_DOCUMENT_CHARS):
            if not text.strip():
                continue
            if self.fmt == "jsonl":
                try:
                    record = json.loads(text)
                except (ValueError, RecursionError):  # malformed, an integer of over 4300 digits, nested too deep
                    self.skips.add("bad JSON", self.path, number)
                    continue
                text = record.get(self.text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    self.skips.add(f"no string field {self.text_field!r}", self.path, number)
                    continue
                if not text.strip():
                    self.skips.add(f"empty field {self.text_field!r}", self.path, number)
                    continue
                text = replace_lone_surrogates(text)
            sentences = self._sentences(text, number)
            if sentences:
                yield sentences

    def __iter__(self) -> Iterator[list[str]]:
        skipped_before = self.skips.total
        for document in self._documents():
            self.documents += 1
            yield document
        self.bytes_read = self.size
        if self.documents == 0 and self.skips.total == skipped_before:
            self.skips.add("empty file", self.path)


def iter_documents(
    inputs: list[str | Path], fmt: str = "auto", text_field: str = "text", skips: Skips | None = None
) -> Iterator[list[str]]:
    """Every document of every input file in order; raises at the end if the corpus held no document at all."""
    skips = Skips() if skips is None else skips
    files = expand_inputs(inputs)
    # Open (and so check) every file first: a binary file is refused before a long run starts, not halfway.
    readers = [FileReader(path, fmt, text_field, skips) for path in files]
    count = 0
    for reader in readers:
        for document in reader:
            count += 1
            yield document
    if count == 0:
        raise BertkitError(
            f"{', '.join(map(str, inputs))}: no documents in {len(files)} file(s) ({skips.summary()}); "
            "expected text with at least one non-empty line"
        )
