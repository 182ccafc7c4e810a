"""GLUE and SQuAD metrics as their leaderboards report them: percentages, same definitions, same averaging."""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from bertkit.data.glue import get_task
from bertkit.data.squad import SquadExample
from bertkit.errors import BertkitError


def _correlation(fn: Callable, predictions: np.ndarray, labels: np.ndarray) -> float:
    # A constant prediction has no correlation; scipy says nan, and nan would poison "best on dev".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(predictions, labels)[0])
    return 0.0 if np.isnan(value) else value


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda p, y: accuracy_score(y, p),
    "f1": lambda p, y: f1_score(y, p, pos_label=1, average="binary", zero_division=0.0),
    "mcc": lambda p, y: matthews_corrcoef(y, p),
    "pearson": lambda p, y: _correlation(pearsonr, p, y),
    "spearman": lambda p, y: _correlation(spearmanr, p, y),
}


def compute_metrics(names: Sequence[str], predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The named metrics (accuracy, f1, mcc, pearson, spearman) as percentages."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1 or len(p) == 0:
        raise BertkitError(f"predictions {p.shape} and labels {y.shape}: expected two equal, non-empty 1-D sequences")
    unknown = [n for n in names if n not in _METRICS]
    if unknown:
        raise BertkitError(f"unknown metric(s) {', '.join(unknown)} (expected {', '.join(_METRICS)})")
    return {name: 100.0 * float(_METRICS[name](p, y)) for name in names}


def glue_metrics(task: str, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """A GLUE task's metrics on class indices (floats for STS-B), in percent as on the leaderboard."""
    return compute_metrics(get_task(task).metrics, predictions, labels)


def headline_score(scores: dict[str, float]) -> float:
    """The one number for "best on dev": GLUE averages a task's metrics when it reports two (MRPC, QQP, STS-B)."""
    return sum(scores.values()) / len(scores)


# SQuAD ----------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower-case, drop ASCII punctuation and a/an/the, collapse white space."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 over the bags of normalised tokens; two empty answers agree (an unanswerable question left empty)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _best_threshold(scores: dict[str, float], null_odds: dict[str, float], has_answer: dict[str, bool],
                    predictions: dict[str, str]) -> tuple[float, float]:
    """The null-odds threshold that maximises a score, and that score, as the v2.0 evaluation searches it.

    Answering "" for every question whose odds exceed t; start from t below all odds (every answer null,
    right only for the unanswerable ones) and raise t past one question at a time, keeping the best.
    """
    total = sum(not has_answer[q] for q in scores)
    best, best_t = total, 0.0
    for qid in sorted(scores, key=lambda q: null_odds[q]):
        if has_answer[qid]:
            total += scores[qid]
        elif predictions.get(qid):
            total -= 1  # an unanswerable question now gets a non-empty answer
        if total > best:
            best, best_t = total, null_odds[qid]
    return 100.0 * best / len(scores), best_t


def squad_metrics(
    examples: Sequence[SquadExample],
    predictions: dict[str, str],
    null_odds: dict[str, float] | None = None,
    null_threshold: float = 1.0,
) -> dict[str, float]:
    """Exact match and F1 in percent, with HasAns/NoAns parts and, given null odds, the best thresholds.

    A question with no prediction scores 0. With `null_odds`, a question whose odds exceed `null_threshold`
    counts as answered "" (the v2.0 script's --na-prob-thresh, default 1.0).
    """
    if not examples:
        raise BertkitError("no questions to score")
    exact, f1, has_answer = {}, {}, {}
    for example in examples:
        # Gold answers that normalise to nothing cannot be matched; an unanswerable question's gold is "".
        golds = [a.text for a in example.answers if normalize_answer(a.text)] or [""]
        prediction = predictions.get(example.id)
        has_answer[example.id] = bool(example.answers)
        if prediction is None:
            exact[example.id] = f1[example.id] = 0.0
            continue
        exact[example.id] = max(exact_match(prediction, g) for g in golds)
        f1[example.id] = max(token_f1(prediction, g) for g in golds)

    if null_odds is not None:
        missing = [q for q in exact if q not in null_odds]
        if missing:
            raise BertkitError(f"null_odds has no entry for {len(missing)} questions, first {missing[0]}")
        thresholded = {}
        for name, raw in (("exact", exact), ("f1", f1)):
            thresholded[name] = {
                q: float(not has_answer[q]) if null_odds[q] > null_threshold else s for q, s in raw.items()
            }
        exact_used, f1_used = thresholded["exact"], thresholded["f1"]
    else:
        exact_used, f1_used = exact, f1

    result = {"exact": 100.0 * np.mean(list(exact_used.values())), "f1": 100.0 * np.mean(list(f1_used.values())),
              "total": float(len(exact))}
    for part, wanted in (("HasAns", True), ("NoAns", False)):
        ids = [q for q in exact if has_answer[q] == wanted]
        if ids:
            result[f"{part}_exact"] = 100.0 * np.mean([exact_used[q] for q in ids])
            result[f"{part}_f1"] = 100.0 * np.mean([f1_used[q] for q in ids])
            result[f"{part}_total"] = float(len(ids))
    if null_odds is not None:
        result["best_exact"], result["best_exact_thresh"] = _best_threshold(exact, null_odds, has_answer, predictions)
        result["best_f1"], result["best_f1_thresh"] = _best_threshold(f1, null_odds, has_answer, predictions)
    return {k: float(v) for k, v in result.items()}
