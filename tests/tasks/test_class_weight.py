"""Class weights for single-label classification (`finetune --class-weight balanced`): the weights, the loss they
give, a run trained with them, and the settings they do not fit."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.utils.class_weight import compute_class_weight

from bertkit import BertConfig
from bertkit.cli import main
from bertkit.data.glue import TextExample
from bertkit.errors import BertkitError
from bertkit.model import BertForSequenceClassification
from bertkit.tasks.classification import TextTask
from bertkit.tasks.finetune import FinetuneConfig, finetune
from conftest import data_path


def skewed_sst2(path, negatives: int, positives: int) -> str:
    """The first `negatives` negative and `positives` positive SST-2 training sentences as a .csv (text, label)."""
    wanted = {"0": negatives, "1": positives}
    with open(data_path("glue", "SST-2", "train.tsv"), encoding="utf-8") as f, open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        for sentence, label in (line.rstrip("\n").split("\t") for line in list(f)[1:]):
            if wanted[label] > 0:
                wanted[label] -= 1
                writer.writerow([sentence, "positive" if label == "1" else "negative"])
    return str(path)


def test_balanced_weights_are_sklearns_and_one_for_a_class_without_examples():
    labels = [0, 0, 0, 0, 0, 0, 1, 1, 2]
    task = TextTask("custom", ["a", "b", "c", "d"], ("accuracy",), [TextExample(str(i), "x", None, y)
                                                                    for i, y in enumerate(labels)])
    weights = task.balanced_class_weight()
    assert weights[:3].tolist() == pytest.approx(9 / 3 / torch.tensor([6, 2, 1]))  # examples / (classes x count)
    assert weights[:3].tolist() == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=labels))
    assert weights[3] == 1.0
    for task in (TextTask("custom", [], ("pearson",)), TextTask("custom", ["a"], ("micro_f1",), multi_label=True)):
        with pytest.raises(BertkitError, match="class weights are for single-label classification"):
            task.balanced_class_weight()


def test_the_loss_weighs_each_example_by_its_class():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3))
    model.eval()
    ids, labels = torch.randint(5, 50, (6, 7)), torch.tensor([0, 0, 0, 1, 2, 2])
    logits = model(ids).logits
    plain = model(ids, labels=labels).loss
    model.class_weight = torch.tensor([0.5, 3.0, 1.0])
    weighted = model(ids, labels=labels).loss
    each = F.cross_entropy(logits, labels, reduction="none")
    w = model.class_weight[labels]
    assert weighted.item() == pytest.approx(((w * each).sum() / w.sum()).item(), rel=1e-6)
    assert plain.item() == pytest.approx(each.mean().item(), rel=1e-6) and weighted.item() != pytest.approx(plain.item())
    model.class_weight = torch.ones(3)
    assert model(ids, labels=labels).loss.item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.equal(model(ids).logits, logits)  # the weights touch the loss only


def test_a_run_with_balanced_weights_trains_another_model_and_saves_no_weights(tiny_model_dir, tmp_path):
    train = skewed_sst2(tmp_path / "train.csv", 30, 270)
    runs = {}
    for weight in ("balanced", "none"):
        config = FinetuneConfig(model_dir=tiny_model_dir, out_dir=str(tmp_path / weight), task="custom", text_a="text",
                                train_file=train, eval_file=train, class_weight=weight, lr=2e-3, batch_size=32,
                                epochs=1, seed=0, threads=1, device="cpu")
        runs[weight] = finetune(config)
    a, b = (load_file(str(tmp_path / weight / "model.safetensors")) for weight in ("balanced", "none"))
    assert a.keys() == b.keys() and not torch.equal(a["classifier.weight"], b["classifier.weight"])
    assert runs["balanced"]["train_examples"] == runs["none"]["train_examples"] == 300
    assert "class_weight" not in json.loads((tmp_path / "balanced" / "config.json").read_text())


@pytest.mark.parametrize("args, error", [
    (["--multi-label"], "--class-weight balanced with --multi-label (its weights are --pos-weight)"),
    (["--regression"], "--class-weight balanced with --regression; expected a classification task"),
    (["--task", "sts_b"], "--class-weight balanced with --task sts_b; expected"),
    (["--task", "SQuAD2"], "--class-weight balanced with --task squad2; expected"),
    (["--task", "ner"], "--class-weight balanced with --task ner; expected"),
])
def test_class_weights_outside_single_label_classification_are_refused(args, error, tmp_path, capsys):
    code = main(["finetune", "--model-dir", str(tmp_path / "none"), "--train-file", "x.csv", "--eval-file", "y.csv",
                 "--class-weight", "balanced", *args])
    assert code == 2 and error in capsys.readouterr().err
