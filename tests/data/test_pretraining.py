"""Pretraining examples: masking rates, whole words and spans, sentence labels, layout, determinism, batching."""

import itertools
import pickle
import random
import re

import numpy as np
import pytest
import torch

from bertkit.data.corpus import FileReader
from bertkit.data.prepare import prepare
from bertkit.data.shards import PreparedCorpus
from bertkit.data.pretraining import (
    IGNORE_INDEX,
    PretrainingDataset,
    _truncate,
    masking_statistics,
    truncated_lengths,
)
from bertkit.errors import BertkitError
from bertkit.tokenizer import Tokenizer
from conftest import data_path

SAMPLE = 2500  # examples: over 200k selectable tokens, so a 0.3% tolerance is several standard deviations


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(data_path("checkpoints", "all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    """The first 2000 documents of the Python docs corpus (about 420k tokens), prepared once for this module."""
    folder = tmp_path_factory.mktemp("prepared")
    documents = itertools.islice(FileReader(data_path("corpus", "python-docs-3.11.txt")), 2000)
    source = folder / "slice.txt"
    source.write_text("\n\n".join("\n".join(d) for d in documents) + "\n", encoding="utf-8")
    prepare([str(source)], tokenizer, folder / "out", progress=False)
    return PreparedCorpus(folder / "out")


def originals(example):
    """The input ids before masking."""
    selected = example["labels"] != IGNORE_INDEX
    return np.where(selected, example["labels"], example["input_ids"]), selected


def word_runs(dataset, n):
    """Lengths, in whole words, of the runs of consecutive predicted positions in the first n examples."""
    runs = []
    for index in range(n):
        original, selected = originals(dataset[index])
        word_start = ~dataset.vocab.continuation[original]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], selected.astype(np.int8), [0]])))
        for start, end in zip(edges[::2], edges[1::2]):
            runs.append(int(word_start[start:end].sum()) + (not word_start[start]))
    return np.bincount(runs)


@pytest.mark.parametrize("masking, rate_tolerance, mask_prob", [("token", 0.003, 0.15), ("span", 0.003, 0.15),
                                                              ("wwm", 0.005, 0.15), ("token", 0.003, 0.3)])
def test_masking_rates(corpus, tokenizer, masking, rate_tolerance, mask_prob):
    dataset = PretrainingDataset(corpus, tokenizer, masking=masking, mask_prob=mask_prob)
    stats = masking_statistics(dataset, SAMPLE)
    rates = stats.rates()
    assert stats.selectable >= 200_000
    assert abs(rates["selected"] - mask_prob) <= rate_tolerance
    assert abs(rates["masked"] - 0.8) <= 0.01
    assert abs(rates["replaced"] - 0.1) <= 0.01
    assert abs(rates["kept"] - 0.1) <= 0.01


@pytest.mark.parametrize("mix", [(100, 0, 0), (80, 0, 20), (80, 20, 0), (0, 20, 80), (0, 0, 100)])
def test_each_masking_mix_produces_its_proportions(corpus, tokenizer, mix):
    """The paper's appendix C.2 mixes: [MASK] / unchanged / random among the chosen tokens. A random token is
    drawn from the whole vocabulary, so about 1 in 30k of them is the original: counted as unchanged."""
    dataset = PretrainingDataset(corpus, tokenizer, mask_mix=mix)
    rates = masking_statistics(dataset, 1000).rates()
    assert abs(rates["selected"] - 0.15) <= 0.005
    for name, want in zip(("masked", "kept", "replaced"), mix):
        assert abs(rates[name] - want / 100) <= 0.012, (name, rates[name], want)
    assert (rates["masked"] == 0) == (mix[0] == 0) and (rates["replaced"] == 0) == (mix[2] == 0)


@pytest.mark.parametrize("mix", [(80, 10), (80, 10, 5), (90, 20, -10), (80.5, 9.5, 10)])
def test_a_masking_mix_that_is_not_three_percentages_is_refused(corpus, tokenizer, mix):
    with pytest.raises(BertkitError, match="expected three whole percentages"):
        PretrainingDataset(corpus, tokenizer, mask_mix=mix)


def test_left_to_right_examples_label_every_next_token_and_mask_nothing(corpus, tokenizer):
    dataset = PretrainingDataset(corpus, tokenizer, objective="ltr")
    for index in range(50):
        example = dataset[index]
        ids, labels = example["input_ids"], example["labels"]
        assert ids[0] == dataset.vocab.cls_id and ids[-1] == dataset.vocab.sep_id
        assert dataset.vocab.mask_id not in ids and "next_sentence_label" not in example
        assert (labels[:-1] == ids[1:]).all() and labels[-1] == IGNORE_INDEX


@pytest.mark.parametrize("masking", ["token", "wwm", "span"])
def test_never_special_never_over_cap(corpus, tokenizer, masking):
    dataset = PretrainingDataset(corpus, tokenizer, masking=masking, max_length=64)
    assert dataset.max_predictions == 10  # ceil(64 * 0.15)
    for index in range(300):
        example = dataset[index]
        original, selected = originals(example)
        assert not dataset.vocab.special[original[selected]].any()
        assert 1 <= selected.sum() <= dataset.max_predictions
        replaced = selected & (example["input_ids"] != dataset.vocab.mask_id) & (example["input_ids"] != original)
        assert not dataset.vocab.special[example["input_ids"][replaced]].any()  # random tokens are never special


def split_words(dataset, n):
    """How many whole words in the first n examples were predicted only in part."""
    split = 0
    for index in range(n):
        original, selected = originals(dataset[index])
        # position p continues the word at p - 1 when it is a '##' piece after a non-special token
        joined = dataset.vocab.continuation[original[1:]] & ~dataset.vocab.special[original[:-1]]
        split += int((selected[1:] != selected[:-1])[joined].sum())
    return split


def test_whole_word_masking_never_splits_a_word(corpus, tokenizer):
    assert split_words(PretrainingDataset(corpus, tokenizer, masking="wwm"), 600) == 0
    assert split_words(PretrainingDataset(corpus, tokenizer, masking="span"), 600) == 0
    assert split_words(PretrainingDataset(corpus, tokenizer, masking="token"), 600) > 30  # the check can fail


def test_span_lengths_roughly_geometric(corpus, tokenizer):
    counts = word_runs(PretrainingDataset(corpus, tokenizer, masking="span"), 3000)  # ~15k runs: each ratio +-0.04
    shares = counts / counts.sum()
    mean = (shares * np.arange(len(shares))).sum()
    # Geometric(0.2) truncated at 10 has mean 3.8; the 15% budget cuts the last span of an example short.
    assert 2.7 <= mean <= 4.0, mean
    ratios = shares[2:7] / shares[1:6]  # P(k+1)/P(k) is 0.8 for the untruncated distribution
    assert ((ratios > 0.55) & (ratios < 0.9)).all(), ratios
    assert shares[11:].sum() < 0.02  # longer only where two spans happen to touch
    token_counts = word_runs(PretrainingDataset(corpus, tokenizer, masking="token"), 300)
    assert (token_counts / token_counts.sum() * np.arange(len(token_counts))).sum() < 1.5  # the check can fail


def document_of(corpus, positions):
    starts = corpus.sentence_offsets[corpus.document_sentence_ranges[:, 0]]
    return np.searchsorted(starts, positions, side="right") - 1


@pytest.mark.parametrize("objective", ["mlm+nsp", "mlm+sop"])
def test_sentence_labels_half_and_half_and_meaningful(corpus, tokenizer, objective):
    dataset = PretrainingDataset(corpus, tokenizer, objective=objective)
    labels = []
    for epoch in range(10):
        dataset.set_epoch(epoch)
        a0, a1, b0, b1, label = dataset.plan.T
        same_document = document_of(corpus, a0) == document_of(corpus, b0)
        assert (document_of(corpus, a1 - 1) == document_of(corpus, a0)).all()
        assert (document_of(corpus, b1 - 1) == document_of(corpus, b0)).all()
        assert same_document[label == 0].all() and (b0 >= a1)[label == 0].all()  # in order: B after A
        if objective == "mlm+nsp":
            assert not same_document[label == 1].any()  # random B comes from another document
        else:
            assert same_document[label == 1].all() and (a0 >= b1)[label == 1].all()  # swapped: B before A
        labels.append(label)
    labels = np.concatenate(labels)
    assert len(labels) > 35_000
    assert abs(labels.mean() - 0.5) <= 0.01
    for index in range(20):
        assert dataset[index]["next_sentence_label"] == dataset.plan[index, 4]


@pytest.mark.parametrize("objective", ["mlm+nsp", "mlm+sop"])
def test_pairs_are_whole_sentences(corpus, tokenizer, objective):
    """A and B start and end at sentence boundaries, unless the pair was truncated to max_length (Google's rule)."""
    dataset = PretrainingDataset(corpus, tokenizer, objective=objective)
    boundaries = set(corpus.sentence_offsets.tolist())
    a0, a1, b0, b1, _ = dataset.plan.T
    untruncated = (a1 - a0) + (b1 - b0) + 3 < dataset.max_length
    assert untruncated.sum() > 1000
    for column in (a0, a1, b0, b1):
        assert all(p in boundaries for p in column[untruncated].tolist())


def test_next_sentence_label_not_predictable_from_length(corpus, tokenizer):
    """In every length bucket the "is next" share stays near 50%: a model cannot guess the label from length."""
    dataset = PretrainingDataset(corpus, tokenizer, max_length=128)
    lengths, labels = [], []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        a0, a1, b0, b1, label = dataset.plan.T
        lengths.append((a1 - a0) + (b1 - b0) + 3)
        labels.append(label)
    lengths, labels = np.concatenate(lengths), np.concatenate(labels)
    buckets = np.digitize(lengths, [16, 32, 48, 64, 96, 128])
    checked = 0
    for bucket in np.unique(buckets):
        in_bucket = buckets == bucket
        if in_bucket.sum() >= 1000:  # the share's standard error is 1.6 points or less
            assert abs((labels[in_bucket] == 0).mean() - 0.5) < 0.05, f"bucket {bucket}"
            checked += 1
    short = lengths < 48
    assert checked >= 4 and short.sum() >= 1000
    assert abs((labels[short] == 0).mean() - 0.5) < 0.05


@pytest.mark.parametrize("objective", ["mlm+nsp", "mlm+sop", "mlm"])
def test_layout_lengths_and_segments(corpus, tokenizer, objective):
    dataset = PretrainingDataset(corpus, tokenizer, objective=objective, max_length=64)
    a0, a1, b0, b1, _ = dataset.plan.T
    lengths = (a1 - a0) + (b1 - b0) + (3 if objective != "mlm" else 2)
    assert lengths.max() == 64 and (a1 > a0).all()
    assert (lengths < 32).mean() > 0.015  # short_seq_prob (and short documents) make some examples short
    assert (b1 > b0).all() if objective != "mlm" else (b1 == b0).all()
    vocab = dataset.vocab
    for index in range(200):
        example = dataset[index]
        original, selected = originals(example)
        n = len(original)
        assert n == example["length"] == len(example["token_type_ids"]) <= 64
        separators = np.flatnonzero(original == vocab.sep_id)
        assert original[0] == vocab.cls_id and separators[-1] == n - 1 and vocab.cls_id not in original[1:]
        types = example["token_type_ids"]
        if objective == "mlm":
            assert "next_sentence_label" not in example
            assert list(separators) == [n - 1] and not types.any()
        else:
            assert len(separators) == 2
            first = separators[0]
            assert not types[: first + 1].any() and types[first + 1 :].all()
            assert 1 < first < n - 2  # both segments non-empty
        assert not selected[original == vocab.cls_id].any() and not selected[separators].any()


def same(x, y):
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_deterministic_from_seed_epoch_index(corpus, tokenizer):
    dataset = PretrainingDataset(corpus, tokenizer, masking="span", seed=3)
    first = [dataset[i] for i in (0, 7, 1234)]
    dataset.set_epoch(1)
    later = [dataset[i] for i in range(50)]
    resumed = PretrainingDataset(corpus, tokenizer, masking="span", seed=3)  # a new process, as after a restart
    resumed.set_epoch(5)
    resumed.set_epoch(0)
    assert all(same(x, resumed[i]) for x, i in zip(first, (0, 7, 1234)))
    assert all(same(x, dataset[0]) for x in [dataset[0]])  # repeated reads agree
    assert all(same(x, pickle.loads(pickle.dumps(dataset))[i]) for i, x in enumerate(later[:5]))  # as in workers
    resumed.set_epoch(0)
    epoch0 = [resumed[i] for i in range(50)]
    assert sum(not np.array_equal(x["labels"], y["labels"]) for x, y in zip(epoch0, later)) >= 48
    other_seed = PretrainingDataset(corpus, tokenizer, masking="span", seed=4)
    assert not same(other_seed[0], epoch0[0])
    plan = resumed.plan.copy()
    resumed.set_epoch(0)
    np.testing.assert_array_equal(plan, resumed.plan)


def test_the_loader_starting_in_the_epoch_built_at_construction_does_not_build_its_plan_again(corpus, tokenizer,
                                                                                               monkeypatch):
    """The plan is a pass over every sentence of the corpus (41 s on a 2 GB one): the constructor builds epoch 0 and
    the loader sets the epoch it starts in, which built the same plan a second time before the first step."""
    from bertkit.train.distributed import Distributed
    from bertkit.train.loader import PretrainBatches

    dataset = PretrainingDataset(corpus, tokenizer)
    first, plan, built = dataset.plan, PretrainingDataset._plan, []
    monkeypatch.setattr(PretrainingDataset, "_plan", lambda self, rng: built.append(self.epoch) or plan(self, rng))
    epoch, _, _ = next(PretrainBatches(dataset, 4, 1, Distributed())(0, 0, 0))
    assert epoch == 0 and built == [] and dataset.plan is first
    dataset.set_epoch(1)
    dataset.set_epoch(0)  # another epoch in between: built again, the same
    assert built == [1, 0]
    np.testing.assert_array_equal(dataset.plan, first)


def test_building_a_plan_takes_little_more_memory_than_the_plan(corpus, tokenizer):
    """A plan is five int64 an example (40 bytes). It was built as a list of tuples of Python ints, over 200 bytes an
    example, so building the plan of a 2 GB corpus (4.3M examples) peaked 1 GB above the plan itself."""
    import tracemalloc  # numpy's arrays are traced too

    dataset = PretrainingDataset(corpus, tokenizer, objective="mlm", max_length=8)  # short examples: many of them
    tracemalloc.start()  # the corpus's sentence index was built by the constructor's plan
    try:
        plan = dataset._plan(random.Random(0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(plan) > 10_000 and peak < 2 * plan.nbytes, (len(plan), peak, plan.nbytes)


def test_collate_pads_to_longest(corpus, tokenizer):
    dataset = PretrainingDataset(corpus, tokenizer, max_length=64, short_seq_prob=0.5)
    batch = [dataset[i] for i in range(16)]
    out = dataset.collate(batch)
    longest = max(len(x["input_ids"]) for x in batch)
    assert set(out) == {"input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label"}
    assert out["input_ids"].shape == (16, longest) and out["input_ids"].dtype == torch.long
    assert out["attention_mask"].sum(1).tolist() == [len(x["input_ids"]) for x in batch]
    padding = out["attention_mask"] == 0
    assert padding.any()
    assert (out["input_ids"][padding] == tokenizer.pad_id).all() and (out["labels"][padding] == IGNORE_INDEX).all()
    assert (out["token_type_ids"][padding] == 0).all()
    assert out["next_sentence_label"].tolist() == [int(x["next_sentence_label"]) for x in batch]
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=dataset.collate)
    first = next(iter(loader))
    assert torch.equal(first["input_ids"], dataset.collate(batch[:8])["input_ids"])


def test_collate_buckets_lengths_up_to_max_length(corpus, tokenizer):
    dataset = PretrainingDataset(corpus, tokenizer, max_length=64, short_seq_prob=1.0)
    batch = [dataset[i] for i in range(8)]
    dataset.pad_to_multiple_of = 24
    out = dataset.collate(batch)
    longest = max(len(x["input_ids"]) for x in batch)
    assert out["input_ids"].shape[1] == min(-(-longest // 24) * 24, 64) >= longest
    assert out["attention_mask"].sum(1).tolist() == [len(x["input_ids"]) for x in batch]  # the extra is padding


def test_truncation_matches_googles_loop():
    rng = random.Random(0)
    for _ in range(2000):
        len_a, len_b, limit = rng.randint(1, 300), rng.randint(0, 300), rng.randint(2, 200)
        a, b = list(range(len_a)), list(range(len_b))
        while len(a) + len(b) > limit:  # truncate_seq_pair from create_pretraining_data.py
            longer = a if len(a) > len(b) else b
            longer.pop()
        assert truncated_lengths(len_a, len_b, limit) == (len(a), len(b))
    a0, a1, b0, b1, _ = _truncate(random.Random(1), 0, 1000, 5000, 5010, 100, 0)
    assert (a1 - a0, b1 - b0) == (90, 10) and 0 < a0 and a1 < 1000  # cut from both ends


def test_other_tokenizer_refused(corpus):
    cased = Tokenizer.from_vocab(data_path("checkpoints", "all-MiniLM-L6-v2", "vocab.txt"), lowercase=False)
    with pytest.raises(BertkitError, match="prepared with another tokenizer"):
        PretrainingDataset(corpus, cased)
    with pytest.raises(BertkitError, match="objective 'nsp'"):
        PretrainingDataset(corpus, cased, objective="nsp")


def test_a_held_out_split_too_small_for_pairs_says_how_to_get_more(tmp_path, tokenizer):
    """40 documents hold out none at the default 1%: the error points at --heldout-fraction."""
    documents = itertools.islice(FileReader(data_path("corpus", "python-docs-3.11.txt")), 40)
    (tmp_path / "small.txt").write_text("\n\n".join("\n".join(d) for d in documents) + "\n", encoding="utf-8")
    prepare([str(tmp_path / "small.txt")], tokenizer, tmp_path / "out", progress=False)
    heldout = PreparedCorpus(tmp_path / "out", split="heldout")
    assert heldout.num_documents < 2
    with pytest.raises(BertkitError, match=r"\(heldout\): .* expected at least 2 .* --heldout-fraction"):
        PretrainingDataset(heldout, tokenizer)


def test_a_split_with_no_two_sentence_document_is_refused_for_pairs(tmp_path, tokenizer):
    """A held-out split of one-sentence documents makes no NSP or SOP pair: said at once, not a run whose every
    held-out score is nan."""
    documents = itertools.islice(FileReader(data_path("corpus", "python-docs-3.11.txt")), 30)
    (tmp_path / "single.txt").write_text("\n\n".join(d[0] for d in documents) + "\n", encoding="utf-8")
    prepare([str(tmp_path / "single.txt")], tokenizer, tmp_path / "out", heldout_fraction=0, progress=False)
    corpus = PreparedCorpus(tmp_path / "out")
    assert corpus.num_documents == 30
    for objective in ("mlm+nsp", "mlm+sop"):
        with pytest.raises(BertkitError, match=rf"\(train\): no sentence pair for objective {re.escape(objective)}: "
                                               r"none of its 30 document\(s\) has two sentences; .* --objective mlm"):
            PretrainingDataset(corpus, tokenizer, objective=objective)
    assert len(PretrainingDataset(corpus, tokenizer, objective="mlm")) == 30
