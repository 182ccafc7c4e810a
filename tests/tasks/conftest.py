"""Tiny random models with a real or a written vocabulary, for fine-tuning runs that take seconds."""

import pytest
import torch

from bertkit import BertModel, Tokenizer
from tiny_folders import tiny_config
from conftest import data_path

WORDS = "the movie film good bad great awful boring fun is was not very and of it to".split()


def save_tiny_model(directory, tokenizer) -> str:
    """A 2-layer, 32-wide encoder (random weights, seeded) with the tokenizer, as a pretrained folder."""
    torch.manual_seed(0)
    config = tiny_config(tokenizer.vocab_size)
    BertModel(config).save_pretrained(directory, tokenizer=tokenizer)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny encoder with all-MiniLM-L6-v2's real 30k vocabulary (skips without the shared data)."""
    tokenizer = Tokenizer.from_pretrained(data_path("checkpoints", "all-MiniLM-L6-v2"))
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory):
    """The tiny encoder with a written 80-token vocabulary: needs no data."""
    directory = tmp_path_factory.mktemp("toy")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", *letters, *("##" + c for c in letters), *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return save_tiny_model(directory, Tokenizer.from_vocab(directory / "vocab.txt"))
