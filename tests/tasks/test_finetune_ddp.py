"""Fine-tuning under torchrun: two processes (gloo) step exactly as one process accumulating two micro-batches.

Dropout is off: each process draws its own dropout masks, which one accumulating process cannot reproduce. The
training file holds 18 rows, 5 batches of 4 an epoch, so that every epoch ends on a group of one batch: the second
process has none of its own there and must still join the all-reduce with a share weighted 0.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bertkit import BertModel
from tiny_folders import tiny_config, tokenizer_in

REPO = Path(__file__).resolve().parents[2]
RUN = "import sys, torch; torch.set_num_threads(1); from bertkit.cli import main; sys.exit(main(sys.argv[1:]))"
ROWS = [("a good movie", "good"), ("a bad film", "bad"), ("great fun", "good"), ("very boring", "bad"),
        ("not very good", "bad"), ("what a great film", "good")] * 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model_dir = root / "model"
    model_dir.mkdir()
    tokenizer = tokenizer_in(model_dir)
    torch.manual_seed(0)
    config = tiny_config(tokenizer.vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         classifier_dropout=0.0)
    BertModel(config).save_pretrained(model_dir, tokenizer=tokenizer)
    data = root / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in ROWS), encoding="utf-8")
    return model_dir, data


def run(args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


@pytest.mark.parametrize("kind", ["full", "lora", "embedding"])
def test_two_processes_equal_one_process_accumulating_two(inputs, tmp_path, kind):
    """Also under LoRA, where DDP holds frozen parameters that take no gradient, and for sentence embeddings (SimCSE
    on the file's sentences, scored by retrieval), whose in-batch negatives are each micro-batch's own both ways."""
    model_dir, data = inputs
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a good movie\tgreat fun\na bad film\tvery boring\nnot very good\tbad\n")
    extra = {"full": [], "lora": ["--lora-rank", "2", "--lora-targets", "all"],
             "embedding": ["--task", "embedding", "--eval-file", str(pairs)]}[kind]
    flags = ["finetune", "--model-dir", str(model_dir), "--task", "custom", "--train-file", str(data),
             "--eval-file", str(data), "--batch-size", "4", "--epochs", "2", "--lr", "2e-3", "--seed", "0",
             "--threads", "1", "--save-every", "2", *extra]
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bertkit.cli",
         *flags, "--out-dir", str(tmp_path / "torchrun")])
    run([sys.executable, "-c", RUN, *flags, "--out-dir", str(tmp_path / "single"), "--grad-accum", "2",
         "--device", "cpu"])
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("torchrun", "single"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    m2, m1 = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("torchrun", "single"))
    assert len(m2["epochs"]) == len(m1["epochs"]) == 2
    for e2, e1 in zip(m2["epochs"], m1["epochs"]):  # the mean loss of the epoch's 3 steps: batches (2, 2, 1)
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-5), e2["epoch"]
        assert [e2[k] for k in m1["best"]] == pytest.approx([e1[k] for k in m1["best"]], abs=1e-6), e2["epoch"]
    assert m2["best_epoch"] == m1["best_epoch"]
    assert m1["epochs"][0]["train_loss"] != pytest.approx(m1["epochs"][1]["train_loss"], rel=1e-3)  # it learns
    # the same step, so results.md says so: 4 rows x 2 processes, not "batch 4" as if one process took 4 a step
    assert "batch 4 x 2 processes, 2 epochs" in (tmp_path / "torchrun" / "results.md").read_text()
    assert "batch 4 x 2 accumulated, 2 epochs" in (tmp_path / "single" / "results.md").read_text()
    assert (m2["processes"], m1["processes"]) == (2, 1)


def test_early_stopping_stops_every_process(inputs, tmp_path):
    """Rank 0 alone scores, so it alone can tell that --early-stopping-patience is spent: the other process must stop
    with it (else it would wait in the next epoch's all-reduce until the timeout). At lr 0 no epoch beats the first."""
    model_dir, data = inputs
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bertkit.cli",
         "finetune", "--model-dir", str(model_dir), "--task", "custom", "--train-file", str(data), "--eval-file",
         str(data), "--batch-size", "4", "--epochs", "5", "--lr", "0", "--seed", "0", "--threads", "1",
         "--early-stopping-patience", "1", "--out-dir", str(tmp_path / "run")])
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [row["epoch"] for row in record["epochs"]] == [1, 2] and record["stopped_early"] == 2
