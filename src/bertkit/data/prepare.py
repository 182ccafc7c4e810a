"""Tokenize a corpus once into sharded, memory-mapped token arrays with a held-out split: the writer of the format
that data/shards.py describes and reads.

Every file is written to a temporary name and renamed, and a shard exists only once the manifest lists it, so
a crash never leaves a shard that looks complete; a re-run resumes from the manifest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import tokenizers

from bertkit.config import option
from bertkit.data.corpus import FileReader, Skips, expand_inputs
from bertkit.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    backend_fingerprint,
    plain_backend,
    read_manifest,
    token_dtype,
)
from bertkit.errors import BertkitError, where
from bertkit.tokenizer import TOKENIZER_THREADS_HELP
from bertkit.train.logs import progress_bar
from bertkit.train.rundir import check_output_path

_HEAD_BYTES = 1 << 20


@dataclass
class PrepareSummary:
    """What one `prepare` run did; counts are for the files tokenized in this run."""

    out_dir: str
    files_prepared: list[str]
    files_already_prepared: list[str]
    documents: int
    sentences: int
    tokens: int
    heldout_documents: int
    seconds: float
    tokens_per_second: float
    skips: Skips = field(default_factory=Skips)

    def __str__(self) -> str:
        seconds = max(self.seconds, 0.0)
        return (f"prepared {self.tokens:,} tokens, {self.sentences:,} sentences, {self.documents:,} documents "
                f"({self.heldout_documents:,} held out) from {len(self.files_prepared)} file(s) in {seconds:.1f}s: "
                f"{self.tokens_per_second:,.0f} tokens/s; {len(self.files_already_prepared)} file(s) already prepared; "
                f"{self.skips.summary()}")


@dataclass
class PrepareConfig:
    """`bertkit prepare`: the command's arguments are these fields."""

    inputs: list[str] = option([], "text files, folders or globs", positional=True)
    tokenizer: str = option("", "tokenizer folder (vocab.txt / tokenizer.json) or Hub model id", required=True)
    out: str = option("", "folder to write the prepared corpus to", required=True)
    heldout_fraction: float = option(0.01, "share of documents held out for evaluation, chosen by a hash of their "
                                     "text")
    seed: int = option(0, "salt of the held-out hash")
    format: Literal["auto", "bert", "docs", "jsonl"] = option("auto", "input layout; auto guesses per file")
    text_field: str = option("text", "the text field of JSON lines input")
    shard_tokens: int = option(2**25, "tokens per shard, about")
    batch_size: int = option(1000, "sentences tokenized per batch")
    threads: int | None = option(None, TOKENIZER_THREADS_HELP)


def prepare_corpus(config: PrepareConfig, progress: bool = True) -> PrepareSummary:
    """`prepare` with the tokenizer folder of `config.tokenizer`: the `prepare` command."""
    from bertkit.tokenizer import Tokenizer, tokenizer_threads

    tokenizer_threads(config.threads)
    return prepare(config.inputs, Tokenizer.from_pretrained(config.tokenizer), config.out,
                   shard_tokens=config.shard_tokens, heldout_fraction=config.heldout_fraction,
                   batch_size=config.batch_size, fmt=config.format, text_field=config.text_field, seed=config.seed,
                   progress=progress)


def _file_identity(path: Path) -> dict:
    """Size, mtime and a hash of the first MiB: enough to notice a file that changed since it was prepared."""
    stat = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()
    return {"size": stat.st_size, "mtime": stat.st_mtime, "head_sha256": head}


def _is_heldout(document: list[str], seed: int, fraction: float) -> bool:
    """Held out by a hash of the document's text: deterministic, independent of file order, and an exact
    duplicate document always lands in the same split, so it cannot leak from train into evaluation."""
    digest = hashlib.blake2b("\n".join(document).encode("utf-8"), digest_size=8, salt=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") < fraction * 2**64


def _check_same_reading(path: Path, out: Path, record: dict, fmt: str, text_field: str) -> None:
    """Refuse to read a file already (partly) prepared in another layout or by another JSON field: a resumed run
    counts the documents written by their index in the file, so another reading would skip or repeat documents, and
    a finished file would silently keep the old one."""
    was_field = record.get("text_field", text_field) if fmt == "jsonl" else text_field
    if record.get("format", fmt) == fmt and was_field == text_field:
        return
    was = f"--format {record.get('format')}" + (f" --text-field {was_field}" if was_field != text_field else "")
    now = f"--format {fmt}" + (f" --text-field {text_field}" if was_field != text_field else "")
    raise BertkitError(
        f"{where(path)}: prepared into {out} read with {was}, now {now}; expected the same reading of the file "
        f"({was}), or a new output folder"
    )


def _replace_atomically(path: Path, write) -> None:
    """Write through `write(file)` to a temporary name, flush to disk, then rename over `path`; a full disk is a
    BertkitError naming the file and the free space (it was numpy's traceback), and prepare run again resumes."""
    from bertkit.checkpoint import atomic_write

    def synced(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, synced)


def _new_manifest(tokenizer, fingerprint: str, heldout_fraction: float, seed: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "tokenizer_fingerprint": fingerprint,
        "special_ids": {name: getattr(tokenizer, f"{name}_id") for name in ("pad", "unk", "cls", "sep", "mask")},
        "settings": {"heldout_fraction": heldout_fraction, "seed": seed},
        "splits": {split: {"documents": 0, "sentences": 0, "tokens": 0, "shards": []} for split in SPLITS},
        "files": {},
        "skips": Skips().to_json(),
    }


class _ShardBuffer:
    """Tokenized documents of one split waiting to become a shard."""

    def __init__(self) -> None:
        self.tokens: list[np.ndarray] = []
        self.sentence_lengths: list[np.ndarray] = []
        self.sources: list[tuple[str, int]] = []  # (file, document index in that file)
        self.files: Counter[str] = Counter()
        self.num_tokens = 0

    def add(self, file: str, index: int, tokens: np.ndarray, sentence_lengths: np.ndarray) -> None:
        self.tokens.append(tokens)
        self.sentence_lengths.append(sentence_lengths)
        self.sources.append((file, index))
        self.files[file] += 1
        self.num_tokens += len(tokens)


class _Preparer:
    """One run of `prepare`: reads new files, tokenizes in batches, writes shards and keeps the manifest current."""

    def __init__(self, out_dir: Path, manifest: dict, backend: tokenizers.Tokenizer, shard_tokens: int) -> None:
        self.out_dir = out_dir
        self.manifest = manifest
        self.backend = backend
        self.dtype = np.dtype(manifest["dtype"])
        self.shard_tokens = shard_tokens
        self.buffers = {split: _ShardBuffer() for split in SPLITS}
        self.pending: list[tuple[str, int, str, list[str]]] = []  # (file, index, split, sentences) to tokenize
        self.pending_sentences = 0
        self.finished_reading: set[str] = set()
        self.counts = Counter()

    def add(self, file: str, index: int, split: str, document: list[str], batch_size: int) -> None:
        self.pending.append((file, index, split, document))
        self.pending_sentences += len(document)
        if self.pending_sentences >= batch_size:
            self.tokenize()

    def tokenize(self) -> None:
        """Encode all pending sentences in one encode_batch call (parallel in Rust) and file them by split."""
        if not self.pending:
            return
        sentences = [s for _, _, _, document in self.pending for s in document]
        ids = [e.ids for e in self.backend.encode_batch(sentences, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, int(lengths.sum()))
        token_offsets = np.concatenate([[0], np.cumsum(lengths)])
        first = 0
        for file, index, split, document in self.pending:
            last = first + len(document)
            doc_lengths = lengths[first:last]
            doc_lengths = doc_lengths[doc_lengths > 0]  # a sentence of only dropped characters has no tokens
            if len(doc_lengths):
                # A copy, not a view: a view keeps the whole batch's array alive while the document waits for its
                # shard, and held-out documents wait for most of the run (1% of a corpus fills a shard late), so
                # memory grew with the corpus: nearly all of it when documents are short.
                tokens = flat[token_offsets[first] : token_offsets[last]].copy()
                self.buffers[split].add(file, index, tokens, doc_lengths)
                self.counts["documents"] += 1
                self.counts["heldout_documents"] += split == "heldout"
                self.counts["sentences"] += len(doc_lengths)
                self.counts["tokens"] += int(doc_lengths.sum())
                if self.buffers[split].num_tokens >= self.shard_tokens:
                    self.flush(split)
            first = last
        self.pending, self.pending_sentences = [], 0

    def flush(self, split: str) -> None:
        """Write the buffered documents of one split as the next shard, then record it in the manifest."""
        buffer = self.buffers[split]
        if not buffer.sources:
            return
        entry = self.manifest["splits"][split]
        name = f"{len(entry['shards']):05d}"
        folder = self.out_dir / split
        folder.mkdir(exist_ok=True)
        tokens = np.concatenate(buffer.tokens)
        sentence_lengths = np.concatenate(buffer.sentence_lengths)
        sentence_offsets = np.concatenate([[0], np.cumsum(sentence_lengths)]).astype(np.int64)
        document_offsets = np.concatenate([[0], np.cumsum([len(x) for x in buffer.sentence_lengths])]).astype(np.int64)
        for kind, array in (("tokens", tokens), ("sentences", sentence_offsets), ("documents", document_offsets)):
            _replace_atomically(folder / f"{name}.{kind}.npy", lambda f, a=array: np.save(f, a))
        shard = {"name": name, "documents": len(buffer.sources), "sentences": len(sentence_lengths), "tokens": len(tokens)}
        entry["shards"].append(shard)
        for key in ("documents", "sentences", "tokens"):
            entry[key] += shard[key]
        for (file, index), lengths in zip(buffer.sources, buffer.sentence_lengths):
            record = self.manifest["files"][file]
            record["done"][split] = index + 1  # documents of a file arrive in order: all before this are written
            record["documents"] += 1
            record["sentences"] += len(lengths)
            record["tokens"] += int(lengths.sum())
            if f"{split}/{name}" not in record["shards"]:
                record["shards"].append(f"{split}/{name}")
        self.buffers[split] = _ShardBuffer()
        self.save_manifest()

    def save_manifest(self) -> None:
        """Mark files whose documents are all written as complete, then replace the manifest atomically."""
        waiting = {file for file, _, _, _ in self.pending}.union(*(buffer.files for buffer in self.buffers.values()))
        for file in self.finished_reading - waiting:
            self.manifest["files"][file]["complete"] = True
        skips = Skips()
        for record in self.manifest["files"].values():
            if record["complete"]:
                skips.merge(Skips.from_json(record["skips"]))
        self.manifest["skips"] = skips.to_json()
        text = json.dumps(self.manifest, indent=1) + "\n"
        _replace_atomically(self.out_dir / MANIFEST, lambda f: f.write(text.encode("utf-8")))


def prepare(
    inputs: list[str],
    tokenizer,
    out_dir: str | Path,
    *,
    shard_tokens: int = 2**25,
    heldout_fraction: float = 0.01,
    batch_size: int = 1000,
    fmt: str = "auto",
    text_field: str = "text",
    seed: int = 0,
    progress: bool = True,
) -> PrepareSummary:
    """Tokenize the corpus files not yet in `out_dir` into shards (about `shard_tokens` tokens each, documents
    whole); a document goes to the held-out split with probability `heldout_fraction`, decided by its text."""
    if not 0 <= heldout_fraction < 1:
        raise BertkitError(f"heldout_fraction={heldout_fraction}; expected a fraction in [0, 1)")
    if shard_tokens < 1 or batch_size < 1:
        raise BertkitError(f"shard_tokens={shard_tokens}, batch_size={batch_size}; expected both positive")
    if not 0 <= seed < 2**64:  # the held-out hash's salt is 8 bytes
        raise BertkitError(f"seed={seed}; expected a whole number from 0 to 2**64 - 1")
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BertkitError(f"{where(out)}: a file, not a folder; expected a folder to write the prepared corpus to")
    files = expand_inputs(inputs)
    for entry in inputs:  # an input folder is read whole: a re-run would read the shards written into it as corpus
        if Path(entry).is_dir():
            check_output_path(out, "--out", {"input": str(entry)})
    backend = plain_backend(tokenizer.backend)
    fingerprint = backend_fingerprint(backend)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest["tokenizer_fingerprint"] != fingerprint:
            raise BertkitError(
                f"{where(out / MANIFEST)}: prepared with a different tokenizer (fingerprint "
                f"{manifest['tokenizer_fingerprint'][:12]}, this one {fingerprint[:12]}); expected the same "
                "tokenizer, or a new output folder"
            )
        settings = {"heldout_fraction": heldout_fraction, "seed": seed}
        if manifest["settings"] != settings:
            raise BertkitError(
                f"{where(out / MANIFEST)}: prepared with {manifest['settings']}, now {settings}; expected the same "
                "held-out settings (they decide the split), or a new output folder"
            )
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BertkitError(f"{where(out)}: cannot create the folder ({e.strerror or e}); expected a folder this "
                               "user can write") from None
        manifest = _new_manifest(tokenizer, fingerprint, heldout_fraction, seed)

    # Check every file before tokenizing any: a changed or binary file stops the run now, not hours in.
    readers, already, seen = [], [], set()
    for path in files:
        key = str(path.resolve())
        if key in seen:  # one file named twice (a relative and an absolute path, a link to it): read once
            continue
        seen.add(key)
        identity = _file_identity(path)
        record = manifest["files"].get(key)
        if record is not None:
            if (record["size"], record["head_sha256"]) != (identity["size"], identity["head_sha256"]):
                raise BertkitError(
                    f"{where(path)}: changed since it was prepared into {out} (size or first MiB differ); expected "
                    "an unchanged file, or a new output folder"
                )
            if record["complete"]:
                if fmt != "auto":  # auto takes a finished file as it was read (so adding files needs no old flags)
                    _check_same_reading(path, out, record, fmt, text_field)
                already.append(key)
                continue
        reader = FileReader(path, fmt, text_field)
        if record is None:
            manifest["files"][key] = record = {
                **identity, "format": reader.fmt, "complete": False, "done": dict.fromkeys(SPLITS, 0),
                "documents": 0, "sentences": 0, "tokens": 0, "shards": [], "skips": Skips().to_json(),
                **({"text_field": text_field} if reader.fmt == "jsonl" else {}),
            }
        else:
            _check_same_reading(path, out, record, reader.fmt, text_field)
        readers.append((key, reader))

    run = _Preparer(out, manifest, backend, shard_tokens)
    skips = Skips()
    total_bytes = sum(reader.size for _, reader in readers)
    done_bytes = 0
    bar = progress_bar(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress)
    for key, reader in readers:
        done = manifest["files"][key]["done"]
        for index, document in enumerate(reader):
            split = "heldout" if _is_heldout(document, seed, heldout_fraction) else "train"
            if index < done[split]:
                continue  # written into a shard by an interrupted earlier run
            before = run.counts["tokens"]
            run.add(key, index, split, document, batch_size)
            if run.counts["tokens"] != before:  # a batch was tokenized
                bar.update(done_bytes + reader.bytes_read - bar.n)
                bar.set_postfix(tokens_per_s=f"{run.counts['tokens'] / (time.perf_counter() - start):,.0f}",
                                refresh=False)  # the bar redraws on its own schedule
        done_bytes += reader.size
        manifest["files"][key]["skips"] = reader.skips.to_json()
        skips.merge(reader.skips)
        run.finished_reading.add(key)
    run.tokenize()
    for split in SPLITS:
        run.flush(split)
    run.save_manifest()
    bar.update(total_bytes - bar.n)
    bar.close()

    if not any(manifest["splits"][split]["documents"] for split in SPLITS):
        raise BertkitError(
            f"{', '.join(map(str, inputs))}: no documents in {len(files)} file(s) ({skips.summary()}); "
            "expected text with at least one non-empty line"
        )
    seconds = time.perf_counter() - start
    summary = PrepareSummary(
        out_dir=str(out),
        files_prepared=[key for key, _ in readers],
        files_already_prepared=already,
        documents=run.counts["documents"],
        sentences=run.counts["sentences"],
        tokens=run.counts["tokens"],
        heldout_documents=run.counts["heldout_documents"],
        seconds=seconds,
        tokens_per_second=run.counts["tokens"] / seconds if seconds > 0 else 0.0,
        skips=skips,
    )
    return summary


