"""SQuAD fine-tuning on a few real paragraphs with a tiny random model: windows, predictions, v2.0 extras."""

import dataclasses
import io
import json
import math
import random
import re
import shutil
import string
from collections import Counter
from pathlib import Path

import pytest

from bertkit import Tokenizer
from bertkit.cli import main
from bertkit.data.squad import read_squad
from bertkit.errors import BertkitError
from bertkit.tasks.evaluation import evaluate, predict
from bertkit.tasks.finetune import FinetuneConfig, finetune
from bertkit.tasks.metrics import normalize_answer, squad_metrics
from bertkit.tasks.squad import SquadTask
from conftest import data_path


def slice_of(source: str, out, articles=(1, 2), paragraphs=4):
    """The first paragraphs of a few articles of a real SQuAD file, in the same format."""
    data = json.loads(data_path("squad", source).read_text(encoding="utf-8"))
    data["data"] = [dict(data["data"][a], paragraphs=data["data"][a]["paragraphs"][:paragraphs]) for a in articles]
    out.write_text(json.dumps(data), encoding="utf-8")
    return out


def config(model_dir, out_dir, task, file, **kw) -> FinetuneConfig:
    # short windows so that long paragraphs are cut into several, as 384/128 does on full articles
    options = dict(lr=2e-3, batch_size=16, epochs=2, max_length=128, doc_stride=48, seed=0, threads=1, device="cpu")
    return FinetuneConfig(model_dir=model_dir, out_dir=str(out_dir), task=task, train_file=str(file), train_articles=1,
                          **{**options, **kw})


@pytest.fixture(scope="module")
def squad1_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("squad1")
    run = config(tiny_model_dir, tmp / "run", "squad1", slice_of("dev-v1.1.json", tmp / "slice.json"))
    return run, finetune(run)


def test_training_windows_point_at_the_answer(tiny_model_dir, tmp_path):
    file = slice_of("dev-v1.1.json", tmp_path / "slice.json")
    run = config(tiny_model_dir, tmp_path, "squad1", file)
    task = SquadTask("squad1", train=read_squad(file))
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    rows = task.train_rows(tokenizer, run)
    assert len(rows) > len(task.train)  # long paragraphs give several windows
    assert all(len(r["input_ids"]) <= 128 and r["input_ids"][-1] == tokenizer.sep_id for r in rows)
    answered = [r for r in rows if r["start_positions"] > 0]
    assert len(answered) >= len(task.train)
    # the labelled tokens read back as a gold answer (as the tokenizer sees it: lower-cased, accents stripped)
    golds = {normalize_answer(tokenizer.decode(tokenizer.encode(a.text)["input_ids"])).replace(" ", "")
             for e in task.train for a in e.answers}
    for row in answered:
        span = tokenizer.decode(row["input_ids"][row["start_positions"] : row["end_positions"] + 1])
        assert normalize_answer(span).replace(" ", "") in golds


def test_squad1_run_end_to_end(squad1_run):
    run, record = squad1_run
    out = Path(run.out_dir)
    assert {"exact", "f1"} <= set(record["best"]) and not (out / "null_odds.json").exists()
    assert record["train_rows"] > record["train_examples"] > 0 and record["eval_examples"] > 0
    assert len(json.loads((out / "predictions.json").read_text())) == record["eval_examples"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]
    assert "| epoch | train loss | exact | f1 |" in (out / "results.md").read_text()
    # the same run typed with another case is the same run: its record comes back, not "holds another run"
    assert finetune(dataclasses.replace(run, task="SQuAD1", resume="auto"))["best"] == record["best"]


def test_evaluate_reproduces_the_recorded_squad_scores(squad1_run, tmp_path):
    run, record = squad1_run
    metrics = evaluate(run.out_dir, out_dir=tmp_path)
    assert metrics["exact"] == pytest.approx(record["best"]["exact"]) and metrics["f1"] == pytest.approx(record["best"]["f1"])
    kept = json.loads(Path(run.out_dir, "predictions.json").read_text())
    assert json.loads((tmp_path / "predictions.json").read_text()) == kept


def test_predict_answers_json_lines(squad1_run, monkeypatch, capsys):
    run, _ = squad1_run
    lines = [json.dumps({"id": "q", "question": "Where is the cat?", "context": "The cat sat on the mat in Paris."}), ""]
    answer, blank = predict(run.out_dir, lines)  # one output line per input line, the blank one included
    assert answer["id"] == "q" and answer["answer"] in "The cat sat on the mat in Paris."
    assert blank == {"question": None, "answer": None, "error": "blank line: no question to answer"}
    monkeypatch.setattr("sys.stdin", io.StringIO('{"question": "Who?"}\n'))
    assert main(["predict", run.out_dir]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and '<stdin>:1: expected a JSON object with string "question" and "context"' in err


def test_predict_answers_each_line_even_when_ids_repeat_or_escape_a_lone_surrogate(squad1_run):
    """Several questions on one document under one id, a line number that is another line's id, and a JSON-escaped
    lone surrogate (U+FFFD to the tokenizer): every line gets the answer it gets alone."""
    run, _ = squad1_run
    context = "The cat sat on the mat in Paris. The dog ran to the park in Rome at noon."
    lines = [json.dumps({"id": "doc", "question": "Where is the cat?", "context": context}),
             json.dumps({"id": "doc", "question": "When did the dog run?", "context": context}),
             json.dumps({"id": "1", "question": "Where did the dog run?", "context": context}),
             json.dumps({"question": "Who sat \ud800?", "context": "Ada sat \udfff on the mat."})]
    together = predict(run.out_dir, lines)
    alone = [predict(run.out_dir, [line])[0] for line in lines]
    assert [r["answer"] for r in together] == [r["answer"] for r in alone]
    assert [r["id"] for r in together] == ["doc", "doc", "1", "4"]


def test_predict_numbers_a_line_whose_id_is_null(squad1_run):
    """An "id" of null is no id, as `bertkit serve` reads it: the line number, not the string "None"."""
    run, _ = squad1_run
    line = json.dumps({"id": None, "question": "Where is the cat?", "context": "The cat sat on the mat."})
    assert predict(run.out_dir, [line, line.replace("null", '"q"')])[0]["id"] == "1"


def test_predict_writes_a_lone_surrogate_it_echoes_as_utf8(squad1_run, tmp_path):
    """A JSON-escaped lone surrogate in a question, context or id is echoed as U+FFFD: as itself, the output file
    (or standard output) could not be encoded and predict ended in a UnicodeEncodeError traceback."""
    run, _ = squad1_run
    lines = tmp_path / "in.jsonl"
    lines.write_text(json.dumps({"id": "q\ud800", "question": "Who sat \udfff?", "context": "Ada \ud800 sat."}) + "\n")
    assert main(["predict", run.out_dir, str(lines), "--out", str(tmp_path / "out.jsonl")]) in (0, None)
    result = json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))
    assert result["id"] == "q\ufffd" and result["question"] == "Who sat \ufffd?"
    assert result["answer"] in "Ada \ufffd sat."


@pytest.fixture(scope="module")
def squad2_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("squad2")
    file = slice_of("dev-v2.0-half.json", tmp / "slice.json", articles=(0, 1))
    run = config(tiny_model_dir, tmp / "run", "squad2", file, epochs=1)
    return run, finetune(run)


def test_squad2_run_has_null_odds_and_the_breakdown(squad2_run):
    run, record = squad2_run
    best, out = record["best"], Path(run.out_dir)
    for key in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_f1", "best_f1_thresh"):
        assert key in best, key
    assert best["best_f1"] >= best["f1"] - 1e-9
    null_odds = json.loads((out / "null_odds.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    spans = json.loads((out / "predictions_spans.json").read_text())
    assert null_odds.keys() == predictions.keys() == spans.keys() and len(predictions) == record["eval_examples"]
    assert all(v > 0 for v in null_odds.values())
    # the answers at --null-threshold 0, i.e. null odds e^0 = 1
    assert predictions == {q: "" if null_odds[q] > 1.0 else spans[q] for q in spans}
    (answer,) = predict(out, [json.dumps({"question": "Who?", "context": "Ada wrote it."})])
    assert answer["null_odds"] > 0


def official_v2(data: list, predictions: dict, na_probs: dict, na_prob_thresh: float = 1.0) -> dict:
    """What SQuAD's evaluate-v2.0.py prints, re-implemented from its documented algorithm: v2.0 golds (those that
    normalise to nothing dropped, "" for none), null where na_prob > na_prob_thresh, and the best threshold
    searched from "all null" at 0.0 question by question in order of na_prob, a non-empty answer to an
    unanswerable question counting as wrong."""

    def tokens(text):
        text = "".join(c for c in text.lower() if c not in string.punctuation)
        return re.sub(r"\b(a|an|the)\b", " ", text).split()

    def f1(gold, guess):
        common = sum((Counter(tokens(gold)) & Counter(tokens(guess))).values())
        if not tokens(gold) or not tokens(guess) or common == 0:
            return int(tokens(gold) == tokens(guess))
        precision, recall = common / len(tokens(guess)), common / len(tokens(gold))
        return 2 * precision * recall / (precision + recall)

    has_answer, exact_raw, f1_raw = {}, {}, {}
    for qa in (qa for article in data for paragraph in article["paragraphs"] for qa in paragraph["qas"]):
        has_answer[qa["id"]] = bool(qa["answers"])
        golds = [a["text"] for a in qa["answers"] if tokens(a["text"])] or [""]
        exact_raw[qa["id"]] = max(int(tokens(g) == tokens(predictions[qa["id"]])) for g in golds)
        f1_raw[qa["id"]] = max(f1(g, predictions[qa["id"]]) for g in golds)

    def percent(scores, ids):
        return 100.0 * sum(scores[q] for q in ids) / len(ids)

    out = {}
    nulled = {name: {q: float(not has_answer[q]) if na_probs[q] > na_prob_thresh else s for q, s in raw.items()}
              for name, raw in (("exact", exact_raw), ("f1", f1_raw))}
    for prefix, ids in (("", list(has_answer)), ("HasAns_", [q for q in has_answer if has_answer[q]]),
                        ("NoAns_", [q for q in has_answer if not has_answer[q]])):
        if ids:
            out |= {f"{prefix}exact": percent(nulled["exact"], ids), f"{prefix}f1": percent(nulled["f1"], ids),
                    f"{prefix}total": len(ids)}
    for name, raw in (("exact", exact_raw), ("f1", f1_raw)):
        score = best = sum(not v for v in has_answer.values())
        threshold = 0.0
        for q in sorted(na_probs, key=na_probs.get):
            score += raw[q] if has_answer[q] else -1 if predictions[q] else 0
            if score > best:
                best, threshold = score, na_probs[q]
        out |= {f"best_{name}": 100.0 * best / len(raw), f"best_{name}_thresh": threshold}
    return out


def scored_articles(run) -> list:
    """The articles the run scored (those after --train-articles), from the run folder alone: its eval_data.json,
    the official script's dev file."""
    written = json.loads((Path(run.out_dir) / "eval_data.json").read_text(encoding="utf-8"))
    source = json.loads(Path(run.train_file).read_text(encoding="utf-8"))["data"][run.train_articles:]
    assert written["version"] == ("v2.0" if run.task == "squad2" else "1.1") and written["data"] == source
    return written["data"]


def test_official_v2_script_reproduces_every_number_from_the_run_folder(squad2_run):
    run, record = squad2_run
    out = Path(run.out_dir)
    spans, odds = (json.loads((out / name).read_text()) for name in ("predictions_spans.json", "null_odds.json"))
    assert official_v2(scored_articles(run), spans, odds) == record["best"]  # to the bit, every key
    # the answers as scored, without the odds, give the thresholded part
    answers = json.loads((out / "predictions.json").read_text())
    plain = official_v2(scored_articles(run), answers, dict.fromkeys(answers, 0.0))
    assert {k: v for k, v in plain.items() if not k.startswith("best")} == {
        k: v for k, v in record["best"].items() if not k.startswith("best")}


def test_evaluate_takes_a_null_threshold_that_the_script_reproduces(squad2_run, tmp_path, capsys):
    run, _ = squad2_run
    odds = sorted(json.loads(Path(run.out_dir, "null_odds.json").read_text()).values())
    threshold = math.log(odds[len(odds) // 2])  # about half the questions answered
    assert main(["evaluate", run.out_dir, "--null-threshold", repr(threshold), "--out", str(tmp_path)]) == 0
    assert "best_f1_thresh" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval_metrics.json").read_text())
    spans, odds = (json.loads((tmp_path / name).read_text()) for name in ("predictions_spans.json", "null_odds.json"))
    assert official_v2(scored_articles(run), spans, odds, math.exp(threshold)) == metrics
    assert 0 < sum(o <= math.exp(threshold) for o in odds.values()) < len(odds)


def test_official_v2_script_reproduces_every_number_at_any_threshold(tmp_path, monkeypatch):
    """Spans and odds spread so that the best thresholds lie inside the odds; --null-threshold T is the script's
    --na-prob-thresh exp(T); spans that normalise to nothing are written as "" for the script's search."""
    file = slice_of("dev-v2.0-half.json", tmp_path / "slice.json", articles=(0,), paragraphs=4)
    task = SquadTask("squad2", evals=read_squad(file))
    rng = random.Random(0)
    golds = {e.id: (e.answers[0].text if e.answers else "") for e in task.evals}
    spans = {q: rng.choice([g, g.split()[0] if g else "", "the", ".", "some words", ""]) for q, g in golds.items()}
    odds = {q: math.exp(rng.gauss(-1.0 if g else 1.0, 1.5)) for q, g in golds.items()}
    monkeypatch.setattr(task, "answer", lambda *args: (spans, odds))
    data = json.loads(file.read_text(encoding="utf-8"))["data"]
    for null_threshold in (-1.0, 0.0, 0.7):
        metrics, write = task.evaluate(None, None, FinetuneConfig(task="squad2", null_threshold=null_threshold), "cpu")
        write(tmp_path)
        written = {name: json.loads((tmp_path / f"{name}.json").read_text())
                   for name in ("predictions", "predictions_spans", "null_odds")}
        assert written["null_odds"] == odds and set(written["predictions_spans"].values()) <= set(spans.values())
        official = official_v2(data, written["predictions_spans"], odds, math.exp(null_threshold))
        assert official == metrics
        assert 0.0 < metrics["best_f1_thresh"] < max(odds.values())  # not a trivial end


def test_predict_answers_at_the_threshold_that_scored_best_f1(squad2_run, tmp_path):
    run, record = squad2_run
    examples = read_squad(run.train_file)[-record["eval_examples"]:]
    lines = [json.dumps({"id": e.id, "question": e.question, "context": e.context}) for e in examples]
    answers = {a["id"]: a["answer"] for a in predict(run.out_dir, lines)}
    assert squad_metrics(examples, answers, "2.0")["f1"] == pytest.approx(record["best"]["best_f1"], rel=1e-12)
    # the tiny model's best is all null (threshold 0.0); a threshold inside the odds, as a better model gets
    folder = Path(shutil.copytree(run.out_dir, tmp_path / "run"))
    spans, odds = (json.loads((folder / name).read_text()) for name in ("predictions_spans.json", "null_odds.json"))
    threshold = sorted(odds.values())[len(odds) // 2]
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["best"]["best_f1_thresh"] = threshold
    (folder / "metrics.json").write_text(json.dumps(metrics))
    answers = {a["id"]: a["answer"] for a in predict(folder, lines)}
    assert {q for q, a in answers.items() if a == ""} >= {q for q in odds if odds[q] > threshold}
    assert squad_metrics(examples, answers, "2.0")["f1"] == pytest.approx(
        squad_metrics(examples, spans, "2.0", odds, null_threshold=threshold)["f1"], rel=1e-12)


@pytest.mark.parametrize("text, message", [
    ('{"best": {"best_f1_thr', r"metrics.json:1: not valid JSON"),  # cut short while the run rewrote it
    ("[1]", "metrics.json: it is not a JSON object"),
    ('{"best": {"best_f1_thresh": "0.5"}}', "metrics.json: best_f1_thresh is '0.5'; expected"),
    ('{"best": {"best_f1_thresh": -1}}', "metrics.json: best_f1_thresh is -1; expected"),
])
def test_predict_names_a_broken_metrics_json_that_holds_the_threshold(squad2_run, tmp_path, text, message):
    run, _ = squad2_run
    folder = Path(shutil.copytree(run.out_dir, tmp_path / "run"))
    (folder / "metrics.json").write_text(text)
    with pytest.raises(BertkitError, match=message):
        predict(folder, [json.dumps({"question": "Who?", "context": "Ada wrote it."})])


def test_a_scored_question_too_long_for_the_windows_is_refused_before_training(tiny_model_dir, tmp_path):
    file = slice_of("dev-v1.1.json", tmp_path / "slice.json")
    data = json.loads(file.read_text())
    qa = data["data"][1]["paragraphs"][0]["qas"][0]  # article 1 is scored, article 0 trains
    qa["question"] = "Which " + "very " * 40 + "long question is this?"
    file.write_text(json.dumps(data))
    with pytest.raises(BertkitError, match=f"question {qa['id']}: max_length 40 leaves no room for context after its "
                                           "46 question tokens; expected max_length above 49"):
        finetune(config(tiny_model_dir, tmp_path / "run", "squad1", file, max_length=40))
    assert not (tmp_path / "run" / "train.csv").exists()  # not after an epoch of training, which it then lost


def test_squad1_refuses_a_v2_file(tiny_model_dir, tmp_path):
    file = slice_of("dev-v2.0-half.json", tmp_path / "slice.json", articles=(0, 1))
    with pytest.raises(BertkitError, match="unanswerable questions .* expected --task squad2"):
        finetune(config(tiny_model_dir, tmp_path / "run", "squad1", file))


def test_squad2_threshold_search_sees_the_answers_the_threshold_hides(tmp_path, monkeypatch):
    """Null odds above the threshold for every question must not hide the spans from the best-threshold search:
    answered at odds <= 4, the answerable questions (odds 4) score 100 while the unanswerable ones (odds 5) stay null."""
    file = slice_of("dev-v2.0-half.json", tmp_path / "slice.json", articles=(0,), paragraphs=3)
    task = SquadTask("squad2")
    task.evals = read_squad(file)
    golds = {e.id: (e.answers[0].text if e.answers else "") for e in task.evals}
    asked = []

    def answer(model, tokenizer, examples, config, device, null_threshold):
        asked.append(null_threshold)
        return ({q: g or "some words" for q, g in golds.items()}, {q: 4.0 if g else 5.0 for q, g in golds.items()})

    monkeypatch.setattr(task, "answer", answer)
    metrics, write = task.evaluate(None, None, FinetuneConfig(task="squad2", null_threshold=0.0), "cpu")
    assert asked == [None]
    no_answer = 100.0 * sum(not g for g in golds.values()) / len(golds)
    assert 0 < no_answer < 100
    assert metrics["f1"] == pytest.approx(no_answer) and metrics["HasAns_f1"] == 0.0  # all null at threshold 0
    assert metrics["best_f1"] == pytest.approx(100.0) and metrics["best_f1_thresh"] == 4.0
    write(tmp_path)
    assert set(json.loads((tmp_path / "predictions.json").read_text()).values()) == {""}
    assert "" not in set(json.loads((tmp_path / "predictions_spans.json").read_text()).values())


def test_best_epoch_is_chosen_on_the_dev_tuned_scores_for_v2():
    # an epoch whose spans only pay once the threshold is tuned must beat one that answers null everywhere
    all_null = {"exact": 50.7, "f1": 50.7, "best_exact": 50.7, "best_f1": 50.7}
    tuned = {"exact": 50.7, "f1": 50.7, "best_exact": 55.0, "best_f1": 58.0}
    v2 = SquadTask("squad2")
    assert v2.headline(tuned) == pytest.approx(56.5) and v2.headline(tuned) > v2.headline(all_null)
    assert SquadTask("squad1").headline({"exact": 40.0, "f1": 50.0}) == pytest.approx(45.0)


def test_a_pruned_run_is_scored_and_loaded_as_the_run(squad2_run, tmp_path):
    from tasks.test_prune import check_pruned_run

    check_pruned_run(squad2_run[0].out_dir, tmp_path)
