"""The downstream suite: cells kept and never rerun, rows added, shared subsets, the mean ± std table."""

import json
from pathlib import Path

import numpy as np
import pytest

from bertkit.cli import main
from bertkit.errors import BertkitError
from bertkit.tasks.suite import TASKS, SuiteConfig, results_table, suite, summarize, task_files
from conftest import data_path


@pytest.fixture(scope="module")
def wnli_suite(tiny_model_dir, tmp_path_factory):
    """WNLI (635 training pairs, 71 scored), 2 seeds x 1 lr, two cells at a time."""
    out = tmp_path_factory.mktemp("suite")
    config = SuiteConfig(model_dir=tiny_model_dir, data_dir=str(data_path()), out_dir=str(out), tasks=["WNLI"],
                         seeds=2, lrs=[1e-4], jobs=2)
    return config, suite(config)


def test_suite_runs_every_cell_once_and_keeps_them(wnli_suite, tiny_model_dir):
    config, result = wnli_suite
    row = result["results"][config.row]
    assert sorted(row["cells"]) == ["WNLI/lr=0.0001/seed=1", "WNLI/lr=0.0001/seed=2"]
    for cell in row["cells"].values():
        assert cell["train_examples"] == 635 and cell["eval_examples"] == 71
        assert 0 <= cell["best"]["accuracy"] <= 100
    assert json.loads((Path(config.out_dir) / "suite.json").read_text()) == result["results"]
    # the fine-tuned weights are dropped unless --keep-models; the cell's record stays
    cell_dirs = list((Path(config.out_dir) / "cells").rglob("metrics.json"))
    assert len(cell_dirs) == 2 and not any((d.parent / "model.safetensors").exists() for d in cell_dirs)


def test_suite_rerun_adds_only_missing_cells(wnli_suite, monkeypatch):
    config, result = wnli_suite
    before = json.loads((Path(config.out_dir) / "suite.json").read_text())
    ran = []
    monkeypatch.setattr("bertkit.tasks.suite.ProcessPoolExecutor", _recording_pool(ran))
    suite(config)  # nothing missing: no cell runs
    assert ran == []
    config3 = SuiteConfig(**{**config.__dict__, "seeds": 3})
    after = suite(config3)["results"][config.row]["cells"]
    assert ran == ["WNLI/lr=0.0001/seed=3"]
    assert {k: after[k] for k in before[config.row]["cells"]} == before[config.row]["cells"]


def test_two_suites_at_once_into_one_folder_keep_each_others_cells(tiny_model_dir, tmp_path, monkeypatch):
    """Each suite writes only its own row: another suite's cells saved while this one runs are not overwritten."""
    from bertkit.tasks.suite import save_entry

    results_path = tmp_path / "suite.json"
    other = {"model_dir": "elsewhere", "from_scratch": False, "cells": {}}
    ran = []

    def meanwhile(key):  # the other suite saves a cell each time this one starts one
        other["cells"][key] = {"best": {"accuracy": 60.0}, "best_epoch": 1, "seconds": 1.0, "train_examples": 635,
                               "eval_examples": 71}
        save_entry(results_path, "other model", other)

    monkeypatch.setattr("bertkit.tasks.suite.ProcessPoolExecutor", _recording_pool(ran, meanwhile))
    config = SuiteConfig(model_dir=tiny_model_dir, data_dir=str(data_path()), out_dir=str(tmp_path), tasks=["WNLI"],
                         seeds=2, lrs=[1e-4])
    result = suite(config)
    saved = json.loads(results_path.read_text())
    assert set(saved) == {config.row, "other model"} and len(saved[config.row]["cells"]) == 2
    assert saved["other model"]["cells"] == other["cells"] and len(other["cells"]) == 2
    assert result["results"] == saved and "| other model |" in result["table"]


def test_two_suites_at_once_on_one_row_keep_each_others_cells(tiny_model_dir, tmp_path, monkeypatch):
    """`--tasks WNLI` and `--tasks RTE` on one model at once: each saved its own copy of the row, dropping the cells
    the other had saved meanwhile."""
    from bertkit.tasks.suite import save_entry

    config = SuiteConfig(model_dir=tiny_model_dir, data_dir=str(data_path()), out_dir=str(tmp_path), tasks=["WNLI"],
                         seeds=2, lrs=[1e-4])
    results_path = tmp_path / "suite.json"
    other = {"model_dir": str(tiny_model_dir), "from_scratch": False, "batch_size": config.batch_size, "cells": {}}

    def meanwhile(key):  # the other suite finishes an RTE cell each time this one starts a WNLI cell
        other["cells"][key.replace("WNLI", "RTE")] = {"best": {"accuracy": 55.0}, "best_epoch": 1, "seconds": 1.0,
                                                      "train_examples": 2490, "eval_examples": 277}
        save_entry(results_path, config.row, other)

    monkeypatch.setattr("bertkit.tasks.suite.ProcessPoolExecutor", _recording_pool([], meanwhile))
    result = suite(config)
    cells = json.loads(results_path.read_text())[config.row]["cells"]
    assert sorted(cells) == ["RTE/lr=0.0001/seed=1", "RTE/lr=0.0001/seed=2", "WNLI/lr=0.0001/seed=1",
                             "WNLI/lr=0.0001/seed=2"]
    assert result["results"][config.row]["cells"] == cells


def _recording_pool(ran, on_submit=None):
    """A stand-in pool that records which cells it was given and answers them with a fixed score."""
    from concurrent.futures import Future

    class Pool:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, fn, finetune_config, log, keep):
            ran.append(f"{finetune_config.task}/lr={finetune_config.lr:g}/seed={finetune_config.seed}")
            if on_submit:
                on_submit(ran[-1])
            future = Future()
            future.set_result({"best": {"accuracy": 50.0}, "best_epoch": 1, "seconds": 1.0, "train_examples": 635,
                               "eval_examples": 71})
            return future

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    return Pool


def _inline_pool():
    """A stand-in pool that runs each cell in this process, so that a test's monkeypatching reaches it."""
    from concurrent.futures import Future

    class Pool:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, fn, *args):
            future = Future()
            try:
                future.set_result(fn(*args))
            except Exception as e:
                future.set_exception(e)
            return future

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    return Pool


def test_a_suite_stopped_inside_a_cell_continues_that_cell_from_its_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """A cell stopped after its first checkpoint (the end of epoch 1) is continued when the suite runs again: the
    rerun trains epoch 2 alone and records the cell. It was refused ("expected --resume auto"), and with it the
    whole suite, so an interrupted suite could never finish."""
    import bertkit.tasks.finetune as finetune_module

    monkeypatch.setattr("bertkit.tasks.suite.ProcessPoolExecutor", _inline_pool())
    config = SuiteConfig(model_dir=tiny_model_dir, data_dir=str(data_path()), out_dir=str(tmp_path), tasks=["WNLI"],
                         seeds=1, lrs=[1e-4])
    original, steps, stop = finetune_module.train_step, [], True

    def counted(*args, **kwargs):  # WNLI's 635 pairs are 20 steps an epoch: the first run stops in epoch 2
        steps.append(1)
        if len(steps) == 25 and stop:
            raise RuntimeError("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "train_step", counted)
    with pytest.raises(BertkitError, match="suite cell WNLI/lr=0.0001/seed=1 failed"):
        suite(config)
    cell_dir = tmp_path / "cells" / config.row / "WNLI" / "lr-0.0001" / "seed-1"
    assert [p.name for p in (cell_dir / "checkpoints").iterdir()] == ["step-00000020"]
    steps.clear()
    stop = False
    cells = suite(config)["results"][config.row]["cells"]
    assert list(cells) == ["WNLI/lr=0.0001/seed=1"] and cells["WNLI/lr=0.0001/seed=1"]["eval_examples"] == 71
    assert len(steps) == 20 and not (cell_dir / "checkpoints").exists()  # epoch 2 alone, then the run is whole


def test_a_failed_cell_keeps_the_cells_that_finish_while_the_pool_shuts_down(wnli_suite, tmp_path, monkeypatch):
    """One cell fails while another is running: the suite stops naming the failure, and the running cell's result,
    which arrives during the shutdown, is saved rather than lost."""
    from concurrent.futures import Future

    config, _ = wnli_suite
    submitted = []

    class Pool:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, fn, finetune_config, log, keep):
            future = Future()
            submitted.append(future)
            if finetune_config.seed == 1:
                future.set_exception(RuntimeError("the folder is in use"))
            return future

        def shutdown(self, wait=True, cancel_futures=False):
            submitted[1].set_result({"best": {"accuracy": 55.0}, "best_epoch": 1, "seconds": 1.0,
                                     "train_examples": 635, "eval_examples": 71})

    monkeypatch.setattr("bertkit.tasks.suite.ProcessPoolExecutor", Pool)
    fresh = SuiteConfig(**{**config.__dict__, "out_dir": str(tmp_path)})
    with pytest.raises(BertkitError, match="suite cell WNLI/lr=0.0001/seed=1 failed"):
        suite(fresh)
    saved = json.loads((tmp_path / "suite.json").read_text())[fresh.row]["cells"]
    assert list(saved) == ["WNLI/lr=0.0001/seed=2"] and saved["WNLI/lr=0.0001/seed=2"]["best"]["accuracy"] == 55.0


SUITE_KILLED = r"""
import os, signal, sys, time
from bertkit.tasks.suite import _cell_pool

pool = _cell_pool(2)
pool.submit(time.sleep, 600)  # a cell still training
idle = pool.submit(os.getpid).result()  # the other process, done, waits for a cell
print(*pool._processes, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the suite alone is killed (the OOM killer, kill -9)
"""


def test_the_cells_processes_end_with_a_suite_killed_alone(tmp_path):
    """A suite killed alone left its cells' processes training on, holding the cells' folders (the suite run again
    was refused: "in use by process N"), then waiting forever for another cell (and holding the suite's output open:
    `bertkit suite ... | tee log` never ended)."""
    import os
    import subprocess
    import sys
    import time

    with (tmp_path / "out").open("w") as out:  # a file, not a pipe, which the processes left behind would hold open
        killed = subprocess.run([sys.executable, "-c", SUITE_KILLED], stdout=out, stderr=subprocess.STDOUT, timeout=120)
    output = (tmp_path / "out").read_text()
    assert killed.returncode == -9, output[-2000:]
    cells = [int(pid) for pid in output.split()]
    assert len(cells) == 2

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting to be reaped has ended
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"

    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in cells) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in cells if alive(pid)]
    for pid in left:
        os.kill(pid, 9)
    assert not left


def test_from_scratch_is_its_own_row_with_other_weights(wnli_suite, tiny_model_dir):
    config, _ = wnli_suite
    scratch = SuiteConfig(**{**config.__dict__, "from_scratch": True, "seeds": 1})
    results = suite(scratch)["results"]
    assert set(results) == {config.row, config.row + " (from scratch)"}
    assert results[config.row + " (from scratch)"]["from_scratch"] is True
    table = results_table(results, config.seeds)
    assert f"\n| {config.row} | " in table and f"\n| {config.row} (from scratch) | " in table
    with pytest.raises(BertkitError, match="another --label"):
        suite(SuiteConfig(**{**config.__dict__, "from_scratch": True, "label": config.row}))


def test_a_row_is_not_extended_or_reported_at_another_batch_size(tiny_model_dir, tmp_path, monkeypatch):
    """A cell's key has no batch size: a rerun at another --batch-size reported the row's cells as its own and ran
    its new seeds at the new size, one row mixing two budgets; it is refused, naming both."""
    ran = []
    monkeypatch.setattr("bertkit.tasks.suite.ProcessPoolExecutor", _recording_pool(ran))
    config = SuiteConfig(model_dir=tiny_model_dir, data_dir=str(data_path()), out_dir=str(tmp_path), tasks=["WNLI"],
                         seeds=1, lrs=[1e-4])
    suite(config)
    with pytest.raises(BertkitError, match="fine-tuned at --batch-size 32; now 8; expected the same --batch-size"):
        suite(SuiteConfig(**{**config.__dict__, "seeds": 2, "batch_size": 8}))
    assert ran == ["WNLI/lr=0.0001/seed=1"]
    suite(SuiteConfig(**{**config.__dict__, "batch_size": 8, "label": "batch 8"}))  # its own row
    assert ran == ["WNLI/lr=0.0001/seed=1"] * 2


def test_table_reports_the_best_lr_by_mean_over_seeds():
    cells = {f"RTE/lr={lr}/seed={s}": {"best": {"accuracy": acc}, "seconds": 10.0, "train_examples": 1,
                                       "eval_examples": 1}
             for lr, accs in (("0.0001", (60.0, 50.0, 58.0)), ("0.0003", (59.0, 57.0, 58.0))) for s, acc in
             zip((1, 2, 3), accs)}
    summary = summarize(cells, "RTE")
    assert summary["lr"] == "0.0003" and summary["seeds"] == 3  # 58.0 beats 56.0 on the mean, not on the best seed
    mean, std = summary["metrics"]["accuracy"]
    assert mean == pytest.approx(58.0) and std == pytest.approx(np.std([59.0, 57.0, 58.0], ddof=1))
    table = results_table({"m": {"model_dir": "m", "from_scratch": False, "cells": cells, "wall_seconds": 60}}, 3)
    assert "| m | RTE (acc) " not in table and "58.0 ± 1.0" in table and "RTE 0.0003" in table


def test_a_tie_between_lrs_goes_to_the_lowest_whatever_order_the_cells_finished_in():
    cell = {"best": {"accuracy": 56.3}, "seconds": 1.0, "train_examples": 1, "eval_examples": 1}
    keys = [f"WNLI/lr={lr}/seed=1" for lr in ("0.0003", "5e-05", "0.0001")]
    for order in (keys, keys[::-1]):
        assert summarize({key: cell for key in order}, "WNLI")["lr"] == "5e-05"


def test_a_cell_is_marked_when_its_seeds_are_not_the_number_asked(tiny_model_dir, tmp_path, monkeypatch):
    """The note says "n=5 unless marked" for --seeds 5, so a row run with 3 seeds is marked: it was left unmarked
    (only n of 1 or 2 was), and the note said n=3 whatever --seeds was."""
    monkeypatch.setattr("bertkit.tasks.suite.ProcessPoolExecutor", _recording_pool([]))
    config = SuiteConfig(model_dir=tiny_model_dir, data_dir=str(data_path()), out_dir=str(tmp_path), tasks=["WNLI"],
                         seeds=3, lrs=[1e-4], label="three")
    assert "| three | - | 50.0 ± 0.0 | 0 min |" in suite(config)["table"]
    table = suite(SuiteConfig(**{**config.__dict__, "seeds": 5, "label": "five"}))["table"]
    assert "| three | - | 50.0 ± 0.0 (n=3) | 0 min |" in table and "| five | - | 50.0 ± 0.0 | 0 min |" in table
    assert "over seeds (n=5 unless marked)" in table


def test_subsets_are_fixed_and_shared(tmp_path):
    data = data_path()
    qnli = task_files(TASKS["QNLI"], data, tmp_path)
    train = open(qnli["train_file"]).read().splitlines()
    evals = open(qnli["eval_file"]).read().splitlines()
    dev = open(data / "glue" / "QNLI" / "dev.tsv").read().splitlines()
    assert train[0] == evals[0] == dev[0]  # the header
    assert len(train) - 1 == 2000 and len(evals) - 1 == len(dev) - 1 - 2000
    assert sorted(train[1:] + evals[1:]) == sorted(dev[1:])
    sst2 = task_files(TASKS["SST-2"], data, tmp_path)
    rows = open(sst2["train_file"]).read().splitlines()
    assert rows[0] == "sentence\tlabel" and len(rows) == 8001
    again = task_files(TASKS["SST-2"], data, tmp_path / "other")  # drawn with a fixed seed: the same sentences
    assert open(again["train_file"]).read() == "\n".join(rows) + "\n"


@pytest.mark.slow
def test_books_pretraining_then_the_suite_end_to_end(tmp_path):
    """The pretraining issue's result, shrunk: a vocabulary and a tiny BERT pretrained on 300 chapters of the books
    corpus, then the suite on it and on the same network from scratch (two tasks, two seeds)."""
    import itertools

    from bertkit.cli import main
    from bertkit.data.corpus import FileReader
    from bertkit.train.logs import read_csv

    chapters = itertools.islice(FileReader(data_path("corpus", "gutenberg-en-00.txt.gz")), 300)
    text = tmp_path / "books.txt"
    text.write_text("\n\n".join("\n".join(c) for c in chapters) + "\n", encoding="utf-8")
    assert main(["vocab", "train", str(text), "--out", str(tmp_path / "vocab"), "--vocab-size", "4000"]) == 0
    assert main(["prepare", str(text), "--tokenizer", str(tmp_path / "vocab"), "--out", str(tmp_path / "data"),
                 "--heldout-fraction", "0.05"]) == 0
    run = tmp_path / "run"
    assert main(["pretrain", "--model", "tiny", "--tokenizer", str(tmp_path / "vocab"), "--data", str(tmp_path / "data"),
                 "--out-dir", str(run), "--max-steps", "300", "--lr", "1e-3", "--eval-every", "150", "--threads", "2"]) == 0
    final = read_csv(run / "eval.csv")[-1]
    assert float(final["masked_lm_accuracy"]) > 1.5 * float(final["unigram_baseline_accuracy"])
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    common = ["suite", "--model-dir", str(checkpoint), "--out-dir", str(tmp_path / "suite"), "--tasks", "RTE", "WNLI",
              "--seeds", "2", "--lrs", "3e-4", "--label", "pretrained"]
    assert main(common) == 0
    assert main(common[:-1] + ["scratch", "--from-scratch"]) == 0
    table = (tmp_path / "suite" / "suite.md").read_text()
    assert "\n| pretrained | " in table and "\n| scratch | " in table and "RTE (acc)" in table and "WNLI (acc)" in table
    results = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert len(results["pretrained"]["cells"]) == len(results["scratch"]["cells"]) == 4


@pytest.mark.parametrize("command", [["ablate", "--grid", "table5"], ["suite", "--model-dir", "MODEL"],
                                     ["glue", "--model-dir", "MODEL", "--data-dir", "GLUE"]])
def test_an_out_dir_that_is_a_file_is_named_not_a_traceback(command, tmp_path, capsys):
    """Found by the fuzz suite (`bertkit longdoc --out afile` raised FileExistsError); suite, ablate and glue did too."""
    (tmp_path / "afile").write_text("keep me")
    model = str(data_path("checkpoints", "all-MiniLM-L6-v2"))
    names = {"MODEL": model, "GLUE": str(data_path("glue"))}
    argv = [names.get(word, word) for word in command] + ["--out-dir", str(tmp_path / "afile")]
    assert main(argv) == 2
    assert "afile: a file, not a folder; expected a folder for --out-dir" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.parametrize("command", [["suite", "--model-dir", "MODEL"], ["ablate", "--table-only"]])
def test_an_out_dir_that_cannot_be_created_is_named_with_its_flag(command, tmp_path, capsys):
    """An --out-dir that cannot be created (here under a file; /sys/x is the same error) was an OSError traceback
    (then the command line's backstop, which names no flag); it is the one-line error `pretrain` and `finetune` give."""
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "x"
    model = str(data_path("checkpoints", "all-MiniLM-L6-v2"))
    assert main([model if word == "MODEL" else word for word in command] + ["--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bertkit: error: {out}: cannot create the folder (Not a directory)")
    assert err.endswith("expected a folder this user can create and write for --out-dir\n")
