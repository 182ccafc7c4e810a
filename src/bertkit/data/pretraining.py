"""Pretraining examples: sentence pairs (NSP or SOP) or single segments, with token, whole-word or span masking.

Examples are drawn fresh every epoch and are a pure function of (seed, epoch, index), so a run resumed from
(epoch, step) sees exactly the data it would have seen:
  - `set_epoch(e)` builds the epoch's plan (which token ranges form segment A and B of each example, and the
    sentence label) from (seed, e), over the corpus's sentence offsets only, then shuffles it; read the dataset
    in index order (no sampler shuffling: the plan is already shuffled);
  - `dataset[i]` reads those tokens from the memory maps and masks them with an rng seeded by (seed, e, i).
Bit-for-bit reproduction assumes the same numpy version (numpy's Generator streams may change between versions).
DataLoader workers hold a copy of the dataset: build the loader's iterator after `set_epoch` and leave
persistent_workers off, or the workers keep the previous epoch's plan.
Distributed: `bertkit.train.loader` shares each step's slice of indices out over ranks and micro-steps.
"""

from __future__ import annotations

import array
import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from bertkit.data.batching import bucketed
from bertkit.data.shards import PreparedCorpus, tokenizer_fingerprint
from bertkit.errors import BertkitError



@dataclass(frozen=True)
class Objective:
    """A pretraining objective, described once: the code asks it questions instead of comparing names."""

    name: str
    pairs: bool  # examples are [CLS] A [SEP] B [SEP] with a sentence label; else one segment, [CLS] A [SEP]
    random_b: bool = False  # half the time B comes from another document (the next-sentence task)
    swapped: bool = False  # half the time A and B trade places (the sentence-order task)
    metric: str | None = None  # the held-out accuracy of the sentence task
    short: str = ""  # the progress bar's name for that accuracy
    causal: bool = False  # a left-to-right LM: causal attention, every position predicts the next token, no masking

    @property
    def documents_needed(self) -> int:
        return 2 if self.random_b else 1  # a random B must come from another document


OBJECTIVES = {o.name: o for o in (
    Objective("mlm+nsp", pairs=True, random_b=True, metric="next_sentence_accuracy", short="nsp_acc"),  # BERT
    Objective("mlm", pairs=False),  # RoBERTa's finding: no sentence task
    Objective("mlm+sop", pairs=True, swapped=True, metric="sentence_order_accuracy", short="sop_acc"),  # ALBERT
    Objective("ltr", pairs=False, causal=True),  # the paper's "LTR & No NSP" row (Table 5), as GPT
)}
# What a position chosen for prediction becomes, in percent: [MASK], itself (SAME), a random token (RND); BERT's
# 80/10/10, and the mixes of the paper's appendix C.2 for the ablation
MASK_MIXES = ((80, 10, 10), (100, 0, 0), (80, 0, 20), (80, 20, 0), (0, 20, 80), (0, 0, 100))
MASKINGS = ("token", "wwm", "span")
IGNORE_INDEX = -100  # the label of an unpredicted position: cross-entropy's (and transformers') ignore_index
_BRACKETED = re.compile(r"\[[^\]]*\]")  # [PAD], [unused0]: BERT vocabularies mark reserved pieces this way
_DOCUMENT_BLOCK = 1 << 16


@dataclass(frozen=True)
class MaskingVocab:
    """What masking needs to know about the vocabulary."""

    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    special: np.ndarray  # (V,) bool: never selected for prediction, never drawn as a random replacement
    continuation: np.ndarray  # (V,) bool: '##' pieces, which belong to the word before them
    replacements: np.ndarray  # the ids the 10% random replacement draws from: every non-special id

    @classmethod
    def from_tokenizer(cls, tokenizer) -> MaskingVocab:
        """From a bertkit Tokenizer (special ids and `vocab()`): [PAD] [UNK] [CLS] [SEP] [MASK] and bracketed
        reserved pieces like [unused0] are special (never trained as text, so never a sensible replacement)."""
        pieces = tokenizer.vocab()
        special = np.array([_BRACKETED.fullmatch(p) is not None for p in pieces], bool)
        special[[tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id]] = True
        continuation = np.array([p.startswith("##") for p in pieces], bool)
        return cls(
            tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.pad_id,
            special, continuation, np.flatnonzero(~special),
        )


def truncated_lengths(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
    """The lengths Google's truncate_seq_pair leaves: cut the longer segment a token at a time (B on a tie)."""
    if len_a + len_b <= max_tokens:
        return len_a, len_b
    shorter = min(len_a, len_b)
    if 2 * shorter <= max_tokens:  # the shorter one is never reached
        return (len_a, max_tokens - len_a) if len_a == shorter else (max_tokens - len_b, len_b)
    return max_tokens - max_tokens // 2, max_tokens // 2


def _truncate(rng: random.Random, a0: int, a1: int, b0: int, b1: int, max_tokens: int, label: int) -> tuple:
    """Truncate longest-first; each removed token comes off the front or the back by a coin flip, as the
    original does (so neither end is systematically lost)."""
    keep_a, keep_b = truncated_lengths(a1 - a0, b1 - b0, max_tokens)
    cut_a, cut_b = a1 - a0 - keep_a, b1 - b0 - keep_b
    front_a = rng.getrandbits(cut_a).bit_count() if cut_a else 0  # Binomial(cut, 1/2) coin flips
    front_b = rng.getrandbits(cut_b).bit_count() if cut_b else 0
    return a0 + front_a, a1 - (cut_a - front_a), b0 + front_b, b1 - (cut_b - front_b), label


class PretrainingDataset(torch.utils.data.Dataset):
    """BERT pretraining examples over a PreparedCorpus; `[CLS] A [SEP] B [SEP]` (or `[CLS] A [SEP]` for "mlm").

    objective: "mlm+nsp" B is A's true continuation (next_sentence_label 0) or, half the time, a span of a random
               other document (label 1), as BERT; "mlm+sop" A and B are consecutive and swapped half the time
               (label 1 when swapped), as ALBERT; "mlm" one segment of consecutive sentences, no sentence label.
               "ltr" one segment, unmasked, every position labelled with the next token (a left-to-right LM).
    masking:   "token" BERT's random tokens; "wwm" whole words (a piece and the '##' pieces after it);
               "span" SpanBERT's spans of whole words, lengths ~ Geometric(span_geometric_p) truncated at span_max.
    mask_mix:  what the chosen positions become, in percent: [MASK], unchanged, a random token (80, 10, 10).
    """

    pad_to_multiple_of = 1  # length bucketing of `collate` (`bertkit.data.batching.bucketed`)

    def __init__(
        self,
        corpus: PreparedCorpus,
        tokenizer,
        *,
        max_length: int = 128,
        short_seq_prob: float = 0.1,
        masking: str = "token",
        objective: str = "mlm+nsp",
        mask_prob: float = 0.15,
        max_predictions: int | None = None,
        span_geometric_p: float = 0.2,
        span_max: int = 10,
        mask_mix: tuple[int, int, int] = (80, 10, 10),
        seed: int = 0,
    ) -> None:
        if objective not in OBJECTIVES:
            raise BertkitError(f"objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
        self.task = OBJECTIVES[objective]
        if masking not in MASKINGS:
            raise BertkitError(f"masking {masking!r}; expected one of {', '.join(MASKINGS)}")
        if max_length < 8 or not 0 < mask_prob < 1 or not 0 <= short_seq_prob <= 1 or seed < 0:
            raise BertkitError(
                f"max_length={max_length}, mask_prob={mask_prob}, short_seq_prob={short_seq_prob}, seed={seed}; "
                "expected max_length >= 8, 0 < mask_prob < 1, 0 <= short_seq_prob <= 1, seed >= 0"
            )
        if not 0 < span_geometric_p <= 1 or span_max < 1:
            raise BertkitError(
                f"span_geometric_p={span_geometric_p}, span_max={span_max}; expected 0 < p <= 1 and span_max >= 1"
            )
        mask_mix = tuple(mask_mix)
        if len(mask_mix) != 3 or any(not isinstance(p, int) or p < 0 for p in mask_mix) or sum(mask_mix) != 100:
            raise BertkitError(f"mask_mix={mask_mix}; expected three whole percentages ([MASK], unchanged, random) "
                               "that sum to 100, such as 80 10 10")
        if tokenizer.vocab_size != corpus.vocab_size or tokenizer_fingerprint(tokenizer) != corpus.tokenizer_fingerprint:
            raise BertkitError(
                f"{corpus.out_dir}: prepared with another tokenizer (vocab {corpus.vocab_size}, fingerprint "
                f"{corpus.tokenizer_fingerprint[:12]}); expected the tokenizer it was prepared with"
            )
        needed = self.task.documents_needed
        hint = (" (the held-out split is a share of the documents: prepare the corpus with `bertkit prepare "
                "--heldout-fraction` larger, or give it more documents)") if corpus.split == "heldout" else ""
        if corpus.num_documents < needed:
            raise BertkitError(
                f"{corpus.out_dir} ({corpus.split}): {corpus.num_documents} document(s); expected at least {needed} "
                f"for objective {objective}{hint}"
            )
        self.corpus = corpus
        self.vocab = MaskingVocab.from_tokenizer(tokenizer)
        self.max_length = max_length
        self.short_seq_prob = short_seq_prob
        self.masking = masking
        self.objective = objective
        self.mask_prob = mask_prob
        # a chosen position with decision d in [0, 1) becomes [MASK] below the first bound, random below the second
        self.mix_bounds = (mask_mix[0] / 100, (mask_mix[0] + mask_mix[2]) / 100)
        # The paper's cap (20 predictions at length 128) keeps the prediction count bounded; ceil(max_length *
        # mask_prob) equals it at 128 and never binds for token masking, so the 15% rate stays exact.
        self.max_predictions = max_predictions or math.ceil(max_length * mask_prob)
        lengths = np.arange(1, span_max + 1)
        probs = span_geometric_p * (1 - span_geometric_p) ** (lengths - 1)
        # Truncated and renormalised, as SpanBERT's code does (clipping would pile the tail's mass onto span_max).
        self.span_cdf = np.cumsum(probs / probs.sum())
        self.seed = seed
        self.set_epoch(0)
        if not len(self.plan):  # only pairs can come out empty: every epoch alike, as a pair needs two sentences
            raise BertkitError(
                f"{corpus.out_dir} ({corpus.split}): no sentence pair for objective {objective}: none of its "
                f"{corpus.num_documents} document(s) has two sentences; expected documents of two sentences or "
                f"more{hint}, or --objective mlm"
            )

    def set_epoch(self, epoch: int) -> None:
        """Build the plan of epoch `epoch` (a pure function of seed and epoch); kept if it is that epoch's already."""
        if getattr(self, "epoch", None) == epoch:
            # The constructor builds epoch 0 and the loader sets the epoch it starts in: building it twice doubled
            # pretraining's start-up, which grows with the corpus (41 s more on a 2 GB corpus).
            return
        self.epoch = epoch
        plan = self._plan(random.Random(f"bertkit-plan/{self.seed}/{epoch}"))
        order = np.random.default_rng((self.seed, epoch, 1 << 40)).permutation(len(plan))
        self.plan = plan[order]  # (N, 5) int64: a_start, a_end, b_start, b_end (global token positions), label

    def _target(self, rng: random.Random, max_tokens: int) -> int:
        # Mostly full sequences for efficiency; sometimes short ones, so the model also sees lengths it will
        # meet when fine-tuning (the paper's short_seq_prob). Drawn per example, where Google draws per document.
        return rng.randint(2, max_tokens) if rng.random() < self.short_seq_prob else max_tokens

    def _plan(self, rng: random.Random) -> np.ndarray:
        """Google's create_instances_from_document over every document, in token positions."""
        pair = self.task.pairs
        max_tokens = self.max_length - (3 if pair else 2)
        offsets = self.corpus.sentence_offsets
        ranges = self.corpus.document_sentence_ranges
        # The rows' five numbers back to back, 40 bytes an example: a list of tuples of Python ints took over 200,
        # so building a plan on a 2 GB corpus (4.3M examples) peaked 1 GB above the plan itself.
        rows = array.array("q")
        for block in range(0, len(ranges), _DOCUMENT_BLOCK):
            for d, (s0, s1) in enumerate(ranges[block : block + _DOCUMENT_BLOCK].tolist(), block):
                off = offsets[s0 : s1 + 1].tolist()  # off[k]: first token of the document's k-th sentence
                n = s1 - s0
                start = 0
                while start < n:
                    target = self._target(rng, max_tokens)
                    end = start + 1  # the chunk: sentences [start, end), grown until it reaches the target
                    while end < n and off[end] - off[start] < target:
                        end += 1
                    if not pair:
                        rows.extend(_truncate(rng, off[start], off[end], 0, 0, max_tokens, 0))
                        start = end
                        continue
                    if end - start == 1:  # A and B are whole sentences, so a pair needs two
                        if end == n:
                            break  # the document's last sentence, alone: no pair can be made of it (dropped)
                        end += 1
                    a_end = rng.randint(start + 1, end - 1)
                    if self.task.random_b and rng.random() < 0.5:
                        # The random B is as long as the true B would be (to the target, or to the document's end
                        # when that comes first), so an example's length says nothing about its label.
                        true_b = off[end] - off[a_end]
                        at_end = end == n and off[end] - off[start] < target
                        b0, b1 = self._random_segment(rng, d, true_b if at_end else target - (off[a_end] - off[start]),
                                                      closest=at_end)
                        rows.extend(_truncate(rng, off[start], off[a_end], b0, b1, max_tokens, 1))
                        if not at_end:
                            # B's sentences were not used: they start the next chunk. Not at the document's end,
                            # where a leftover would make one more (short) example for this label only.
                            end = a_end
                    else:
                        a0, a1, b0, b1, label = off[start], off[a_end], off[a_end], off[end], 0
                        if self.task.swapped and rng.random() < 0.5:
                            a0, a1, b0, b1, label = b0, b1, a0, a1, 1
                        rows.extend(_truncate(rng, a0, a1, b0, b1, max_tokens, label))
                    start = end
        return np.frombuffer(rows, np.int64).reshape(-1, 5)

    def _random_segment(self, rng: random.Random, document: int, target_b: int, closest: bool) -> tuple[int, int]:
        """Whole consecutive sentences of another document, from a random sentence on, until they reach target_b
        tokens (as a chunk grows to its target); with `closest`, as near to target_b tokens as whole sentences get.

        The first sentence is uniform over the other documents' sentences, as chunks start uniformly over sentences,
        and one whose document ends before target_b is redrawn: a B cut short by another document's end would make
        short examples more often "random" than "is next". `closest` (a true B cut short by its own document's
        end) keeps the best of a few draws, since one sentence drawn at random is often far longer than a short B."""
        ranges, off = self.corpus.document_sentence_ranges, self.corpus.sentence_offsets
        s0, s1 = ranges[document].tolist()
        best, best_gap = None, None
        for _ in range(8):
            first = rng.randrange(len(off) - 1 - (s1 - s0))
            first += (s1 - s0) * (first >= s0)  # skip this document's sentences
            last = int(ranges[np.searchsorted(ranges[:, 1], first, side="right"), 1])
            if off[last] - off[first] < target_b:
                continue
            end = max(int(np.searchsorted(off[first : last + 1], off[first] + target_b, side="left")), 1)
            if closest and end > 1 and off[first + end] - off[first] - target_b > target_b - (off[first + end - 1] - off[first]):
                end -= 1
            gap = abs(int(off[first + end] - off[first]) - target_b)
            if best is None or gap < best_gap:
                best, best_gap = (int(off[first]), int(off[first + end])), gap
            if not closest or gap <= target_b // 10:
                break
        if best is None:  # every draw fell near a document's end (short documents): take the last one as it is
            best = int(off[first]), int(off[last])
        return best

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Example `index` of the current epoch: input_ids, token_type_ids, labels (IGNORE_INDEX where not
        predicted), length, and next_sentence_label (0 in order / true continuation, 1 random or swapped)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} examples")
        index %= len(self)
        a0, a1, b0, b1, label = self.plan[index].tolist()
        tokens = self.corpus.tokens
        len_a, len_b = a1 - a0, b1 - b0
        pair = self.task.pairs
        length = len_a + 2 + (len_b + 1 if pair else 0)
        input_ids = np.empty(length, np.int64)
        token_type_ids = np.zeros(length, np.int64)
        input_ids[0] = self.vocab.cls_id
        input_ids[1 : 1 + len_a] = tokens[a0:a1]
        input_ids[1 + len_a] = self.vocab.sep_id
        if pair:
            input_ids[2 + len_a : -1] = tokens[b0:b1]
            input_ids[-1] = self.vocab.sep_id
            token_type_ids[2 + len_a :] = 1
        if self.task.causal:
            labels = np.append(input_ids[1:], IGNORE_INDEX)  # position t predicts token t + 1
        else:
            labels = self._mask(input_ids, np.random.default_rng((self.seed, self.epoch, index)))
        example = {"input_ids": input_ids, "token_type_ids": token_type_ids, "labels": labels, "length": np.array(length)}
        if pair:
            example["next_sentence_label"] = np.array(label)
        return example

    def _budget(self, candidates: int, rng: np.random.Generator) -> int:
        """How many tokens to predict: mask_prob of the candidates, rounded at random (floor, or ceil with the
        fraction's probability) so the rate is exactly mask_prob on average; Google's round() would mask 20%
        of a 10-token example. At least 1, at most max_predictions."""
        expected = candidates * self.mask_prob
        count = int(expected) + int(rng.random() < expected - int(expected))
        return min(max(count, 1), self.max_predictions, candidates)

    def _words(self, input_ids: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first position, number of pieces) of each whole word among the candidate positions."""
        starts = ~self.vocab.continuation[input_ids[candidates]]
        starts[0] = True
        starts[1:] |= np.diff(candidates) != 1  # a special token in between ends the word (and the segment)
        first = np.flatnonzero(starts)
        return candidates[first], np.diff(np.append(first, len(candidates)))

    def _mask(self, input_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Choose positions to predict, replace them in place (80% [MASK], 10% random, 10% kept, or mask_mix),
        return labels.

        Why 80/10/10 (BERT section 3.1): [MASK] never occurs when fine-tuning, so some chosen tokens stay
        or become random, and the model must keep a good representation of every input token."""
        labels = np.full(len(input_ids), IGNORE_INDEX, np.int64)
        candidates = np.flatnonzero(~self.vocab.special[input_ids])
        if len(candidates) == 0:
            return labels
        budget = self._budget(len(candidates), rng)
        if self.masking == "token":
            positions = np.sort(rng.choice(candidates, budget, replace=False))
            decision = rng.random(budget)  # per token, as BERT
        else:
            word_starts, word_lengths = self._words(input_ids, candidates)
            chooser = self._whole_words if self.masking == "wwm" else self._spans
            spans = chooser(word_starts, word_lengths, budget, rng)
            if not spans:  # every word is longer than a budget of one or two tokens
                return labels
            if self.masking == "wwm":
                positions = np.concatenate([np.arange(s, e) for s, e in spans])
                decision = rng.random(len(positions))  # per token, as Google's whole-word masking
            else:
                sizes = [e - s for s, e in spans]
                positions = np.concatenate([np.arange(s, e) for s, e in spans])
                decision = np.repeat(rng.random(len(spans)), sizes)  # per span, as SpanBERT
        labels[positions] = input_ids[positions]
        masked_below, random_below = self.mix_bounds
        input_ids[positions[decision < masked_below]] = self.vocab.mask_id
        replaced = positions[(decision >= masked_below) & (decision < random_below)]
        input_ids[replaced] = self.vocab.replacements[rng.integers(len(self.vocab.replacements), size=len(replaced))]
        return labels

    @staticmethod
    def _whole_words(starts: np.ndarray, lengths: np.ndarray, budget: int, rng: np.random.Generator) -> list:
        """Whole words in random order, each taken if it still fits the budget (Google's whole-word masking)."""
        spans, total = [], 0
        for w in rng.permutation(len(starts)).tolist():
            if total + lengths[w] <= budget:
                spans.append((int(starts[w]), int(starts[w] + lengths[w])))
                total += int(lengths[w])
                if total == budget:
                    break
        return spans

    def _spans(self, starts: np.ndarray, lengths: np.ndarray, budget: int, rng: np.random.Generator) -> list:
        """SpanBERT: pick a random unmasked word, draw a span length in words, extend over the following words of
        the same segment while unmasked and within budget; until the budget is spent or no word fits."""
        masked = np.zeros(len(starts), bool)
        follows = np.append(starts[1:] == starts[:-1] + lengths[:-1], False)  # word w + 1 starts where w ends
        spans, remaining = [], budget
        while remaining > 0:
            fits = np.flatnonzero(~masked & (lengths <= remaining))
            if len(fits) == 0:
                break
            first = last = int(fits[rng.integers(len(fits))])
            span_words = min(int(np.searchsorted(self.span_cdf, rng.random(), side="right")) + 1, len(self.span_cdf))
            masked[first] = True
            remaining -= int(lengths[first])
            while last - first + 1 < span_words and follows[last] and not masked[last + 1] and lengths[last + 1] <= remaining:
                last += 1
                masked[last] = True
                remaining -= int(lengths[last])
            spans.append((int(starts[first]), int(starts[last] + lengths[last])))
        return spans

    def collate(self, batch: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Pad to the longest example: input_ids with [PAD], token_type_ids 0, attention_mask 1/0, labels -100;
        the keys are those transformers' BertForPreTraining / BertForMaskedLM take."""
        longest = bucketed(max(len(example["input_ids"]) for example in batch), self.pad_to_multiple_of,
                           self.max_length)
        input_ids = np.full((len(batch), longest), self.vocab.pad_id, np.int64)  # (B, T)
        token_type_ids = np.zeros((len(batch), longest), np.int64)
        attention_mask = np.zeros((len(batch), longest), np.int64)
        labels = np.full((len(batch), longest), IGNORE_INDEX, np.int64)
        for row, example in enumerate(batch):
            n = len(example["input_ids"])
            input_ids[row, :n] = example["input_ids"]
            token_type_ids[row, :n] = example["token_type_ids"]
            attention_mask[row, :n] = 1
            labels[row, :n] = example["labels"]
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }
        if "next_sentence_label" in batch[0]:
            out["next_sentence_label"] = torch.tensor([int(example["next_sentence_label"]) for example in batch])
        return out


@dataclass
class MaskingStatistics:
    """Counts over a sample of examples, to check masking and sentence labels against their intended rates."""

    examples: int = 0
    tokens: int = 0
    selectable: int = 0  # non-special input tokens
    selected: int = 0  # positions with a label
    masked: int = 0  # selected, now [MASK]
    replaced: int = 0  # selected, now another token
    kept: int = 0  # selected, unchanged
    sentence_label_1: int = 0  # random next sentence (NSP) or swapped (SOP)
    longest: int = 0

    def rates(self) -> dict[str, float]:
        """Selected / selectable, the 80/10/10 split of the selected, and the share of sentence label 1."""
        return {
            "selected": self.selected / max(self.selectable, 1),
            "masked": self.masked / max(self.selected, 1),
            "replaced": self.replaced / max(self.selected, 1),
            "kept": self.kept / max(self.selected, 1),
            "sentence_label_1": self.sentence_label_1 / max(self.examples, 1),
        }


def masking_statistics(dataset: PretrainingDataset, n: int) -> MaskingStatistics:
    """Statistics of the first n examples of the current epoch (the plan is shuffled, so a random sample)."""
    stats = MaskingStatistics()
    special = dataset.vocab.special
    for index in range(min(n, len(dataset))):
        example = dataset[index]
        input_ids, labels = example["input_ids"], example["labels"]
        selected = labels != IGNORE_INDEX
        original = np.where(selected, labels, input_ids)
        stats.examples += 1
        stats.tokens += len(input_ids)
        stats.selectable += int((~special[original]).sum())
        stats.selected += int(selected.sum())
        stats.masked += int((input_ids[selected] == dataset.vocab.mask_id).sum())
        stats.kept += int((input_ids[selected] == labels[selected]).sum())
        stats.sentence_label_1 += int(example.get("next_sentence_label", 0))
        stats.longest = max(stats.longest, len(input_ids))
    stats.replaced = stats.selected - stats.masked - stats.kept
    return stats
