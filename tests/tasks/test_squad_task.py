"""SQuAD fine-tuning on a few real paragraphs with a tiny random model: windows, predictions, v2.0 extras."""

import io
import json
from pathlib import Path

import pytest

from bertkit import Tokenizer
from bertkit.cli import main
from bertkit.data.squad import read_squad
from bertkit.errors import BertkitError
from bertkit.tasks.finetune import FinetuneConfig, evaluate, finetune, predict
from bertkit.tasks.metrics import normalize_answer
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


def test_evaluate_reproduces_the_recorded_squad_scores(squad1_run, tmp_path):
    run, record = squad1_run
    metrics = evaluate(run.out_dir, out_dir=tmp_path)
    assert metrics["exact"] == pytest.approx(record["best"]["exact"]) and metrics["f1"] == pytest.approx(record["best"]["f1"])
    kept = json.loads(Path(run.out_dir, "predictions.json").read_text())
    assert json.loads((tmp_path / "predictions.json").read_text()) == kept


def test_predict_answers_json_lines(squad1_run, monkeypatch, capsys):
    run, _ = squad1_run
    lines = [json.dumps({"id": "q", "question": "Where is the cat?", "context": "The cat sat on the mat in Paris."}), ""]
    (answer,) = predict(run.out_dir, lines)
    assert answer["id"] == "q" and answer["answer"] in "The cat sat on the mat in Paris."
    monkeypatch.setattr("sys.stdin", io.StringIO('{"question": "Who?"}\n'))
    assert main(["predict", run.out_dir]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and '<stdin>:1: expected a JSON object with string "question" and "context"' in err


def test_squad2_run_has_null_odds_and_the_breakdown(tiny_model_dir, tmp_path):
    file = slice_of("dev-v2.0-half.json", tmp_path / "slice.json", articles=(0, 1))
    run = config(tiny_model_dir, tmp_path / "run", "squad2", file, epochs=1)
    record = finetune(run)
    best = record["best"]
    for key in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_f1", "best_f1_thresh"):
        assert key in best, key
    assert best["best_f1"] >= best["f1"] - 1e-9
    null_odds = json.loads((tmp_path / "run" / "null_odds.json").read_text())
    predictions = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert null_odds.keys() == predictions.keys() and len(predictions) == record["eval_examples"]
    assert all(predictions[q] == "" for q in predictions if null_odds[q] > 0.0)  # the threshold is 0
    (answer,) = predict(tmp_path / "run", [json.dumps({"question": "Who?", "context": "Ada wrote it."})])
    assert "null_odds" in answer


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


def test_best_epoch_is_chosen_on_the_dev_tuned_scores_for_v2():
    # an epoch whose spans only pay once the threshold is tuned must beat one that answers null everywhere
    all_null = {"exact": 50.7, "f1": 50.7, "best_exact": 50.7, "best_f1": 50.7}
    tuned = {"exact": 50.7, "f1": 50.7, "best_exact": 55.0, "best_f1": 58.0}
    v2 = SquadTask("squad2")
    assert v2.headline(tuned) == pytest.approx(56.5) and v2.headline(tuned) > v2.headline(all_null)
    assert SquadTask("squad1").headline({"exact": 40.0, "f1": 50.0}) == pytest.approx(45.0)
