"""Length-grouped batches and dynamic padding."""

import random

import torch

from bertkit.data.batching import bucketed, collate, length_grouped_batches, sorted_batches


def lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.randint(3, 128) for _ in range(n)]


def test_every_example_once_per_epoch():
    sizes = lengths()
    batches = length_grouped_batches(sizes, 32, seed=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(sizes)))
    assert sorted(map(len, batches)) == [1000 % 32] + [32] * (1000 // 32)  # one chunk, so one short batch


def test_batches_have_similar_lengths_and_cost_little_padding():
    sizes = lengths()

    def padding(batches):
        return sum(max(sizes[i] for i in b) * len(b) - sum(sizes[i] for i in b) for b in batches) / sum(sizes)

    grouped = length_grouped_batches(sizes, 32, seed=1)
    order = list(range(len(sizes)))
    random.Random(1).shuffle(order)
    shuffled = [order[i : i + 32] for i in range(0, len(order), 32)]
    assert padding(grouped) < 0.05 < 0.5 < padding(shuffled)
    spreads = [max(sizes[i] for i in b) - min(sizes[i] for i in b) for b in grouped]
    assert max(spreads) <= 10


def test_seeded_order_repeats_and_differs_by_seed():
    sizes = lengths()
    first = length_grouped_batches(sizes, 16, seed=7)
    assert first == length_grouped_batches(sizes, 16, seed=7)
    assert first != length_grouped_batches(sizes, 16, seed=8)
    # the next epoch of one seed is not the first of the next seed (seed + epoch had made them equal)
    assert length_grouped_batches(sizes, 16, seed=7, epoch=1) not in (first, length_grouped_batches(sizes, 16, seed=8))
    # batches come in a random order, not longest first
    maxima = [max(sizes[i] for i in b) for b in first]
    assert maxima != sorted(maxima, reverse=True)


def test_sorted_batches_cover_everything_longest_first():
    sizes = [5, 9, 2, 9, 7]
    batches = sorted_batches(sizes, 2)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert [sizes[b[0]] for b in batches] == [9, 7, 2]


def test_sorted_batches_hold_a_token_budget():
    """Long inputs come in fewer rows a batch: at most max_tokens padded tokens, and never an empty batch."""
    sizes = [4096, 4096, 4096, 300, 300, 300, 10, 9000]
    batches = sorted_batches(sizes, 128, max_tokens=8192)
    assert batches == [[7], [0, 1], [2, 3], [4, 5, 6]]
    assert all(len(b) * max(sizes[i] for i in b) <= 8192 or len(b) == 1 for b in batches)
    assert sorted_batches([512] * 300, 128) == [list(range(i, min(i + 128, 300))) for i in range(0, 300, 128)]


def test_collate_pads_to_the_longest_row():
    rows = [{"input_ids": [2, 7, 3], "token_type_ids": [0, 0, 0], "labels": 1},
            {"input_ids": [2, 3], "token_type_ids": [0, 0], "labels": 0}]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 7, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].dtype == torch.long
    regression = collate([{"input_ids": [2], "token_type_ids": [0], "labels": 0.5}], pad_id=0)
    assert regression["labels"].dtype == torch.float


def test_length_bucketing_rounds_up_to_the_multiple_within_the_limit():
    assert [bucketed(n, 16) for n in (1, 16, 17, 33)] == [16, 16, 32, 48]
    assert bucketed(120, 64, limit=128) == 128 and bucketed(100, 64, limit=110) == 110  # never past the limit
    assert bucketed(130, 64, limit=128) == 130  # nor below the length itself
    assert bucketed(7, 1) == 7
    rows = [{"input_ids": [2, 7, 3], "token_type_ids": [0, 0, 0], "labels": 1}]
    batch = collate(rows, pad_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].tolist() == [[2, 7, 3, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]] and batch["labels"].tolist() == [1]
