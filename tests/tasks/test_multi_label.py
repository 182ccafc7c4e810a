"""Multi-label classification of a user's own files (`finetune --task custom --multi-label`): the label fields read,
the metrics against sklearn, a run end to end on real sentences, and the folder read by transformers as its own
multi_label_classification model."""

import csv
import json
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from bertkit.cli import main
from bertkit.data.glue import read_custom
from bertkit.errors import BertkitError
from bertkit.tasks.evaluation import evaluate, predict
from bertkit.tasks.finetune import FinetuneConfig, finetune
from bertkit.tasks.metrics import class_report, compute_metrics
from conftest import data_path

# Labels of SST-2 sentences: the sentiment, and what the sentence speaks of, by its words
TOPICS = {"acting": r"\b(actors?|actress|performances?|cast)\b", "story": r"\b(story|plot|script|narrative)\b",
          "funny": r"\b(funny|comedy|laughs?|humor|jokes)\b"}


def sst2_tags(path, start: int, count: int) -> str:
    """`count` SST-2 training sentences from row `start` as a .csv with a `tags` column: positive or negative, and
    each topic whose words the sentence has."""
    rows = [line.rstrip("\n").split("\t") for line in open(data_path("glue", "SST-2", "train.tsv"), encoding="utf-8")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "tags"])
        for sentence, label in rows[1 + start: 1 + start + count]:
            tags = ["positive" if label == "1" else "negative"]
            out.writerow([sentence, ",".join(tags + [t for t, words in TOPICS.items() if re.search(words, sentence)])])
    return str(path)


def test_label_fields_are_read_as_sets_of_labels(tmp_path):
    (tmp_path / "a.csv").write_text('text,tags\none,"b, a"\ntwo,c\nthree,\nfour,"a,a"\n')
    examples, labels = read_custom(tmp_path / "a.csv", "text", "tags", label_sep=",")
    assert labels == ["a", "b", "c"]
    assert [e.label for e in examples] == [(0, 1), (2,), (), (0,)]  # none, and a label named twice holds once
    (tmp_path / "b.tsv").write_text("text\ttags\none\tc|a\n")
    assert read_custom(tmp_path / "b.tsv", "text", "tags", labels=labels, label_sep="|")[0][0].label == (0, 2)
    (tmp_path / "c.jsonl").write_text('{"text": "one", "tags": ["c", "b"]}\n{"text": "two", "tags": []}\n')
    assert [e.label for e in read_custom(tmp_path / "c.jsonl", "text", "tags", labels=labels, label_sep=",")[0]] == [(1, 2), ()]
    # the eval file's labels are the training file's: another is an error naming its line
    (tmp_path / "d.csv").write_text("text,tags\none,a\ntwo,\"a,z\"\n")
    with pytest.raises(BertkitError, match=r"d\.csv:3: unknown label 'z' \(expected one of a, b, c\)"):
        read_custom(tmp_path / "d.csv", "text", "tags", labels=labels, label_sep=",")
    (tmp_path / "e.csv").write_text("text,tags\none,\"a,,b\"\n")
    with pytest.raises(BertkitError, match=r"e\.csv:2: column 'tags' \('a,,b'\) has an empty label"):
        read_custom(tmp_path / "e.csv", "text", "tags", label_sep=",")
    (tmp_path / "f.jsonl").write_text('{"text": "one", "tags": null}\n')
    with pytest.raises(BertkitError, match=r"f\.jsonl:1: column 'tags' is missing or null"):
        read_custom(tmp_path / "f.jsonl", "text", "tags", label_sep=",")
    # without --multi-label a field is one class, named by the whole field, and an empty one an error, as before
    assert read_custom(tmp_path / "b.tsv", "text", "tags")[1] == ["c|a"]
    with pytest.raises(BertkitError, match=r"a\.csv:4: column 'tags' is empty; expected a label"):
        read_custom(tmp_path / "a.csv", "text", "tags")


def test_multi_label_metrics_are_sklearns():
    rng = np.random.default_rng(0)
    gold = (rng.random((200, 6)) < 0.3).astype(int)
    predicted = np.where(rng.random((200, 6)) < 0.8, gold, 1 - gold)
    gold[:, 5] = predicted[:, 5] = 0  # a label neither in the file nor predicted: not in the macro average
    scores = compute_metrics(("micro_f1", "macro_f1", "subset_accuracy"), predicted, gold)
    assert scores["micro_f1"] == pytest.approx(100 * f1_score(gold, predicted, average="micro"))
    assert scores["macro_f1"] == pytest.approx(100 * f1_score(gold[:, :5], predicted[:, :5], average="macro"))
    assert scores["subset_accuracy"] == pytest.approx(100 * accuracy_score(gold, predicted))
    assert scores["subset_accuracy"] == pytest.approx(100 * np.mean((gold == predicted).all(1)))
    report = class_report([f"l{i}" for i in range(6)], predicted, gold, "test")
    assert "| l5 | 0 | 0 | - | - | - |" in report
    assert f"{scores['micro_f1']:.2f} |\n| macro average" in report and f"{scores['macro_f1']:.2f} |\n" in report
    assert f"subset accuracy (every label of an example right) {scores['subset_accuracy']:.2f}" in report
    with pytest.raises(BertkitError, match="unknown metric"):
        compute_metrics(("accuracy",), predicted, gold)  # a single-label name on multi-label data


@pytest.fixture(scope="module")
def tagged_run(tiny_model_dir, tmp_path_factory):
    """The tiny model fine-tuned on 600 SST-2 sentences' tags, scored on 200 others."""
    root = tmp_path_factory.mktemp("multi_label")
    config = FinetuneConfig(model_dir=tiny_model_dir, out_dir=str(root / "run"), task="custom", text_a="text",
                            label="tags", multi_label=True, train_file=sst2_tags(root / "train.csv", 0, 600),
                            eval_file=sst2_tags(root / "dev.csv", 600, 200), lr=2e-3, batch_size=16, epochs=2,
                            seed=0, threads=1, device="cpu")
    return config, finetune(config)


def test_a_multi_label_run_writes_transformers_multi_label_folder(tagged_run):
    config, record = tagged_run
    assert set(record["best"]) == {"micro_f1", "macro_f1", "subset_accuracy"}
    model_config = json.loads(open(f"{config.out_dir}/config.json").read())
    assert model_config["problem_type"] == "multi_label_classification"
    assert list(model_config["id2label"].values()) == ["acting", "funny", "negative", "positive", "story"]
    report = open(f"{config.out_dir}/classes.md").read()
    assert report.startswith("# custom per label: dev, 200 examples") and "| micro average |" in report
    assert "Per label scores of that epoch: classes.md." in open(f"{config.out_dir}/results.md").read()
    # the loss falls from about ln 2 a label
    losses = [row["train_loss"] for row in record["epochs"]]
    assert losses[-1] < losses[0] < 0.7
    assert evaluate(config.out_dir) == pytest.approx(record["best"])


def test_predictions_are_the_labels_at_or_above_the_threshold(tagged_run, capsys):
    config, _ = tagged_run
    texts = ["a funny comedy with a fine cast", "the plot is dull", ""]
    results = predict(config.out_dir, texts)
    for result in results[:2]:
        probabilities = result["probabilities"]
        assert list(probabilities) == ["acting", "funny", "negative", "positive", "story"]
        assert result["labels"] == [name for name, p in probabilities.items() if p >= 0.5]
    assert results[2] == {"text": "", "labels": None, "probabilities": None, "error": "blank line: no text to label"}
    assert predict(config.out_dir, texts[:1], label_threshold=1e-6)[0]["labels"] == list(probabilities)
    assert predict(config.out_dir, texts[:1], label_threshold=1 - 1e-6)[0]["labels"] == []
    # transformers reads the folder as a multi-label classifier: a sigmoid of its logits, the same probabilities
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(config.out_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.out_dir)
    assert model.config.problem_type == "multi_label_classification"
    with torch.no_grad():
        theirs = torch.sigmoid(model(**tokenizer(texts[:2], padding=True, return_tensors="pt")).logits)
    ours = torch.tensor([list(r["probabilities"].values()) for r in results[:2]])
    assert (theirs - ours).abs().max() < 1e-5


def test_a_multi_label_model_is_not_scored_as_single_label_data(tagged_run, tiny_model_dir, capsys):
    config, _ = tagged_run
    assert main(["evaluate", config.out_dir, "--no-multi-label"]) == 2
    assert "problem_type multi_label_classification (a sigmoid per label); expected --task custom --multi-label" \
        in capsys.readouterr().err
    args = ["--task", "custom", "--eval-file", config.eval_file, "--text-a", "text", "--label", "tags"]
    assert main(["evaluate", tiny_model_dir, *args, "--multi-label"]) == 2
    assert "no problem_type multi_label_classification; --multi-label expects a classifier fine-tuned with " \
           "--multi-label" in capsys.readouterr().err


def test_balanced_pos_weight_makes_each_labels_positives_weigh_as_its_negatives(tagged_run, tmp_path):
    from bertkit.tasks.classification import TextTask
    from bertkit.data.glue import TextExample

    rows = [(0,), (0, 1), (), (0,)]  # label 0: 3 of 4; label 1: 1 of 4; label 2: none
    task = TextTask("custom", ["a", "b", "c"], (), [TextExample(str(i), "x", None, r) for i, r in enumerate(rows)],
                    multi_label=True)
    assert task.balanced_pos_weight().tolist() == pytest.approx([1 / 3, 3.0, 1.0])
    # a run with it trains another model from the same start (the weights are used), and saves none of them
    config, _ = tagged_run
    weighted = FinetuneConfig(**{**vars(config), "out_dir": str(tmp_path / "weighted"), "pos_weight": "balanced",
                                 "epochs": 1})
    plain = FinetuneConfig(**{**vars(config), "out_dir": str(tmp_path / "plain"), "epochs": 1})
    finetune(weighted), finetune(plain)
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("weighted", "plain"))
    assert a.keys() == b.keys() and not torch.equal(a["classifier.weight"], b["classifier.weight"])
    assert "pos_weight" not in json.loads((tmp_path / "weighted" / "config.json").read_text())


@pytest.mark.parametrize("args, error", [
    (["--task", "SST-2"], "--multi-label with --task SST-2; expected --task custom"),
    (["--regression"], "--multi-label with --regression; expected one of them"),
    (["--label-threshold", "1"], "--label-threshold is 1.0; expected a probability between 0 and 1"),
    (["--label-threshold", "nan"], "--label-threshold is nan; expected a probability between 0 and 1"),
    (["--label-sep", ""], "--label-sep is empty"),
    (["--no-multi-label", "--pos-weight", "balanced"], "--pos-weight balanced without --multi-label"),
])
def test_bad_multi_label_settings_are_refused_before_anything_is_read(args, error, tmp_path, capsys):
    code = main(["finetune", "--model-dir", str(tmp_path / "none"), "--train-file", "x.csv", "--eval-file", "y.csv",
                 "--multi-label", *args])
    assert code == 2 and error in capsys.readouterr().err
