"""Fine-tuning end to end on small real slices with a tiny random model: files, best epoch, evaluate, predict."""

import dataclasses
import io
import json
import math
import shutil
import time
from pathlib import Path

import pytest

from bertkit.cli import main
from bertkit.errors import BertkitError
from bertkit.tasks.evaluation import evaluate, predict
from bertkit.tasks.finetune import BestCheckpoint, FinetuneConfig, finetune, open_out_dir
from bertkit.tasks.glue import GlueConfig, glue
from bertkit.train.logs import read_csv
from conftest import data_path


def tsv(path, *rows):
    path.write_text("".join("\t".join(map(str, row)) + "\n" for row in rows), encoding="utf-8")
    return path


def quick(model_dir, out_dir, **kw) -> FinetuneConfig:
    """A run of a few steps: high lr so that the tiny model moves, small batches."""
    return FinetuneConfig(model_dir=model_dir, out_dir=str(out_dir), lr=kw.pop("lr", 2e-3), batch_size=16,
                          epochs=kw.pop("epochs", 2), seed=0, threads=1, device="cpu", **kw)


@pytest.fixture(scope="module")
def sst2_run(tiny_model_dir, tmp_path_factory):
    """SST-2: 400 training sentences, all 872 dev sentences, 3 epochs."""
    out = tmp_path_factory.mktemp("sst2")
    config = quick(tiny_model_dir, out, task="SST-2", data_dir=str(data_path("glue", "SST-2")), epochs=3,
                   limit_train_examples=400)
    return config, finetune(config)


def test_sst2_run_writes_a_model_folder_and_its_record(sst2_run):
    config, record = sst2_run
    out = config.out_dir
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "finetune_config.json",
                 "metrics.json", "results.md", "train.csv", "eval.csv"):
        assert Path(out, name).is_file(), name
    model_config = json.loads(Path(out, "config.json").read_text())
    assert model_config["architectures"] == ["BertForSequenceClassification"]
    assert model_config["id2label"] == {"0": "0", "1": "1"}
    saved = json.loads(Path(out, "finetune_config.json").read_text())
    assert saved["task"] == "SST-2" and saved["max_length"] == 128 and saved["warmup"] == 0.1
    # 25 steps an epoch: every 50th step and each epoch's end (its steps since the last row were dropped before)
    assert [int(r["step"]) for r in read_csv(Path(out, "train.csv"))] == [25, 50, 75]
    assert record == json.loads(Path(out, "metrics.json").read_text())
    assert record["train_examples"] == 400 and record["eval_examples"] == 872
    assert len(record["epochs"]) == 3
    for row in record["epochs"]:
        assert row["train_seconds"] > 0 and row["train_examples_per_second"] > 0 and 0 <= row["accuracy"] <= 100
    results = Path(out, "results.md").read_text()
    assert "| epoch | train loss | accuracy |" in results and "(best)" in results


def test_the_best_epoch_is_the_one_kept(sst2_run):
    config, record = sst2_run
    scores = [row["accuracy"] for row in record["epochs"]]
    assert record["best_epoch"] == scores.index(max(scores)) + 1
    # the folder holds that epoch's model: re-scoring it gives the recorded number exactly
    assert evaluate(config.out_dir, threads=1)["accuracy"] == pytest.approx(record["best"]["accuracy"], abs=1e-9)


def test_the_kept_model_is_the_best_epochs_not_the_last(toy_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from bertkit.tasks.classification import TextTask

    scores, snapshots = iter([60.0, 70.0, 65.0]), []
    real_evaluate = TextTask.evaluate

    def scripted(self, model, *args):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        metrics, write = real_evaluate(self, model, *args)
        return {**metrics, "accuracy": next(scores)}, write

    monkeypatch.setattr(TextTask, "evaluate", scripted)
    rows = [("a good movie", 1), ("a bad film", 0), ("great fun", 1), ("very boring", 0)] * 4
    tsv(tmp_path / "train.tsv", ("sentence", "label"), *rows)
    record = finetune(quick(toy_model_dir, tmp_path / "run", task="SST-2", train_file=str(tmp_path / "train.tsv"),
                            eval_file=str(tmp_path / "train.tsv"), epochs=3))
    assert record["best_epoch"] == 2 and record["best"]["accuracy"] == 70.0
    kept = load_file(tmp_path / "run" / "model.safetensors")
    assert all(kept[k].equal(snapshots[1][k]) for k in kept)
    assert not all(kept[k].equal(snapshots[2][k]) for k in kept)


def test_best_checkpoint_only_moves_on_a_strictly_better_score():
    best = BestCheckpoint()
    assert [best.update(s, e) for e, s in enumerate([50.0, 60.0, 60.0, math.nan, 55.0, 61.0], 1)] == [
        True, True, False, False, False, True]
    assert (best.epoch, best.score) == (6, 61.0)


def test_predict_reads_stdin_like_lines(sst2_run):
    config, _ = sst2_run
    results = predict(config.out_dir, io.StringIO("a great movie\n\nawful , boring\n"))
    assert [r["text"] for r in results] == ["a great movie", "", "awful , boring"]
    assert results[1]["label"] is None and results[1]["error"] == "blank line: no text to label"
    assert all(r["label"] in ("0", "1") and 0.5 <= r["probability"] <= 1 for r in results[::2])


def test_predict_warns_when_lines_are_pairs_for_a_model_of_single_texts(sst2_run, caplog):
    """SST-2's dev.tsv given whole (sentence<TAB>label) was read as pairs, the gold label as segment B, silently."""
    config, _ = sst2_run
    results = predict(config.out_dir, io.StringIO("a great movie\t1\nawful , boring\t0\n"))
    assert results[0]["pair"] == "1"
    assert "text<TAB>pair lines, but" in caplog.text and "was fine-tuned on single texts; expected one text per line" \
        in caplog.text
    caplog.clear()
    predict(config.out_dir, io.StringIO("a great movie\n"))
    assert "fine-tuned on" not in caplog.text


def test_cli_predict_on_stdin(sst2_run, monkeypatch, capsys):
    config, _ = sst2_run
    monkeypatch.setattr("sys.stdin", io.StringIO("a fine film\n"))
    assert main(["predict", str(config.out_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "a fine film"
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ttwo\tthree\n"))
    assert main(["predict", str(config.out_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "<stdin>:1: 3 tab-separated fields" in err


def test_regression_sts_b_style(tiny_model_dir, tmp_path):
    header = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score")
    pairs = [("A man is playing a guitar.", "A man plays the guitar.", 4.8),
             ("A woman is slicing an onion.", "A man is riding a horse.", 0.2),
             ("A dog runs in the park.", "A dog is running on the grass.", 3.6),
             ("Kids play football.", "Children are playing soccer.", 4.2),
             ("The stock market fell.", "A cat sleeps on the sofa.", 0.0),
             ("Someone is cooking.", "A person prepares food.", 3.9)]
    rows = [(i, "main", "x", "2012", i, "none", "none", a, b, f"{s:.3f}") for i, (a, b, s) in enumerate(pairs * 4)]
    data = tmp_path / "STS-B"
    data.mkdir()
    tsv(data / "train.tsv", header, *rows)
    tsv(data / "dev.tsv", header, *rows[:6])
    record = finetune(quick(tiny_model_dir, tmp_path / "run", task="STS-B", data_dir=str(data)))
    assert set(record["best"]) == {"pearson", "spearman"}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_labels"] == 1
    scores = predict(tmp_path / "run", ["A man is playing a guitar.\tA man plays the guitar."])
    assert set(scores[0]) == {"text", "pair", "score"}


def test_custom_csv_dataset_with_named_labels(toy_model_dir, tmp_path):
    lines = ["review,stars"] + [f'"{t}, really",{s}' for t, s in
                                [("a good film", "good"), ("bad movie", "bad"), ("great fun", "good"),
                                 ("very boring", "bad"), ("it was ok", "meh"), ("not bad", "meh")] * 5]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(lines[:7]) + "\n")
    config = quick(toy_model_dir, tmp_path / "run", task="custom", train_file=str(tmp_path / "train.csv"),
                   eval_file=str(tmp_path / "dev.csv"), text_a="review", label="stars")
    record = finetune(config)
    assert set(record["best"]) == {"accuracy", "macro_f1", "ece", "nll"}
    id2label = json.loads((tmp_path / "run" / "config.json").read_text())["id2label"]
    assert id2label == {"0": "bad", "1": "good", "2": "meh"}
    # per class: the dev file's 2 / 2 / 2 rows, and a confusion matrix whose rows count them
    report = (tmp_path / "run" / "classes.md").read_text()
    assert report.startswith("# custom per class: dev, 6 examples\n") and "classes.md" in (tmp_path / "run" /
                                                                                          "results.md").read_text()
    matrix = [line.split(" | ")[1:] for line in report.splitlines()[-3:]]
    assert [sum(int(n.strip(" |")) for n in row) for row in matrix] == [2, 2, 2]
    assert "| macro average | 6 | 6 | " in report and f"{record['best']['macro_f1']:.2f} |" in report
    assert evaluate(tmp_path / "run")["accuracy"] == pytest.approx(record["best"]["accuracy"])
    assert predict(tmp_path / "run", ["great fun"])[0]["label"] in ("bad", "good", "meh")
    # the command scores a file whose columns are named otherwise, and a copy without the run's config: it could
    # not be told the columns (dev.csv:1: no column 'sentence')
    (tmp_path / "test.csv").write_text("\n".join(["text,gold"] + lines[1:7]) + "\n")
    # predict reads a table as finetune does: the run's column, one result per row with its line, the header
    # not labelled as a text (it was, with each raw line, commas and quotes included)
    rows = predict(tmp_path / "run", tmp_path / "dev.csv")
    assert [(r["line"], r["text"]) for r in rows] == [(n, lines[n - 1].split('"')[1]) for n in range(2, 8)]
    assert [r["label"] for r in rows] == [r["label"] for r in predict(tmp_path / "run", [r["text"] for r in rows])]
    (tmp_path / "run" / "finetune_config.json").unlink()
    (tmp_path / "in.jsonl").write_text('{"text": "great fun, really"}\n{"text": ""}\n')
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "in.jsonl"), "--text-a", "text", "--out",
                 str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["line"], r["label"] is None) for r in out] == [(1, False), (2, True)]
    argv = ["evaluate", str(tmp_path / "run"), "--task", "custom", "--eval-file", str(tmp_path / "test.csv"),
            "--text-a", "text", "--label", "gold", "--out", str(tmp_path / "scored")]
    assert main(argv) == 0
    scored = json.loads((tmp_path / "scored" / "eval_metrics.json").read_text())
    assert scored["accuracy"] == pytest.approx(record["best"]["accuracy"])
    assert (tmp_path / "scored" / "classes.md").read_text() == report


def test_evaluate_from_another_folder_scores_the_runs_own_relative_files(toy_model_dir, tmp_path, monkeypatch):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    rows = [("a good film", "good"), ("bad movie", "bad"), ("great fun", "good"), ("very boring", "bad")] * 4
    (here / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    (here / "dev.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows[:4]))
    (elsewhere / "dev.csv").write_text("text,label\nthe,good\n")  # a namesake that is not the run's data
    monkeypatch.chdir(here)
    record = finetune(quick(toy_model_dir, tmp_path / "run", task="custom", train_file="train.csv",
                            eval_file="dev.csv", text_a="text", epochs=1))
    monkeypatch.chdir(elsewhere)
    metrics = evaluate(tmp_path / "run")
    assert record["eval_examples"] == 4 and metrics["accuracy"] == pytest.approx(record["best"]["accuracy"])
    saved = json.loads((tmp_path / "run" / "finetune_config.json").read_text())
    assert saved["eval_file"] == str(here / "dev.csv")


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_out_dir_holding_the_runs_own_data_files_is_refused_before_it_deletes_them(toy_model_dir, tmp_path,
                                                                                      overwrite):
    data = tmp_path / "data"
    data.mkdir()
    rows = "text,label\n" + "a good film,good\nbad movie,bad\n" * 4
    (data / "train.csv").write_text(rows)
    (data / "eval.csv").write_text(rows)
    config = quick(toy_model_dir, data, task="custom", train_file=str(data / "train.csv"),
                   eval_file=str(data / "eval.csv"), text_a="text", epochs=1, overwrite=overwrite)
    with pytest.raises(BertkitError, match="--train-file .*train.csv is in --out-dir .* the run would delete its own "
                                           "input; expected an --out-dir apart from the data"):
        finetune(config)
    assert (data / "train.csv").read_text() == rows and (data / "eval.csv").read_text() == rows


def test_glue_submission_file_for_test_tsv(toy_model_dir, tmp_path):
    data = tmp_path / "SST-2"
    data.mkdir()
    sentences = [("a good movie", 1), ("a bad film", 0), ("great fun", 1), ("very boring", 0)] * 4
    tsv(data / "train.tsv", ("sentence", "label"), *sentences)
    tsv(data / "dev.tsv", ("sentence", "label"), *sentences[:4])
    tsv(data / "test.tsv", ("index", "sentence"), (0, "not bad"), (1, "awful"), (5, "fun"))
    record = finetune(quick(toy_model_dir, tmp_path / "run", task="sst2", data_dir=str(data), predict=True))
    submission = (tmp_path / "run" / "SST-2.tsv").read_text().splitlines()
    assert record["submissions"] == [str(tmp_path / "run" / "SST-2.tsv")]
    assert submission[0] == "index\tprediction" and [line.split("\t")[0] for line in submission[1:]] == ["0", "1", "5"]
    assert all(line.split("\t")[1] in ("0", "1") for line in submission[1:])
    # evaluate and predict write no leaderboard file: they neither read test.tsv (a broken one failed them) nor warn
    (data / "test.tsv").write_text("index\tsentence\n0\tnot bad\textra\n")
    assert set(evaluate(tmp_path / "run")) == {"accuracy", "ece", "nll"}
    assert predict(tmp_path / "run", ["a good movie\n"])[0]["label"] in ("0", "1")
    # a test file without GLUE's index column (a labelled one) is numbered by position
    tsv(data / "test.tsv", ("sentence", "label"), *sentences[:3])
    finetune(quick(toy_model_dir, tmp_path / "run2", task="sst2", data_dir=str(data), predict=True))
    submission = (tmp_path / "run2" / "SST-2.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in submission[1:]] == ["0", "1", "2"]


def test_mnli_writes_the_diagnostic_ax_file_from_glues_diagnostic_folder(toy_model_dir, tmp_path):
    """GLUE's leaderboard takes AX.tsv beside MNLI-m.tsv and MNLI-mm.tsv: the MNLI model's predictions on
    glue_data/diagnostic/diagnostic.tsv (index, sentence1, sentence2), which nothing read before."""
    data, diagnostic = tmp_path / "MNLI", tmp_path / "diagnostic"
    data.mkdir(), diagnostic.mkdir()
    pairs = [("a man sleeps", "a person rests", "entailment"), ("a man sleeps", "a man runs", "contradiction"),
             ("a dog barks", "it is loud", "neutral")] * 6
    header = ("index", "sentence1", "sentence2", "gold_label")
    tsv(data / "train.tsv", header, *[(i, *p) for i, p in enumerate(pairs)])
    for split in ("dev_matched", "dev_mismatched"):
        tsv(data / f"{split}.tsv", header, *[(i, *p) for i, p in enumerate(pairs[:3])])
    for split in ("test_matched", "test_mismatched"):
        tsv(data / f"{split}.tsv", header[:3], (0, "a cat sits", "a cat is seated"))
    tsv(diagnostic / "diagnostic.tsv", header[:3], *[(i, "the cat sat", "a cat sat") for i in range(5)])
    record = finetune(quick(toy_model_dir, tmp_path / "run", task="mnli", data_dir=str(data), predict=True, epochs=1))
    assert sorted(Path(p).name for p in record["submissions"]) == ["AX.tsv", "MNLI-m.tsv", "MNLI-mm.tsv"]
    rows = (tmp_path / "run" / "AX.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["0", "1", "2", "3", "4"]
    assert {r.split("\t")[1] for r in rows[1:]} <= {"entailment", "neutral", "contradiction"}


def test_a_folder_naming_the_task_labels_in_another_order_is_scored_by_name(toy_model_dir, tmp_path):
    """A transformers RTE/MNLI model may list its labels in another order (not_entailment first): scored by index,
    every class was swapped; evaluate reads the classifier's rows by label name."""
    from safetensors.torch import load_file, save_file

    data = tmp_path / "RTE"
    data.mkdir()
    pairs = [("a man sleeps", "a person rests", "entailment"), ("a man sleeps", "a man runs", "not_entailment"),
             ("a dog barks", "it is loud", "entailment"), ("a cat sits", "the cat flies", "not_entailment")] * 4
    header = ("index", "sentence1", "sentence2", "label")
    tsv(data / "train.tsv", header, *[(i, *p) for i, p in enumerate(pairs)])
    tsv(data / "dev.tsv", header, *[(i, *p) for i, p in enumerate(pairs[:3])])
    finetune(quick(toy_model_dir, tmp_path / "run", task="rte", data_dir=str(data), epochs=1))
    expected = evaluate(tmp_path / "run")
    swapped = tmp_path / "swapped"
    shutil.copytree(tmp_path / "run", swapped)
    config = json.loads((swapped / "config.json").read_text())
    config["id2label"] = {"0": "not_entailment", "1": "entailment"}
    config["label2id"] = {"not_entailment": 0, "entailment": 1}
    (swapped / "config.json").write_text(json.dumps(config))
    weights = load_file(swapped / "model.safetensors")
    for key in ("classifier.weight", "classifier.bias"):
        weights[key] = weights[key].flip(0).contiguous()
    save_file(weights, swapped / "model.safetensors")
    assert evaluate(swapped) == pytest.approx(expected)


def test_predict_asked_of_a_finished_run_writes_its_submission_file(toy_model_dir, tmp_path):
    """--predict is one of the fields a run continued may change, but `--resume auto --predict` on a finished run
    (and so a `glue --predict` rerun) said "nothing to do" and wrote no leaderboard file."""
    data = tmp_path / "SST-2"
    data.mkdir()
    sentences = [("a good movie", 1), ("a bad film", 0), ("great fun", 1), ("very boring", 0)] * 4
    tsv(data / "train.tsv", ("sentence", "label"), *sentences)
    tsv(data / "dev.tsv", ("sentence", "label"), *sentences[:4])
    tsv(data / "test.tsv", ("index", "sentence"), (0, "not bad"), (1, "awful"))
    config = quick(toy_model_dir, tmp_path / "run", task="SST-2", data_dir=str(data), epochs=1)
    finetune(config)
    assert not (tmp_path / "run" / "SST-2.tsv").exists()
    record = finetune(FinetuneConfig(**{**vars(config), "predict": True, "resume": "auto"}))
    assert record["submissions"] == [str(tmp_path / "run" / "SST-2.tsv")]
    assert (tmp_path / "run" / "SST-2.tsv").read_text().splitlines()[1:] != []
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == record
    assert f"Submission file: {tmp_path / 'run' / 'SST-2.tsv'}" in (tmp_path / "run" / "results.md").read_text()


def test_glue_grid_picks_the_best_lr_per_task(tiny_model_dir, tmp_path):
    result = glue(GlueConfig(model_dir=str(tiny_model_dir), tasks=["SST-2", "RTE"], data_dir=str(data_path("glue")),
                             out_dir=str(tmp_path), lrs=[1e-3, 1e-4], batch_size=16, epochs=1,
                             limit_train_examples=48, threads=1, device="cpu"))
    for task, metric in (("SST-2", "accuracy"), ("RTE", "accuracy")):
        by_lr = result["tasks"][task]["by_lr"]
        assert result["tasks"][task]["best_lr"] == max((1e-3, 1e-4), key=lambda lr: by_lr[f"{lr:g}"][metric])
    table = (tmp_path / "glue_results.md").read_text()
    assert "| System | SST-2 | RTE | Average |" in table
    assert "| | 48 | 48 | - |" in table and "1 epoch," in table  # the sizes trained on, not the paper's 67k / 2.5k
    average = (result["tasks"]["SST-2"]["best"]["accuracy"] + result["tasks"]["RTE"]["best"]["accuracy"]) / 2
    assert f"| {average:.1f} |" in table
    assert result["table"] == table


def test_glue_runs_every_task_with_lora_when_asked(tiny_model_dir, tmp_path, capsys):
    result = glue(GlueConfig(model_dir=str(tiny_model_dir), tasks=["RTE"], data_dir=str(data_path("glue")),
                             out_dir=str(tmp_path), lrs=[1e-3], batch_size=16, epochs=1, limit_train_examples=16,
                             threads=1, device="cpu", lora_rank=2, lora_targets="all"))
    run = Path(result["tasks"]["RTE"]["run_dir"])
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run / "finetune_config.json").read_text())["lora_targets"] == "all"
    assert "seed 42, LoRA rank 2 alpha 8 on all;" in result["table"]
    argv = ["glue", "--model-dir", str(tiny_model_dir), "--data-dir", str(data_path("glue")), "--out-dir",
            str(tmp_path / "bad"), "--lora-rank", "2", "--lora-targets", "keys"]
    assert main(argv) == 2 and "--lora-targets 'keys': keys; expected some of" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_glue_checks_every_tasks_data_before_the_first_run(tiny_model_dir, tmp_path, capsys):
    """Without --tasks, every task folder runs: the shared data's QNLI has no train.tsv, and the sweep failed on it
    only after fine-tuning CoLA, SST-2, MRPC and STS-B at every lr."""
    argv = ["glue", "--model-dir", str(tiny_model_dir), "--data-dir", str(data_path("glue")),
            "--out-dir", str(tmp_path / "glue"), "--lrs", "1e-4", "--epochs", "1", "--limit-train-examples", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no training data for QNLI: expected --data-dir with train.tsv" in err, err
    assert "(or leave QNLI out: --tasks names the tasks to run)" in err
    assert not (tmp_path / "glue").exists()  # no task was fine-tuned, nothing written


@pytest.mark.parametrize("content, argv_extra, expected", [
    ("review,stars\n\"good\",1\n\"bad\",0,extra\n", [], "train.csv:3: 3 columns, expected 2"),
    ("review,stars\n\"good\",1\n", ["--text-a", "text"], "no column 'text'"),
    ("review,stars\n\"good\",1\n", ["--task", "SST-3"], "unknown GLUE task 'SST-3'"),
    ("review,stars\n\"good\",1\n", ["--epochs", "0"], "--epochs is 0; expected a positive number"),
])
def test_malformed_input_is_one_line_and_status_2(toy_model_dir, tmp_path, capsys, content, argv_extra, expected):
    (tmp_path / "train.csv").write_text(content)
    argv = ["finetune", "--model-dir", toy_model_dir, "--task", "custom", "--train-file", str(tmp_path / "train.csv"),
            "--eval-file", str(tmp_path / "train.csv"), "--text-a", "review", "--label", "stars",
            "--out-dir", str(tmp_path / "run"), *argv_extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bertkit: error: ") and err.count("\n") == 1 and expected in err, err


def test_evaluate_and_predict_refuse_what_the_folder_cannot_do(toy_model_dir, capsys):
    assert main(["evaluate", toy_model_dir, "--task", "SST-2"]) == 2
    assert "expected --data-dir" in capsys.readouterr().err
    assert main(["predict", toy_model_dir, "/no/such/file.txt"]) == 2
    assert "/no/such/file.txt: cannot read" in capsys.readouterr().err


def test_a_max_length_past_the_models_positions_is_refused_before_any_work(toy_model_dir, tmp_path, capsys):
    """finetune, evaluate and predict name the model's positions and `bertkit extend` (it failed mid-epoch)."""
    positions = json.loads(Path(toy_model_dir, "config.json").read_text())["max_position_embeddings"]
    config = toy_run(toy_model_dir, tmp_path, str(tmp_path / "run"), max_length=positions + 1)
    with pytest.raises(BertkitError, match=rf"--max-length {positions + 1} is more than the {positions} positions .*"
                                           "bertkit extend"):
        finetune(config)
    assert not (tmp_path / "run").exists()
    finetune(toy_run(toy_model_dir, tmp_path, str(tmp_path / "run"), epochs=1))
    (tmp_path / "in.txt").write_text("a good movie\n")
    for command in (["evaluate", str(tmp_path / "run")], ["predict", str(tmp_path / "run"), str(tmp_path / "in.txt")]):
        assert main([*command, "--max-length", str(positions * 2)]) == 2
        assert f"more than the {positions} positions" in capsys.readouterr().err


def test_results_name_the_precision_that_ran_not_the_one_asked(toy_model_dir, tmp_path, caplog):
    """fp16 on the CPU trains in fp32 (with a warning); results.md and metrics.json say fp32."""
    record = finetune(toy_run(toy_model_dir, tmp_path, str(tmp_path / "run"), epochs=1, precision="fp16"))
    assert record["precision"] == "fp32"
    header = (tmp_path / "run" / "results.md").read_text().splitlines()[2]
    assert header.startswith("lr ") and "fp16" not in header


def test_transformers_loads_the_kept_model_with_its_labels(sst2_run):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bertkit import BertForSequenceClassification

    config, _ = sst2_run
    theirs = AutoModelForSequenceClassification.from_pretrained(config.out_dir).eval()
    assert theirs.config.id2label == {0: "0", 1: "1"}
    batch = AutoTokenizer.from_pretrained(config.out_dir)(["a gripping , funny film"], return_tensors="pt")
    ours = BertForSequenceClassification.from_pretrained(config.out_dir).eval()
    with torch.no_grad():
        assert torch.allclose(ours(**batch).logits, theirs(**batch).logits, atol=1e-5)


# ---- numbers that are not numbers, output folders, the first hour ------------------------------------------------


def toy_run(toy_model_dir, tmp_path, out, **kw) -> FinetuneConfig:
    """A custom two-class task of 16 rows: a run of seconds."""
    if not (tmp_path / "train.tsv").exists():
        rows = [("a good movie", "good"), ("a bad film", "bad"), ("great fun", "good"), ("very boring", "bad")] * 4
        tsv(tmp_path / "train.tsv", ("sentence", "label"), *rows)
    options = dict(task="custom", train_file=str(tmp_path / "train.tsv"), eval_file=str(tmp_path / "train.tsv"))
    config = quick(toy_model_dir, out, **{**options, **kw})
    config.batch_size = kw.get("batch_size", 4)  # 4 steps an epoch
    return config


@pytest.mark.parametrize("flag, value, expected", [
    ("--lr", "nan", "--lr is nan; expected a finite number"),
    ("--lr", "inf", "--lr is inf; expected a finite number"),
    ("--weight-decay", "nan", "--weight-decay is nan; expected a finite number"),
    ("--warmup", "inf", "--warmup is inf; expected a finite number"),
    ("--max-grad-norm", "nan", "--max-grad-norm is nan; expected a finite number"),
    ("--null-threshold", "nan", "--null-threshold is nan; expected a finite number"),
    ("--lr", "-1e-5", "--lr is -1e-05; expected zero or more"),
    ("--threads", "-1", "--threads is -1; expected a whole number from 1 to 1024"),
    ("--threads", "99999999999999999999", "expected a whole number from 1 to 1024"),
    ("--max-bad-steps", "0", "--max-bad-steps is 0; expected a positive number"),
    ("--pad-to-multiple-of", "0", "--pad-to-multiple-of is 0; expected a positive number"),
    ("--device", "meta", "--device 'meta' is not a device to run on; expected cpu, cuda, cuda:N, mps or auto"),
    ("--seed", "-1", "--seed is -1; expected a whole number from 0 to 4294967295"),
    ("--seed", "4294967296", "--seed is 4294967296; expected a whole number from 0 to 4294967295"),
    ("--train-articles", "0", "--train-articles is 0; expected at least 1"),
    ("--train-articles", "-3", "--train-articles is -3; expected at least 1"),
    ("--warmup", "2.5", "--warmup is 2.5; expected a whole number of steps, or a fraction of the run below 1"),
])
def test_numbers_that_are_not_numbers_are_refused_before_training(toy_model_dir, tmp_path, capsys, flag, value,
                                                                  expected):
    config = toy_run(toy_model_dir, tmp_path, tmp_path / "run")
    argv = ["finetune", "--model-dir", toy_model_dir, "--task", "custom", "--train-file", config.train_file,
            "--eval-file", config.eval_file, "--out-dir", str(tmp_path / "run"), f"{flag}={value}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_a_warm_up_as_long_as_the_run_is_refused(toy_model_dir, tmp_path, capsys):
    config = toy_run(toy_model_dir, tmp_path, tmp_path / "run")
    argv = ["finetune", "--model-dir", toy_model_dir, "--task", "custom", "--train-file", config.train_file,
            "--eval-file", config.eval_file, "--out-dir", str(tmp_path / "run"), "--warmup", "10000"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--warmup 10000 steps, as long as the run's" in err, err


def test_glue_lrs_that_are_not_numbers_are_refused(capsys):
    assert main(["glue", "--model-dir", "m", "--data-dir", "d", "--lrs", "1e-4", "nan"]) == 2
    assert "--lrs 0.0001 nan: expected finite numbers above 0" in capsys.readouterr().err


def _nan_loss_at(monkeypatch, steps: set[int]):
    from bertkit import BertForSequenceClassification

    original, calls = BertForSequenceClassification.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if kwargs.get("labels") is not None and self.training:
            calls["n"] += 1
            if calls["n"] in steps:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BertForSequenceClassification, "forward", forward)


def test_a_nan_loss_skips_the_step_and_nan_losses_in_a_row_stop_the_run(toy_model_dir, tmp_path, monkeypatch, caplog):
    with monkeypatch.context() as patch:
        _nan_loss_at(patch, {2, 3})
        record = finetune(toy_run(toy_model_dir, tmp_path, tmp_path / "skip"))
    assert "step 3: the loss is not finite (nan or inf): step skipped, no update (2 in a row" in caplog.text
    assert all(math.isfinite(e["train_loss"]) for e in record["epochs"])
    with monkeypatch.context() as patch:
        _nan_loss_at(patch, set(range(3, 100)))
        with pytest.raises(BertkitError, match=r"^step 6: the loss was not finite \(nan or inf\) for 4 steps in a "
                                               r"row \(steps 3-6.*try a lower --lr \(now 0.002\)") as stopped:
            finetune(toy_run(toy_model_dir, tmp_path, tmp_path / "stop", max_bad_steps=4))
    # was "; --resume auto continues from the last checkpoint": a resume with a lower --lr is refused as another run's
    assert str(stopped.value).endswith("with --overwrite, which starts the run over")
    assert not (tmp_path / "stop" / "results.md").exists()  # not a finished run; what it kept is epoch 1's model
    from safetensors.torch import load_file

    assert all(bool(w.isfinite().all()) for w in load_file(tmp_path / "stop" / "model.safetensors").values())


def test_the_output_folder_is_never_the_model_folder_or_inside_it(toy_model_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in Path(toy_model_dir).iterdir()}
    for out in (toy_model_dir, str(Path(toy_model_dir) / "ft"), str(Path(toy_model_dir) / ".." / Path(toy_model_dir).name)):
        with pytest.raises(BertkitError, match="the run would write into its own input"):
            finetune(toy_run(toy_model_dir, tmp_path, out))
    assert {p.name: p.read_bytes() for p in Path(toy_model_dir).iterdir()} == before
    (tmp_path / "afile").write_text("")
    with pytest.raises(BertkitError, match="afile: a file, not a folder; expected a folder for --out-dir"):
        finetune(toy_run(toy_model_dir, tmp_path, tmp_path / "afile"))


def test_a_failed_finetune_leaves_another_runs_folder_as_it_was(toy_model_dir, tmp_path, capsys):
    finetune(toy_run(toy_model_dir, tmp_path, tmp_path / "run", epochs=1))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    other = toy_run(toy_model_dir, tmp_path, tmp_path / "run", lr=1e-3, epochs=1)
    with pytest.raises(BertkitError, match=r"holds another fine-tuning run \(custom; lr 0.002 -> 0.001\); expected "
                                           "--overwrite to replace it"):
        finetune(other)
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(BertkitError):  # bad data: fails before the folder is touched
        finetune(toy_run(toy_model_dir, tmp_path, tmp_path / "run", epochs=1, train_file=str(tmp_path / "bad.tsv"),
                         overwrite=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    record = finetune(FinetuneConfig(**{**vars(other), "overwrite": True}))
    assert json.loads((tmp_path / "run" / "finetune_config.json").read_text())["lr"] == 1e-3
    assert record["epochs"] and evaluate(tmp_path / "run")["accuracy"] == record["best"]["accuracy"]


def test_a_model_folder_that_is_not_a_run_is_not_overwritten(toy_model_dir, tmp_path):
    import shutil

    shutil.copytree(toy_model_dir, tmp_path / "someone")
    with pytest.raises(BertkitError, match="holds config.json, model.safetensors.* but no finetune_config.json"):
        finetune(toy_run(toy_model_dir, tmp_path, tmp_path / "someone"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "finetune.log").write_text("a wrapper's log")  # files a run never writes are no obstacle
    finetune(toy_run(toy_model_dir, tmp_path, tmp_path / "mine", epochs=1))
    assert (tmp_path / "mine" / "finetune.log").read_text() == "a wrapper's log"


def test_bucketed_lengths_reach_the_training_batches(toy_model_dir, tmp_path, monkeypatch):
    """--pad-to-multiple-of pads every training batch to a multiple of it (the padding is masked: the model-level
    equality is tests/test_model.py's; with dropout the draws differ, so the runs are not compared bitwise)."""
    import bertkit.tasks.finetune as finetune_module

    lengths = []
    collate = finetune_module.collate

    def spy(rows, pad_id, multiple=1, **kw):
        batch = collate(rows, pad_id, multiple, **kw)
        lengths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(finetune_module, "collate", spy)
    finetune(toy_run(toy_model_dir, tmp_path, tmp_path / "bucketed", epochs=1, pad_to_multiple_of=16))
    assert lengths and all(n % 16 == 0 for n in lengths)


def test_bucketed_lengths_stop_at_max_length(toy_model_dir, tmp_path, monkeypatch):
    """A batch whose longest row is cut at --max-length is padded no further (as pretraining's are): rounded up
    past it, --max-length 512 --pad-to-multiple-of 96 gave batches of 576 positions, and a model of 512 positions
    crashed mid-run with a traceback."""
    import bertkit.tasks.finetune as finetune_module

    lengths = []
    collate = finetune_module.collate

    def spy(*args, **kw):
        batch = collate(*args, **kw)
        lengths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(finetune_module, "collate", spy)
    rows = [("a good movie " * 10, "good"), ("a bad film", "bad"), ("great fun", "good"), ("very boring", "bad")] * 4
    tsv(tmp_path / "train.tsv", ("sentence", "label"), *rows)
    finetune(toy_run(toy_model_dir, tmp_path, tmp_path / "run", epochs=1, max_length=20, pad_to_multiple_of=16))
    assert max(lengths) == 20 and all(n % 16 == 0 or n == 20 for n in lengths)


def test_the_same_run_again_starts_over_and_resume_auto_returns_a_finished_one(toy_model_dir, tmp_path, caplog):
    config = toy_run(toy_model_dir, tmp_path, tmp_path / "run", epochs=1)
    first = finetune(config)
    again = finetune(config)
    assert "starting the run over (an earlier attempt's metrics.json, results.md, train.csv, eval.csv deleted)" in caplog.text
    done = finetune(FinetuneConfig(**{**vars(config), "resume": "auto"}))
    assert "this run has finished already" in caplog.text
    assert done == json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert first["best"] == again["best"] == done["best"]


def test_the_same_out_dir_spelled_another_way_is_the_same_run(toy_model_dir, tmp_path, monkeypatch):
    """`--out-dir run`, then `--out-dir ./run/` or its absolute path with --resume auto, was refused as "another
    fine-tuning run (out_dir run -> ./run/)"; a checkpoint of another folder is still refused for --out-dir."""
    monkeypatch.chdir(tmp_path)
    config = toy_run(toy_model_dir, tmp_path, "run", epochs=1)
    first = finetune(config)
    for spelling in ("./run/", str(tmp_path / "run")):
        assert finetune(FinetuneConfig(**{**vars(config), "out_dir": spelling, "resume": "auto"})) == first
    (tmp_path / "other" / "checkpoints" / "step-00000004").mkdir(parents=True)
    monkeypatch.setattr("bertkit.tasks.finetune.verify_checkpoint", lambda path: None)  # taken as whole
    with pytest.raises(BertkitError, match="not a checkpoint of --out-dir run; expected one of run/checkpoints"):
        open_out_dir(FinetuneConfig(**{**vars(config), "resume": "other/checkpoints/step-00000004"}), Path("run"))


def test_a_mistyped_model_dir_says_no_such_folder(tmp_path, capsys):
    assert main(["finetune", "--model-dir", str(tmp_path / "modle"), "--task", "SST-2", "--out-dir",
                 str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'modle'}: no such folder (expected a model folder" in capsys.readouterr().err
    for command in (["evaluate"], ["predict"]):
        assert main([*command, str(tmp_path / "modle")]) == 2
        assert "modle: no such folder" in capsys.readouterr().err


def test_predict_prints_the_label_names_of_the_data(tiny_model_dir, tmp_path):
    config = quick(tiny_model_dir, tmp_path / "rte", task="RTE", data_dir=str(data_path("glue", "RTE")), epochs=1,
                   limit_train_examples=32)
    finetune(config)
    (result,) = predict(tmp_path / "rte", ["A man is sleeping.\tSomeone sleeps."])
    assert result["label"] in ("entailment", "not_entailment")


def test_results_table_gives_null_thresholds_in_significant_digits():
    from bertkit.tasks.finetune import results_table
    from bertkit.tasks.squad import SquadTask

    best = {"exact": 50.0, "f1": 51.0, "HasAns_f1": 40.0, "NoAns_f1": 60.0, "best_f1": 55.5, "best_f1_thresh": 0.000123456}
    row = {"epoch": 1, "train_loss": 1.0, "train_seconds": 1.0, "train_examples_per_second": 1.0, "eval_seconds": 1.0,
           **best}
    record = {"train_examples": 10, "train_rows": 12, "eval_examples": 5, "epochs": [row], "best_epoch": 1, "best": best}
    table = results_table(FinetuneConfig(model_dir="m", task="squad2", epochs=1), SquadTask("squad2"), record)
    assert "| 55.50 | 0.0001235 |" in table and "best_f1_thresh 0.0001235" in table and ", 1 epoch," in table


def test_glue_average_counts_mnli_matched_and_mismatched_as_the_paper_does():
    from bertkit.tasks.glue import glue_table

    # BERT-Base's row of the paper's Table 1, whose Average is 79.6 (MNLI-m and -mm are two of its nine numbers)
    best = {"MNLI": {"accuracy": 84.6, "dev_mismatched_accuracy": 83.4}, "QQP": {"f1": 71.2, "accuracy": 89.2},
            "QNLI": {"accuracy": 90.5}, "SST-2": {"accuracy": 93.5}, "CoLA": {"mcc": 52.1},
            "STS-B": {"pearson": 87.1, "spearman": 85.8}, "MRPC": {"f1": 88.9, "accuracy": 84.8},
            "RTE": {"accuracy": 66.4}, "WNLI": {"accuracy": 65.1}}
    result = {"tasks": {t: {"best": b, "best_lr": 2e-5, "by_lr": {"2e-05": b}, "train_examples": None}
                        for t, b in best.items()}}
    table = glue_table(result, "base", GlueConfig(lrs=[2e-5]))
    assert "| 84.6/83.4 | 71.2 | 90.5 | 93.5 | 52.1 | 85.8 | 88.9 | 66.4 | 65.1 | 79.6 |" in table
    wnli = {"tasks": {"WNLI": result["tasks"]["WNLI"]}}  # the average leaves WNLI out: nothing to average (was nan)
    assert "| bertkit base | 65.1 | - |" in glue_table(wnli, "base", GlueConfig(lrs=[2e-5]))


def test_evaluate_data_dir_scores_that_folder_not_the_runs_eval_file(toy_model_dir, tmp_path):
    rows = [("a good movie", 1), ("a bad film", 0), ("great fun", 1), ("very boring", 0)] * 4
    tsv(tmp_path / "train.tsv", ("sentence", "label"), *rows)
    finetune(quick(toy_model_dir, tmp_path / "run", task="SST-2", train_file=str(tmp_path / "train.tsv"),
                   eval_file=str(tmp_path / "train.tsv"), epochs=1))
    (tmp_path / "other").mkdir()
    tsv(tmp_path / "other" / "dev.tsv", ("sentence", "label"), *[("a good movie", label) for label in (1, 1, 0)])
    # 1 or 2 of the 3 rows there; the run's own 16 rows can give neither
    assert evaluate(tmp_path / "run", data_dir=str(tmp_path / "other"))["accuracy"] in (pytest.approx(100 / 3),
                                                                                       pytest.approx(200 / 3))
    assert evaluate(tmp_path / "run", data_dir=str(tmp_path / "other"), eval_file=str(tmp_path / "train.tsv")) \
        == evaluate(tmp_path / "run")


def test_training_time_leaves_the_checkpoint_writes_out(toy_model_dir, tmp_path, monkeypatch):
    """train_seconds (and the examples/s made from it) counted the mid-epoch checkpoint writes; pretraining's never
    did."""
    import bertkit.tasks.finetune as finetune_module

    write = finetune_module.save_checkpoint

    def slow(*args, **kwargs):
        time.sleep(0.5)
        return write(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "save_checkpoint", slow)
    record = finetune(toy_run(toy_model_dir, tmp_path, tmp_path / "run", save_every=1, epochs=1))
    assert record["epochs"][0]["train_seconds"] < 1.0  # 3 mid-epoch writes of at least 0.5 s each were counted


def test_csv_files_of_the_user_in_the_run_folder_are_left_as_they_are(toy_model_dir, tmp_path):
    """Files of other kinds are left beside the run's, CSV ones included: the logs cut back to a checkpoint (on
    every start, resumed or not) are train.csv and eval.csv alone. Was: every *.csv of --out-dir without a step
    column deleted, the custom task's own training file among them."""
    out = tmp_path / "run"
    out.mkdir()
    data = tsv(out / "reviews.csv", ("sentence", "label"), *[("a good movie", "good"), ("a bad film", "bad")] * 8)
    data.write_text(data.read_text().replace("\t", ","))
    notes = out / "notes.csv"
    notes.write_text("step,what\n1,warm-up looked fine\n50,\n")
    kept = {p: p.read_bytes() for p in (data, notes)}
    finetune(toy_run(toy_model_dir, tmp_path, out, train_file=str(data), eval_file=str(data), epochs=1))
    assert {p: p.read_bytes() for p in kept if p.exists()} == kept


def test_evaluate_and_predict_read_the_head_of_a_folder_that_names_no_architecture(tmp_path, capsys):
    """NVIDIA's bert_config.json names no architecture: evaluate and predict took a pretraining or QA folder for a
    classifier and scored a newly initialised, random head (a warning, then labels, exit status 0). They read the
    head from the weights: a QA folder answers, a pretraining folder fills in [MASK]."""
    from bertkit import Tokenizer
    from bertkit.model import BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification
    from bertkit.tf_checkpoint import save_nvidia
    from tiny_folders import save_tiny

    for cls in (BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification):
        source = save_tiny(tmp_path / cls.__name__, cls=cls)
        save_nvidia(cls.from_pretrained(source), tmp_path / f"nvidia-{cls.__name__}",
                    tokenizer=Tokenizer.from_pretrained(source))
    (tmp_path / "glue").mkdir()
    tsv(tmp_path / "glue" / "dev.tsv", ("sentence", "label"), ("a good movie", 1), ("a bad film", 0))
    (tmp_path / "in.txt").write_text("a good movie\n")
    pretraining, qa = tmp_path / "nvidia-BertForPreTraining", tmp_path / "nvidia-BertForQuestionAnswering"
    assert main(["evaluate", str(pretraining), "--task", "SST-2", "--data-dir", str(tmp_path / "glue")]) == 2
    assert "bert_config.json: architecture BertForPreTraining; expected BertForSequenceClassification for SST-2" in \
        capsys.readouterr().err
    # predict reads the weights' heads: a pretraining folder fills in [MASK] as bertkit's own folder does
    masked = "a good [MASK]"
    assert predict(pretraining, [masked])[0]["masks"] == \
        predict(tmp_path / "BertForPreTraining", [masked])[0]["masks"]
    assert main(["evaluate", str(qa), "--task", "SST-2", "--data-dir", str(tmp_path / "glue")]) == 2
    assert "architecture BertForQuestionAnswering" in capsys.readouterr().err
    question = {"question": "who signed", "context": "the company signed the treaty"}
    assert predict(qa, [json.dumps(question)])[0]["answer"] == \
        predict(tmp_path / "BertForQuestionAnswering", [json.dumps(question)])[0]["answer"]
    ours, theirs = (predict(tmp_path / name, ["a good movie"])[0]
                    for name in ("BertForSequenceClassification", "nvidia-BertForSequenceClassification"))
    assert theirs["probability"] == pytest.approx(ours["probability"], abs=1e-6)


def test_the_results_table_marks_an_epoch_recorded_without_a_metric(tmp_path):
    """A custom run killed under a version that scored accuracy alone and resumed under one that adds macro_f1: its
    first epoch's row lacks the column, and the table raised KeyError at the run's end, after all its training."""
    from bertkit.tasks.classification import TextTask
    from bertkit.tasks.finetune import FinetuneConfig, results_table

    task = TextTask("custom", ["a", "b"], ("accuracy", "macro_f1"), evals={"dev": []})
    timing = {"train_loss": 0.5, "train_seconds": 1.0, "train_examples_per_second": 10.0, "eval_seconds": 1.0}
    record = {"train_examples": 8, "eval_examples": 4, "best_epoch": 2, "best": {"accuracy": 75.0, "macro_f1": 70.0},
              "epochs": [{"epoch": 1, "accuracy": 50.0, **timing},
                         {"epoch": 2, "accuracy": 75.0, "macro_f1": 70.0, **timing}]}
    table = results_table(FinetuneConfig(model_dir="m", task="custom", out_dir=str(tmp_path)), task, record)
    assert "| 1 | 0.5000 | 50.00 | - |" in table and "| 2 (best) | 0.5000 | 75.00 | 70.00 |" in table


def test_activation_checkpointing_fine_tunes_to_the_same_weights(toy_model_dir, tmp_path, monkeypatch):
    """--activation-checkpointing reruns each block in backward with the same dropout masks: the same model."""
    import torch.utils.checkpoint
    from safetensors.torch import load_file

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))

    lines = ["review,stars"] + [f"{t},{s}" for t, s in [("a good film", "good"), ("bad movie", "bad"),
                                                        ("great fun", "good"), ("very boring", "bad")] * 8]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    weights = []
    for checkpointing in (False, True):
        out = tmp_path / f"run-{checkpointing}"
        finetune(quick(toy_model_dir, out, task="custom", train_file=str(tmp_path / "train.csv"), epochs=1,
                       eval_file=str(tmp_path / "train.csv"), text_a="review", label="stars",
                       activation_checkpointing=checkpointing))
        weights.append(load_file(out / "model.safetensors"))
        assert len(calls) == (2 * 2 if checkpointing else 0)  # 2 steps (32 rows, batch 16) x 2 blocks, in training
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert (tensor - weights[1][name]).abs().max() < 1e-6, name


def test_early_stopping_ends_a_run_whose_dev_score_stops_improving(toy_model_dir, tmp_path, caplog):
    """At lr 0 the model never changes, so no epoch beats the first: with patience 2 the run stops after epoch 3 of
    6, keeps epoch 1's model, says why, and `--resume auto` returns it as finished instead of training on."""
    lines = ["review,stars"] + [f"{t},{s}" for t, s in [("a good film", "good"), ("bad movie", "bad")] * 8]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    config = quick(toy_model_dir, tmp_path / "run", task="custom", train_file=str(tmp_path / "train.csv"),
                   eval_file=str(tmp_path / "train.csv"), text_a="review", label="stars", lr=0.0, epochs=6,
                   early_stopping_patience=2)
    record = finetune(config)
    assert [row["epoch"] for row in record["epochs"]] == [1, 2, 3]
    assert record["stopped_early"] == 3 and record["best_epoch"] == 1
    why = "no epoch beat epoch 1's dev score in the 2 epochs after it (--early-stopping-patience)"
    assert f"stopped after epoch 3 of 6: {why}" in caplog.text
    assert f"Stopped after epoch 3 of 6: {why}." in (tmp_path / "run" / "results.md").read_text()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    assert finetune(dataclasses.replace(config, resume="auto")) == record
    with pytest.raises(BertkitError, match="--early-stopping-patience is -1; expected zero"):
        dataclasses.replace(config, early_stopping_patience=-1).check()
