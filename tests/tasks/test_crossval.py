"""Scoring on rows held out of the training file (`finetune --eval-split`, `--folds`/`--fold`), `--keep last`, and
k-fold cross-validation (`bertkit crossval`): the stratified split, the runs, every row predicted out of fold, the
pooled metrics, the label errors found, resuming, and the settings refused."""

import collections
import json
import statistics

import numpy as np
import pytest

from bertkit.cli import main
from bertkit.tasks.classification import HELD_OUT, stratified_folds, stratified_order
from bertkit.tasks.crossval import crossval
from bertkit.tasks.evaluation import evaluate, predict
from bertkit.tasks.finetune import finetune, load_task
from bertkit.tasks.metrics import compute_metrics
from conftest import data_path
from tasks.test_finetune import quick, tsv

GOOD = ["a good movie", "great fun", "very good", "a great film", "fun and good", "good fun"]
BAD = ["a bad film", "very boring", "awful", "a boring movie", "bad and boring", "an awful film"]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_fold_and_first_stretch_holds_each_label_in_its_share(seed):
    labels = [0] * 70 + [1] * 23 + [2] * 7  # unbalanced, in file order
    folds = stratified_folds(labels, 5, seed)
    for k in range(1, 6):  # each of five folds: 14, 4.6 and 1.4 of the three labels
        counts = collections.Counter(label for label, fold in zip(labels, folds) if fold == k)
        assert counts[0] == 14 and counts[1] in (4, 5) and counts[2] in (1, 2), counts
    assert sorted(collections.Counter(folds).values()) == [20] * 5
    order = stratified_order(labels, seed)
    assert sorted(order) == list(range(100))
    for m in (10, 25, 50):  # any first stretch: a stratified sample of that size
        counts = collections.Counter(labels[i] for i in order[:m])
        assert all(abs(counts[c] - m * n / 100) <= 1 for c, n in ((0, 70), (1, 23), (2, 7))), (m, counts)
    assert order == stratified_order(labels, seed) and order != stratified_order(labels, seed + 1)
    assert folds == stratified_folds(labels, 5, seed) and folds != stratified_folds(labels, 5, seed + 1)


def test_a_regressors_folds_span_the_scores_alike():
    scores = [float(x) for x in np.random.default_rng(0).uniform(0, 5, 200)]
    folds = stratified_folds(scores, 4, 3, regression=True)
    means = [statistics.mean(s for s, f in zip(scores, folds) if f == k) for k in range(1, 5)]
    assert max(means) - min(means) < 0.15  # the whole range in every fold
    low = [scores[i] for i in stratified_order(scores, 3, regression=True)[:20]]
    assert min(low) < 0.6 and max(low) > 4.4  # a first tenth from every tenth of the scores


def test_multi_label_rows_are_stratified_by_their_set_of_labels():
    labels = [(0,), (0, 1), (), (1,)] * 10
    folds = stratified_folds(labels, 2, 0)
    for k in (1, 2):
        assert collections.Counter(label for label, f in zip(labels, folds) if f == k) == {(0,): 5, (0, 1): 5, (): 5,
                                                                                          (1,): 5}


def test_a_groups_rows_share_a_fold_and_the_folds_stay_stratified():
    rng = np.random.default_rng(0)
    labels = [int(x) for x in rng.random(600) < 0.3]
    groups = [f"doc-{int(g)}" for g in rng.integers(0, 150, 600)]  # about four rows a document
    folds = stratified_folds(labels, 5, 1, groups=groups)
    assert all(len({f for f, g in zip(folds, groups) if g == doc}) == 1 for doc in set(groups))
    sizes = collections.Counter(folds)
    assert max(sizes.values()) - min(sizes.values()) <= 10, sizes  # within a couple of documents
    share = [statistics.mean(label for label, f in zip(labels, folds) if f == k) for k in range(1, 6)]
    assert max(share) - min(share) < 0.05, share
    assert folds == stratified_folds(labels, 5, 1, groups=groups) != stratified_folds(labels, 5, 2, groups=groups)


def reviews(tmp_path, flipped: int | None = None):
    """48 rows, a sentiment word decides the label; `flipped`: that row's label is wrong."""
    rows = [(text, "good") for text in GOOD] * 4 + [(text, "bad") for text in BAD] * 4
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    if flipped is not None:
        text, label = rows[flipped]
        rows[flipped] = (text, "bad" if label == "good" else "good")
    return tsv(tmp_path / "reviews.tsv", ("sentence", "label"), *rows), rows


def test_eval_split_holds_out_a_stratified_share_that_evaluate_finds_again(toy_model_dir, tmp_path):
    path, rows = reviews(tmp_path)
    config = quick(toy_model_dir, tmp_path / "run", task="custom", train_file=str(path), eval_split=0.25)
    task = load_task(config)
    held = task.evals[HELD_OUT]
    assert len(held) == 12 and len(task.train) == 36 and list(task.evals) == [HELD_OUT]
    assert collections.Counter(e.label for e in held) == {0: 6, 1: 6}
    assert {e.line for e in held}.isdisjoint(e.line for e in task.train)
    assert [rows[i][0] for i in task.held_out] == [e.text_a for e in held]  # the rows' places in the file
    record = finetune(config)
    assert record["train_examples"] == 36 and record["eval_examples"] == 12
    results = (tmp_path / "run" / "results.md").read_text()
    assert "Scored on 0.25 of the training file, held out (split seed 0)." in results
    again = evaluate(tmp_path / "run")  # from the run's config: the same rows held out of the same file
    assert again["accuracy"] == pytest.approx(record["best"]["accuracy"])
    other = tsv(tmp_path / "other.tsv", ("sentence", "label"), ("a good movie", "good"), ("awful", "bad"))
    assert evaluate(tmp_path / "run", eval_file=str(other))["accuracy"] in (0.0, 50.0, 100.0)  # that file alone


def test_group_holds_out_whole_documents(toy_model_dir, tmp_path):
    rows = [(text, label, f"review-{i % 7}") for i, (text, label) in enumerate(reviews(tmp_path)[1])]
    path = tsv(tmp_path / "grouped.tsv", ("sentence", "label", "doc"), *rows)
    other = tsv(tmp_path / "dev.tsv", ("sentence", "label"), ("a good movie", "good"), ("awful", "bad"))  # no doc
    for split in ({"folds": 3, "fold": 2}, {"eval_split": 0.25}):
        config = quick(toy_model_dir, tmp_path / "run", task="custom", train_file=str(path), eval_file=str(other),
                       group="doc", **split)
        task = load_task(config)
        held = {e.group for e in task.evals[HELD_OUT]}
        assert held and held.isdisjoint(e.group for e in task.train)  # no document on both sides
        assert list(task.evals) == [HELD_OUT, "dev"]
    assert len(task.evals[HELD_OUT]) in range(6, 19)  # --eval-split 0.25: one of four folds of whole documents
    finetune(config)
    assert evaluate(tmp_path / "run")["accuracy"] == json.loads((tmp_path / "run" / "metrics.json").read_text())[
        "best"]["accuracy"]
    assert evaluate(tmp_path / "run", eval_file=str(other))["accuracy"] in (0.0, 50.0, 100.0)  # no split, no group


def test_a_glue_task_scores_its_held_out_fold_first_then_dev(tiny_model_dir, tmp_path):
    config = quick(tiny_model_dir, tmp_path / "run", task="RTE", data_dir=str(data_path("glue", "RTE")), folds=5,
                   fold=2, epochs=1, limit_train_examples=64)
    task = load_task(config)
    assert list(task.evals) == [HELD_OUT, "dev"] and len(task.evals[HELD_OUT]) == 498  # 2,490 / 5
    record = finetune(config)
    assert record["eval_examples"] == 498 and {"accuracy", "dev_accuracy"} <= set(record["best"])


def test_keep_last_keeps_the_last_epoch_whatever_it_scores(toy_model_dir, tmp_path, monkeypatch):
    import bertkit.tasks.metrics as metrics

    scores = iter([80.0, 90.0, 60.0])  # the best epoch is the second
    monkeypatch.setattr(metrics, "compute_metrics", lambda names, p, y: {m: next(scores) for m in names[:1]}
                        | {m: 0.0 for m in names[1:]})
    path, _ = reviews(tmp_path)
    record = finetune(quick(toy_model_dir, tmp_path / "run", task="custom", train_file=str(path), eval_split=0.25,
                            epochs=3, keep="last"))
    assert record["best_epoch"] == 3 and record["best"]["accuracy"] == 60.0
    text = (tmp_path / "run" / "results.md").read_text()
    assert "| 3 (kept) |" in text and "Last: epoch 3 (accuracy 60.00" in text


def test_crossval_predicts_every_row_once_by_the_model_that_did_not_see_it(toy_model_dir, tmp_path, capsys):
    path, rows = reviews(tmp_path, flipped=5)
    config = quick(toy_model_dir, tmp_path / "cv", task="custom", train_file=str(path), folds=3, keep="last",
                   epochs=8, lr=2e-2)
    summary = crossval(config)
    oof = [json.loads(line) for line in (tmp_path / "cv" / "out_of_fold.jsonl").read_text().splitlines()]
    assert [r["index"] for r in oof] == list(range(48)) and [r["text"] for r in oof] == [t for t, _ in rows]
    assert [r["gold"] for r in oof] == [label for _, label in rows]
    folds = stratified_folds([0 if label == "bad" else 1 for _, label in rows], 3, 0)  # custom labels: sorted
    assert [r["fold"] for r in oof] == folds
    # each row's prediction is the one `predict` gives with its fold's model
    for fold in (1, 3):
        mine = [r for r in oof if r["fold"] == fold]
        theirs = predict(tmp_path / "cv" / f"fold-{fold}", [r["text"] for r in mine])
        assert [t["label"] for t in theirs] == [r["label"] for r in mine]
        assert [t["probability"] for t in theirs] == pytest.approx([r["probability"] for r in mine], abs=1e-5)
    # the per-fold scores are the folds' own records; the pooled scores are the out-of-fold predictions'
    for fold, row in enumerate(summary["per_fold"], start=1):
        record = json.loads((tmp_path / "cv" / f"fold-{fold}" / "metrics.json").read_text())
        assert row["accuracy"] == record["epochs"][-1]["accuracy"] and row["epoch"] == 8
    pooled = compute_metrics(("accuracy",), [r["label"] for r in oof], [r["gold"] for r in oof])
    assert summary["pooled"]["accuracy"] == pytest.approx(pooled["accuracy"])
    assert summary["mean"]["accuracy"] == pytest.approx(statistics.mean(f["accuracy"] for f in summary["per_fold"]))
    # the wrong label is the least likely one out of fold: listed first
    assert max(oof, key=lambda r: r["loss"])["index"] == 5
    table = (tmp_path / "cv" / "crossval.md").read_text()
    suspects = table.split("| line | gold | predicted | loss | text |")[1].splitlines()
    assert f"| {rows[5][0]} |" in suspects[2]
    assert json.loads((tmp_path / "cv" / "crossval.json").read_text())["pooled"] == summary["pooled"]

    # the same command again: every fold is kept, nothing trains
    before = (tmp_path / "cv" / "fold-1" / "metrics.json").stat().st_mtime_ns
    assert main(["crossval", "--model-dir", toy_model_dir, "--task", "custom", "--train-file", str(path), "--folds",
                 "3", "--out-dir", str(tmp_path / "cv"), "--epochs", "8", "--lr", "2e-2", "--batch-size", "16",
                 "--seed", "0", "--threads", "1", "--device", "cpu"]) == 0
    assert (tmp_path / "cv" / "fold-1" / "metrics.json").stat().st_mtime_ns == before
    assert "| mean ± std |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    (["--eval-split", "1"], "--eval-split is 1.0; expected a fraction of the training file from 0"),
    (["--folds", "1"], "--folds is 1; expected 2 or more folds"),
    (["--folds", "3", "--fold", "4"], "--fold is 4; expected a fold from 1 to --folds 3"),
    (["--fold", "2"], "--fold 2 without --folds; expected --folds K"),
    (["--folds", "3", "--eval-split", "0.1"], "--eval-split 0.1 with --folds 3; expected one of them"),
    (["--folds", "3", "--task", "squad1"], "--folds with --task squad1; expected a GLUE task or custom files"),
    (["--keep", "last", "--early-stopping-patience", "1"], "--keep last with --early-stopping-patience 1; expected "
                                                           "one of them"),
    (["--eval-split", "0.01"], "--eval-split 0.01 of 48 training examples leaves 48 to train on and 0 to score"),
    (["--eval-file", ""], "a custom task needs --eval-file (labelled, same columns as the training file), or "
                          "--eval-split 0.1"),
    (["--group", "doc"], "--group doc without --eval-split or --folds; expected one of them"),
    (["--group", "doc", "--folds", "3", "--task", "SST-2"], "--group with --task SST-2; expected --task custom"),
    (["--group", "doc", "--folds", "3"], "reviews.tsv:1: no column 'doc' (found sentence, label)"),
])
def test_splits_no_run_can_use_are_refused_before_the_folder_is_made(toy_model_dir, tmp_path, capsys, argv,
                                                                     expected):
    path, _ = reviews(tmp_path)
    task = [] if "--task" in argv else ["--task", "custom"]
    assert main(["finetune", "--model-dir", toy_model_dir, *task, "--train-file", str(path), "--out-dir",
                 str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_crossval_refuses_a_task_without_labels_to_stratify(toy_model_dir, tmp_path, capsys):
    assert main(["crossval", "--model-dir", toy_model_dir, "--task", "ner", "--out-dir", str(tmp_path / "cv")]) == 2
    assert "--folds with --task ner; expected a GLUE task or custom files" in capsys.readouterr().err
    assert not (tmp_path / "cv").exists()
