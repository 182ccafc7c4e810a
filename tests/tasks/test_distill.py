"""Knowledge distillation (`finetune --teacher`, `--transfer-file`): the loss against formulas written out, the
teacher's logits in the rows (with its own vocabulary), a run whose student follows a teacher that contradicts the
labels, and the settings refused."""

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bertkit.cli import main
from bertkit.errors import BertkitError
from bertkit.model import ModelOutput
from bertkit.tasks.classification import TextTask
from bertkit.tasks.distill import (TEACHER_KEY, check_teacher_data, distillation_forward, distillation_loss,
                                  distillation_rows)
from bertkit.tasks.evaluation import predict
from bertkit.tasks.finetune import FinetuneConfig, finetune, load_task
from bertkit.tokenizer import Tokenizer


def reviews(path, count: int, seed: int, flip: bool = False, labelled: bool = True) -> str:
    """`count` short texts in the toy vocabulary as a .csv (text, label): positive when the one sentiment word among
    neutral ones is good, great or fun, negative for bad, awful or boring; the labels swapped with `flip`, none
    with `labelled` False."""
    rng = np.random.default_rng(seed)
    neutral = "the movie film is was very and of it to".split()
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"] if labelled else ["text"])
        for _ in range(count):
            words = list(rng.choice(neutral, int(rng.integers(3, 7))))
            positive = bool(rng.integers(2))
            words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(["good", "great", "fun"] if positive
                                                                           else ["bad", "awful", "boring"])))
            label = "positive" if positive != flip else "negative"
            out.writerow([" ".join(words), label] if labelled else [" ".join(words)])
    return str(path)


def test_the_loss_is_hintons_soft_cross_entropy_and_its_kin():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3)
    single = TextTask("t", ["a", "b", "c"], ())
    for t in (1.0, 2.0, 4.0):
        expected = -(torch.softmax(teacher / t, -1) * torch.log_softmax(student / t, -1)).sum(-1).mean() * t * t
        assert distillation_loss(student, teacher, single, t).item() == pytest.approx(expected.item(), rel=1e-6)
    # at the teacher's logits the gradient is zero: the student is pulled to the teacher's distribution
    at_teacher = teacher.clone().requires_grad_(True)
    distillation_loss(at_teacher, teacher, single, 2.0).backward()
    assert at_teacher.grad.abs().max() < 1e-6
    multi = TextTask("t", ["a", "b", "c"], (), multi_label=True)
    p = torch.sigmoid(teacher / 2)
    s = torch.sigmoid(student / 2)
    expected = -(p * s.log() + (1 - p) * (1 - s).log()).mean() * 4
    assert distillation_loss(student, teacher, multi, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    regression = TextTask("t", [], ())
    assert distillation_loss(student[:, :1], teacher[:, :1], regression, 3.0).item() == pytest.approx(
        ((student[:, 0] - teacher[:, 0]) ** 2).mean().item(), rel=1e-6)


def test_the_forward_mixes_the_teachers_loss_with_the_labels_by_alpha():
    task = TextTask("t", ["a", "b"], ())
    logits, teacher, labels = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 1, 1, 0])

    def model(**batch):
        assert TEACHER_KEY not in batch  # the model sees its usual inputs only
        return ModelOutput(loss=F.cross_entropy(logits, batch["labels"]) if "labels" in batch else None, logits=logits)

    soft = distillation_loss(logits, teacher, task, 2.0)
    hard = F.cross_entropy(logits, labels)
    out = distillation_forward(task, 2.0, 0.25)(model, {"labels": labels, TEACHER_KEY: teacher})
    assert out.loss.item() == pytest.approx((0.25 * soft + 0.75 * hard).item(), rel=1e-6)
    assert distillation_forward(task, 2.0, 1.0)(model, {TEACHER_KEY: teacher}).loss.item() == pytest.approx(soft.item())


@pytest.fixture(scope="module")
def flipped_teacher(toy_model_dir, tmp_path_factory):
    """The toy model fine-tuned on texts with their labels swapped: a teacher that is wrong on purpose, so that a
    student following it is told apart from one following the labels."""
    root = tmp_path_factory.mktemp("distill")
    config = FinetuneConfig(model_dir=toy_model_dir, out_dir=str(root / "teacher"), task="custom", text_a="text",
                            train_file=reviews(root / "flipped.csv", 200, seed=0, flip=True),
                            eval_file=reviews(root / "flipped-dev.csv", 100, seed=1, flip=True), lr=1e-2, batch_size=16, epochs=4,
                            seed=0, threads=1, device="cpu")
    return root, config, finetune(config)


def test_the_rows_hold_the_teachers_logits_computed_with_its_own_tokenizer(flipped_teacher, tiny_model_dir):
    root, teacher_config, _ = flipped_teacher
    config = FinetuneConfig(model_dir=tiny_model_dir, out_dir=str(root / "unused"), task="custom", text_a="text",
                            train_file=str(root / "flipped-dev.csv"), eval_file=str(root / "flipped-dev.csv"),
                            teacher=teacher_config.out_dir,
                            transfer_file=reviews(root / "transfer.csv", 20, seed=2, labelled=False), threads=1,
                            device="cpu")
    task = load_task(config)
    student_tokenizer = Tokenizer.from_pretrained(tiny_model_dir)  # a real 30k vocabulary: not the teacher's 80
    rows = distillation_rows(config, task, student_tokenizer, task.train_rows(student_tokenizer, config),
                             torch.device("cpu"))
    assert len(rows) == 120 and all("labels" not in r for r in rows)  # alpha 1: the teacher's targets only
    assert rows[0]["input_ids"] == student_tokenizer.encode(task.train[0].text_a, max_length=128)["input_ids"]
    texts = [e.text_a for e in task.train] + [line.strip() for line in open(root / "transfer.csv")][1:]
    wanted = predict(teacher_config.out_dir, [texts[0], texts[50], texts[119]], threads=1, device="cpu")
    got = [torch.softmax(torch.tensor(rows[i][TEACHER_KEY]), -1) for i in (0, 50, 119)]
    for w, g in zip(wanted, got):
        assert float(g.max()) == pytest.approx(w["probability"], abs=1e-5)
        assert task.labels[int(g.argmax())] == w["label"]


def test_a_student_follows_its_teacher_not_the_labels(flipped_teacher, toy_model_dir):
    root, teacher_config, teacher_record = flipped_teacher
    dev = reviews(root / "dev.csv", 100, seed=1)  # the teacher's dev texts, with their true labels
    accuracy = {"teacher": 100 - teacher_record["best"]["accuracy"]}
    train, transfer = reviews(root / "train.csv", 200, seed=3), reviews(root / "more.csv", 100, seed=4, labelled=False)
    for name, extra in (("student", {"teacher": teacher_config.out_dir, "transfer_file": transfer}), ("plain", {})):
        config = FinetuneConfig(model_dir=toy_model_dir, out_dir=str(root / name), task="custom", text_a="text",
                                train_file=train, eval_file=dev, lr=1e-2, batch_size=16, epochs=4, seed=0, threads=1,
                                device="cpu", **extra)
        accuracy[name] = finetune(config)["epochs"][-1]["accuracy"]  # the last: the best is chosen on true labels
    # the teacher learnt the swapped labels, and so the student, trained on the true labels' file with the teacher's
    # targets, is as wrong; the same run without the teacher learns the labels
    assert accuracy["teacher"] < 10 and accuracy["student"] < 10 and accuracy["plain"] > 90, accuracy
    saved = json.loads((root / "student" / "metrics.json").read_text())
    assert saved["teacher"] == teacher_config.out_dir and saved["transfer_examples"] == 100
    assert saved["train_rows"] == 300
    assert (f"200 training examples, 100 scored. Distilled from {teacher_config.out_dir} (temperature 1, its share "
            "of the loss 1; 100 unlabelled transfer examples).") in (root / "student" / "results.md").read_text()


@pytest.mark.parametrize("args, error", [
    (["--transfer-file", "t.csv"], "--transfer-file t.csv without --teacher"),
    (["--distill-alpha", "0.5"], "--distill-alpha 0.5 without --teacher"),
    (["--teacher", "T", "--task", "squad1"], "--teacher with --task squad1; expected a classification"),
    (["--teacher", "T", "--distill-temperature", "0"], "--distill-temperature is 0.0; expected a number above 0"),
    (["--teacher", "T", "--distill-alpha", "0"], "--distill-alpha is 0.0; expected the teacher's share"),
    (["--teacher", "T", "--distill-alpha", "0.5", "--transfer-file", "t.csv"],
     "--transfer-file with --distill-alpha 0.5; expected --distill-alpha 1"),
    (["--teacher", "T", "--class-weight", "balanced"], "--class-weight with --teacher and --distill-alpha 1"),
    (["--teacher", "out", "--out-dir", "out"], "--teacher out is --out-dir"),
])
def test_bad_distillation_settings_are_refused_before_anything_is_read(args, error, tmp_path, capsys):
    code = main(["finetune", "--model-dir", str(tmp_path / "none"), "--train-file", "x.csv", "--eval-file", "y.csv",
                 *args])
    assert code == 2 and error in capsys.readouterr().err


def test_a_teacher_for_other_labels_is_refused(flipped_teacher, tiny_model_dir, tmp_path):
    root, teacher_config, _ = flipped_teacher
    other = tmp_path / "other.csv"
    other.write_text("text,label\ngood,yes\nbad,no\n")
    config = FinetuneConfig(model_dir=tiny_model_dir, out_dir=str(tmp_path / "run"), task="custom", text_a="text",
                            train_file=str(other), eval_file=str(other), teacher=teacher_config.out_dir, threads=1,
                            device="cpu")
    with pytest.raises(BertkitError, match="labels negative, positive; expected the task's, no, yes"):
        finetune(config)


def test_a_teacher_that_saw_the_rows_held_out_is_refused(flipped_teacher, tmp_path):
    """The teacher trained on the whole file; a run (or crossval) holding rows of that file out must not learn their
    labels from it. A teacher holding out the same rows passes the check."""
    root, teacher_config, _ = flipped_teacher
    held_out = dataclasses.replace(teacher_config, out_dir=str(tmp_path / "run"), teacher=teacher_config.out_dir,
                                   eval_split=0.25)
    with pytest.raises(BertkitError, match=r"fine-tuned on .*flipped.csv, the rows this run holds out \(--eval-split "
                                           r"0.25\) included"):
        finetune(held_out)
    assert not (tmp_path / "run").exists()
    assert main(["crossval", "--model-dir", teacher_config.model_dir, "--task", "custom", "--text-a", "text",
                 "--train-file", teacher_config.train_file, "--teacher", teacher_config.out_dir, "--folds", "3",
                 "--out-dir", str(tmp_path / "cv"), "--threads", "1"]) == 2
    assert not (tmp_path / "cv").exists()
    # the same rows held out by the teacher: allowed (checked alone, nothing trained)
    same = dataclasses.replace(held_out, teacher=str(tmp_path / "teacher-held-out"))
    shutil.copytree(teacher_config.out_dir, same.teacher)
    dataclasses.replace(teacher_config, out_dir=same.teacher, eval_split=0.25).save(Path(same.teacher))
    check_teacher_data(same)
    check_teacher_data(dataclasses.replace(held_out, eval_split=0.0))  # nothing held out
