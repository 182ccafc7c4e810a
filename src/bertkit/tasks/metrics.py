"""GLUE, SQuAD and CoNLL tagging metrics as their leaderboards and scripts report them: percentages, same definitions,
same averaging."""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, matthews_corrcoef, precision_recall_fscore_support

from bertkit.data.glue import get_task
from bertkit.data.squad import SquadExample
from bertkit.errors import BertkitError


def _correlation(fn: Callable, predictions: np.ndarray, labels: np.ndarray) -> float:
    # A constant prediction has no correlation; scipy says nan, and nan would poison "best on dev".
    if len(predictions) < 2:  # nor has a single pair, where pearsonr raises (after a whole epoch of training)
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(predictions, labels)[0])
    return 0.0 if np.isnan(value) else value


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda p, y: accuracy_score(y, p),
    "f1": lambda p, y: f1_score(y, p, pos_label=1, average="binary", zero_division=0.0),
    "mcc": lambda p, y: matthews_corrcoef(y, p),
    # each class's F1 averaged over the classes in the labels or the predictions: a rare class counts as much as a
    # common one, where accuracy rewards always guessing the common one
    "macro_f1": lambda p, y: f1_score(y, p, average="macro", zero_division=0.0),
    "pearson": lambda p, y: _correlation(pearsonr, p, y),
    "spearman": lambda p, y: _correlation(spearmanr, p, y),
}


def _multi_label_macro_f1(p: np.ndarray, y: np.ndarray) -> float:
    """Each label's F1 averaged over the labels in the file or predicted (as sklearn's macro F1 counts the classes of
    single-label data); 0 when there are none."""
    seen = np.flatnonzero(y.any(0) | p.any(0))
    return f1_score(y, p, labels=seen, average="macro", zero_division=0.0) if len(seen) else 0.0


# Multi-label: predictions and labels are (N, labels) 0/1 matrices
_MULTI_LABEL_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    # every (example, label) decision pooled: frequent labels weigh more
    "micro_f1": lambda p, y: f1_score(y, p, average="micro", zero_division=0.0),
    "macro_f1": _multi_label_macro_f1,
    # the whole set of labels right (sklearn's accuracy of multi-label data)
    "subset_accuracy": lambda p, y: accuracy_score(y, p),
}


def compute_metrics(names: Sequence[str], predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The named metrics (accuracy, f1, mcc, macro_f1, pearson, spearman) as percentages; for multi-label 0/1
    matrices (N, labels), micro_f1, macro_f1 and subset_accuracy."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or p.ndim not in (1, 2) or len(p) == 0:
        raise BertkitError(f"predictions {p.shape} and labels {y.shape}: expected two equal, non-empty 1-D sequences "
                           "(or multi-label 0/1 matrices)")
    known = _METRICS if p.ndim == 1 else _MULTI_LABEL_METRICS
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BertkitError(f"unknown metric(s) {', '.join(unknown)} (expected {', '.join(known)})")
    return {name: 100.0 * float(known[name](p, y)) for name in names}


CALIBRATION_BINS = 15  # Guo et al. 2017's


def calibration_scores(probabilities: np.ndarray, gold: Sequence[int], bins: int = CALIBRATION_BINS) -> dict:
    """How far a classifier's probabilities are from the frequencies they claim: the expected calibration error
    (Guo et al. 2017: examples put in `bins` equal-width bins of their top class's probability, each bin's |accuracy
    - mean confidence| weighted by its share of the examples), as a percentage, and the mean negative
    log-likelihood of the gold classes (nats)."""
    p, y = np.asarray(probabilities, dtype=np.float64), np.asarray(gold)
    if p.ndim != 2 or y.shape != (len(p),) or len(p) == 0:
        raise BertkitError(f"probabilities {p.shape} and labels {y.shape}: expected (N, classes) and (N,), N > 0")
    confidence, correct = p.max(1), (p.argmax(1) == y).astype(np.float64)
    # bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 (impossible above 1/classes) in bin 0
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = sum(abs(correct[which == b].sum() - confidence[which == b].sum()) for b in range(bins))
    nll = -np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None)).mean()
    return {"ece": 100.0 * float(gap) / len(y), "nll": float(nll)}


def fit_temperature(logits: np.ndarray, gold: Sequence[int]) -> float:
    """The temperature T that minimises the negative log-likelihood of softmax(logits / T) on these examples
    (Guo et al.'s temperature scaling: one number, so the predicted classes stay the same), between 0.05 and 20."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    z, y = np.asarray(logits, dtype=np.float64), np.asarray(gold)

    def nll(log_t: float) -> float:
        return -log_softmax(z / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean()

    found = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))


def class_report(labels: Sequence[str], predictions: Sequence[int], gold: Sequence[int], title: str,
                 max_matrix: int = 30) -> str:
    """Per class (indices into `labels`): examples, times predicted, precision, recall and F1 in percent, the macro
    average (as `macro_f1`), and the confusion matrix (up to `max_matrix` classes), in markdown. Multi-label 0/1
    matrices (N, labels) get the same table per label, with the micro average and the subset accuracy instead of
    the accuracy and the matrix."""
    p, y = np.asarray(predictions), np.asarray(gold)
    multi_label = p.ndim == 2
    classes = range(len(labels))
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=classes, zero_division=0.0)
    predicted = p.sum(0) if multi_label else np.bincount(p, minlength=len(labels))
    name = [" ".join(str(label).split()).replace("|", "\\|") or "(blank)" for label in labels]
    seen = (support > 0) | (predicted > 0)  # a class neither in the file nor predicted has no score
    what = "label" if multi_label else "class"
    lines = [f"# {title}", "", f"| {what} | examples | predicted | precision | recall | F1 |", "|---" * 6 + "|"]
    for i in classes:
        scores = f"{100 * precision[i]:.2f} | {100 * recall[i]:.2f} | {100 * f1[i]:.2f}" if seen[i] else "- | - | -"
        lines.append(f"| {name[i]} | {support[i]} | {predicted[i]} | {scores} |")
    macro = [f"{100 * values[seen].mean():.2f}" for values in (precision, recall, f1)]
    if not multi_label:
        lines += [f"| macro average | {len(y)} | {len(p)} | " + " | ".join(macro) + " |", "",
                  f"Accuracy {100 * float(np.mean(p == y)):.2f}; the macro average is over the {int(seen.sum())} "
                  "classes in the file or predicted (its F1 is `macro_f1`).", ""]
    else:
        micro = precision_recall_fscore_support(y, p, average="micro", zero_division=0.0)[:3]
        lines += [f"| micro average | {int(y.sum())} | {int(p.sum())} | "
                  + " | ".join(f"{100 * v:.2f}" for v in micro) + " |",
                  f"| macro average | {int(y.sum())} | {int(p.sum())} | " + " | ".join(macro) + " |", "",
                  f"{len(y):,} examples, {y.sum(1).mean():.2f} labels each in the file and {p.sum(1).mean():.2f} "
                  f"predicted; subset accuracy (every label of an example right) "
                  f"{100 * float(np.mean((p == y).all(1))):.2f}. The micro average pools every decision (its F1 is "
                  f"`micro_f1`), the macro average is over the {int(seen.sum())} labels in the file or predicted "
                  "(`macro_f1`).", ""]
        return "\n".join(lines)
    if len(labels) > max_matrix:
        return "\n".join(lines + [f"(No confusion matrix: {len(labels)} classes, more than {max_matrix}.)"]) + "\n"
    matrix = confusion_matrix(y, p, labels=classes)
    lines += ["Confusion matrix (rows: the file's label; columns: predicted):", "",
              "| label \\ predicted | " + " | ".join(name) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {name[i]} | " + " | ".join(str(n) for n in matrix[i]) + " |" for i in classes]
    return "\n".join(lines) + "\n"


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


def token_f1(prediction: str, gold: str, version: str = "2.0") -> float:
    """F1 over the bags of normalised tokens. When one side is empty, v2.0 scores 1 if both are (an unanswerable
    question left empty); v1.1's script has no such rule, so there no token in common is 0, even for "" vs "."."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(version == "2.0" and predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _percent(scores: Iterable[float]) -> float:
    """100 * the mean, with sum() in question order as the v2.0 script computes it, so the two agree to the bit."""
    scores = list(scores)
    return 100.0 * sum(scores) / len(scores)


def _best_threshold(scores: dict[str, float], null_odds: dict[str, float],
                    has_answer: dict[str, bool]) -> tuple[float, float]:
    """The null-odds threshold that maximises a score, and that score, searched as the v2.0 script does.

    Answer "" where the odds exceed t. Start at t = 0.0, below all odds: every question null, right only for the
    unanswerable ones (the script's start, hence odds above 0). Then raise t past the questions in order of their
    odds, each trading its null score for its answer's, and keep the best. Two deliberate differences from the
    script make the reported t score exactly what is reported: t stops only after a whole group of equal odds
    (the script also stops inside one, at a score that no threshold gives), and an answer that normalises to
    nothing (".") counts by its score (the script counts any non-empty answer to an unanswerable question as
    wrong, while its scoring, and so its thresholded numbers, count "." as right). SquadTask.evaluate writes such
    spans as "", so on bertkit's files the two searches differ only where distinct questions tie exactly.
    """
    total = sum(not has_answer[q] for q in scores)
    best, best_t = total, 0.0
    order = sorted(scores, key=lambda q: null_odds[q])
    for i, qid in enumerate(order):
        total += scores[qid] - (not has_answer[qid])
        if (i + 1 == len(order) or null_odds[order[i + 1]] != null_odds[qid]) and total > best:
            best, best_t = total, null_odds[qid]
    return 100.0 * best / len(scores), best_t


def squad_metrics(
    examples: Sequence[SquadExample],
    predictions: dict[str, str],
    version: str,
    null_odds: dict[str, float] | None = None,
    null_threshold: float = 1.0,
) -> dict[str, float]:
    """Exact match and F1 in percent as the official script of `version` ("1.1" or "2.0") scores them.

    A question with no prediction scores 0. v1.1 keeps every gold answer as it is (three dev questions have
    the gold "."; the empty answer matches it exactly, with F1 0). v2.0 drops golds that normalise to nothing
    (a question left with none has the gold "") and adds the HasAns/NoAns parts; given null odds (above 0,
    e.g. `null_odds` of data.squad), a question whose odds exceed `null_threshold` counts as answered ""
    (the script's --na-prob-thresh, default 1.0), and best_exact/best_f1 are the scores at the thresholds
    best_exact_thresh/best_f1_thresh, 0.0 meaning every question null.
    """
    if version not in ("1.1", "2.0"):
        raise ValueError(f"SQuAD version {version!r}, expected '1.1' or '2.0'")
    if not examples:
        raise BertkitError("no questions to score")
    exact, f1, has_answer = {}, {}, {}
    for example in examples:
        golds = [a.text for a in example.answers]
        if version == "2.0":
            # Gold answers that normalise to nothing cannot be matched; an unanswerable question's gold is "".
            golds = [g for g in golds if normalize_answer(g)] or [""]
        elif not golds:
            raise BertkitError(f"question {example.id} has no gold answer; SQuAD v1.1 scores answerable questions")
        prediction = predictions.get(example.id)
        has_answer[example.id] = bool(example.answers)
        if prediction is None:
            exact[example.id] = f1[example.id] = 0.0
            continue
        exact[example.id] = max(exact_match(prediction, g) for g in golds)
        f1[example.id] = max(token_f1(prediction, g, version) for g in golds)
    if version == "1.1":
        return {"exact": _percent(exact.values()), "f1": _percent(f1.values()), "total": float(len(exact))}

    if null_odds is not None:
        missing = [q for q in exact if q not in null_odds]
        if missing:
            raise BertkitError(f"null_odds has no entry for {len(missing)} questions, first {missing[0]}")
        bad = next((q for q in exact if not null_odds[q] > 0), None)
        if bad is not None:
            raise BertkitError(f"null odds of question {bad} is {null_odds[bad]}; expected a number above 0")
        thresholded = {}
        for name, raw in (("exact", exact), ("f1", f1)):
            thresholded[name] = {
                q: float(not has_answer[q]) if null_odds[q] > null_threshold else s for q, s in raw.items()
            }
        exact_used, f1_used = thresholded["exact"], thresholded["f1"]
    else:
        exact_used, f1_used = exact, f1

    result = {"exact": _percent(exact_used.values()), "f1": _percent(f1_used.values()), "total": float(len(exact))}
    for part, wanted in (("HasAns", True), ("NoAns", False)):
        ids = [q for q in exact if has_answer[q] == wanted]
        if ids:
            result[f"{part}_exact"] = _percent([exact_used[q] for q in ids])
            result[f"{part}_f1"] = _percent([f1_used[q] for q in ids])
            result[f"{part}_total"] = float(len(ids))
    if null_odds is not None:
        result["best_exact"], result["best_exact_thresh"] = _best_threshold(exact, null_odds, has_answer)
        result["best_f1"], result["best_f1_thresh"] = _best_threshold(f1, null_odds, has_answer)
    return {k: float(v) for k, v in result.items()}


# Tagging (CoNLL) ---------------------------------------------------------------------------------------------------

CHUNK_PREFIXES = ("B", "I", "E", "S")  # begin, inside, end, single: IOB1, IOB2 (BIO), IOE and IOBES tags are read


def split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") for B-PER, ("O", "") for O."""
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def _chunk_ends(prev: str, prev_kind: str, prefix: str, kind: str) -> bool:
    """Whether a chunk ends before this word (conlleval's rule, with seqeval's S for IOBES)."""
    return (prev in ("E", "S") or (prev in ("B", "I") and prefix in ("B", "S", "O"))
            or (prev != "O" and prev_kind != kind))


def _chunk_starts(prev: str, prev_kind: str, prefix: str, kind: str) -> bool:
    """Whether a chunk starts at this word: at B or S, at I or E after no open chunk, or where the type changes."""
    return (prefix in ("B", "S") or (prefix in ("I", "E") and prev in ("E", "S", "O"))
            or (prefix != "O" and prev_kind != kind))


def chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The chunks (entities) of one sentence's tags as (type, first word, last word + 1): IOB1 and IOB2 tags as
    conlleval.pl finds them (an I- after O or after another type opens a chunk, so the two read the same way), E-
    and S- tags as seqeval does (conlleval.pl has no S- tag, and reads E-PER B-PER as one chunk)."""
    found, start, prev, prev_kind = [], 0, "O", ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = split_tag(tag)
        if _chunk_ends(prev, prev_kind, prefix, kind):
            found.append((prev_kind, start, i))
        if _chunk_starts(prev, prev_kind, prefix, kind):
            start = i
        prev, prev_kind = prefix, kind
    return found


def _prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return 100 * precision, 100 * recall, 100 * f1


def chunk_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> tuple[dict, dict]:
    """Entity-level precision, recall and F1 (a predicted chunk is right when its type, first and last word equal a
    gold chunk's; micro-averaged over all chunks) and the accuracy over words, in percent, as conlleval reports
    them; and per type: {type: {"gold", "predicted", "correct", "precision", "recall", "f1"}}."""
    if len(gold) != len(predicted) or any(len(g) != len(p) for g, p in zip(gold, predicted)):
        raise BertkitError("predicted and gold tags: expected as many sentences, and as many tags per sentence")
    words = sum(len(g) for g in gold)
    if not words:
        raise BertkitError("no tagged words to score")
    counts: dict[str, Counter] = {}
    for g, p in zip(gold, predicted):
        gold_chunks, predicted_chunks = set(chunks(g)), set(chunks(p))
        for name, found in (("gold", gold_chunks), ("predicted", predicted_chunks),
                            ("correct", gold_chunks & predicted_chunks)):
            for kind, _, _ in found:
                counts.setdefault(kind, Counter())[name] += 1
    per_type = {}
    for kind in sorted(counts):
        c = counts[kind]
        per_type[kind] = {"gold": c["gold"], "predicted": c["predicted"], "correct": c["correct"],
                          **dict(zip(("precision", "recall", "f1"), _prf(c["correct"], c["predicted"], c["gold"])))}
    total = sum(counts.values(), Counter())
    precision, recall, f1 = _prf(total["correct"], total["predicted"], total["gold"])
    right = sum(a == b for g, p in zip(gold, predicted) for a, b in zip(g, p))
    return {"f1": f1, "precision": precision, "recall": recall, "accuracy": 100 * right / words}, per_type


def chunk_report(scores: dict, per_type: dict, title: str) -> str:
    """`chunk_scores`'s result in markdown: one row per type, then all types together."""
    lines = [f"# {title}", "", "| type | gold | predicted | correct | precision | recall | F1 |", "|---" * 7 + "|"]
    for kind, s in per_type.items():
        lines.append(f"| {kind} | {s['gold']} | {s['predicted']} | {s['correct']} | {s['precision']:.2f} | "
                     f"{s['recall']:.2f} | {s['f1']:.2f} |")
    total = {k: sum(s[k] for s in per_type.values()) for k in ("gold", "predicted", "correct")}
    lines += [f"| all | {total['gold']} | {total['predicted']} | {total['correct']} | {scores['precision']:.2f} | "
              f"{scores['recall']:.2f} | {scores['f1']:.2f} |", "",
              f"Accuracy over words {scores['accuracy']:.2f}. A chunk is right when its type, first and last word all "
              "match (conlleval's scoring).", ""]
    return "\n".join(lines)
