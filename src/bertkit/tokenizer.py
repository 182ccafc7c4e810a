"""WordPiece: train a vocabulary, load and save it like transformers' BertTokenizerFast, encode texts and pairs."""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tokenizers
import torch
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

from bertkit.config import option, save_folder, write_json
from bertkit.data.corpus import FileReader, Skips, expand_inputs, replace_lone_surrogates
from bertkit.errors import BertkitError, where

logger = logging.getLogger("bertkit")

# In this order at the head of a trained vocabulary, so [PAD] is id 0.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Original BERT: a longer word becomes one [UNK] instead of dozens of single-character pieces.
MAX_CHARS_PER_WORD = 100
MODEL_MAX_LENGTH = 512
# The trainer allocates by vocab_size up front; XLM-R's 250k is the largest vocabulary in common use.
MAX_VOCAB_SIZE = 1 << 20


def _bert_normalizer(lowercase: bool, strip_accents: bool | None = None,
                     chinese_chars: bool = True) -> normalizers.BertNormalizer:
    """Clean text, split CJK characters, and lowercase + strip accents only when uncased (by default)."""
    # strip_accents=None follows lowercase, as in the original BERT: cased vocabularies keep accents.
    return normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese_chars, strip_accents=strip_accents, lowercase=lowercase
    )


def _normalizer_settings(config: dict) -> dict:
    """tokenizer_config.json's do_lower_case, strip_accents and tokenize_chinese_chars, with transformers' defaults
    for those it leaves out (transformers applies them over tokenizer.json's normalizer)."""
    strip_accents = config.get("strip_accents")
    return {"lowercase": bool(config.get("do_lower_case", True)),
            "strip_accents": None if strip_accents is None else bool(strip_accents),
            "chinese_chars": bool(config.get("tokenize_chinese_chars", True))}


def _bert_post_processor(vocab: dict[str, int]) -> processors.TemplateProcessing:
    """`[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]`, segment ids 0 then 1."""
    return processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )


def _build_backend(vocab: dict[str, int], lowercase: bool, strip_accents: bool | None = None,
                   chinese_chars: bool = True) -> tokenizers.Tokenizer:
    """The fast tokenizer transformers builds for BertTokenizerFast on the same vocabulary."""
    backend = tokenizers.Tokenizer(
        WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=MAX_CHARS_PER_WORD)
    )
    backend.normalizer = _bert_normalizer(lowercase, strip_accents, chinese_chars)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = _bert_post_processor(vocab)
    backend.decoder = decoders.WordPiece(prefix="##")
    # Registered as special added tokens, as transformers does: a literal "[MASK]" in text encodes to the [MASK] id.
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return backend


def _check_special_tokens(vocab: dict[str, int], source: Path) -> None:
    """Raise unless every BERT special token is in the vocabulary."""
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise BertkitError(
            f"{where(source)}: vocabulary lacks {', '.join(missing)}; expected all of {', '.join(SPECIAL_TOKENS)}"
        )


def _read_vocab(vocab_file: Path) -> dict[str, int]:
    """Read vocab.txt (one token per line, id = line number - 1) as transformers does."""
    vocab: dict[str, int] = {}
    try:
        with open(vocab_file, encoding="utf-8") as f:
            for index, line in enumerate(f):
                token = line.rstrip("\n")
                if token in vocab:
                    raise BertkitError(
                        f"{where(vocab_file, index + 1)}: token {token!r} repeats line {vocab[token] + 1}; "
                        "expected each token once"
                    )
                vocab[token] = index
    except (OSError, UnicodeDecodeError) as e:
        raise BertkitError(
            f"{where(vocab_file)}: cannot read the vocabulary ({e}); expected a UTF-8 vocab.txt, one token per line"
        ) from e
    _check_special_tokens(vocab, vocab_file)
    return vocab


def _read_json(path: Path) -> dict:
    """Read a JSON object, raising BertkitError on a bad file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise BertkitError(f"{where(path)}: cannot read ({e})") from e
    except json.JSONDecodeError as e:
        raise BertkitError(f"{where(path, e.lineno)}: invalid JSON ({e.msg}); expected a JSON object") from e
    if not isinstance(value, dict):
        raise BertkitError(f"{where(path, 1)}: expected a JSON object, got {type(value).__name__}")
    return value


def _listed_special_tokens(directory: Path, config: dict) -> list[str]:
    """The special tokens a slow tokenizer's folder names, in order (BERT's, and additional_special_tokens or
    extra_special_tokens in tokenizer_config.json or special_tokens_map.json): how transformers tells which of
    added_tokens.json's tokens are special."""
    special = list(SPECIAL_TOKENS)
    map_file = directory / "special_tokens_map.json"
    for values in (config, _read_json(map_file) if map_file.is_file() else {}):
        for key in ("additional_special_tokens", "extra_special_tokens"):
            tokens = values.get(key)
            for token in tokens if isinstance(tokens, list) else []:
                token = token.get("content") if isinstance(token, dict) else token
                if isinstance(token, str) and token not in special:
                    special.append(token)
    return special


def _saved_added_tokens(directory: Path, config: dict) -> list[tuple[int, tokenizers.AddedToken]]:
    """The tokens a folder without tokenizer.json adds over its vocab.txt, (id, token) in id order, as transformers
    reads them: tokenizer_config.json's added_tokens_decoder, or else (older folders) added_tokens.json, whose
    tokens are special when the folder lists them as special tokens."""
    decoder = config.get("added_tokens_decoder")
    if decoder is not None:
        source = directory / "tokenizer_config.json"
        expected = "added_tokens_decoder: an object of token id -> {content, special, ...}"
        if not isinstance(decoder, dict):
            raise BertkitError(f"{where(source)}: added_tokens_decoder is {type(decoder).__name__}; expected {expected}")
        added = []
        for index, token in decoder.items():
            if not (isinstance(index, str) and index.isdecimal() and isinstance(token, dict)
                    and isinstance(token.get("content"), str)):
                raise BertkitError(f"{where(source)}: added_tokens_decoder[{index!r}] is {token!r}; expected {expected}")
            flags = {k: bool(token[k]) for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in token}
            added.append((int(index), tokenizers.AddedToken(token["content"], **flags)))
        return sorted(added, key=lambda pair: pair[0])
    source = directory / "added_tokens.json"
    if not source.is_file():
        return []
    encoder = _read_json(source)
    special = _listed_special_tokens(directory, config)
    added = []
    for content, index in encoder.items():
        if not isinstance(index, int) or isinstance(index, bool):
            raise BertkitError(f"{where(source)}: token {content!r} has id {index!r}; expected an integer id")
        is_special = content in special
        added.append((index, tokenizers.AddedToken(content, normalized=not is_special, special=is_special)))
    return sorted(added, key=lambda pair: pair[0])


def _add_saved_tokens(backend: tokenizers.Tokenizer, directory: Path, config: dict) -> None:
    """Add `_saved_added_tokens` to a backend built on the folder's vocab.txt, each at the id the folder gives it,
    then the special tokens the folder lists that are not added yet (vocab.txt entries made special)."""
    source = directory / ("tokenizer_config.json" if "added_tokens_decoder" in config else "added_tokens.json")
    for index, token in _saved_added_tokens(directory, config):
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        got = backend.token_to_id(token.content)
        if got != index:
            raise BertkitError(f"{where(source)}: added token {token.content!r} has id {index}, but it lands at id "
                               f"{got} over vocab.txt; expected the ids that follow vocab.txt's tokens")
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    listed = [t for t in _listed_special_tokens(directory, config) if t not in added]
    backend.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in listed])


def _as_text(text, what: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD; a BertkitError when it is not a str at all."""
    if not isinstance(text, str):
        raise BertkitError(f"{what} has type {type(text).__name__}; expected a str")
    return replace_lone_surrogates(text)


def _as_row(row, index: int, zipped: bool):
    """A row of encode_batch with `_as_text` applied: a text, or a (text, pair) from `texts` and `pairs` (`zipped`) or
    given whole in `texts`."""
    if isinstance(row, (tuple, list)) and len(row) == 2:
        names = (f"texts[{index}]", f"pairs[{index}]") if zipped else (f"texts[{index}][0]", f"texts[{index}][1]")
        return tuple(_as_text(text, name) for text, name in zip(row, names))
    return _as_text(row, f"texts[{index}]")


class Tokenizer:
    """BERT's WordPiece tokenizer over a `tokenizers` backend; encodes exactly like transformers' BertTokenizerFast."""

    def __init__(self, backend: tokenizers.Tokenizer, lowercase: bool) -> None:
        self.backend = backend
        self.lowercase = lowercase
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            backend.token_to_id(token) for token in SPECIAL_TOKENS
        )
        self._special_ids = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        # No cleanup: transformers' default glues " ." and " 's" onto the previous word, a guess about the
        # original spacing that would make decode(encode(x)) differ from the normalised text.
        self._decoder = decoders.WordPiece(prefix="##", cleanup=False)

    @classmethod
    def from_vocab(cls, vocab_file: str | Path, lowercase: bool = True, strip_accents: bool | None = None,
                   chinese_chars: bool = True) -> Tokenizer:
        """Build the BERT tokenizer on a vocab.txt (`strip_accents` None: when lowercasing; `chinese_chars`: CJK
        characters split into words of their own)."""
        backend = _build_backend(_read_vocab(Path(vocab_file)), lowercase, strip_accents, chinese_chars)
        return cls(backend, lowercase)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder: tokenizer.json if present, else vocab.txt + tokenizer_config.json.
        As in transformers, tokenizer_config.json's do_lower_case, strip_accents and tokenize_chinese_chars (or
        their defaults, when the file leaves them out) override tokenizer.json's normalizer. A folder of Google's
        (vocab.txt beside bert_config.json, no tokenizer_config.json) is cased when its vocabulary is
        (`tf_checkpoint.vocab_is_cased`), accents stripped only when uncased, as Google's tokenization.py does."""
        from bertkit import hub

        directory = Path(hub.resolve(directory, weights=False))  # a Hub model id: its tokenizer files fetched
        config_file = directory / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else None
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            if not (directory / "vocab.txt").is_file():
                raise BertkitError(f"{where(directory)}: expected a tokenizer folder with tokenizer.json or vocab.txt")
            settings = _normalizer_settings(config or {})
            if config is None and (directory / "bert_config.json").is_file():
                # Google's folder: no tokenizer config says the casing, so the vocabulary does (transformers' default,
                # lower-casing, would feed a cased BERT lower-cased text, which it never saw in training)
                from bertkit.tf_checkpoint import vocab_is_cased

                settings["lowercase"] = not vocab_is_cased(directory / "vocab.txt")
            backend = _build_backend(_read_vocab(directory / "vocab.txt"), **settings)
            _add_saved_tokens(backend, directory, config or {})  # a slow tokenizer's added tokens, as transformers
            return cls(backend, settings["lowercase"])
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a plain Exception for any malformed file
            raise BertkitError(f"{where(tokenizer_file)}: cannot load ({e}); expected a tokenizers JSON file") from e
        if not isinstance(backend.model, WordPiece):
            raise BertkitError(
                f"{where(tokenizer_file)}: model is {type(backend.model).__name__}; expected WordPiece (a BERT tokenizer)"
            )
        _check_special_tokens(backend.get_vocab(), tokenizer_file)
        if backend.post_processor is None:
            # A tokenizer trained with the tokenizers library alone saves none, and encode would then add no [CLS] or
            # [SEP] (a classifier would read the first word as [CLS]); transformers' BertTokenizer puts BERT's on too.
            backend.post_processor = _bert_post_processor(backend.get_vocab())
        # A saved file may fix padding/truncation (all-MiniLM-L6-v2 pads everything to 128); encode sets them per call.
        backend.no_padding()
        backend.no_truncation()
        lowercase = bool(getattr(backend.normalizer, "lowercase", True))
        if config is not None:
            settings = _normalizer_settings(config)
            if isinstance(backend.normalizer, normalizers.BertNormalizer):
                lowercase = settings["lowercase"]
                backend.normalizer = _bert_normalizer(**settings)
            else:  # another normalizer is left as it is; do_lower_case, when given, is what the folder says it does
                lowercase = bool(config.get("do_lower_case", lowercase))
        return cls(backend, lowercase)

    def save_pretrained(self, directory: str | Path, model_max_length: int = MODEL_MAX_LENGTH) -> None:
        """Write vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json as transformers reads them
        (`model_max_length`: the length transformers truncates to by default, the model's positions)."""
        from bertkit.checkpoint import atomic_write  # it reads tokenizer folders: imported here, not at the top

        directory = save_folder(directory)
        # each file whole or not at all (a full disk was a traceback and left a cut one, a cut vocab.txt read after as
        # a smaller vocabulary), as write_json writes the other two
        write_vocab(directory / "vocab.txt", self.vocab())
        atomic_write(directory / "tokenizer.json", lambda tmp: self.backend.save(str(tmp)))
        special_tokens = {
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"
        }
        # special tokens added over BERT's five (an entity marker [E1], say): without this list transformers treats
        # them as ordinary tokens (get_special_tokens_mask, so DataCollatorForLanguageModeling masks them)
        extra = [token.content for _, token in sorted(self.backend.get_added_tokens_decoder().items())
                 if token.special and token.content not in SPECIAL_TOKENS]
        if extra:
            special_tokens["additional_special_tokens"] = extra
        normalizer = self.backend.normalizer
        bert = isinstance(normalizer, normalizers.BertNormalizer)
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.lowercase,
            "do_basic_tokenize": True,
            "never_split": None,
            "tokenize_chinese_chars": normalizer.handle_chinese_chars if bert else True,
            "strip_accents": normalizer.strip_accents if bert else None,
            "model_max_length": model_max_length,
            **special_tokens,
            # every added token at its id, as transformers writes them: read from vocab.txt and this file alone (a slow
            # tokenizer, or the folder without tokenizer.json), a token added over the vocabulary ("covid19") would
            # be one more word piece, no longer matched inside a word
            "added_tokens_decoder": {
                str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                         "single_word": t.single_word, "special": t.special}
                for i, t in sorted(self.backend.get_added_tokens_decoder().items())
            },
        }
        write_json(directory / "tokenizer_config.json", config)
        write_json(directory / "special_tokens_map.json", special_tokens)

    @contextlib.contextmanager
    def _truncation(self, max_length: int | None, is_pair: bool) -> Iterator[None]:
        """Truncate longest-first to max_length for the duration of one call, leaving the backend untruncated."""
        if max_length is None:
            yield
            return
        num_special = 3 if is_pair else 2
        if not isinstance(max_length, numbers.Integral) or isinstance(max_length, bool) or max_length > 2**31 - 1:
            raise BertkitError(f"max_length={max_length!r}; expected a whole number of tokens (or None)")
        if max_length < num_special:
            raise BertkitError(f"max_length={max_length} leaves no room; expected at least {num_special} for [CLS]/[SEP]")
        self.backend.enable_truncation(max_length, strategy="longest_first")
        try:
            yield
        finally:
            self.backend.no_truncation()

    def _encoding(self, text: str, pair: str | None, max_length: int | None) -> tokenizers.Encoding:
        """The backend's encoding of one text (or pair), truncated longest-first to max_length."""
        with self._truncation(max_length, pair is not None):
            try:
                return self.backend.encode(text, pair)
            except TypeError:  # the backend's answer to a non-str and to a str it cannot pass to Rust
                return self.backend.encode(_as_text(text, "text"), None if pair is None else _as_text(pair, "pair"))

    def encode(self, text: str, pair: str | None = None, max_length: int | None = None) -> dict[str, list[int]]:
        """Encode `[CLS] text [SEP]` or `[CLS] text [SEP] pair [SEP]` with segment ids 0/1.

        Text that is not clean is taken as BERT takes it: control characters are dropped by the normalizer, and
        lone surrogates (no UTF-8 text holds them; they come from `surrogateescape` decoding or JSON `\\ud800`
        escapes) are replaced by U+FFFD, which the normalizer drops too. A text that is not a str is a
        BertkitError.
        """
        encoding = self._encoding(text, pair, max_length)
        return {
            "input_ids": encoding.ids,
            "token_type_ids": encoding.type_ids,
            "attention_mask": encoding.attention_mask,
        }

    def encode_words(self, text: str, pair: str | None = None, max_length: int | None = None) -> dict[str, list]:
        """`encode`'s ids with, for each token, its text (`tokens`), the index of its word in its own text
        (`word_ids`: None for [CLS] and [SEP]; a pair's words count from 0 again) and its character span in that
        text (`offsets`; which text is the token's segment id): what puts a token's share of a result back on the
        words of the input."""
        encoding = self._encoding(text, pair, max_length)
        return {"input_ids": encoding.ids, "token_type_ids": encoding.type_ids, "tokens": encoding.tokens,
                "word_ids": encoding.word_ids, "offsets": encoding.offsets}

    def encode_batch(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        max_length: int | None = None,
        padding: bool = True,
        return_tensors: str | None = None,
    ) -> dict[str, list[list[int]]] | dict[str, torch.Tensor]:
        """Encode a batch, padded to its longest row with [PAD] and mask 0; torch tensors if return_tensors="pt".
        Pairs are `texts` and `pairs` side by side or, as transformers takes them, (text, pair) rows of `texts`.

        Unclean text is handled as in `encode` (lone surrogates become U+FFFD); a row that is not a str is a
        BertkitError naming its index.
        """
        if isinstance(texts, str) or isinstance(pairs, str):
            raise BertkitError("encode_batch got a str; expected a list of texts (use encode for one text)")
        # read once: an iterator's rows were gone when read again below to be cleaned (an empty batch came back)
        texts, pairs = list(texts), None if pairs is None else list(pairs)
        if pairs is not None and len(pairs) != len(texts):
            raise BertkitError(f"encode_batch got {len(texts)} texts and {len(pairs)} pairs; expected as many of each")
        if return_tensors not in (None, "pt"):
            raise BertkitError(f"return_tensors={return_tensors!r}; expected None or 'pt'")
        if return_tensors == "pt" and not padding:
            raise BertkitError("return_tensors='pt' needs padding=True: rows of different lengths make no tensor")
        inputs = texts if pairs is None else list(zip(texts, pairs))
        # rows (text, pair) in `texts`, transformers' other way of giving pairs, are encoded as pairs by the backend:
        # their second [SEP] must count against max_length too (below 3, truncation was skipped: rows came back whole)
        is_pair = pairs is not None or any(isinstance(row, (tuple, list)) for row in texts)
        with self._truncation(max_length, is_pair):
            try:
                encodings = self.backend.encode_batch(inputs)
            except TypeError:  # a row that is not a str, or holds lone surrogates: cleaned (or named) and retried
                inputs = [_as_row(row, i, pairs is not None) for i, row in enumerate(inputs)]
                encodings = self.backend.encode_batch(inputs)
        batch = {
            "input_ids": [e.ids for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
        }
        if padding:
            longest = max((len(ids) for ids in batch["input_ids"]), default=0)
            for key, fill in (("input_ids", self.pad_id), ("token_type_ids", 0), ("attention_mask", 0)):
                batch[key] = [row + [fill] * (longest - len(row)) for row in batch[key]]
            if return_tensors == "pt":
                return {key: torch.tensor(rows, dtype=torch.long).reshape(len(rows), longest) for key, rows in batch.items()}
        return batch

    def tokenize(self, text: str) -> list[str]:
        """Split text into WordPiece tokens, without [CLS]/[SEP] (unclean text handled as in `encode`)."""
        try:
            return self.backend.encode(text, add_special_tokens=False).tokens
        except TypeError:
            return self.backend.encode(_as_text(text, "text"), add_special_tokens=False).tokens

    def word_pieces(self, texts: Sequence[str] | Sequence[Sequence[str]]
                    ) -> list[list[tuple[list[int], tuple[int, int]]]]:
        """Each text's words as (WordPiece ids, character span), without [CLS]/[SEP]: the words BERT's pre-tokenizer
        finds in a str (split at white space and punctuation; spans index the text), or the given words of a text
        already split into a list of words (as a CoNLL file gives them), one entry per word in order: a word the
        pre-tokenizer splits further ("U.N.") stays one word, a word left without a piece (control characters
        alone) is [UNK], and spans index the word."""
        texts = list(texts)
        split = bool(texts) and not isinstance(texts[0], str)
        try:
            encodings = self.backend.encode_batch(texts, is_pretokenized=split, add_special_tokens=False)
        except TypeError:  # lone surrogates (or a non-str), cleaned or named as encode does
            texts = [[_as_text(w, "word") for w in t] if split else _as_text(t, "text") for t in texts]
            encodings = self.backend.encode_batch(texts, is_pretokenized=split, add_special_tokens=False)
        result = []
        for text, encoding in zip(texts, encodings):
            words: dict[int, tuple[list[int], list[int]]] = {}
            for token, word, (start, end) in zip(encoding.ids, encoding.word_ids, encoding.offsets):
                if word is None:
                    continue
                ids, span = words.setdefault(word, ([], [start, end]))
                ids.append(token)
                span[1] = end
            if split:
                result.append([(words[i][0], tuple(words[i][1])) if i in words else ([self.unk_id], (0, len(w)))
                               for i, w in enumerate(text)])
            else:
                result.append([(ids, tuple(span)) for _, (ids, span) in sorted(words.items())])
        return result

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Join WordPiece tokens back into text: `##` pieces glue on, words are separated by single spaces."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise BertkitError(f"decode got a {ids.dim()}-D {str(ids.dtype).removeprefix('torch.')} tensor; "
                                   "expected one sequence of integer token ids")
            ids = ids.tolist()
        tokens = []
        for i in ids:
            # int() made 7592.7 (a float, a probability: not an id) the token 7592, and a row of a batch a TypeError
            if not isinstance(i, numbers.Integral) or isinstance(i, bool):
                raise BertkitError(f"decode got {i!r}; expected integer token ids, one sequence of them")
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise BertkitError(f"decode got id {i}; expected ids in 0..{self.vocab_size - 1}")
            if skip_special_tokens and i in self._special_ids:
                continue
            tokens.append(self.backend.id_to_token(i))
        return self._decoder.decode(tokens)

    def vocab(self) -> list[str]:
        """The vocabulary as a list: position = token id."""
        return [self.backend.id_to_token(i) for i in range(self.vocab_size)]


def read_sentences(readers: list[FileReader]) -> Iterator[list[str]]:
    """The sentences of the readers' documents in batches (the trainer is fed from Python)."""
    batch = []
    for reader in readers:
        for document in reader:
            batch += document
            if len(batch) >= 10_000:
                yield batch
                batch = []
    yield batch


def _check_count(name: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BertkitError(f"{name} is {value!r}; expected a whole number from {low:,} to {high:,}")


TOKENIZER_THREADS_HELP = "threads for tokenizing (default: one per core, the tokenizers library's own)"


def tokenizer_threads(threads: int | None) -> None:
    """Bound the tokenizers library's thread pool to `threads` (None: leave it be). The pool (Rust's rayon) reads
    RAYON_NUM_THREADS once, when its first batch starts it: so this is said before any batch, a pool already running
    keeps its size, and a RAYON_NUM_THREADS the user set wins. Without it `--threads 1` bounded torch alone, and
    preparing a corpus took every core of a shared machine."""
    if threads is None:
        return
    from bertkit.train.distributed import MAX_THREADS  # torch's import, paid only when --threads is given

    # the bound torch's threads have (pretrain, finetune): the pool starts every thread it is told to, and
    # `vocab train --threads 100000` spun for minutes on a 2-core machine where --threads 1 took 2 s
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise BertkitError(f"--threads {threads}: expected a whole number of threads, at least 1 and at most "
                           f"{MAX_THREADS}")
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))


@dataclass
class VocabConfig:
    """`bertkit vocab train`: the command's arguments are these fields."""

    files: list[str] = option([], "text files, folders or globs", positional=True)
    out: str = option("", "folder to write vocab.txt and tokenizer.json to", required=True)
    vocab_size: int = option(30522, "vocabulary size, special tokens included")
    cased: bool = option(False, "keep case and accents (default: lower-cased, accents stripped, as bert-base-uncased)")
    min_frequency: int = option(2, "minimum count of a merged piece")
    limit_alphabet: int = option(1000, "most single characters kept")
    format: Literal["auto", "bert", "docs", "jsonl"] = option("auto", "input layout; auto guesses per file")
    text_field: str = option("text", "the text field of JSON lines input")
    threads: int | None = option(None, TOKENIZER_THREADS_HELP)


def vocab_train(config: VocabConfig, show_progress: bool = True) -> Tokenizer:
    """`train_vocab` on the files, folders and globs of `config.files`: the `vocab train` command."""
    tokenizer_threads(config.threads)
    return train_vocab(expand_inputs(config.files), config.out, vocab_size=config.vocab_size,
                       lowercase=not config.cased, min_frequency=config.min_frequency,
                       limit_alphabet=config.limit_alphabet, fmt=config.format, text_field=config.text_field,
                       show_progress=show_progress)


def write_vocab(path: Path, tokens: list[str]) -> None:
    """vocab.txt, a token a line, replaced whole: a full disk is a BertkitError naming it, not a cut file."""
    from bertkit.checkpoint import atomic_write_text

    text = "".join(token + "\n" for token in tokens)
    atomic_write_text(path, text)


def train_vocab(
    files: list[str | Path],
    out_dir: str | Path,
    vocab_size: int = 30522,
    lowercase: bool = True,
    min_frequency: int = 2,
    limit_alphabet: int = 1000,
    fmt: str = "auto",
    text_field: str = "text",
    show_progress: bool = True,
) -> Tokenizer:
    """Train a WordPiece vocabulary on text files, save the tokenizer folder to out_dir and return it.

    The files are read as `prepare` reads them (data/corpus.py: `fmt` and `text_field` as there, gzip known by its
    magic number); the lines it skips (invalid UTF-8, over-long, bad JSON) are skipped here too, with a warning.
    A binary file, a corpus without text, or a vocab_size too small for the special tokens and the corpus's single
    characters (at most limit_alphabet of them), is a BertkitError and nothing is written.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise BertkitError("train_vocab got no files; expected at least one text file")
    # the special tokens and at least one character; more than the trainer's up-front allocation can take is refused
    _check_count("vocab_size", vocab_size, len(SPECIAL_TOKENS) + 1, MAX_VOCAB_SIZE)
    _check_count("min_frequency", min_frequency, 0, 2**32)
    _check_count("limit_alphabet", limit_alphabet, 1, MAX_VOCAB_SIZE)
    for path in paths:
        if not path.is_file():
            raise BertkitError(f"{where(path)}: no such file; expected a text file (plain or .gz) to train on")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BertkitError(f"{where(out_dir)}: a file, not a folder; expected a folder to write the vocabulary to")
    if (out_dir / "config.json").is_file():  # its weights' rows are the old vocabulary's ids: replaced, they'd be lost
        raise BertkitError(f"{where(out_dir)}: holds a model (config.json), whose embeddings belong to its own "
                           "vocabulary; expected a folder of its own for the new vocabulary")

    def train(size: int, specials: list[str], alphabet: list[str]) -> tokenizers.Tokenizer:
        backend = tokenizers.Tokenizer(WordPiece(unk_token="[UNK]", max_input_chars_per_word=MAX_CHARS_PER_WORD))
        backend.normalizer = _bert_normalizer(lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = WordPieceTrainer(vocab_size=size, min_frequency=min_frequency, limit_alphabet=max(1, len(alphabet)),
                                   special_tokens=specials, initial_alphabet=alphabet, continuing_subword_prefix="##",
                                   show_progress=show_progress)
        # in the formats the first pass found; the lines skipped were counted and reported by it
        again = [FileReader(reader.path, reader.fmt, text_field) for reader in readers]
        backend.train_from_iterator(read_sentences(again), trainer=trainer)
        return backend

    # The trainer breaks ties in hash-map order, which changes from run to run (tokenizers issue #1794): between
    # equally frequent characters at the limit_alphabet cut-off, and, as it numbers the "##c" forms of single
    # characters in that order and breaks ties between equally frequent merges by token id, near the vocab_size
    # cut-off. So the vocabulary is built in three steps that leave it no tie to break: the limit_alphabet most
    # frequent characters counted here (ties by character), a first pass given exactly those that learns only their
    # "##c" forms, and the real pass given the characters up front and the "##c" forms as special tokens in sorted
    # order. The vocabulary is then a function of the corpus and the options alone.
    skips = Skips()
    readers = [FileReader(path, fmt, text_field, skips) for path in paths]  # a binary file is refused before reading
    sentences, raw = 0, Counter()
    for batch in read_sentences(readers):
        sentences += len(batch)
        raw.update("".join(batch))
    if skips.total:
        logger.warning("vocabulary training %s", skips.summary())
    if sentences == 0:
        raise BertkitError(f"{', '.join(map(str, paths))}: no line with text; expected a corpus of text to train a "
                           "vocabulary on")
    # what the trainer counts: characters after normalisation, which maps each character on its own
    normalizer, frequency = _bert_normalizer(lowercase), Counter()
    for character, n in raw.items():
        for c in normalizer.normalize_str(character):
            frequency[c] += n
    ranked = sorted((c for c in frequency if not c.isspace()), key=lambda c: (-frequency[c], c))
    characters = sorted(ranked[:limit_alphabet])
    alphabet = sorted(set(train(1, list(SPECIAL_TOKENS), characters).get_vocab()) - set(SPECIAL_TOKENS))
    backend = train(vocab_size, list(SPECIAL_TOKENS) + [t for t in alphabet if t.startswith("##")],
                    [t for t in alphabet if not t.startswith("##")])
    learned = len(backend.get_vocab()) - len(SPECIAL_TOKENS)
    if learned <= 0:
        raise BertkitError(f"{', '.join(map(str, paths))}: no character left after normalisation; expected a corpus "
                           "of text to train a vocabulary on")
    if learned + len(SPECIAL_TOKENS) > vocab_size:  # the trainer keeps its whole alphabet, whatever vocab_size says
        raise BertkitError(
            f"vocab_size {vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and the corpus's single "
            f"characters (with their ## forms) already make {learned + len(SPECIAL_TOKENS)}; expected a vocab_size "
            f"of at least that, or a smaller limit_alphabet (now {limit_alphabet})"
        )
    # Ids in vocab.txt: the special tokens, then every other token sorted, so that they depend on the token set alone
    # (WordPiece matches by string, so the order changes no tokenization).
    tokens = list(SPECIAL_TOKENS) + sorted(set(backend.get_vocab()) - set(SPECIAL_TOKENS))
    # Rebuilt from the written vocab.txt, so a trained tokenizer is the same object a later from_pretrained loads.
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        reason = getattr(e, "strerror", None) or e
        raise BertkitError(f"{where(out_dir)}: cannot create the folder ({reason})") from None
    vocab_file = out_dir / "vocab.txt"
    write_vocab(vocab_file, tokens)
    tokenizer = Tokenizer.from_vocab(vocab_file, lowercase)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
