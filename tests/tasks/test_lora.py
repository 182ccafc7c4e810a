"""LoRA (`finetune --lora-rank`): the layer against its merged form, forward, loss and gradients against peft on
transformers' model with the same weights, the adapter folder peft loads, a peft adapter merged by `convert`, a
run that learns with its encoder frozen, and the settings refused."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from bertkit.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, merged
from bertkit.cli import main
from bertkit.config import BertConfig
from bertkit.errors import BertkitError
from bertkit.model import (LORA_TARGETS, BertForSequenceClassification, LoraLinear, add_lora, merge_lora,
                           set_kernels)
from bertkit.tasks.finetune import FinetuneConfig, finetune
from tasks.test_distill import reviews

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def small_config(**overrides) -> BertConfig:
    return BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=32, num_labels=3, **overrides)


def random_updates(model, std: float = 0.3) -> None:
    """B starts at zero (the update is nothing): give every LoRA matrix values, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(std=std)


def batch():
    torch.manual_seed(2)
    ids = torch.randint(5, 60, (4, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("packing", ["never", "always"])
def test_the_update_equals_its_merged_weights_on_every_path(packing):
    torch.manual_seed(0)
    model = BertForSequenceClassification(small_config()).eval()
    set_kernels(model, packing=packing)
    ids, mask = batch()
    before = model(ids, attention_mask=mask).logits
    adapted = add_lora(model, 4, 8.0, LORA_TARGETS)
    assert len(adapted) == 12 and all(isinstance(model.get_submodule(n), LoraLinear) for n in adapted)
    assert torch.equal(model(ids, attention_mask=mask).logits, before)  # B = 0: the pretrained model
    random_updates(model)
    after = model(ids, attention_mask=mask).logits
    assert (after - before).abs().max() > 1e-2  # the update changes the outputs (q, k, v through the fused GEMM too)
    plain = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    torch.testing.assert_close(plain(ids, attention_mask=mask).logits, after, atol=1e-5, rtol=1e-4)
    # what trains: the LoRA matrices and the head (classifier, and the pooler the classifier reads)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if ".lora_" in n or n.startswith(("classifier.",
                                                                                                  "bert.pooler."))}


def test_query_and_value_alone_leave_the_other_layers_plain():
    model = BertForSequenceClassification(small_config())
    adapted = add_lora(model, 2, 4.0, ("query", "value"))
    assert adapted == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    assert not isinstance(model.bert.encoder.layer[0].attention.self.key, LoraLinear)
    assert not isinstance(model.bert.pooler.dense, LoraLinear)  # "dense" of the pooler is not a block's
    with pytest.raises(BertkitError, match="LoRA targets dense; expected some of query"):
        add_lora(BertForSequenceClassification(small_config()), 2, 4.0, ("dense",))


def bertkit_name(peft_name: str) -> str:
    """A parameter's name in a peft model as bertkit (and transformers) name it."""
    for part in (".default", "modules_to_save.", ".base_layer"):
        peft_name = peft_name.replace(part, "")
    return peft_name.removeprefix("base_model.model.")


def peft_twin(tmp_path, targets):
    """bertkit's and transformers' + peft's classifiers with the same weights and the same LoRA matrices."""
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    hf.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                     target_modules=list(targets), modules_to_save=["classifier",
                                                                                                    "pooler"]))
    random_updates(theirs)
    ours = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    add_lora(ours, 4, 8.0, targets)
    state = {bertkit_name(k): v for k, v in theirs.state_dict().items() if "original_module" not in k}
    ours.load_state_dict(state)
    return ours, theirs


@pytest.mark.parametrize("targets", [("query", "value"), LORA_TARGETS])
def test_forward_loss_and_gradients_equal_peft_on_transformers(tmp_path, targets):
    ours, theirs = peft_twin(tmp_path, targets)
    ids, mask = batch()
    labels = torch.tensor([0, 2, 1, 2])
    ours.train(), theirs.train()  # dropout is 0: training mode, for the path training takes
    a = ours(ids, attention_mask=mask, labels=labels)
    b = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-5)
    a.loss.backward(), b.loss.backward()
    theirs_grads = {bertkit_name(k): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == theirs_grads.keys()  # the same parameters train
    for key in ours_grads:
        torch.testing.assert_close(ours_grads[key], theirs_grads[key], atol=1e-6, rtol=1e-4, msg=key)


def test_a_peft_adapter_is_merged_by_convert(tmp_path):
    _, theirs = peft_twin(tmp_path, ("query", "key", "intermediate.dense"))
    theirs.save_pretrained(tmp_path / "adapter")
    (tmp_path / "base" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                           + [f"w{i}" for i in range(55)]) + "\n")
    assert main(["convert", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--out",
                 str(tmp_path / "merged"), "--to", "hf"]) == 0
    ids, mask = batch()
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
    ours = BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(ours(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-4)
    # transformers reads the folder as a plain model, and agrees
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-4)
    # peft's own config has no base here: without --base, the error says so
    with pytest.raises(BertkitError, match="no base_model_name_or_path; expected --base"):
        merged(tmp_path / "adapter")


@pytest.fixture(scope="module")
def lora_run(toy_model_dir, tmp_path_factory):
    """LoRA needs an encoder that has learnt something (it cannot move the random toy embeddings): the toy model
    fully fine-tuned on the reviews with their labels swapped is the base, and the LoRA run learns the true ones."""
    root = tmp_path_factory.mktemp("lora")
    common = dict(task="custom", text_a="text", batch_size=16, epochs=4, seed=0, threads=1, device="cpu")
    finetune(FinetuneConfig(model_dir=toy_model_dir, out_dir=str(root / "base"), lr=1e-2, **common,
                            train_file=reviews(root / "flipped.csv", 200, seed=0, flip=True),
                            eval_file=reviews(root / "flipped-dev.csv", 100, seed=1, flip=True)))
    config = FinetuneConfig(model_dir=str(root / "base"), out_dir=str(root / "run"), lr=1e-2, **common,
                            train_file=reviews(root / "train.csv", 200, seed=2),
                            eval_file=reviews(root / "dev.csv", 100, seed=1), lora_rank=4, lora_targets="all")
    return root, config, finetune(config)


def test_a_lora_run_learns_with_its_encoder_frozen_and_saves_both_forms(lora_run):
    root, config, record = lora_run
    run = root / "run"
    # it starts wrong on every example (the first epoch's mean loss is past chance's 0.69) and ends right
    assert record["epochs"][0]["train_loss"] > 1 and record["best"]["accuracy"] > 90, record["epochs"]
    base, tuned = load_file(root / "base" / "model.safetensors"), load_file(run / "model.safetensors")
    # the merged folder: plain names, the frozen weights as they were, the adapted ones moved
    assert not any("lora" in k for k in tuned)
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.output.LayerNorm.weight"):
        assert torch.equal(tuned[f"bert.{key}"], base[f"bert.{key}"])
    assert not torch.equal(tuned["bert.encoder.layer.1.attention.self.query.weight"],
                           base["bert.encoder.layer.1.attention.self.query.weight"])
    # trained: 12 Linear layers' A (4 x in) and B (out x 4), the classifier and the pooler
    H, I = 32, 64  # the tiny config's hidden and feed-forward sizes; 2 layers of q, k, v, attention output (H -> H),
    lora = 2 * (4 * 4 * (H + H) + 4 * (H + I) + 4 * (I + H))  # intermediate (H -> I), output (I -> H)
    assert record["trained_parameters"] == lora + (H * 2 + 2) + (H * H + H)
    assert f"LoRA rank 4, alpha 8 on {', '.join(LORA_TARGETS)}: {record['trained_parameters']:,} trained" in (
        run / "results.md").read_text()
    adapter = json.loads((run / "adapter" / ADAPTER_CONFIG).read_text())
    assert adapter["r"] == 4 and adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["classifier",
                                                                                                      "pooler"]
    assert adapter["base_model_name_or_path"] == str(root / "base")
    weights = load_file(run / "adapter" / ADAPTER_WEIGHTS)
    assert sum(v.numel() for v in weights.values()) == record["trained_parameters"]


def test_peft_loads_the_runs_adapter_onto_transformers_model_and_agrees_with_the_merged_folder(lora_run):
    root, _, _ = lora_run
    base = transformers.BertForSequenceClassification.from_pretrained(root / "base")
    theirs = peft.PeftModel.from_pretrained(base, root / "run" / "adapter").eval()
    ours = BertForSequenceClassification.from_pretrained(root / "run").eval()
    ids = torch.tensor([[2, 5, 80, 81, 3, 0], [2, 82, 83, 84, 85, 3]])
    ids = ids.clamp(max=ours.config.vocab_size - 1)
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits,
                                   theirs(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("args, error", [
    (["--lora-alpha", "16"], "--lora-alpha 16.0 without --lora-rank"),
    (["--lora-targets", "all"], "--lora-targets all without --lora-rank"),
    (["--lora-rank", "-1"], "--lora-rank is -1; expected a positive rank"),
    (["--lora-rank", "8", "--lora-alpha", "0"], "--lora-alpha is 0.0; expected a number above 0"),
    (["--lora-rank", "8", "--lora-targets", "query,dense"], "--lora-targets 'query,dense': dense; expected some"),
    (["--lora-rank", "8", "--from-scratch"], "--lora-rank with --from-scratch; expected pretrained weights"),
])
def test_bad_lora_settings_are_refused_before_anything_is_read(args, error, tmp_path, capsys):
    code = main(["finetune", "--model-dir", str(tmp_path / "none"), "--train-file", "x.csv", "--eval-file", "y.csv",
                 *args])
    assert code == 2 and error in capsys.readouterr().err


@pytest.mark.parametrize("head", ["BertForSequenceClassification", "BertForQuestionAnswering",
                                  "BertForTokenClassification", "BertForMultipleChoice"])
def test_every_heads_adapter_loads_in_peft_with_the_same_outputs(head, tmp_path):
    import bertkit
    from bertkit.adapter import save_adapter

    torch.manual_seed(0)
    ours = getattr(bertkit, head)(small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ours.save_pretrained(tmp_path / "base")
    add_lora(ours, 4, 16.0, LORA_TARGETS)
    random_updates(ours)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.startswith(ours.head_prefixes):  # the head trained too: not the base folder's any more
                p.add_(0.1)
    save_adapter(ours, tmp_path / "adapter", str(tmp_path / "base"), 4, 16.0, LORA_TARGETS)
    theirs = peft.PeftModel.from_pretrained(getattr(transformers, head).from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    ids, mask = batch()
    if head == "BertForMultipleChoice":  # 2 examples of 2 choices
        ids, mask = ids.view(2, 2, -1), mask.view(2, 2, -1)
    ours.eval()
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask), theirs(input_ids=ids, attention_mask=mask)
    for key in ("start_logits", "end_logits") if head == "BertForQuestionAnswering" else ("logits",):
        x, y = getattr(a, key), getattr(b, key)
        if head in ("BertForQuestionAnswering", "BertForTokenClassification"):  # the real tokens' (padding's differ)
            x, y = x[mask.bool()], y[mask.bool()]
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=key)


def test_info_describes_an_adapter_folder(lora_run, capsys):
    root, _, record = lora_run
    assert main(["info", str(root / "run" / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "peft LoRA adapter (SEQ_CLS)" in out and f"base model       {root / 'base'}" in out
    assert ("12 Linear layers (attention.output.dense, attention.self.key, attention.self.query, attention.self.value, "
            "intermediate.dense, output.dense)") in out
    assert f"{record['trained_parameters']:,}: 3,584 LoRA, 1,122 in the head (classifier, pooler)" in out


def test_adapters_bertkit_cannot_merge_are_refused_by_name(lora_run, tmp_path, capsys):
    import shutil

    root, _, _ = lora_run
    for change, error in (({"use_dora": True}, "use_dora True"), ({"peft_type": "IA3"}, "peft_type 'IA3'"),
                          ({"alpha_pattern": {"query": 4}}, "alpha_pattern {'query': 4}")):
        shutil.copytree(root / "run" / "adapter", tmp_path / "a", dirs_exist_ok=True)
        config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
        (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps(config | change))
        assert main(["convert", str(tmp_path / "a"), "--out", str(tmp_path / "out"), "--to", "hf"]) == 2
        assert f"{error}; expected a plain LoRA adapter" in capsys.readouterr().err
    assert main(["convert", str(root / "base"), "--base", str(root / "base"), "--out", str(tmp_path / "out"),
                 "--to", "hf"]) == 2
    assert "has no adapter_config.json; expected --base only for a peft adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
