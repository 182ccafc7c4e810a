"""Held-out masked-LM loss and perplexity of a model folder at a chosen length (`bertkit perplexity`), and of the
same text read in shorter pieces: the measure of what a longer context buys a model extended by `bertkit extend`.

The examples are the prepared corpus's held-out split, built at --max-length with the MLM objective and the
paper's masking (15%, 80/10/10, drawn from --seed), and the first --batches x --batch-size of them are scored, so
two models are scored on the same tokens whenever they share the vocabulary, the length, the seed and that count;
another length or seed cuts and draws other examples (lengths are compared on the same tokens with --pieces).
With --pieces P each example is also cut into pieces of P tokens ([CLS] and [SEP] around P - 2 of its tokens, as
a 512-token model reads a long text) with the same masked tokens in the same places, so the two losses differ only
in how much of the text each prediction could see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bertkit.checkpoint import model_folder, normalize_keys, weight_shapes
from bertkit.config import BertConfig, option
from bertkit.errors import BertkitError

IGNORE = -100


@dataclass
class PerplexityConfig:
    """`bertkit perplexity`: the CLI's flags are these fields."""

    model_dir: str = option("", "a model folder with a masked-LM head (a pretraining checkpoint, or its extension)",
                            positional=True)
    data: str = option("", "a prepared corpus (`bertkit prepare`) made with the model's vocabulary; its held-out "
                       "split is scored", required=True)
    max_length: int = option(512, "tokens per example")
    pieces: int | None = option(None, "also score the same examples read in pieces of this many tokens (e.g. 512)")
    batch_size: int = option(4, "examples per forward pass; with --batches, how many are scored")
    batches: int = option(20, "held-out batches scored: the first --batches x --batch-size examples (the same ones for "
                          "every model at one --max-length and --seed; a smaller --batch-size scores fewer)")
    seed: int = option(0, "seed of the masking")
    threads: int | None = option(None, "CPU threads for torch (default: the cores the load average leaves idle)")


def cut_into_pieces(batch: dict[str, torch.Tensor], size: int, cls_id: int, sep_id: int, pad_id: int) -> dict:
    """(B, T) examples `[CLS] tokens [SEP]` -> pieces `[CLS] size-2 of the tokens [SEP]`, their labels moved with
    them, padded to the longest piece."""
    if size < 3:
        raise BertkitError(f"--pieces {size}; expected at least 3 tokens ([CLS], one token, [SEP])")
    pieces = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        inner, inner_labels = ids[1:n - 1], labels[1:n - 1]
        for start in range(0, len(inner), size - 2):
            piece = inner[start:start + size - 2]
            piece_labels = inner_labels[start:start + size - 2]
            pieces.append((torch.cat([ids.new_tensor([cls_id]), piece, ids.new_tensor([sep_id])]),
                           torch.cat([labels.new_tensor([IGNORE]), piece_labels, labels.new_tensor([IGNORE])])))
    longest = max(len(p) for p, _ in pieces)
    out = {"input_ids": torch.full((len(pieces), longest), pad_id), "labels": torch.full((len(pieces), longest), IGNORE),
           "attention_mask": torch.zeros(len(pieces), longest, dtype=torch.long)}
    for row, (piece, piece_labels) in enumerate(pieces):
        out["input_ids"][row, :len(piece)] = piece
        out["labels"][row, :len(piece)] = piece_labels
        out["attention_mask"][row, :len(piece)] = 1
    out["token_type_ids"] = torch.zeros_like(out["input_ids"])
    return out


@torch.no_grad()
def _score(model, batch: dict, batch_size: int) -> tuple[float, int, int]:
    """Summed loss, correct predictions and count over the masked positions, batch_size rows at a time (on the
    model's device)."""
    device = next(model.parameters()).device
    loss, correct, count = 0.0, 0, 0
    for start in range(0, len(batch["input_ids"]), batch_size):
        rows = {k: v[start:start + batch_size].to(device) for k, v in batch.items()}
        masked = rows["labels"] != IGNORE
        if not bool(masked.any()):
            continue
        logits = model(rows["input_ids"], rows["token_type_ids"], rows["attention_mask"],
                       masked_positions=masked).prediction_logits  # (M, V)
        targets = rows["labels"][masked]
        loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        count += int(targets.numel())
    return loss, correct, count


def masked_lm_scores(model, batch: dict, batch_size: int, data: str = "the corpus") -> dict:
    """masked_lm_loss, perplexity, accuracy and the number of masked tokens of `model` (a masked-LM or pretraining
    model) on the batch (`held_out_examples` of `data`)."""
    loss, correct, n = _score(model, batch, batch_size)
    if n == 0:
        raise BertkitError(f"{data}: no masked tokens in {len(batch['input_ids'])} held-out examples; expected more "
                           "--batches")
    return {"masked_lm_loss": loss / n, "perplexity": math.exp(loss / n), "accuracy": correct / n, "masked_tokens": n}


def check_masked_lm(directory, model_config: BertConfig) -> None:
    """Refuse a folder without a masked-LM head, or a left-to-right one."""
    # the names as the model loads them (NVIDIA's call the head's dense layer `dense_act`), a pytorch_model.bin's
    # too, so that its missing head is refused, not initialised
    names = set(normalize_keys(weight_shapes(directory), model_config))
    if not any(k.endswith("cls.predictions.transform.dense.weight") for k in names):
        raise BertkitError(f"{directory}: no masked-LM head (cls.predictions); expected a pretraining checkpoint or "
                           "a model saved with its MLM head")
    if model_config.is_decoder:  # its causal mask hides the right context a masked token is predicted from
        raise BertkitError(f"{directory}: a left-to-right model (is_decoder); a masked-LM score needs a bidirectional "
                           "one (its own next-token evaluation is in its run's eval.csv)")


def held_out_examples(data, tokenizer, max_length: int, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The first `count` examples of a prepared corpus's held-out split at `max_length`, masked as the paper masks
    (15%, 80/10/10, drawn from `seed`), as one collated batch."""
    from bertkit.data.pretraining import PretrainingDataset
    from bertkit.data.shards import PreparedCorpus

    dataset = PretrainingDataset(PreparedCorpus(data, "heldout"), tokenizer, max_length=max_length, objective="mlm",
                                 masking="token", mask_prob=0.15, seed=seed)
    dataset.set_epoch(0)
    return dataset.collate([dataset[i] for i in range(min(count, len(dataset)))])


def perplexity(config: PerplexityConfig) -> dict:
    """{"whole": ..., and with --pieces "pieces": ...}, each with masked_lm_loss, perplexity, accuracy and the
    number of masked tokens scored."""
    from bertkit.train.distributed import torch_threads

    with torch_threads(config.threads):
        return _perplexity(config)


def _perplexity(config: PerplexityConfig) -> dict:
    from bertkit.model import BertForMaskedLM
    from bertkit.tasks.inference import check_tokenizer
    from bertkit.tokenizer import Tokenizer

    directory = model_folder(config.model_dir)
    model_config = BertConfig.load(directory)
    check_masked_lm(directory, model_config)
    for name in ("max_length", "batch_size", "batches"):
        if getattr(config, name) < 1:
            raise BertkitError(f"--{name.replace('_', '-')} {getattr(config, name)}; expected a positive number")
    tokenizer = Tokenizer.from_pretrained(directory)
    check_tokenizer(tokenizer, model_config, directory)  # its extra ids would index past the embeddings
    model = BertForMaskedLM.from_pretrained(directory).eval()
    if config.max_length > model.config.max_position_embeddings:
        raise BertkitError(f"--max-length {config.max_length}; expected at most the model's "
                           f"{model.config.max_position_embeddings} positions (`bertkit extend` gives it more)")
    examples = held_out_examples(config.data, tokenizer, config.max_length, config.batches * config.batch_size,
                                 config.seed)
    results = {}
    ways = [("whole", examples)]
    if config.pieces is not None:  # --pieces 0 is refused by cut_into_pieces, not taken for "not given"
        ways.append(("pieces", cut_into_pieces(examples, config.pieces, tokenizer.cls_id, tokenizer.sep_id,
                                               tokenizer.pad_id)))
    for name, batch in ways:
        scores = masked_lm_scores(model, batch, config.batch_size, config.data)
        results[name] = {**scores, "sequences": len(batch["input_ids"]),
                         "tokens_per_sequence": float(batch["attention_mask"].sum(1).float().mean())}
    return results
