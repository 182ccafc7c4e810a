"""Inputs longer than a checkpoint was trained on: `bertkit extend` gives an existing BERT folder (any head, bertkit's
or transformers') more learned positions and, optionally, windowed attention, and writes a new model folder.

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

