"""Fine-tuning on small training sets: the top blocks re-initialised (`finetune --reinit-layers`) against transformers'
own initialiser, layer-wise lr decay (`--layer-lr-decay`) through the schedule and an AdamW step, the runs, and the
settings refused."""

import json
from pathlib import Path

import pytest
import torch

from bertkit.cli import main
from bertkit.config import BertConfig
from bertkit.errors import BertkitError
from bertkit.model import BertForQuestionAnswering, BertForSentenceEmbedding, BertForSequenceClassification, \
    reinit_top_layers
from bertkit.tasks.finetune import finetune
from bertkit.train.optim import build_optimizer, param_groups, parameter_depth, warmup_linear
from bertkit.tasks.glue import GlueConfig, glue
from conftest import data_path
from tasks.test_finetune import toy_run

transformers = pytest.importorskip("transformers")


def small_config(**overrides) -> BertConfig:
    return BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=32, num_labels=2, **overrides)


def trained_weights(model) -> None:
    """Weights unlike a fresh initialisation's: every tensor moved, as pretraining leaves them."""
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def test_parameter_depth_counts_blocks_from_the_embeddings():
    assert parameter_depth("bert.embeddings.word_embeddings.weight") == 0
    assert parameter_depth("embeddings.LayerNorm.bias") == 0  # an encoder without the bert. prefix
    assert parameter_depth("bert.encoder.layer.0.attention.self.query.weight") == 1
    assert parameter_depth("encoder.layer.11.output.dense.bias") == 12
    assert parameter_depth("bert.pooler.dense.weight") is None
    assert parameter_depth("classifier.weight") is None and parameter_depth("qa_outputs.bias") is None


def test_layer_lr_decay_gives_each_parameter_its_layers_rate(tmp_path):
    model = BertForSequenceClassification(small_config())
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.01, layer_lr_decay=0.5)
    lr = {name: g["lr"] for g in optimizer.param_groups for name, p in model.named_parameters()
          if any(p is q for q in g["params"])}
    assert len(lr) == len(list(model.parameters()))  # every parameter in exactly one group
    expected = {"classifier.weight": 1e-3, "bert.pooler.dense.bias": 1e-3,
                "bert.encoder.layer.2.output.dense.weight": 5e-4,
                "bert.encoder.layer.1.attention.self.key.bias": 2.5e-4,
                "bert.encoder.layer.0.intermediate.dense.weight": 1.25e-4,
                "bert.embeddings.word_embeddings.weight": 6.25e-5, "bert.embeddings.LayerNorm.weight": 6.25e-5}
    assert {name: lr[name] for name in expected} == pytest.approx(expected)
    decay = {name: g["weight_decay"] for g in optimizer.param_groups for name, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert decay["bert.encoder.layer.1.attention.self.key.weight"] == 0.01
    assert decay["bert.encoder.layer.1.attention.self.key.bias"] == 0.0 == decay["bert.embeddings.LayerNorm.weight"]
    # without decay: the two groups as ever (a run's optimizer state from before the option still loads)
    assert [len(g["params"]) for g in param_groups(model, 0.01)] == [len(g["params"]) for g in
                                                                      param_groups(model, 0.01, layer_lr_decay=1.0)]
    assert len(param_groups(model, 0.01)) == 2


def test_the_schedule_scales_every_layers_rate_alike():
    model = BertForSequenceClassification(small_config())
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.0, layer_lr_decay=0.8)
    peaks = [g["lr"] for g in optimizer.param_groups]
    scheduler = warmup_linear(optimizer, 4, 10)
    for step in range(10):
        factor = (step + 1) / 4 if step < 4 else (10 - step) / 6
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([p * factor for p in peaks])
        optimizer.step()
        scheduler.step()


def test_an_adamw_step_with_layer_decay_is_adam_at_each_layers_rate():
    """The reference: torch's AdamW over one group per parameter, its rate written out by hand."""
    torch.manual_seed(0)
    ours = BertForSequenceClassification(small_config()).eval()  # no dropout: the same gradients in both
    reference = BertForSequenceClassification(small_config()).eval()
    reference.load_state_dict(ours.state_dict())
    rates = {}
    for name, p in reference.named_parameters():
        depth = parameter_depth(name)
        rates[name] = 1e-2 * 0.7 ** (0 if depth is None else 4 - depth)
    groups = [{"params": [p], "lr": rates[n], "weight_decay": 0.0 if p.ndim < 2 else 0.01}
              for n, p in reference.named_parameters()]
    optimizers = [build_optimizer(ours, "adamw", 1e-2, 0.01, layer_lr_decay=0.7),
                  torch.optim.AdamW(groups, eps=1e-6)]
    ids = torch.randint(5, 60, (4, 9))
    for _ in range(3):
        for model, optimizer in zip((ours, reference), optimizers):
            model(ids, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_reinit_redraws_the_top_blocks_and_pooler_as_transformers_initialiser_does(tmp_path):
    torch.manual_seed(0)
    ours = BertForSequenceClassification(small_config())
    trained_weights(ours)
    ours.save_pretrained(tmp_path)
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    before = {n: p.clone() for n, p in ours.named_parameters()}

    torch.manual_seed(123)
    drawn = reinit_top_layers(ours, 2)
    assert drawn == ["bert.encoder.layer.1", "bert.encoder.layer.2", "bert.pooler"]
    torch.manual_seed(123)
    for module in (theirs.bert.encoder.layer[1], theirs.bert.encoder.layer[2], theirs.bert.pooler):
        for p in module.parameters():
            p._is_hf_initialized = False  # loaded weights are marked as initialised: transformers would skip them
        module.apply(theirs._init_weights)

    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(mine[name], p, rtol=0, atol=0, msg=name)
    for name, p in mine.items():
        redrawn = name.startswith(tuple(drawn))
        assert torch.equal(p, before[name]) != redrawn, name  # the rest exactly as trained
    assert mine["bert.encoder.layer.2.output.LayerNorm.weight"].eq(1).all()
    assert mine["bert.encoder.layer.1.attention.self.query.bias"].eq(0).all()
    assert mine["bert.encoder.layer.1.intermediate.dense.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    ids = torch.randint(5, 60, (3, 7))
    ours.eval()
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_reinit_leaves_a_frozen_unused_pooler_and_heads_without_one():
    embedder = BertForSentenceEmbedding(small_config())
    pooler = embedder.pooler.dense.weight.clone()
    assert reinit_top_layers(embedder, 1) == ["encoder.layer.2"]
    assert torch.equal(embedder.pooler.dense.weight, pooler)
    qa = BertForQuestionAnswering(small_config())
    assert reinit_top_layers(qa, 3) == ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]
    assert reinit_top_layers(qa, 0) == []
    with pytest.raises(BertkitError, match="top 4 layers of a 3-layer model; expected 0 to 3"):
        reinit_top_layers(qa, 4)


def test_a_run_with_both_trains_records_them_and_resumes(toy_model_dir, tmp_path):
    config = toy_run(toy_model_dir, tmp_path, tmp_path / "run", reinit_layers=1, layer_lr_decay=0.8, epochs=2,
                     save_every=2)
    record = finetune(config)
    assert len(record["epochs"]) == 2
    saved = json.loads((tmp_path / "run" / "finetune_config.json").read_text())
    assert saved["reinit_layers"] == 1 and saved["layer_lr_decay"] == 0.8
    results = (tmp_path / "run" / "results.md").read_text()
    assert "Top 1 block re-initialised. Layer-wise lr decay 0.8." in results
    config.resume = "auto"
    assert finetune(config)["epochs"] == record["epochs"]  # a finished run is returned as it was

    # the options change what the run computes: the same folder with another decay is another run
    other = toy_run(toy_model_dir, tmp_path, tmp_path / "run", reinit_layers=1, layer_lr_decay=0.9, resume="auto")
    with pytest.raises(BertkitError, match="layer_lr_decay 0.8 -> 0.9"):
        finetune(other)


def test_the_reinit_draws_differ_from_the_pretrained_start(toy_model_dir, tmp_path):
    """The top block of the kept model is not the pretrained one moved by a few steps: it started afresh."""
    from safetensors.torch import load_file

    pretrained = load_file(f"{toy_model_dir}/model.safetensors")
    key = next(k for k in pretrained if k.endswith("layer.1.intermediate.dense.weight"))
    runs = {}
    for reinit in (0, 1):
        finetune(toy_run(toy_model_dir, tmp_path, tmp_path / f"r{reinit}", reinit_layers=reinit, lr=1e-5, epochs=1))
        runs[reinit] = load_file(tmp_path / f"r{reinit}" / "model.safetensors")
    mine = next(k for k in runs[0] if k.endswith("layer.1.intermediate.dense.weight"))
    low = next(k for k in runs[0] if k.endswith("layer.0.intermediate.dense.weight"))
    assert (runs[0][mine] - pretrained[key]).abs().max() < 1e-3  # lr 1e-5 for four steps
    assert (runs[1][mine] - pretrained[key]).abs().max() > 0.05
    assert torch.allclose(runs[1][low], runs[0][low], atol=1e-3)  # the block below: pretrained in both


@pytest.mark.parametrize("argv, expected", [
    (["--layer-lr-decay", "0"], "--layer-lr-decay is 0.0; expected a factor above 0 and at most 1"),
    (["--layer-lr-decay", "1.5"], "--layer-lr-decay is 1.5; expected a factor above 0 and at most 1"),
    (["--layer-lr-decay", "nan"], "--layer-lr-decay is nan; expected a factor above 0 and at most 1"),
    (["--reinit-layers", "-1"], "--reinit-layers is -1; expected zero (none) or more blocks"),
    (["--reinit-layers", "3"], "--reinit-layers 3: {model} has 2 encoder blocks; expected at most that many"),
    (["--reinit-layers", "1", "--from-scratch"], "--reinit-layers 1 with --from-scratch; expected pretrained weights"),
    (["--reinit-layers", "1", "--lora-rank", "4"], "--reinit-layers 1 with --lora-rank; expected pretrained weights"),
])
def test_settings_no_run_can_use_are_refused_before_the_folder_is_made(toy_model_dir, tmp_path, capsys, argv,
                                                                       expected):
    config = toy_run(toy_model_dir, tmp_path, tmp_path / "run")
    assert main(["finetune", "--model-dir", toy_model_dir, "--task", "custom", "--train-file", config.train_file,
                 "--eval-file", config.eval_file, "--out-dir", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected.format(model=toy_model_dir) in err, err
    assert not (tmp_path / "run").exists()


def test_glue_passes_both_to_every_run_and_checks_them_first(tiny_model_dir, tmp_path, capsys):
    result = glue(GlueConfig(model_dir=str(tiny_model_dir), tasks=["RTE"], data_dir=str(data_path("glue")),
                             out_dir=str(tmp_path), lrs=[1e-3], batch_size=16, epochs=1, limit_train_examples=16,
                             threads=1, device="cpu", reinit_layers=1, layer_lr_decay=0.9))
    saved = json.loads((Path(result["tasks"]["RTE"]["run_dir"]) / "finetune_config.json").read_text())
    assert (saved["reinit_layers"], saved["layer_lr_decay"]) == (1, 0.9)
    assert "seed 42, top 1 re-initialised, layer-wise lr decay 0.9;" in result["table"]
    argv = ["glue", "--model-dir", str(tiny_model_dir), "--data-dir", str(data_path("glue")), "--out-dir",
            str(tmp_path / "bad"), "--layer-lr-decay", "2"]
    assert main(argv) == 2 and "--layer-lr-decay is 2.0; expected a factor above 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
