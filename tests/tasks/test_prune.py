"""Structured pruning (`bertkit prune`): the importance is the derivative of the loss by a gate on each block and
feed-forward unit, the pruned model computes what the full one computes with those units removed, the folder is a
run that evaluate, finetune and transformers read, and what cannot be pruned is refused."""

import json
import logging

import numpy as np
import pytest
import torch

from bertkit.cli import main
from bertkit.data.batching import collate
from bertkit.errors import BertkitError
from bertkit.model import BertForSequenceClassification
from bertkit.tasks.evaluation import evaluate, run_config
from bertkit.tasks.finetune import finetune, load_task
from bertkit.tasks.prune import PruneConfig, importance, prune, pruned
from bertkit.tokenizer import Tokenizer
from conftest import data_path
from tasks.test_finetune import quick
from tasks.test_soup import reviews, run  # noqa: F401 (the fixture)


@pytest.fixture(scope="module")
def toy_run(toy_model_dir, reviews, tmp_path_factory):  # noqa: F811
    return run(toy_model_dir, tmp_path_factory.mktemp("prune") / "run", reviews)


def batches_of(run_dir, rows: int = 24, size: int = 8):
    config = run_config(run_dir, {})
    tokenizer = Tokenizer.from_pretrained(run_dir)
    encoded = load_task(config).train_rows(tokenizer, config)[:rows]
    return [collate(encoded[s: s + size], tokenizer.pad_id) for s in range(0, rows, size)]


def gated(model, block_gates, unit_gates, skip=()):
    """`model`'s blocks computing x + g (block(x) - x), with each feed-forward unit's activation times its gate;
    the blocks in `skip` pass their input on."""
    for i, block in enumerate(model.bert.encoder.layer):
        def forward(x, layout, block=block, i=i):
            if i in skip:
                return x
            a = block.attention(x, layout)
            y = block.output(block.intermediate(a) * unit_gates[i], a)
            return x + block_gates[i] * (y - x)
        block.forward = forward
    return model


def test_importance_is_the_loss_derivative_by_each_gate(toy_run):
    batches = batches_of(toy_run)
    model = BertForSequenceClassification.from_pretrained(toy_run).eval()
    blocks, units = importance(model, batches, torch.device("cpu"))
    width = model.config.intermediate_size
    expected_blocks, expected_units = torch.zeros(2, dtype=torch.float64), torch.zeros(2, width, dtype=torch.float64)
    reference = BertForSequenceClassification.from_pretrained(toy_run).eval()
    block_gates = torch.ones(2, requires_grad=True)
    unit_gates = torch.ones(2, width, requires_grad=True)
    gated(reference, block_gates, unit_gates)
    for batch in batches:  # each batch's derivative, its absolute value summed over the batches
        g_blocks, g_units = torch.autograd.grad(reference(**batch)["loss"], [block_gates, unit_gates])
        expected_blocks += g_blocks.abs().double()
        expected_units += g_units.abs().double()
    torch.testing.assert_close(blocks, expected_blocks, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.stack(units), expected_units, rtol=1e-4, atol=1e-7)
    assert blocks.min() > 0 and (expected_units > 0).float().mean() > 0.5  # not a comparison of zeros


def test_the_pruned_model_is_the_full_one_without_the_removed_units(toy_run):
    model = BertForSequenceClassification.from_pretrained(toy_run).eval()
    width = model.config.intermediate_size
    units = sorted(np.random.default_rng(0).permutation(width)[: width // 2].tolist())
    small = pruned(model, [1], [units])
    assert (small.config.num_hidden_layers, small.config.intermediate_size) == (1, width // 2)
    mask = torch.zeros(2, width)
    mask[1, units] = 1
    reference = gated(BertForSequenceClassification.from_pretrained(toy_run).eval(), torch.ones(2), mask, skip={0})
    batch = batches_of(toy_run)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(**batch)["logits"], reference(**batch)["logits"], rtol=0, atol=1e-5)
        assert not torch.allclose(small(**batch)["logits"], model(**batch)["logits"], atol=1e-3)


@pytest.fixture(scope="module")
def minilm_sst2_run(tmp_path_factory):
    """all-MiniLM-L6-v2 fine-tuned on SST-2's first 600 training sentences, 2 epochs (~1 minute on one thread)."""
    out = tmp_path_factory.mktemp("minilm") / "run"
    finetune(quick(str(data_path("checkpoints", "all-MiniLM-L6-v2")), out, task="SST-2",
                   data_dir=str(data_path("glue", "SST-2")), limit_train_examples=600, lr=1e-4, max_length=64))
    return str(out)


def test_on_sst2_the_most_important_units_keep_the_accuracy_random_and_least_important_ones_lose_it(
        minilm_sst2_run):
    """MiniLM's 1,536 feed-forward units per block cut to 192: the most important by the gate derivative, a random
    192, the least important; SST-2 dev accuracy without fine-tuning again."""
    config = run_config(minilm_sst2_run, {"threads": 1})
    task, tokenizer = load_task(config), Tokenizer.from_pretrained(minilm_sst2_run)
    rows = task.train_rows(tokenizer, config)
    batches = [collate(rows[s: s + 16], tokenizer.pad_id) for s in range(0, 320, 16)]
    model = BertForSequenceClassification.from_pretrained(minilm_sst2_run).eval()
    _, units = importance(model, batches, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    choices = {"most": lambda u: torch.topk(u, 192).indices, "least": lambda u: torch.topk(-u, 192).indices,
               "random": lambda u: torch.randperm(len(u), generator=generator)[:192]}
    accuracy = {}
    with torch.no_grad():
        full = task.evaluate(model, tokenizer, config, torch.device("cpu"))[0]["accuracy"]
        for name, choose in choices.items():
            small = pruned(model, list(range(6)), [sorted(choose(u).tolist()) for u in units])
            accuracy[name] = task.evaluate(small, tokenizer, config, torch.device("cpu"))[0]["accuracy"]
    assert full > 72, full  # a model that learnt the task
    # measured: full 77.2, most 74.8, random 71.6, least 68.5 (a 600-row, 2-epoch run; 872 dev sentences)
    assert accuracy["most"] > accuracy["random"] + 1 > accuracy["least"] + 2, accuracy
    assert full - accuracy["most"] < 5, (full, accuracy)


def test_prune_writes_a_run_folder_that_evaluate_finetune_and_transformers_read(
        toy_run, reviews, tmp_path, capsys, caplog):  # noqa: F811
    out = tmp_path / "pruned"
    assert main(["prune", toy_run, "--out", str(out), "--layers", "1", "--intermediate-size", "16",
                 "--batches", "2", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert "1 block of 2 kept" in table and "| parameters |" in table
    summary = json.loads((out / "prune.json").read_text())
    assert summary["parameters"]["after"] < summary["parameters"]["before"]
    assert summary["rows"] == 2 * 16 and len(summary["kept_layers"]) == 1
    # evaluate scores the folder as prune scored it
    again = evaluate(out, threads=1)
    assert again["accuracy"] == pytest.approx(summary["after"]["accuracy"])
    # transformers builds the same model from it
    transformers = pytest.importorskip("transformers")
    theirs = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    ours = BertForSequenceClassification.from_pretrained(out).eval()
    batch = Tokenizer.from_pretrained(out).encode_batch(["a good movie", "very boring"], max_length=16)
    inputs = {k: torch.tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs)["logits"], theirs(**inputs).logits, rtol=0, atol=1e-5)
    # fine-tuned again from the folder, its classifier is kept (nothing newly initialised)
    train, dev = reviews
    caplog.set_level(logging.WARNING, logger="bertkit")
    finetune(quick(str(out), tmp_path / "again", task="custom", train_file=str(train), eval_file=str(dev), epochs=1))
    assert "newly initialised" not in caplog.text
    # the top blocks instead of the least important
    top = prune(PruneConfig(run=toy_run, out=str(tmp_path / "top"), layers=1, drop_layers="top", batches=1,
                            threads=1))
    assert top["kept_layers"] == [0]


def test_what_cannot_be_pruned_is_refused(toy_run, toy_model_dir, tmp_path):
    def refused(match, **kw):
        with pytest.raises(BertkitError, match=match):
            prune(PruneConfig(**{"run": toy_run, "out": str(tmp_path / "out"), "threads": 1} | kw))
        assert not (tmp_path / "out").exists()

    refused("nothing to prune")
    refused("nothing to prune", layers=2, intermediate_size=64)
    refused("expected at most", layers=3)
    refused("expected at most", intermediate_size=65)
    refused("expected a positive number", layers=0)
    refused("expected a positive number", batches=0)
    refused("no finetune_config.json", run=toy_model_dir, layers=1)
    refused("no such folder", run=str(tmp_path / "missing"), layers=1)
    refused("expected an empty or new folder", layers=1, out=str(_filled(tmp_path / "full")))
    refused("inside", layers=1, out=f"{toy_run}/pruned")


def _filled(path):
    path.mkdir()
    (path / "file").write_text("x")
    return path


def check_pruned_run(run_dir, tmp_path) -> dict:
    """Prune a tagging, SQuAD or SWAG run to one block of 32 units; the folder is scored by `evaluate` as prune
    scored it, and transformers loads it to the same outputs (its class for the head from config.json)."""
    out = tmp_path / "pruned"
    summary = prune(PruneConfig(run=str(run_dir), out=str(out), layers=1, intermediate_size=32, batches=2,
                                threads=1))
    assert summary["parameters"]["after"] < summary["parameters"]["before"]
    again = evaluate(out, threads=1)
    for name, value in summary["after"].items():
        assert again[name] == pytest.approx(value), name
    transformers = pytest.importorskip("transformers")
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (1, 32)
    from bertkit import model as bertkit_model

    name = config["architectures"][0]
    ours = getattr(bertkit_model, name).from_pretrained(out).eval()
    theirs = getattr(transformers, name).from_pretrained(out).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    if name == "BertForMultipleChoice":
        ids = ids[None].expand(1, 2, 5)
    with torch.no_grad():
        a, b = ours(input_ids=ids), theirs(input_ids=ids)
    first = "start_logits" if name == "BertForQuestionAnswering" else "logits"
    torch.testing.assert_close(a[first], getattr(b, first), rtol=0, atol=1e-5)
    return summary
