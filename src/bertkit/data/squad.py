"""SQuAD v1.1/v2.0: read and check the JSON, cut question + context into windows, turn logits back into answers."""

from __future__ import annotations

import dataclasses

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from bertkit.config import parse_json, write_json
from bertkit.data.corpus import replace_lone_surrogates
from bertkit.errors import BertkitError, missing


@dataclass
class SquadAnswer:
    """A gold answer: its text and where it starts in the context (in characters)."""

    text: str
    start: int


@dataclass
class SquadExample:
    """One question about one paragraph; `answers` is empty exactly when `is_impossible` (v2.0)."""

    id: str
    title: str
    article: int  # index of the article in its file, for splitting by article
    question: str
    context: str
    answers: list[SquadAnswer]
    is_impossible: bool = False


@dataclass
class SquadFeature:
    """One window: [CLS] question [SEP] part of the context [SEP], padded to max_length."""

    example_index: int
    input_ids: list[int]
    token_type_ids: list[int]
    attention_mask: list[int]
    offsets: list[tuple[int, int] | None]  # character span in the context; None for question/special/pad
    is_max_context: list[bool]  # True where this window sees the token with the most context on both sides
    start_position: int  # training label; 0 ([CLS]) when the answer is not inside this window
    end_position: int


def _field(obj: Any, key: str, kind: type, place: str) -> Any:
    """obj[key], checked to be a `kind`."""
    if not isinstance(obj, dict) or key not in obj:
        raise BertkitError(f"{place}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BertkitError(f"{place}: field {key!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _load_json(path: Path) -> list[Any]:
    """The `data` list of a SQuAD file."""
    if not path.is_file():
        raise BertkitError(missing(path, "a SQuAD JSON file ({'version': ..., 'data': [...]})"))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise BertkitError(f"{path}: byte {e.start} is not UTF-8 (expected UTF-8 JSON)") from None
    if not text.strip():
        raise BertkitError(f"{path}: file is empty, expected SQuAD JSON ({{'version': ..., 'data': [...]}})")
    dataset = parse_json(text, path, "SQuAD JSON ({'version': ..., 'data': [...]})")
    return _field(dataset, "data", list, str(path))


def read_squad(path: str | Path) -> list[SquadExample]:
    """Read a SQuAD v1.1 or v2.0 JSON file into examples, checking every answer against its context.

    An answer whose text is not found at its answer_start raises rather than being skipped: the official
    files have none, so one means offsets computed differently (bytes, other normalisation) or a hand edit,
    and skipping would silently train on fewer or wrong spans.
    """
    path = Path(path)
    examples: list[SquadExample] = []
    seen: set[str] = set()
    for a, article in enumerate(_load_json(path)):
        place = f"{path}: article {a}"
        title = str(article.get("title", "")) if isinstance(article, dict) else ""
        place += f" ({title!r})" if title else ""
        for p, paragraph in enumerate(_field(article, "paragraphs", list, place)):
            context = _field(paragraph, "context", str, f"{place}, paragraph {p}")
            for qa in _field(paragraph, "qas", list, f"{place}, paragraph {p}"):
                qid = _field(qa, "id", str, f"{place}, paragraph {p}")
                here = f"{place}, question {qid}"
                if qid in seen:
                    raise BertkitError(f"{here}: question id repeats an earlier one; expected unique ids")
                seen.add(qid)
                impossible = qa.get("is_impossible", False) is True
                answers = []
                for raw in _field(qa, "answers", list, here):
                    text, start = _field(raw, "text", str, here), _field(raw, "answer_start", int, here)
                    if start < 0 or not text or context[start : start + len(text)] != text:
                        found = context[max(start, 0) : max(start, 0) + len(text)]
                        raise BertkitError(
                            f"{here}: answer {text!r} is not at answer_start {start} (context has {found!r} there)"
                        )
                    answers.append(SquadAnswer(text, start))
                if impossible and answers:
                    raise BertkitError(f"{here}: is_impossible is true but answers is not empty")
                if not impossible and not answers:
                    raise BertkitError(f"{here}: no answers, expected at least one (or is_impossible: true)")
                question = _field(qa, "question", str, here)
                examples.append(SquadExample(qid, title, a, question, context, answers, impossible))
    if not examples:
        raise BertkitError(f"{path}: no questions in the file")
    return examples


def split_by_article(path: str | Path, n_train: int) -> tuple[list[SquadExample], list[SquadExample]]:
    """Split a SQuAD file into its first `n_train` articles and the rest, e.g. dev-v1.1's 38 / 10."""
    examples = read_squad(path)
    n_articles = examples[-1].article + 1
    if not 0 < n_train < n_articles:
        wanted = (f"1 to {n_articles - 1} (the rest are scored)" if n_articles > 1 else
                  "a file of 2 or more articles to split")
        raise BertkitError(f"{path}: --train-articles {n_train} of its {n_articles} article(s); expected {wanted}")
    return [e for e in examples if e.article < n_train], [e for e in examples if e.article >= n_train]


def whole_articles(examples: list[SquadExample], separator: str = "\n\n") -> list[SquadExample]:
    """The long-document task: each question's context becomes its whole article (the article's paragraphs in
    file order, joined by `separator`), its answers moved to where they now start. The official metric scores
    answer texts, so the scores stay comparable with the paragraph task's."""
    paragraphs: dict[int, list[str]] = {}
    for e in examples:
        seen = paragraphs.setdefault(e.article, [])
        if e.context not in seen:
            seen.append(e.context)
    offsets, texts = {}, {}
    for article, contexts in paragraphs.items():
        at = 0
        for context in contexts:
            offsets[(article, context)] = at
            at += len(context) + len(separator)
        texts[article] = separator.join(contexts)
    out = []
    for e in examples:
        shift = offsets[(e.article, e.context)]
        answers = [SquadAnswer(a.text, a.start + shift) for a in e.answers]
        out.append(dataclasses.replace(e, context=texts[e.article], answers=answers))
    return out


def _resolve_tokenizer(tokenizer: Any) -> tuple[tokenizers.Tokenizer, int, int, int]:
    """A plain copy of the backend (no truncation, no padding) and the [CLS]/[SEP]/[PAD] ids."""
    backend = getattr(tokenizer, "backend", tokenizer)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise BertkitError(
            f"expected a tokenizers.Tokenizer or an object with .backend, got {type(tokenizer).__name__}"
        )
    ids = []
    for attr, token in (("cls_id", "[CLS]"), ("sep_id", "[SEP]"), ("pad_id", "[PAD]")):
        value = getattr(tokenizer, attr, None)
        value = backend.token_to_id(token) if value is None else value
        if value is None:
            raise BertkitError(f"the tokenizer has no {token} token; expected a BERT vocabulary")
        ids.append(value)
    # A tokenizer.json may carry truncation/padding settings (all-MiniLM pads to 128); windows are cut here,
    # so encode with a copy that has none, leaving the caller's tokenizer untouched.
    plain = tokenizers.Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain, ids[0], ids[1], ids[2]


def _windows(n_tokens: int, max_tokens: int, doc_stride: int) -> list[tuple[int, int]]:
    """(start, length) of each window; `doc_stride` is the step between window starts, as in BERT's run_squad."""
    spans = []
    start = 0
    while True:
        length = min(n_tokens - start, max_tokens)
        spans.append((start, length))
        if start + length >= n_tokens:
            return spans
        start += min(length, doc_stride)


def _max_context_window(spans: list[tuple[int, int]], n_tokens: int) -> list[int]:
    """For each context token, the window where it sits most centrally (BERT's _check_is_max_context)."""
    best, best_score = [0] * n_tokens, [-1.0] * n_tokens
    for w, (start, length) in enumerate(spans):
        for i in range(start, start + length):
            # distance to the nearer window edge; ties go to the longer window
            score = min(i - start, start + length - 1 - i) + 0.01 * length
            if score > best_score[i]:
                best[i], best_score[i] = w, score
    return best


def _answer_tokens(example: SquadExample, offsets: list[tuple[int, int]]) -> tuple[int, int]:
    """First and last context token overlapping the first gold answer's characters."""
    answer = example.answers[0]
    start_char, end_char = answer.start, answer.start + len(answer.text)
    starts = [i for i, (s, e) in enumerate(offsets) if e > start_char and s < end_char]
    if not starts:
        raise BertkitError(f"question {example.id}: answer {answer.text!r} covers no token of the context")
    return starts[0], starts[-1]


def _encode_questions(examples: Sequence[SquadExample], backend: tokenizers.Tokenizer, max_length: int,
                      max_query_length: int) -> list[tokenizers.Encoding]:
    """The questions' encodings; a BertkitError naming the first whose kept tokens leave no context in a window."""
    # a lone surrogate (a JSON escape such as "\ud800") becomes U+FFFD for the backend: one character for one,
    # so the character offsets into the context stay valid
    questions = backend.encode_batch([replace_lone_surrogates(e.question) for e in examples], add_special_tokens=False)
    for example, question in zip(examples, questions):
        query = min(len(question.ids), max_query_length)
        if max_length - query - 3 < 1:  # [CLS], [SEP], [SEP] and at least one context token
            raise BertkitError(
                f"question {example.id}: max_length {max_length} leaves no room for context after its {query} "
                f"question tokens; expected max_length above {query + 3} or a smaller max_query_length"
            )
    return questions


def check_questions(examples: Sequence[SquadExample], tokenizer: Any, max_length: int = 384,
                    max_query_length: int = 64) -> None:
    """Raise, as featurize would, for a question that leaves no room for context: fine-tuning checks the questions
    it scores before it trains, not after the first epoch."""
    _encode_questions(examples, _resolve_tokenizer(tokenizer)[0], max_length, max_query_length)


def featurize(
    examples: Sequence[SquadExample],
    tokenizer: Any,
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> list[SquadFeature]:
    """Cut each example into overlapping windows of question + context, with start/end labels per window.

    `tokenizer` is a `tokenizers.Tokenizer` or anything with `.backend` (and optionally `.cls_id`,
    `.sep_id`, `.pad_id`), such as `bertkit.tokenizer.Tokenizer`. `doc_stride` is the step between window
    starts, as in Google's run_squad.py (transformers' run_qa.py passes its doc_stride as the overlap instead).
    """
    backend, cls_id, sep_id, pad_id = _resolve_tokenizer(tokenizer)
    questions = _encode_questions(examples, backend, max_length, max_query_length)
    contexts = list(dict.fromkeys(e.context for e in examples))  # paragraphs repeat once per question
    encoded = dict(zip(contexts, backend.encode_batch([replace_lone_surrogates(c) for c in contexts],
                                                      add_special_tokens=False)))

    features = []
    for index, (example, question) in enumerate(zip(examples, questions)):
        query = question.ids[:max_query_length]
        doc = encoded[example.context]
        max_doc = max_length - len(query) - 3  # [CLS], [SEP], [SEP]
        spans = _windows(len(doc.ids), max_doc, doc_stride)
        best_window = _max_context_window(spans, len(doc.ids))
        answer = None if example.is_impossible or not example.answers else _answer_tokens(example, doc.offsets)
        head = len(query) + 2  # position of the first context token
        for w, (start, length) in enumerate(spans):
            ids = [cls_id, *query, sep_id, *doc.ids[start : start + length], sep_id]
            n_pad = max_length - len(ids)
            start_position = end_position = 0
            if answer is not None and start <= answer[0] and answer[1] < start + length:
                start_position, end_position = head + answer[0] - start, head + answer[1] - start
            features.append(
                SquadFeature(
                    example_index=index,
                    input_ids=ids + [pad_id] * n_pad,
                    token_type_ids=[0] * head + [1] * (length + 1) + [0] * n_pad,
                    attention_mask=[1] * len(ids) + [0] * n_pad,
                    offsets=[None] * head + list(doc.offsets[start : start + length]) + [None] * (n_pad + 1),
                    is_max_context=[False] * head
                    + [best_window[i] == w for i in range(start, start + length)]
                    + [False] * (n_pad + 1),
                    start_position=start_position,
                    end_position=end_position,
                )
            )
    return features


def postprocess(
    examples: Sequence[SquadExample],
    features: Sequence[SquadFeature],
    start_logits: Any,
    end_logits: Any,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> tuple[dict[str, str], dict[str, float]]:
    """Each question's best non-null span from per-window logits (B, T), and its null odds; both by id.

    BERT's score_diff is the null score ([CLS] start + end, lowest over windows) minus the best span score; the
    null odds are exp(score_diff) (see `null_odds`). Whether a question is answered "" is decided later, by
    `null_answers`, so that one set of spans serves every threshold.
    """
    start_logits, end_logits = np.asarray(start_logits, dtype=np.float64), np.asarray(end_logits, dtype=np.float64)
    if start_logits.shape != end_logits.shape or len(start_logits) != len(features):
        raise BertkitError(
            f"logits of shape {start_logits.shape} and {end_logits.shape}, expected ({len(features)}, max_length)"
        )
    by_example: dict[int, list[int]] = {}
    for f, feature in enumerate(features):
        by_example.setdefault(feature.example_index, []).append(f)

    spans, odds = {}, {}
    for index, example in enumerate(examples):
        if index not in by_example:
            raise BertkitError(f"question {example.id} has no features; expected those featurize() made for it")
        null_score = float("inf")
        best_score, best_text = None, ""
        for f in by_example[index]:
            feature, starts, ends = features[f], start_logits[f], end_logits[f]
            null_score = min(null_score, starts[0] + ends[0])
            # candidate spans: the n_best highest starts x ends, both inside this window's context
            top_starts = [s for s in np.argsort(starts)[::-1][:n_best] if feature.is_max_context[s]]
            top_ends = [e for e in np.argsort(ends)[::-1][:n_best] if feature.offsets[e] is not None]
            if not top_starts or not top_ends:
                continue
            s_idx, e_idx = np.array(top_starts)[:, None], np.array(top_ends)[None, :]
            scores = starts[s_idx] + ends[e_idx]  # (n_best, n_best)
            scores[(e_idx < s_idx) | (e_idx - s_idx >= max_answer_length)] = -np.inf
            i, j = np.unravel_index(np.argmax(scores), scores.shape)
            if np.isfinite(scores[i, j]) and (best_score is None or scores[i, j] > best_score):
                best_score = float(scores[i, j])
                s, e = top_starts[i], top_ends[j]
                best_text = example.context[feature.offsets[s][0] : _word_end(example.context, feature.offsets[e][1])]
        # As in BERT: with no valid span, the non-null answer is "" with score 0.
        odds[example.id] = null_odds(null_score - (best_score if best_score is not None else 0.0))
        spans[example.id] = best_text
    return spans, odds


def _word_end(context: str, end: int) -> int:
    """`end` moved past the combining marks that follow it. An uncased vocabulary's normaliser strips accents, so
    a decomposed "é" (e + U+0301) gives a token that ends at the "e": the answer would lose the accent of its last
    letter, and with it the exact match (BERT's whitespace words keep it)."""
    while end < len(context) and unicodedata.category(context[end]) == "Mn":
        end += 1
    return end


def null_odds(score_diff: float) -> float:
    """exp(score_diff): the odds of "no answer" against the best span, under a softmax over the two scores.

    These are what null_odds.json holds and the official evaluate-v2.0.py reads as its --na-prob-file. Its
    best-threshold search starts from "every question null" at threshold 0.0, and reports 0.0 when that wins,
    so the values must be above 0; score_diff itself is often negative, and there 0.0 answers most questions
    (a run reported best F1 50.83 "at 0.0" where F1 was 8.11). exp keeps the order and is above 0, and the
    script's default threshold 1.0 is even odds: score_diff 0, BERT's and bertkit's default --null-threshold.
    A sigmoid (a probability) also keeps the order, but rounds every score_diff above ~37 to exactly 1.0, which
    the default 1.0 then never makes null, and merges nearby ones above ~25 into ties. The clip keeps the value
    finite and above 0 for any score_diff (beyond ±700 only from a broken model).
    """
    return math.exp(min(max(score_diff, -700.0), 700.0))


def null_answers(spans: dict[str, str], odds: dict[str, float], threshold: float) -> dict[str, str]:
    """The answers at a null-odds threshold: "" where the odds exceed it (the v2.0 script's --na-prob-thresh)."""
    return {q: "" if odds[q] > threshold else text for q, text in spans.items()}


def write_predictions(predictions: dict[str, str], path: str | Path) -> None:
    """Write predictions.json as the official evaluation script reads it: {question id: answer text}."""
    write_json(path, predictions, indent=4)


def write_null_odds(odds: dict[str, float], path: str | Path) -> None:
    """Write null_odds.json, the v2.0 script's --na-prob-file: {question id: exp(score_diff)}."""
    write_json(path, odds, indent=4)
