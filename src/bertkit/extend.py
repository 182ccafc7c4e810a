"""An existing BERT folder (any head, bertkit's or transformers') made bigger, written as a new model folder: more
learned positions for inputs longer than it was trained on (`bertkit extend`), or more tokens for a domain's words
(`bertkit vocab extend`, at the end of this module).

Inputs longer than a checkpoint was trained on: `bertkit extend` gives the folder more learned positions and,
optionally, windowed attention.

Two ways to fill the new position embeddings from the P trained ones:
- copy: position p takes trained position p mod P (Longformer's initialisation). The first P positions are the
  trained ones, so an input of up to P tokens gets exactly the outputs it got before (with full attention, or with
  a window that covers it); beyond P the model sees the same local position pattern again, which attention within
  a window (the window at most P wide) can use as it is, and continued pretraining repairs the rest.
- interpolate: position p takes the trained table linearly interpolated at p * (P - 1) / (L - 1) (position
  interpolation, as LongEmbed applies it to learned absolute positions). Every input changes, short ones included:
  neighbouring tokens now sit a fraction of a trained step apart.

The weights of everything else are unchanged; config.json records `max_position_embeddings`, the
`attention_window` and what was done (`position_extension`). transformers loads the folder as an ordinary BERT
(with full attention: the window is bertkit's).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from bertkit.checkpoint import heads_of, model_folder, read_state_dict, save_pretrained
from bertkit.config import BertConfig, option
from bertkit.errors import BertkitError
from bertkit.train.rundir import make_dir, new_model_folder

logger = logging.getLogger("bertkit")

POSITIONS = "embeddings.position_embeddings.weight"


@dataclass
class ExtendConfig:
    """`bertkit extend`: the CLI's flags are these fields."""

    model_dir: str = option("", "the model folder (or Hub model id) to extend (config.json, weights, tokenizer "
                            "files)", positional=True)
    out: str = option("", "the new model folder", required=True)
    max_length: int = option(4096, "positions of the extended model")
    method: Literal["copy", "interpolate"] = option(
        "copy", "copy: position p takes trained position p mod P (short inputs unchanged); interpolate: the trained "
        "table stretched over the new length (every input changes)")
    attention_window: int = option(512, "each token attends to attention_window / 2 tokens on each side and to the "
                                   "global tokens ([CLS]; for QA the question); 0 keeps full attention (quadratic)")
    overwrite: bool = option(False, "write into --out even when it holds files")


def extend_positions(table: torch.Tensor, length: int, method: str) -> torch.Tensor:
    """(P, H) trained position embeddings -> (length, H)."""
    P = table.shape[0]
    if method == "copy":
        return table[torch.arange(length) % P].clone()
    if method == "interpolate":
        if P == 1:
            return table.expand(length, -1).clone()
        stretched = F.interpolate(table.T[None].float(), size=length, mode="linear", align_corners=True)
        return stretched[0].T.to(table.dtype).contiguous()  # position p at p * (P - 1) / (length - 1)
    raise BertkitError(f"--method {method}: unknown; expected copy or interpolate")


def extend(config: ExtendConfig) -> dict:
    """Write the extended model folder; returns what was done (as config.json's position_extension records it)."""
    source = model_folder(config.model_dir)
    out = new_model_folder(config.out, config.model_dir, config.overwrite, "extended model")
    model_config = BertConfig.load(source)
    trained = model_config.max_position_embeddings
    if not isinstance(config.max_length, int) or config.max_length <= trained:
        raise BertkitError(f"--max-length {config.max_length}; expected more than the model's "
                           f"{trained} positions")
    if config.attention_window < 0 or config.attention_window % 2:
        raise BertkitError(f"--attention-window {config.attention_window}; expected 0 (full attention) or an even "
                           "number of tokens")
    if config.attention_window and model_config.is_decoder:
        raise BertkitError(f"{source}: a left-to-right model (is_decoder); expected --attention-window 0 for it")
    window = config.attention_window
    if window and window // 2 >= config.max_length - 1:
        logger.warning("--attention-window %d reaches every one of the %d positions: attention stays full, its cost "
                       "quadratic in the length (0 says full attention; a window below the length saves)", window,
                       config.max_length)
    elif window > trained and config.method == "copy":
        logger.warning("--attention-window %d is wider than the %d trained positions: with --method copy, tokens %d "
                       "apart in one window share a position embedding (continued pretraining must tell them apart)",
                       window, trained, trained)

    try:  # the extended config checked as config.json is, before the new table is allocated
        dataclasses.replace(model_config, max_position_embeddings=config.max_length)
    except BertkitError as e:
        raise BertkitError(f"--max-length {config.max_length}: {e}") from None

    state = read_state_dict(source)
    keys = [k for k in state if k.endswith(POSITIONS)]
    if len(keys) != 1 or state[keys[0]].shape[0] != trained:
        raise BertkitError(f"{source}: expected one {POSITIONS} of {trained} rows (config.json's "
                           f"max_position_embeddings); found {[(k, tuple(state[k].shape)) for k in keys]}")
    table = state[keys[0]]
    state[keys[0]] = extend_positions(table, config.max_length, config.method)
    record = {"method": config.method, "from": trained, "to": config.max_length}
    model_config.max_position_embeddings = config.max_length
    model_config.attention_window = config.attention_window
    model_config.position_extension = record

    model = _model_for(model_config, source)
    from bertkit.checkpoint import load_state_dict_into

    load_state_dict_into(model, state, source=str(source))
    from bertkit.tokenizer import Tokenizer

    make_dir(out, "--out")
    save_pretrained(model, out, tokenizer=Tokenizer.from_pretrained(source))
    return {**record, "attention_window": config.attention_window, "out": str(out),
            "architecture": type(model).__name__}


def _model_for(config: BertConfig, source: Path):
    """A model of the folder's architecture: transformers' class name in config.json, or, where it names none, the
    one its weights' heads make; a bare encoder would drop them."""
    from bertkit.model import MODEL_CLASSES

    names = config.extra.get("architectures")
    if not names:
        found = heads_of(source)
        names = found.get("architectures", ["BertModel"])
        if "num_labels" in found and config.id2label is None:  # named labels are checked on load
            config.num_labels = found["num_labels"]
    cls = next((MODEL_CLASSES[n] for n in names if n in MODEL_CLASSES), None)
    if cls is None:
        raise BertkitError(f"architecture {', '.join(names)}; expected one of {', '.join(MODEL_CLASSES)}")
    return cls(config)


# ---------------------------------------------------------------------------------------------------------------
# More tokens: a domain's words


@dataclass
class VocabExtendConfig:
    """`bertkit vocab extend`: the CLI's flags are these fields."""

    model_dir: str = option("", "the model folder (or Hub model id) whose vocabulary to extend", positional=True)
    files: list[str] = option([], "the domain's text: files, folders or globs, read as `prepare` reads them",
                              positional=True)
    out: str = option("", "the new model folder", required=True)
    add: int = option(2000, "tokens to add: the most frequent, in the domain's text, of those a WordPiece "
                      "vocabulary trained on it has and the model's lacks")
    domain_vocab_size: int = option(30522, "size of the WordPiece vocabulary trained on the domain's text, where the "
                                    "new tokens come from")
    min_frequency: int = option(2, "minimum count of a merged piece in that training")
    overwrite: bool = option(False, "write into --out even when it holds files")


def domain_tokens(tokenizer, files: list[Path], count: int, domain_vocab_size: int = 30522,
                  min_frequency: int = 2) -> list[tuple[str, int]]:
    """The `count` tokens the tokenizer's vocabulary lacks that a WordPiece vocabulary trained on the files uses
    most, as (token, times used in the files); ties by token."""
    import tempfile
    from collections import Counter

    from bertkit.data.corpus import FileReader
    from bertkit.tokenizer import SPECIAL_TOKENS, read_sentences, train_vocab

    with tempfile.TemporaryDirectory() as folder:
        domain = train_vocab(files, folder, vocab_size=domain_vocab_size, lowercase=tokenizer.lowercase,
                             min_frequency=min_frequency, show_progress=False)
    used: Counter = Counter()
    for batch in read_sentences([FileReader(path) for path in files]):
        used.update(token for e in domain.backend.encode_batch(batch, add_special_tokens=False) for token in e.tokens)
    known = set(tokenizer.vocab()) | set(SPECIAL_TOKENS)
    return sorted(((t, n) for t, n in used.items() if t not in known), key=lambda tn: (-tn[1], tn[0]))[:count]


def new_rows(table: torch.Tensor, tokenizer, tokens: list[str]) -> torch.Tensor:
    """A row per new token: the mean of the rows of the pieces the old tokenizer splits it into (a "##" piece's
    characters split as a word; characters it does not know are [UNK], whose row is what the model saw for them)."""
    rows = []
    for token in tokens:
        ids = tokenizer.backend.encode(token.removeprefix("##"), add_special_tokens=False).ids or [tokenizer.unk_id]
        rows.append(table[ids].float().mean(0))
    return torch.stack(rows).to(table.dtype)


def vocab_extend(config: VocabExtendConfig) -> dict:
    """Write the model folder with the domain's tokens appended to its vocabulary (the old tokens keep their ids,
    so text that none of the new tokens matches is encoded and run exactly as before); returns what was done."""
    from bertkit.checkpoint import load_state_dict_into
    from bertkit.data.corpus import expand_inputs
    from bertkit.tokenizer import Tokenizer, write_vocab

    source = model_folder(config.model_dir)
    out = new_model_folder(config.out, config.model_dir, config.overwrite, "extended model")
    if isinstance(config.add, bool) or not isinstance(config.add, int) or not 1 <= config.add <= 1_000_000:
        raise BertkitError(f"--add {config.add!r}; expected a whole number of tokens from 1 to 1,000,000")
    files = expand_inputs(config.files)
    model_config = BertConfig.load(source)
    tokenizer = Tokenizer.from_pretrained(source)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise BertkitError(f"{source}: the tokenizer has {tokenizer.vocab_size:,} tokens, more than config.json's "
                           f"vocab_size {model_config.vocab_size:,}; expected the model's own tokenizer files")
    found = domain_tokens(tokenizer, files, config.add, config.domain_vocab_size, config.min_frequency)
    if not found:
        raise BertkitError(f"{', '.join(map(str, files))}: no token that the model's vocabulary lacks; expected a "
                           "domain's text whose words it splits")
    tokens = [t for t, _ in found]
    first = tokenizer.vocab_size  # a table padded past the tokenizer (NVIDIA's 30,528 rows) has its spare rows reused
    size = max(model_config.vocab_size, first + len(tokens))
    state = read_state_dict(source)
    for key in [k for k in state if k.endswith(("word_embeddings.weight", "predictions.decoder.weight",
                                                 "predictions.bias", "predictions.decoder.bias"))]:
        old = state[key]
        if old.shape[0] != model_config.vocab_size:
            raise BertkitError(f"{source}: {key} has {old.shape[0]:,} rows; expected config.json's vocab_size "
                               f"{model_config.vocab_size:,}")
        grown = torch.cat([old, old.new_zeros(size - old.shape[0], *old.shape[1:])])
        grown[first:first + len(tokens)] = new_rows(old[:first], tokenizer, tokens)
        state[key] = grown
    record = {"added": len(tokens), "from": tokenizer.vocab_size, "to": first + len(tokens),
              "corpus": [str(f) for f in files]}
    model_config.vocab_size = size
    model_config.extra["vocab_extension"] = record
    model = _model_for(model_config, source)
    load_state_dict_into(model, state, source=str(source))
    make_dir(out, "--out")
    write_vocab(out / "vocab.txt", tokenizer.vocab() + tokens)
    extended = Tokenizer.from_vocab(out / "vocab.txt", lowercase=tokenizer.lowercase)
    save_pretrained(model, out, tokenizer=extended)
    return record | {"out": str(out), "architecture": type(model).__name__, "tokens": found}
