"""Calibration: the expected calibration error and NLL against hand computations, the temperature fit against a
known temperature, and `evaluate --calibrate` rewriting a classifier folder in place (and what it refuses)."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bertkit.cli import main
from bertkit.errors import BertkitError
from bertkit.tasks.calibrate import CALIBRATION_FILE, calibrate_folder
from bertkit.tasks.classification import TextTask
from bertkit.tasks.evaluation import evaluate, predict
from bertkit.tasks.finetune import FinetuneConfig, finetune
from bertkit.tasks.metrics import calibration_scores, fit_temperature
from tasks.test_distill import reviews


def test_ece_is_the_binned_gap_between_confidence_and_accuracy():
    # four examples in four of the 15 bins (confidences 0.85, 0.75, 0.62, 0.71; the second wrong): the ECE is the
    # mean |correct - confidence|
    p = np.array([[0.85, 0.15], [0.25, 0.75], [0.62, 0.38], [0.29, 0.71]])
    gold = [0, 0, 0, 1]
    expected = (0.15 + 0.75 + 0.38 + 0.29) / 4
    scores = calibration_scores(p, gold)
    assert scores["ece"] == pytest.approx(100 * expected)
    assert scores["nll"] == pytest.approx(-np.mean(np.log([0.85, 0.25, 0.62, 0.71])))
    # ten examples in one bin, confidence 0.8, eight right: calibrated, whatever the classes
    p = np.tile([[0.8, 0.1, 0.1]], (10, 1))
    assert calibration_scores(p, [0] * 8 + [1, 2])["ece"] == pytest.approx(0, abs=1e-9)
    # two bins: confidence 0.95 all right (gap 0.05 x 5), confidence 0.55 all wrong (gap 0.55 x 5)
    p = np.array([[0.95, 0.05]] * 5 + [[0.55, 0.45]] * 5)
    assert calibration_scores(p, [0] * 5 + [1] * 5)["ece"] == pytest.approx(100 * (0.05 * 5 + 0.55 * 5) / 10)
    with pytest.raises(BertkitError, match="expected \\(N, classes\\) and \\(N,\\)"):
        calibration_scores(p[:, 0], [0] * 10)


def test_the_fitted_temperature_undoes_an_overconfident_scale():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20000, 3)) * 1.5
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    gold = np.array([rng.choice(3, p=p) for p in probabilities])  # the labels these logits are calibrated for
    assert fit_temperature(logits, gold) == pytest.approx(1.0, rel=0.05)
    assert fit_temperature(3 * logits, gold) == pytest.approx(3.0, rel=0.05)  # overconfident three times over
    assert fit_temperature(logits / 2, gold) == pytest.approx(0.5, rel=0.05)  # underconfident
    assert calibration_scores(probabilities, gold)["ece"] < 2  # calibrated logits score near 0


def noisy(path, every: int = 4) -> str:
    """The reviews file with every `every`-th label swapped: a model right on the words is wrong on those."""
    rows = list(csv.reader(open(path, encoding="utf-8")))
    for i, row in enumerate(rows[1:]):
        if i % every == 0:
            row[1] = "negative" if row[1] == "positive" else "positive"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return str(path)


@pytest.fixture
def overconfident(toy_model_dir, tmp_path):
    """A toy classifier trained to near-zero loss, and a held-out file it gets 75% right: overconfident there."""
    config = FinetuneConfig(model_dir=toy_model_dir, out_dir=str(tmp_path / "run"), task="custom", text_a="text",
                            train_file=reviews(tmp_path / "train.csv", 200, seed=0),
                            eval_file=reviews(tmp_path / "dev.csv", 100, seed=1), lr=1e-2, batch_size=16, epochs=4,
                            seed=0, threads=1, device="cpu")
    finetune(config)
    return tmp_path / "run", noisy(reviews(tmp_path / "held.csv", 200, seed=2))


def test_calibrate_folds_the_temperature_into_the_folder(overconfident):
    run, held = overconfident
    texts = [row[0] for row in csv.reader(open(held, encoding="utf-8"))][1:6]
    before = predict(run, texts, threads=1, device="cpu")
    first = evaluate(run, eval_file=held, calibrate=True, threads=1, device="cpu")
    assert 70 <= first["accuracy"] <= 80 and first["ece"] > 10  # confident and wrong a quarter of the time
    assert first["temperature"] > 2 and first["calibrated_ece"] < first["ece"] / 2
    assert first["calibrated_nll"] < first["nll"]
    after = predict(run, texts, threads=1, device="cpu")
    assert [a["label"] for a in after] == [b["label"] for b in before]  # the same classes, milder probabilities
    for a, b in zip(after, before):
        p = torch.tensor([b["probability"], 1 - b["probability"]]).log() / first["temperature"]
        assert a["probability"] == pytest.approx(float(torch.softmax(p, 0)[0]), abs=1e-4)
    # the folder scores as calibrated, and a second fit has nothing left to do: T near 1, recorded in all
    again = evaluate(run, eval_file=held, calibrate=True, threads=1, device="cpu")
    assert again["ece"] == pytest.approx(first["calibrated_ece"], abs=1e-3)
    assert again["temperature"] == pytest.approx(1, abs=1e-3)
    record = json.loads((run / CALIBRATION_FILE).read_text())
    assert len(record["fits"]) == 2
    assert record["temperature"] == pytest.approx(first["temperature"] * again["temperature"])
    assert record["fits"][0]["examples"] == 200
    assert record["fits"][0]["before"]["ece"] == pytest.approx(first["ece"], abs=1e-4)  # float64 here, float32 there
    # a plain folder: transformers gives the calibrated probabilities too
    transformers = pytest.importorskip("transformers")
    theirs = transformers.BertForSequenceClassification.from_pretrained(run)
    assert theirs.classifier.weight.shape == (2, 32)


def test_what_cannot_be_calibrated_is_refused_before_anything_is_written(overconfident, tmp_path, capsys):
    run, held = overconfident
    weights = (run / "model.safetensors").read_bytes()
    for args, error in ((["--int8"], "--calibrate with --int8; expected the float model"),
                        (["--task", "squad1"], "--calibrate on a squad1 model; expected a classifier")):
        assert main(["evaluate", str(run), "--eval-file", held, "--calibrate", "--threads", "1", *args]) == 2
        assert error in capsys.readouterr().err, args
    bin_folder = tmp_path / "bin"
    shutil.copytree(run, bin_folder)
    torch.save(load_file(bin_folder / "model.safetensors"), bin_folder / "pytorch_model.bin")
    (bin_folder / "model.safetensors").unlink()
    assert main(["evaluate", str(bin_folder), "--calibrate", "--threads", "1"]) == 2
    assert "weights in pytorch_model.bin; expected one model.safetensors to rewrite" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == weights and not (run / CALIBRATION_FILE).exists()
    for task, kind in ((TextTask("t", [], ()), "regression"), (TextTask("t", ["a", "b"], (), multi_label=True),
                                                                "multi-label")):
        with pytest.raises(BertkitError, match=f"--calibrate on a {kind} model"):
            calibrate_folder(run, task, torch.zeros(2, 2), [0, 1], "dev")


def test_calibrating_runs_the_model_over_the_data_once(overconfident, monkeypatch):
    run, held = overconfident
    calls = []
    original = TextTask.logits
    monkeypatch.setattr(TextTask, "logits", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    evaluate(run, eval_file=held, calibrate=True, threads=1, device="cpu")
    assert len(calls) == 1  # the scoring pass's logits are the ones the temperature is fitted to
