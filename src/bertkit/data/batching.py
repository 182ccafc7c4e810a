"""Fine-tuning batches: length-grouped order and dynamic padding, so a batch costs what its real tokens cost."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Rows that are padded to the longest of the batch; the other keys hold one number per example.
SEQUENCE_KEYS = ("input_ids", "token_type_ids")


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, group_batches: int = 50, epoch: int = 0
) -> list[list[int]]:
    """Every index once, in batches of similar length: shuffle, sort within chunks of `group_batches` batches,
    cut into batches, then shuffle the batches.

    Sorting only inside large random chunks keeps the order random (a batch's examples come from anywhere in
    the data) while padding all but vanishes; the final shuffle stops the model seeing lengths in sequence.
    The same (seed, epoch) gives the same order, and any other pair another one: seed + epoch would have given
    seed 1's second epoch the order of seed 2's first, so a suite's seeds would share most of their orders.
    """
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * group_batches
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: lengths[i], reverse=True)
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# Evaluation batches hold at most this many padded tokens (128 rows of 512), so that inputs of thousands of tokens
# come in fewer rows a batch instead of in one batch the size of 128 x their length.
EVAL_TOKENS = 128 * 512


def sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = EVAL_TOKENS) -> list[list[int]]:
    """Evaluation batches: every index once, longest first, so padding is minimal; callers restore the order. A
    batch has at most `batch_size` rows and at most `max_tokens` tokens once padded (one row at the least)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, i = [], 0
    while i < len(order):
        rows = max(1, min(batch_size, max_tokens // max(lengths[order[i]], 1)))  # the first row is the longest
        batches.append(order[i : i + rows])
        i += rows
    return batches


def bucketed(length: int, multiple: int, limit: int | None = None) -> int:
    """Length bucketing: `length` rounded up to a multiple of `multiple` (not past `limit`, and never below `length`),
    so that batches come in a few shapes, which compiled graphs and CUDA graphs reuse; the padding is masked."""
    rounded = -(-length // multiple) * multiple if multiple > 1 else length
    return max(length, min(rounded, limit)) if limit else rounded


def row_length(row: dict) -> int:
    """A row's tokens: its length, or a multiple-choice row's longest choice (its ids are one list per choice)."""
    ids = row["input_ids"]
    return max(map(len, ids)) if ids and isinstance(ids[0], list) else len(ids)


def _collate_choices(rows: Sequence[dict], pad_id: int, longest: int) -> dict[str, torch.Tensor]:
    """Multiple-choice rows, (choices, tokens) each, padded to (B, choices, longest); the labels stacked."""
    batch = {}
    for key, fill in (("input_ids", pad_id), ("token_type_ids", 0)):
        batch[key] = torch.tensor([[ids + [fill] * (longest - len(ids)) for ids in row[key]] for row in rows])
    batch["attention_mask"] = torch.tensor([[[1] * len(ids) + [0] * (longest - len(ids)) for ids in row["input_ids"]]
                                            for row in rows])
    if "labels" in rows[0]:
        batch["labels"] = torch.tensor([row["labels"] for row in rows])
    return batch


def collate(rows: Sequence[dict], pad_id: int, pad_to_multiple_of: int = 1,
            limit: int | None = None) -> dict[str, torch.Tensor]:
    """Pad `input_ids`/`token_type_ids` (and per-token labels, with -100) to the batch's longest row (rounded up to
    `pad_to_multiple_of`, not past `limit`), add `attention_mask`, stack the other labels. Multiple-choice rows
    (a list of ids per choice) become (B, choices, T)."""
    longest = bucketed(max(row_length(row) for row in rows), pad_to_multiple_of, limit)
    if isinstance(rows[0]["input_ids"][0], list):
        return _collate_choices(rows, pad_id, longest)
    batch = {}
    for key in rows[0]:
        if key in SEQUENCE_KEYS or isinstance(rows[0][key], list):  # a tagger's labels: one per token, -100 ignored
            fill = {"input_ids": pad_id, "labels": -100}.get(key, 0)
            batch[key] = torch.tensor([row[key] + [fill] * (longest - len(row[key])) for row in rows])
        else:  # one label per row: an index, a score, a multi-label row's tuple of 0/1 per label, or a teacher's logits
            values = [row[key] for row in rows]
            first = values[0][0] if isinstance(values[0], tuple) and values[0] else values[0]  # tuples: per label
            batch[key] = torch.tensor(values, dtype=torch.float if isinstance(first, float) else torch.long)
    batch["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (longest - len(r["input_ids"])) for r in rows])
    return batch
