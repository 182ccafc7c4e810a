"""Filling in [MASK]: what a pretrained model's masked-LM head puts in each masked position of a text, the first
thing to ask of a model just pretrained (`bertkit predict` on a pretraining folder; transformers' fill-mask
pipeline gives the same tokens and probabilities)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bertkit.data.batching import collate, sorted_batches
from bertkit.errors import BertkitError
from bertkit.tasks.classification import TextExample, is_blank
from bertkit.tasks.inference import check_segments, to_device


def check_fill_mask(model_config, model_dir, top_k: int, vocab_size: int) -> None:
    """Refuse a left-to-right model (it predicts the next token, not a masked one) and a --top-k out of range."""
    if model_config.is_decoder:
        raise BertkitError(f"{model_dir}/config.json: is_decoder (a left-to-right model predicts the next token); "
                           "filling in [MASK] needs a bidirectional masked-LM model")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size:
        raise BertkitError(f"--top-k {top_k!r}; expected a whole number of tokens from 1 to the vocabulary's "
                           f"{vocab_size:,}")


@torch.no_grad()
def fill_masks(model, tokenizer, examples: Sequence[TextExample], max_length: int, batch_size: int,
               device: torch.device, top_k: int = 5) -> list[dict]:
    """Per example, in order: each [MASK]'s `top_k` tokens with their probabilities (`masks`, one list per mask, in
    the text's order) and the text with every mask replaced by its first token (`filled`, as the tokenizer decodes
    it: normalised, pieces joined). Every mask is predicted from the same input, all of them masked, as the
    fill-mask pipeline does. A blank example, or one with no [MASK] (or none left within `max_length`), gets
    masks and filled None and an "error"."""
    model.eval()
    rows = {i: tokenizer.encode(e.text_a, e.text_b, max_length) for i, e in enumerate(examples) if not is_blank(e)}
    check_segments(model.config, list(rows.values()))
    mask = tokenizer.mask_id
    rows = {i: r for i, r in rows.items() if mask in r["input_ids"]}
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    order = list(rows)
    for batch_rows in sorted_batches([len(rows[i]["input_ids"]) for i in order], batch_size):
        indices = [order[k] for k in batch_rows]
        batch = to_device(collate([{k: rows[i][k] for k in ("input_ids", "token_type_ids")} for i in indices],
                                  tokenizer.pad_id), device)
        masked = batch["input_ids"] == mask
        logits = model(**batch, masked_positions=masked).prediction_logits.float()  # (M, V), row-major order
        probabilities, ids = torch.softmax(logits, -1).topk(top_k, -1)
        counts = masked.sum(1).tolist()
        for i, p, t in zip(indices, probabilities.cpu().split(counts), ids.cpu().split(counts)):
            found[i] = (p, t)
    token = tokenizer.backend.id_to_token
    results = []
    for i, example in enumerate(examples):
        text = {"text": example.text_a} | ({"pair": example.text_b} if example.text_b is not None else {})
        if i not in found:
            error = ("blank line: no text to fill" if is_blank(example) else
                     f"no [MASK] to fill{' within --max-length ' + str(max_length) if max_length else ''}; "
                     "expected a text with [MASK] where a token is to be predicted")
            results.append(text | {"masks": None, "filled": None, "error": error})
            continue
        probabilities, ids = found[i]
        filled = list(rows[i]["input_ids"])
        for position, first in zip([k for k, t in enumerate(filled) if t == mask], ids[:, 0].tolist()):
            filled[position] = first
        masks = [[{"token": token(t), "probability": p} for t, p in zip(row_ids.tolist(), row_p.tolist())]
                 for row_ids, row_p in zip(ids, probabilities)]
        results.append(text | {"masks": masks, "filled": tokenizer.decode(filled)})
    return results
