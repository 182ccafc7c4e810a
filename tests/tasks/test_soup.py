"""Model soups (`bertkit soup`): the average of the runs' weights, the greedy recipe leaving out a run that lowers
the held-out score, the ensemble beside them, the soup as a run folder that evaluate, predict and transformers
read, and the runs refused."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bertkit.cli import main
from bertkit.errors import BertkitError
from bertkit.model import BertForSequenceClassification
from bertkit.tasks.evaluation import evaluate, predict
from bertkit.tasks.finetune import finetune, load_task
from bertkit.tasks.soup import SoupConfig, soup
from bertkit.tokenizer import Tokenizer
from tasks.test_crossval import BAD, GOOD
from tasks.test_finetune import quick, tsv


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """48 training rows (a quarter held out by every run) and 12 dev rows."""
    root = tmp_path_factory.mktemp("reviews")
    rows = [(text, "good") for text in GOOD] * 4 + [(text, "bad") for text in BAD] * 4
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    train = tsv(root / "train.tsv", ("sentence", "label"), *rows)
    dev = tsv(root / "dev.tsv", ("sentence", "label"), *[(t, "good") for t in GOOD], *[(t, "bad") for t in BAD])
    return train, dev


def run(model_dir, out, reviews, **kw):
    train, dev = reviews
    seed = kw.pop("seed", 0)
    config = quick(model_dir, out, task="custom", train_file=str(train), eval_file=str(dev), eval_split=0.25,
                   epochs=kw.pop("epochs", 10), lr=kw.pop("lr", 1e-2), **kw)
    finetune(dataclasses.replace(config, seed=seed))
    return str(out)


@pytest.fixture(scope="module")
def runs(toy_model_dir, reviews, tmp_path_factory):
    """Two runs of an lr and seed search, and a third: the first's weights with noise, the run that spoils a soup."""
    root = tmp_path_factory.mktemp("runs")
    a = run(toy_model_dir, root / "a", reviews, lr=1e-2, seed=0)
    b = run(toy_model_dir, root / "b", reviews, lr=5e-3, seed=1)
    noisy = root / "noisy"
    shutil.copytree(a, noisy)
    weights = load_file(noisy / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    weights = {k: v + torch.randn(v.shape, generator=generator) * 3 if v.dim() == 2 else v for k, v in weights.items()}
    save_file(weights, noisy / "model.safetensors", metadata={"format": "pt"})
    return a, b, str(noisy)


def test_the_uniform_soup_is_the_mean_of_the_runs_weights_and_transformers_reads_it(runs, tmp_path):
    a, b, _ = runs
    summary = soup(SoupConfig(runs=[a, b], out=str(tmp_path / "soup"), recipe="uniform", threads=1))
    weights = load_file(tmp_path / "soup" / "model.safetensors")
    first, second = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    assert set(weights) == set(first)
    for name, value in weights.items():
        torch.testing.assert_close(value, (first[name].double() + second[name].double()).div(2).float(), rtol=0,
                                   atol=1e-7)
    # a run folder: transformers loads it to the same logits, evaluate scores it as the soup was scored
    transformers = pytest.importorskip("transformers")
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "soup").eval()
    ours = BertForSequenceClassification.from_pretrained(tmp_path / "soup").eval()
    batch = Tokenizer.from_pretrained(tmp_path / "soup").encode_batch(["a good movie", "very boring"], max_length=16)
    ids, types = torch.tensor(batch["input_ids"]), torch.tensor(batch["token_type_ids"])
    mask = torch.tensor(batch["attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, token_type_ids=types, attention_mask=mask)["logits"],
                                   theirs(input_ids=ids, token_type_ids=types, attention_mask=mask).logits,
                                   rtol=0, atol=1e-5)
    again = evaluate(tmp_path / "soup")
    for name in ("accuracy", "dev_accuracy"):
        assert again[name] == pytest.approx(summary["uniform"]["metrics"][name])
    assert [r["label"] for r in predict(tmp_path / "soup", ["a great film", "an awful film"])] == ["good", "bad"]
    assert summary["selected_on"] == "held-out" and summary["recipe"] == "uniform"
    saved = json.loads((tmp_path / "soup" / "finetune_config.json").read_text())
    assert saved["eval_split"] == 0.25 and saved["model_dir"] == json.loads(
        (tmp_path / "soup" / "soup.json").read_text())["model_dir"]


def test_the_greedy_soup_leaves_out_the_run_that_lowers_the_held_out_score(runs, tmp_path):
    a, b, noisy = runs
    summary = soup(SoupConfig(runs=[noisy, a, b], out=str(tmp_path / "soup"), threads=1))
    scores = [r["metrics"]["accuracy"] for r in summary["runs"]]
    assert scores[1] == scores[2] == 100.0 and scores[0] < 100.0  # the noisy run scores worst on its own
    assert summary["ranking"] == [1, 2, 0]  # best first, ties in the order given
    assert summary["greedy"]["runs"] == [1, 2]  # a and b kept, the noisy run left out
    assert [s["kept"] for s in summary["greedy"]["steps"]] == [True, True, False]
    assert summary["uniform"]["metrics"]["accuracy"] < summary["greedy"]["metrics"]["accuracy"] == 100.0
    # what the folder holds: a and b averaged
    weights = load_file(tmp_path / "soup" / "model.safetensors")
    first, second = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    for name, value in weights.items():
        torch.testing.assert_close(value, (first[name] + second[name]) / 2, rtol=0, atol=1e-6)
    table = (tmp_path / "soup" / "soup.md").read_text()
    assert "| 3 | run 1 |" in table and "left out |" in table and "keeping each that does not make it worse: run 2; run 3" \
        in table
    assert "optimistic" not in table  # chosen on held-out rows, reported on dev


def test_the_ensemble_averages_the_runs_logits(runs, tmp_path):
    a, _, noisy = runs
    summary = soup(SoupConfig(runs=[a, noisy], out=str(tmp_path / "soup"), threads=1))
    from bertkit.tasks.finetune import FinetuneConfig

    config = FinetuneConfig.load(a)
    task = load_task(config, need_train=False, labels=["bad", "good"])
    tokenizer = Tokenizer.from_pretrained(a)
    for split, key in (("held-out", "accuracy"), ("dev", "dev_accuracy")):
        examples = task.evals[split]
        logits = [task.logits(BertForSequenceClassification.from_pretrained(r).eval(), tokenizer, examples, config,
                              torch.device("cpu")) for r in (a, noisy)]
        predicted = torch.stack(logits).mean(0).argmax(-1)
        accuracy = 100 * float((predicted == torch.tensor(task.gold(examples))).float().mean())
        assert summary["ensemble"]["metrics"][key] == pytest.approx(accuracy)


def test_the_command_prints_the_table_and_writes_the_recipe_asked(runs, tmp_path, capsys):
    a, b, _ = runs
    assert main(["soup", a, b, "--out", str(tmp_path / "soup"), "--recipe", "uniform", "--no-ensemble",
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "# Model soup: custom, 2 runs fine-tuned from" in printed and "**uniform soup** | 2 |" in printed
    summary = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert summary["recipe"] == "uniform" and "ensemble" not in summary
    assert [r["run"] for r in summary["runs"]] == [a, b] and [r["seed"] for r in summary["runs"]] == [0, 1]
    # the same --out again: refused without --overwrite
    assert main(["soup", a, b, "--out", str(tmp_path / "soup")]) == 2
    assert "holds files" in capsys.readouterr().err


def test_chosen_on_the_data_it_reports_the_table_says_so(runs, reviews, tmp_path):
    a, b, _ = runs
    soup(SoupConfig(runs=[a, b], out=str(tmp_path / "soup"), eval_file=str(reviews[1]), threads=1))
    table = (tmp_path / "soup" / "soup.md").read_text()
    assert "chosen on dev" in table and "optimistic" in table
    assert json.loads((tmp_path / "soup" / "finetune_config.json").read_text())["eval_split"] == 0.0


def test_runs_that_do_not_average_are_refused(runs, toy_model_dir, reviews, tmp_path):
    a, b, _ = runs

    def refused(run_list, match, **kw):
        with pytest.raises(BertkitError, match=match):
            soup(SoupConfig(runs=run_list, out=str(kw.pop("out", tmp_path / "soup")), threads=1, **kw))

    refused([a], "1 run folder; expected two or more")
    refused([a, a], "given twice")
    refused([a, b], "inside the run 1 folder", out=f"{a}/soup")
    refused([a, b], "--batches 5 without --data", batches=5)  # it only counts for checkpoints: not ignored
    other_split = run(toy_model_dir, tmp_path / "other-split", reviews, epochs=1, split_seed=3)
    refused([a, other_split], "split_seed 3.*holding out the same rows")
    start = tmp_path / "start"  # the same pretrained weights, another folder: not known to be the same start
    shutil.copytree(toy_model_dir, start)
    refused([a, run(str(start), tmp_path / "other-start", reviews, epochs=1)], "from 2 pretrained models")
    for name, labels, match in (("three", {"0": "bad", "1": "good", "2": "meh"}, "num_labels 3"),
                                ("swapped", {"0": "good", "1": "bad"}, "id2label")):
        other = tmp_path / name  # a classifier's rows are averaged row by row: the same labels in the same order
        shutil.copytree(b, other)
        config = json.loads((other / "config.json").read_text())
        config["id2label"], config["label2id"] = labels, {v: int(k) for k, v in labels.items()}
        (other / "config.json").write_text(json.dumps(config))
        refused([a, str(other)], f"{match}.*expected one architecture and one label set")
    bare = tmp_path / "bare"
    shutil.copytree(b, bare)
    (bare / "finetune_config.json").unlink()
    refused([a, str(bare)], "bare: no finetune_config.json; expected --task")
    refused([str(bare), str(tmp_path / "bare")], "given twice")
    other_dev = run(toy_model_dir, tmp_path / "other-dev", (reviews[0], reviews[0]), epochs=1)
    refused([a, other_dev], "eval_file .*train.tsv.*dev.tsv.*expected runs on the same task and data")
    # scored on the data given instead, they are compared on it alone
    assert soup(SoupConfig(runs=[a, other_dev], out=str(tmp_path / "soup"), eval_file=str(reviews[1]), threads=1,
                           ensemble=False))["selected_on"] == "dev"


def test_a_folder_without_a_run_config_is_scored_on_the_data_given(runs, reviews, tmp_path, caplog):
    a, b, _ = runs
    bare = tmp_path / "bare"  # as a fine-tuned model downloaded from the Hub: no finetune_config.json
    shutil.copytree(b, bare)
    (bare / "finetune_config.json").unlink()
    summary = soup(SoupConfig(runs=[a, str(bare)], out=str(tmp_path / "soup"), task="custom",
                              eval_file=str(reviews[1]), threads=1))
    assert "1 of the 2 runs have no finetune_config.json" in caplog.text
    assert "lr" in summary["runs"][0] and "lr" not in summary["runs"][1]  # not the config's default
    assert summary["selected_on"] == "dev" and summary["runs"][1]["metrics"]["accuracy"] == pytest.approx(
        evaluate(bare, task="custom", eval_file=str(reviews[1]))["accuracy"])
