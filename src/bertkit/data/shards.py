"""The prepared-corpus format and its reader: sharded, memory-mapped token arrays with a held-out split
(`bertkit prepare` writes them: data/prepare.py).

A prepared folder:
  manifest.json                       the only source of truth: settings, tokenizer fingerprint, shards, files
  train/00000.tokens.npy              token ids, uint16 (vocab < 65536) or uint32, all sentences back to back
  train/00000.sentences.npy           int64 offsets into tokens, one per sentence plus the end (starts at 0)
  train/00000.documents.npy           int64 offsets into sentences, one per document plus the end (starts at 0)
  heldout/00000.*.npy                 the same for the held-out documents
A shard exists only once the manifest lists it. Documents never span shards, so a document's tokens are one
contiguous slice of one memory map.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import numpy as np
import tokenizers

from bertkit.config import read_json
from bertkit.errors import BertkitError, where

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "heldout")


def plain_backend(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A copy of the backend with padding and truncation off: encode_batch then returns every token, no more."""
    copy = tokenizers.Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy


def backend_fingerprint(plain: tokenizers.Tokenizer) -> str:
    return hashlib.sha256(plain.to_str().encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's whole serialization (vocabulary, normalizer, pre-tokenizer), padding aside."""
    return backend_fingerprint(plain_backend(tokenizer.backend))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds every id of a vocabulary under 65536 entries, at half the bytes of uint32."""
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


def read_manifest(out_dir: str | Path) -> dict:
    """The manifest of a prepared folder; raises if there is none."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise BertkitError(f"{where(path)}: no manifest; expected a folder written by `bertkit prepare`")
    # a manifest lists every file and shard: large for a large corpus, but never near this
    manifest = read_json(path, "the manifest.json `bertkit prepare` writes", max_bytes=1 << 30)
    if not isinstance(manifest, dict):
        raise BertkitError(f"{where(path)}: a JSON {type(manifest).__name__}; expected the manifest object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BertkitError(f"{where(path)}: format_version {manifest.get('format_version')}; expected {FORMAT_VERSION}")
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: dict, path: Path) -> None:
    """Raise naming the first field of a manifest that is missing or of the wrong type (a hand-edited or foreign
    file), so that reading it fails here and not with a KeyError deep in a training run."""

    def fail(field: str, expected: str) -> None:
        raise BertkitError(f"{where(path)}: field {field} is missing or wrong; expected {expected} (was the folder "
                           "modified? prepare into a new folder)")

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not count(manifest.get("vocab_size")) or not manifest["vocab_size"]:
        fail("vocab_size", "a positive integer")
    if not isinstance(manifest.get("tokenizer_fingerprint"), str):
        fail("tokenizer_fingerprint", "a string")
    if manifest.get("dtype") not in ("uint16", "uint32"):
        fail("dtype", "uint16 or uint32")
    for key in ("settings", "files", "splits"):
        if not isinstance(manifest.get(key), dict):
            fail(key, "an object")
    for split in SPLITS:
        entry = manifest["splits"].get(split)
        if not isinstance(entry, dict):
            fail(f"splits.{split}", "an object")
        for key in ("documents", "sentences", "tokens"):
            if not count(entry.get(key)):
                fail(f"splits.{split}.{key}", "a count (an integer >= 0)")
        shards = entry.get("shards")
        if not isinstance(shards, list):
            fail(f"splits.{split}.shards", "a list of shards")
        for i, shard in enumerate(shards):
            name = shard.get("name") if isinstance(shard, dict) else None
            # a plain name: the manifest must not make bertkit map files outside the folder
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                fail(f"splits.{split}.shards[{i}].name", "a shard file name")
            for key in ("tokens", "sentences", "documents"):
                if not count(shard.get(key)):
                    fail(f"splits.{split}.shards[{i}].{key}", "a count (an integer >= 0)")
    for name, record in manifest["files"].items():
        done = record.get("done") if isinstance(record, dict) else None
        if (not isinstance(done, dict) or not all(count(done.get(split)) for split in SPLITS)
                or not count(record.get("size")) or not isinstance(record.get("head_sha256"), str)
                or not isinstance(record.get("complete"), bool)):
            fail(f"files[{name!r}]", "a record with size, head_sha256, complete and done counts")


class TokenView:
    """The tokens of all shards as one read-only sequence; a slice inside one shard is a zero-copy view."""

    def __init__(self, corpus: PreparedCorpus) -> None:
        self._corpus = corpus
        self.dtype = corpus.dtype

    def __len__(self) -> int:
        return self._corpus.num_tokens

    def __getitem__(self, key: int | slice) -> np.ndarray:
        corpus = self._corpus
        if isinstance(key, (int, np.integer)):
            position = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"token {key} out of range for {len(self)} tokens")
            shard = int(np.searchsorted(corpus.shard_token_starts, position, side="right")) - 1
            return corpus.shard_arrays(shard)[0][position - corpus.shard_token_starts[shard]]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("token slices take no step")
        if stop <= start:
            return np.empty(0, self.dtype)
        first = int(np.searchsorted(corpus.shard_token_starts, start, side="right")) - 1
        last = int(np.searchsorted(corpus.shard_token_starts, stop - 1, side="right")) - 1
        pieces = []
        for shard in range(first, last + 1):
            base = int(corpus.shard_token_starts[shard])
            pieces.append(corpus.shard_arrays(shard)[0][max(start, base) - base : stop - base])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class PreparedCorpus:
    """One split of a prepared folder: a memory map per shard, plus a global sentence/document index in RAM
    (8 bytes a sentence, 16 a document); token ids stay on disk until read."""

    def __init__(self, out_dir: str | Path, split: str = "train") -> None:
        if split not in SPLITS:
            raise BertkitError(f"split {split!r}; expected one of {', '.join(SPLITS)}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.manifest = read_manifest(self.out_dir)
        self.vocab_size: int = self.manifest["vocab_size"]
        self.tokenizer_fingerprint: str = self.manifest["tokenizer_fingerprint"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shards: list[dict] = self.manifest["splits"][split]["shards"]
        self.num_documents = sum(s["documents"] for s in self.shards)
        self.num_sentences = sum(s["sentences"] for s in self.shards)
        self.num_tokens = sum(s["tokens"] for s in self.shards)
        self.shard_token_starts = np.cumsum([0] + [s["tokens"] for s in self.shards], dtype=np.int64)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        # DataLoader workers get a pickled copy: a pickled memmap would copy its whole content, and the index
        # arrays are rebuilt on demand (examples are read by token position), so neither travels.
        lazy = ("tokens", "sentence_offsets", "sentence_lengths", "document_sentence_ranges")
        return {**{k: v for k, v in self.__dict__.items() if k not in lazy}, "_arrays": {}}

    def shard_arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, sentence offsets, document offsets) of one shard, memory-mapped and checked on first use."""
        if shard not in self._arrays:
            info = self.shards[shard]
            base = self.out_dir / self.split / info["name"]
            arrays = []
            for kind, length, dtype in (
                ("tokens", info["tokens"], self.dtype),
                ("sentences", info["sentences"] + 1, np.int64),
                ("documents", info["documents"] + 1, np.int64),
            ):
                path = Path(f"{base}.{kind}.npy")
                try:
                    array = np.load(path, mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise BertkitError(f"{where(path)}: cannot read ({e}); expected the shard the manifest lists") from e
                if array.shape != (length,) or array.dtype != dtype:
                    raise BertkitError(
                        f"{where(path)}: {array.dtype}{list(array.shape)}; expected {np.dtype(dtype)}[{length}] as "
                        f"{MANIFEST} lists (was the folder modified?)"
                    )
                arrays.append(array)
            self._arrays[shard] = tuple(arrays)
        return self._arrays[shard]

    @cached_property
    def tokens(self) -> TokenView:
        return TokenView(self)

    @cached_property
    def sentence_offsets(self) -> np.ndarray:
        """(num_sentences + 1,) int64: sentence s is tokens[offsets[s]:offsets[s + 1]]."""
        pieces = [self.shard_arrays(i)[1][:-1] + self.shard_token_starts[i] for i in range(len(self.shards))]
        return np.concatenate(pieces + [np.array([self.num_tokens], np.int64)])

    @property
    def sentence_starts(self) -> np.ndarray:
        return self.sentence_offsets[:-1]

    @property
    def sentence_ends(self) -> np.ndarray:
        return self.sentence_offsets[1:]

    @cached_property
    def sentence_lengths(self) -> np.ndarray:
        return np.diff(self.sentence_offsets)

    @cached_property
    def document_sentence_ranges(self) -> np.ndarray:
        """(num_documents, 2) int64: document d is sentences [ranges[d, 0], ranges[d, 1])."""
        sentence_starts = np.cumsum([0] + [s["sentences"] for s in self.shards], dtype=np.int64)
        starts = [self.shard_arrays(i)[2] + sentence_starts[i] for i in range(len(self.shards))]
        if not starts:
            return np.empty((0, 2), np.int64)
        return np.concatenate([np.stack([s[:-1], s[1:]], axis=1) for s in starts])

    def sentence(self, s: int) -> np.ndarray:
        """The token ids of sentence s."""
        return self.tokens[int(self.sentence_offsets[s]) : int(self.sentence_offsets[s + 1])]

    def document(self, d: int) -> list[np.ndarray]:
        """The token ids of document d, one array a sentence."""
        first, last = self.document_sentence_ranges[d]
        return [self.sentence(s) for s in range(first, last)]
