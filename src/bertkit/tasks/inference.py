"""Run a model over encoded rows without gradients, in length-sorted batches, and put the outputs back in order."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bertkit.data.batching import collate, row_length, sorted_batches
from bertkit.errors import BertkitError


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def check_segments(config, rows: Sequence[dict]) -> None:
    """Refuse sentence B (segment id 1) for a model with one segment embedding, which would index past its table."""
    def second_segment(types: list) -> bool:  # a multiple-choice row holds a list of segment ids per choice
        return any(map(second_segment, types)) if types and isinstance(types[0], list) else max(types, default=0) > 0

    if config.type_vocab_size < 2 and any(second_segment(r["token_type_ids"]) for r in rows):
        raise BertkitError("the model has one segment embedding (type_vocab_size 1), so it reads single texts; the "
                           "input has sentence pairs (or a question with its context), which need type_vocab_size 2")


def check_tokenizer(tokenizer, config, model_dir) -> None:
    """Refuse a folder whose tokenizer has more tokens than the model has embeddings: its extra ids index past the
    embedding table, an IndexError deep in torch on the first text that holds one of them."""
    if tokenizer.vocab_size > config.vocab_size:
        raise BertkitError(f"{model_dir}: the tokenizer has {tokenizer.vocab_size:,} tokens, more than config.json's "
                           f"vocab_size {config.vocab_size:,}; expected the model's own tokenizer files (vocab.txt, "
                           "tokenizer.json) in its folder")


@torch.no_grad()
def infer(
    model, rows: Sequence[dict], batch_size: int, pad_id: int, device: torch.device, outputs: tuple[str, ...],
    width: int | None = None,
) -> dict[str, torch.Tensor]:
    """The named outputs for every row, in the rows' order, on the CPU.

    Per-token outputs, (B, T) or (B, T, C), of different batches are padded to `width` positions with the lowest
    float, the value the QA head gives padding, so they stack into one (N, width) or (N, width, C) tensor.
    """
    from bertkit.train.logs import progress_bar

    check_segments(model.config, rows)
    model.eval()
    lengths = [row_length(r) for r in rows]
    results: dict[str, list] = {name: [None] * len(rows) for name in outputs}
    # a bar for long work only (SQuAD's dev set, a big predict file): not for a served batch or a GLUE dev set
    with progress_bar(total=len(rows), desc="inference", unit="row", leave=False, disable=len(rows) < 4096) as bar:
        for indices in sorted_batches(lengths, batch_size):
            batch = collate([{k: rows[i][k] for k in ("input_ids", "token_type_ids")} for i in indices], pad_id)
            out = model(**to_device(batch, device))
            for name in outputs:
                values = out[name].float().cpu()
                if width is not None and values.ndim >= 2:  # (B, T) or a tagger's (B, T, labels): T padded
                    padding = (0, 0) * (values.ndim - 2) + (0, width - values.shape[1])
                    values = torch.nn.functional.pad(values, padding, value=torch.finfo(values.dtype).min)
                for i, v in zip(indices, values):
                    results[name][i] = v
            bar.update(len(indices))
    return {name: torch.stack(values) for name, values in results.items()}
