"""GLUE metrics against hand-checked values and sklearn/scipy; SQuAD EM/F1 against the official numbers."""

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from bertkit.data.squad import SquadAnswer, SquadExample, read_squad
from bertkit.errors import BertkitError
from bertkit.tasks.metrics import (
    compute_metrics,
    exact_match,
    glue_metrics,
    headline_score,
    normalize_answer,
    squad_metrics,
    token_f1,
)


def data_path(*parts: str) -> Path:
    root = os.environ.get("BERTKIT_DATA")
    if not root or not Path(root, *parts).exists():
        pytest.skip("BERTKIT_DATA is not set or lacks this file")
    return Path(root, *parts)


# --- GLUE ------------------------------------------------------------------------------------------------


def test_hand_checked_classification():
    predictions, labels = [1, 0, 1, 1], [1, 0, 0, 1]  # TP 2, TN 1, FP 1, FN 0
    scores = compute_metrics(["accuracy", "f1", "mcc"], predictions, labels)
    assert scores["accuracy"] == pytest.approx(75.0)
    assert scores["f1"] == pytest.approx(80.0)  # 2*TP / (2*TP + FP + FN) = 4/5
    assert scores["mcc"] == pytest.approx(100 * 2 / math.sqrt(3 * 2 * 1 * 2))


def test_hand_checked_correlation():
    scores = compute_metrics(["pearson", "spearman"], [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert scores["pearson"] == pytest.approx(100 * 9 / math.sqrt(84))
    assert scores["spearman"] == pytest.approx(100.0)
    # a constant prediction has no correlation: 0, not nan, so "best on dev" still compares
    assert compute_metrics(["pearson"], [2.0, 2.0, 2.0], [1.0, 2.0, 4.0]) == {"pearson": 0.0}


def test_one_scored_pair_has_no_correlation_and_is_not_an_error():
    # pearsonr raises on fewer than 2 values: a one-row STS-B eval file failed the run after its first epoch
    assert compute_metrics(["pearson", "spearman"], [2.0], [3.5]) == {"pearson": 0.0, "spearman": 0.0}
    assert glue_metrics("STS-B", [2.0], [3.5]) == {"pearson": 0.0, "spearman": 0.0}


def test_agrees_with_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    scores = compute_metrics(["accuracy", "f1", "mcc"], p, y)
    assert scores == pytest.approx({"accuracy": 100 * accuracy_score(y, p), "f1": 100 * f1_score(y, p),
                                    "mcc": 100 * matthews_corrcoef(y, p)})
    gold, guess = rng.uniform(0, 5, 200), rng.uniform(0, 5, 200)
    assert glue_metrics("sts-b", guess, gold) == pytest.approx(
        {"pearson": 100 * pearsonr(guess, gold)[0], "spearman": 100 * spearmanr(guess, gold)[0]})


@pytest.mark.parametrize("task, keys", [
    ("CoLA", {"mcc"}), ("SST-2", {"accuracy"}), ("MRPC", {"f1", "accuracy"}), ("STS-B", {"pearson", "spearman"}),
    ("QQP", {"f1", "accuracy"}), ("MNLI", {"accuracy"}), ("QNLI", {"accuracy"}), ("RTE", {"accuracy"}),
    ("WNLI", {"accuracy"}),
])
def test_each_glue_task(task, keys):
    labels = [0, 1, 2, 1, 0, 2] if task == "MNLI" else [0, 1, 1, 0, 1, 1]
    predictions = [0, 1, 1, 1, 0, 2] if task == "MNLI" else [0, 1, 0, 0, 1, 1]
    if task == "STS-B":
        labels, predictions = [0.5, 1.0, 2.5, 3.0, 4.2, 5.0], [0.7, 1.1, 2.0, 3.3, 4.0, 4.8]
    scores = glue_metrics(task, predictions, labels)
    assert set(scores) == keys
    if task != "STS-B":
        assert scores.get("accuracy", 100 * 5 / 6) == pytest.approx(100 * 5 / 6)
    assert headline_score(scores) == pytest.approx(sum(scores.values()) / len(keys))


def test_headline_averages_two_metrics():
    assert headline_score({"f1": 90.0, "accuracy": 86.0}) == 88.0
    assert headline_score({"mcc": 55.0}) == 55.0


def test_bad_metric_input():
    with pytest.raises(BertkitError, match="expected two equal, non-empty"):
        glue_metrics("rte", [0, 1], [0])
    with pytest.raises(BertkitError, match="unknown metric.*auc"):
        compute_metrics(["auc"], [0], [0])


# --- SQuAD -----------------------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day\n") == "apple day"
    assert normalize_answer("Theatre and anthem") == "theatre and anthem"  # articles only as whole words
    assert normalize_answer("“Quoted”") == "“quoted”"  # only ASCII punctuation goes, as in the official script


def test_exact_match_and_f1():
    assert exact_match("Denver Broncos", "the denver broncos.") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)  # P 1, R 2/3
    assert token_f1("x y y", "y y z") == pytest.approx(2 / 3)  # tokens are a bag: "y" matches twice
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0
    # v1.1's script: no token in common is 0, even for two empty answers; exact match still holds
    assert token_f1("", ".", "1.1") == 0.0 and token_f1("", "", "1.1") == 0.0 and exact_match("", ".") == 1.0


def example(qid: str, *answers: str) -> SquadExample:
    context = " ".join(answers) or "nothing here"
    spans, start = [], 0
    for text in answers:
        spans.append(SquadAnswer(text, start))
        start += len(text) + 1
    return SquadExample(qid, "t", 0, "q?", context, spans, is_impossible=not answers)


def test_squad_v2_breakdown_and_thresholds():
    examples = [example("q1", "Paris"), example("q2", "the Eiffel Tower"), example("q3"), example("q4")]
    predictions = {"q1": "Paris", "q2": "Eiffel", "q3": "", "q4": "London"}
    plain = squad_metrics(examples, predictions, "2.0")
    assert plain["exact"] == pytest.approx(50.0) and plain["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 4)
    assert plain["HasAns_exact"] == 50.0 and plain["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert plain["NoAns_exact"] == 50.0 and plain["NoAns_total"] == 2.0
    assert "best_f1" not in plain

    odds = {"q1": 0.01, "q2": 0.5, "q3": 2.0, "q4": 3.0}
    scored = squad_metrics(examples, predictions, "2.0", odds)  # q3, q4 have odds > 1.0: counted as null, both right
    assert scored["exact"] == pytest.approx(75.0) and scored["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2) / 4)
    # null for odds > t: t = 0.01 answers only q1 (3 of 4 right); t = 0.5 adds q2's partial F1 of 2/3
    assert (scored["best_exact"], scored["best_exact_thresh"]) == (pytest.approx(75.0), 0.01)
    assert (scored["best_f1"], scored["best_f1_thresh"]) == (pytest.approx(100 * (3 + 2 / 3) / 4), 0.5)


def test_all_null_best_is_reported_at_a_threshold_that_answers_nothing():
    """When answering nothing wins, the threshold is 0.0, below all (positive) odds: there every answer is null.
    (The score difference, which the odds are exp of, would be negative here, where 0.0 answers every question.)"""
    examples = [example("a1", "Paris"), example("n1"), example("n2"), example("n3")]
    predictions = {"a1": "Rome", "n1": "Lyon", "n2": "Nice", "n3": "Metz"}
    odds = {"a1": math.exp(-3.0), "n1": math.exp(-2.0), "n2": math.exp(-1.5), "n3": math.exp(-1.0)}
    scores = squad_metrics(examples, predictions, "2.0", odds)
    assert scores["best_f1"] == 75.0 and scores["best_f1_thresh"] == 0.0 == scores["best_exact_thresh"]
    assert squad_metrics(examples, predictions, "2.0", odds, null_threshold=0.0)["f1"] == 75.0
    assert squad_metrics(examples, predictions, "2.0", odds)["f1"] == 0.0  # at the default 1.0 all are answered


def test_reported_best_threshold_scores_the_reported_best_score():
    """best_{exact,f1}_thresh, used as the threshold, scores exactly best_{exact,f1}, and no threshold scores more:
    also with tied odds (the search stops only after a whole tie) and answers that normalise to nothing."""
    rng = random.Random(0)
    for trial in range(20):
        examples = [example(f"q{i}", "red fox") if i % 3 else example(f"q{i}") for i in range(60)]
        predictions = {e.id: rng.choice(["", ".", "the", "red fox", "fox", "blue"]) for e in examples}
        levels = [math.exp(rng.uniform(-3, 3)) for _ in range(8 if trial % 2 else 60)]  # few levels: many ties
        odds = {e.id: rng.choice(levels) for e in examples}
        scores = squad_metrics(examples, predictions, "2.0", odds)
        for name in ("exact", "f1"):
            every = [squad_metrics(examples, predictions, "2.0", odds, null_threshold=t)[name]
                     for t in [0.0, *odds.values()]]
            reported = squad_metrics(examples, predictions, "2.0", odds, null_threshold=scores[f"best_{name}_thresh"])
            assert scores[f"best_{name}"] == pytest.approx(max(every), rel=1e-12)
            assert reported[name] == pytest.approx(scores[f"best_{name}"], rel=1e-12)


def test_missing_predictions_score_zero_and_odds_must_be_positive():
    examples = [example("q1", "Paris"), example("q2", "Rome")]
    assert squad_metrics(examples, {"q1": "paris"}, "2.0")["exact"] == 50.0
    assert squad_metrics(examples, {"q1": "paris"}, "1.1")["exact"] == 50.0
    with pytest.raises(BertkitError, match="null_odds has no entry for 1 questions, first q2"):
        squad_metrics(examples, {"q1": "paris"}, "2.0", {"q1": 1.0})
    with pytest.raises(BertkitError, match="null odds of question q2 is -0.5; expected a number above 0"):
        squad_metrics(examples, {"q1": "paris"}, "2.0", {"q1": 1.0, "q2": -0.5})
    with pytest.raises(BertkitError, match="question q3 has no gold answer; SQuAD v1.1"):
        squad_metrics([example("q3")], {"q3": ""}, "1.1")


def test_each_version_keeps_the_golds_its_own_script_keeps():
    """v1.1 keeps a gold "." (normalised "", matched exactly by an empty answer, F1 0); v2.0 drops it."""
    examples = [example("q1", "fox", "."), example("q2", ".")]
    assert squad_metrics(examples, {"q1": "", "q2": ""}, "1.1") == {"exact": 100.0, "f1": 0.0, "total": 2.0}
    v2 = squad_metrics(examples, {"q1": "", "q2": ""}, "2.0")  # q1's gold is "fox"; q2 has none left, so ""
    assert (v2["exact"], v2["f1"], v2["HasAns_total"]) == (50.0, 50.0, 2.0)


def test_official_score_of_the_bert_ensemble():
    examples = read_squad(data_path("squad", "dev-v1.1.json"))
    predictions = json.loads(data_path("squad", "reference", "bert-ensemble-v1.1-dev-predictions.json").read_text())
    scores = squad_metrics(examples, predictions, "1.1")
    assert round(scores["exact"], 3) == 86.206
    assert round(scores["f1"], 3) == 92.196
    assert scores["total"] == 10570
    # The three questions with the gold "." (the ensemble answers them otherwise): answered "", evaluate-v1.1.py
    # gives them exact match 1 and F1 0, and prints these numbers.
    dotted = [e.id for e in examples if any(a.text == "." for a in e.answers)]
    assert len(dotted) == 3
    scores = squad_metrics(examples, predictions | dict.fromkeys(dotted, ""), "1.1")
    assert (scores["exact"], scores["f1"]) == (86.2251655629139, 92.18044260281135)


def test_macro_f1_and_the_class_report_hand_checked():
    """A user's own classes: macro F1 (each class's F1 averaged, so the rare class counts) beside accuracy, which
    an always-the-common-class model games, and the per class table with its confusion matrix."""
    from sklearn.metrics import f1_score as sk_f1

    from bertkit.tasks.metrics import class_report

    gold, always = [0] * 8 + [1] * 2, [0] * 10
    scores = compute_metrics(["accuracy", "macro_f1"], always, gold)
    assert scores == {"accuracy": pytest.approx(80.0), "macro_f1": pytest.approx(100 * (16 / 18) / 2)}
    rng = np.random.default_rng(1)
    p, y = rng.integers(0, 4, 200), rng.integers(0, 3, 200)  # a class predicted that the file lacks
    assert compute_metrics(["macro_f1"], p, y)["macro_f1"] == pytest.approx(100 * sk_f1(y, p, average="macro"))
    report = class_report(["neg", "pos", "n|a", "unused"], [0, 1, 1, 0, 2], [0, 1, 0, 0, 1], "t")
    lines = report.splitlines()
    assert lines[4:9] == ["| neg | 3 | 2 | 100.00 | 66.67 | 80.00 |", "| pos | 2 | 2 | 50.00 | 50.00 | 50.00 |",
                          "| n\\|a | 0 | 1 | 0.00 | 0.00 | 0.00 |", "| unused | 0 | 0 | - | - | - |",
                          "| macro average | 5 | 5 | 50.00 | 38.89 | 43.33 |"]
    assert compute_metrics(["macro_f1"], [0, 1, 1, 0, 2], [0, 1, 0, 0, 1])["macro_f1"] == pytest.approx(130 / 3)
    assert lines[-4:] == ["| neg | 2 | 1 | 0 | 0 |", "| pos | 0 | 1 | 1 | 0 |", "| n\\|a | 0 | 0 | 0 | 0 |",
                          "| unused | 0 | 0 | 0 | 0 |"]
    assert "No confusion matrix: 4 classes" in class_report(["a", "b", "c", "d"], [0], [0], "t", max_matrix=3)
