"""The tests' tiny model: `tiny_config` (2 layers, 32 wide, 2 heads) and tiny fine-tuned model folders (random
weights, seeded, a written vocabulary) for the int8, export and serve tests.

The weights are scaled up from BERT's initialisation so that the outputs vary with the input: at std 0.02 a
2-layer, 32-wide model gives nearly the same logits for every text, and a test comparing two computations of
them would pass for a computation that ignored the text.
"""

from __future__ import annotations

import torch

from bertkit import BertConfig, BertForSequenceClassification, Tokenizer

WORDS = ("the movie film good bad great awful boring fun is was not very and of it to who what where when did "
         "an in on at by signed treaty company profit rose".split())


def tiny_config(vocab_size: int = 100, **overrides) -> BertConfig:
    """The tests' tiny BERT: 2 layers, hidden 32, 2 heads, feed-forward 64 (overrides: any BertConfig field)."""
    return BertConfig(**{"vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "intermediate_size": 64, **overrides})


def varied(model):
    """`model` with its matrices scaled 10x (std 0.2 instead of 0.02), so that its outputs vary with the input (see
    the module docstring); returns it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "LayerNorm" not in name:
                p.mul_(10)
    return model


def left_padded(ids: torch.Tensor, pads: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention_mask, position_ids) for `ids` with `pads[row]` padding positions on the left of those rows, the
    real tokens at positions 0, 1, ... as when the row is alone."""
    mask = torch.ones_like(ids)
    for row, n in pads.items():
        mask[row, :n] = 0
    return mask, (mask.cumsum(1) - 1).clamp(min=0)


def tokenizer_in(directory) -> Tokenizer:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "?", "%", *letters, *("##" + c for c in letters),
             *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return Tokenizer.from_vocab(directory / "vocab.txt")


def save_tiny(directory, cls=BertForSequenceClassification, num_labels: int = 2, seed: int = 0) -> str:
    """A 2-layer, 32-wide `cls` with its tokenizer; classifiers get labels neg/pos (or more, or one: regression)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_in(directory)
    torch.manual_seed(seed)
    labels = {0: "neg", 1: "pos"} if num_labels == 2 else {i: f"class{i}" for i in range(num_labels)}
    config = tiny_config(tokenizer.vocab_size, max_position_embeddings=128,
                         **({"id2label": labels} if cls is BertForSequenceClassification and num_labels > 1 else {}),
                         **({"num_labels": 1} if num_labels == 1 else {}))
    varied(cls(config)).save_pretrained(directory, tokenizer=tokenizer)
    return str(directory)

