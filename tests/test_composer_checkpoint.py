"""Composer checkpoints (MosaicML): `bertkit convert` reads one and writes one.

Composer itself pins an older torch and is checked by hand (benchmarks/composer_check.py, its result in
benchmarks/composer_check.json). Here a checkpoint is built as Composer 0.32.1's Trainer saved the one that
script read: transformers' own BertForMaskedLM state dict under `model.`, the config and tokenizer files kept as
its HuggingFaceModel keeps them, and the plain values besides tensors it pickles (timedeltas, the torch version,
numpy's random state).
"""

import datetime
import json
import random

import numpy as np
import pytest
import torch
from torch.torch_version import TorchVersion

from bertkit.cli import main

transformers = pytest.importorskip("transformers")

SENTENCES = ["The cat sat on the mat.", "A much longer sentence, with commas, numbers like 42 and more words."]


def _tokenizer_entries(folder):
    """The tokenizer files of a transformers folder as Composer's HuggingFaceModel.get_metadata keeps them."""
    out = {}
    for file in sorted(folder.iterdir()):
        if file.name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            text = file.read_text(encoding="utf-8")
            content = text.split("\n") if file.suffix == ".txt" else json.loads(text)
            out[file.name] = {"file_extension": file.suffix, "content": content}
    return out


def _composer_checkpoint(path, model, tokenizer_folder=None, **state_extra):
    """torch.save of what Composer's Trainer saves for a transformers `model` wrapped in its HuggingFaceModel."""
    hf = {"model": {"config": {"file_extension": ".json", "content": model.config.to_dict(),
                               "class": f"{type(model).__module__}.{type(model).__name__}"}},
          "tokenizer": _tokenizer_entries(tokenizer_folder) if tokenizer_folder else {}}
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    moments = {name: {"exp_avg": torch.zeros_like(v)} for name, v in weights.items()}
    state = {"model": weights, "optimizers": {"DecoupledAdamW": {"state": moments, "param_groups": []}},
             "schedulers": {}, "algorithms": [], "callbacks": {},
             "timestamp": {"Timestamp": {"batch": 2, "total_wct": datetime.timedelta(seconds=0.1)}},
             "run_name": "1796590924-astonishing-jackalope", "integrations": {"huggingface": hf},
             "metadata": {"torch_version": TorchVersion(torch.__version__), "device": "cpu"}, **state_extra}
    rng = [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}]
    torch.save({"state": state, "rng": rng}, path)
    return path


def _hf_masked_lm(minilm_dir):
    config = transformers.BertConfig.from_pretrained(minilm_dir)
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config).eval()


def test_a_composer_checkpoint_converts_to_a_folder_with_its_weights_config_and_tokenizer(minilm_dir, tmp_path):
    from bertkit import BertForMaskedLM, Tokenizer

    hf = _hf_masked_lm(minilm_dir)
    checkpoint = _composer_checkpoint(tmp_path / "ep0-ba2-rank0.pt", hf, minilm_dir)
    out = tmp_path / "out"
    assert main(["convert", str(checkpoint), "--out", str(out), "--to", "hf"]) == 0
    ours = BertForMaskedLM.from_pretrained(out).eval()
    assert ours.config.num_hidden_layers == 2
    theirs = hf.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    tokenizer = Tokenizer.from_pretrained(out)
    batch = tokenizer.encode_batch(SENTENCES, return_tensors="pt")
    assert torch.equal(batch["input_ids"], Tokenizer.from_pretrained(minilm_dir).encode_batch(
        SENTENCES, return_tensors="pt")["input_ids"])
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        assert torch.allclose(ours(**batch).logits[real], hf(**batch).logits[real], atol=1e-4)


def test_a_classifiers_checkpoint_keeps_its_head_and_labels_and_one_without_a_tokenizer_converts_too(tmp_path):
    from bertkit import BertForSequenceClassification

    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, id2label={0: "neg", 1: "neu", 2: "pos"})
    hf = transformers.BertForSequenceClassification(config).eval()
    checkpoint = _composer_checkpoint(tmp_path / "ckpt.pt", hf)
    assert main(["convert", str(checkpoint), "--out", str(tmp_path / "out"), "--to", "hf"]) == 0
    ours = BertForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert ours.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-5)
    assert not (tmp_path / "out" / "vocab.txt").exists()


def test_convert_to_composer_writes_what_composer_loads_and_converts_back_bit_for_bit(minilm_dir, tmp_path, capsys):
    from bertkit import BertForMaskedLM, Tokenizer
    from safetensors.torch import load_file

    source = tmp_path / "mlm"
    torch.manual_seed(0)
    BertForMaskedLM.from_pretrained(minilm_dir).save_pretrained(source, tokenizer=Tokenizer.from_pretrained(minilm_dir))
    assert main(["convert", str(source), "--out", str(tmp_path / "c"), "--to", "composer"]) == 0
    assert "composer_checkpoint.pt" in capsys.readouterr().out
    written = torch.load(tmp_path / "c" / "composer_checkpoint.pt", weights_only=True)  # plain data, nothing else
    state = written["state"]
    hf_state = state["integrations"]["huggingface"]
    config = hf_state["model"]["config"]
    assert config["class"] == "transformers.models.bert.modeling_bert.BertForMaskedLM"
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**config["content"])).eval()
    # the names transformers' model has, every one (Composer loads with strict names): the tied decoder included
    assert sorted(state["model"]) == sorted(f"model.{k}" for k in hf.state_dict())
    hf.load_state_dict({k[len("model."):]: v for k, v in state["model"].items()}, strict=True)
    ours = BertForMaskedLM.from_pretrained(source).eval()
    folder = tmp_path / "tok"  # the tokenizer files as Composer writes them back out (.txt lines joined)
    folder.mkdir()
    for name, entry in hf_state["tokenizer"].items():
        content = entry["content"]
        (folder / name).write_text("\n".join(content) if name.endswith(".txt") else json.dumps(content))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = Tokenizer.from_pretrained(source).encode_batch(SENTENCES, return_tensors="pt")
    assert torch.equal(hf_tokenizer(SENTENCES, padding=True, return_tensors="pt")["input_ids"], batch["input_ids"])
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        assert torch.allclose(hf(**batch).logits[real], ours(**batch).logits[real], atol=1e-4)
    assert main(["convert", str(tmp_path / "c" / "composer_checkpoint.pt"), "--out", str(tmp_path / "back"),
                 "--to", "hf"]) == 0
    before = load_file(str(source / "model.safetensors"))
    after = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "back" / "vocab.txt").read_text() == (source / "vocab.txt").read_text()


def test_what_is_not_a_bert_composer_checkpoint_is_refused_naming_the_file(tmp_path, capsys):
    from bertkit import BertModel
    from tiny_folders import tiny_config

    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    hf = transformers.BertForMaskedLM(config)

    def convert(path):
        code = main(["convert", str(path), "--out", str(tmp_path / "out"), "--to", "hf"])
        return code, capsys.readouterr().err

    mosaic = {f"model.bert.encoder.layer.0.{name}.weight": torch.zeros(2, 2)
              for name in ("attention.self.Wqkv", "mlp.gated_layers", "mlp.wo")}
    torch.save({"state": {"model": mosaic}}, tmp_path / "mosaic.pt")
    code, err = convert(tmp_path / "mosaic.pt")
    assert code == 2 and "mosaic.pt: MosaicBERT's weights" in err and "hf_bert" in err
    torch.save({"state": {"model": {f"model.{k}": v for k, v in hf.state_dict().items()}}}, tmp_path / "bare.pt")
    code, err = convert(tmp_path / "bare.pt")
    assert code == 2 and "no ['integrations']" in err and "bare.pt" in err
    torch.save({"model": hf.state_dict()}, tmp_path / "nvidia.pt")
    code, err = convert(tmp_path / "nvidia.pt")
    assert code == 2 and "not a Composer checkpoint" in err
    _composer_checkpoint(tmp_path / "odd.pt", hf, hook=torch.optim.SGD)  # a class pickled: never run
    code, err = convert(tmp_path / "odd.pt")
    assert code == 2 and "it pickles torch.optim.sgd.SGD" in err
    assert not (tmp_path / "out").exists()
    # a Composer checkpoint put in a model folder: what to do about it, not "several checkpoints" or a traceback
    folder = tmp_path / "folder"
    folder.mkdir()
    BertModel(tiny_config(vocab_size=60)).config.save(folder)
    _composer_checkpoint(folder / "ep0-ba2-rank0.pt", hf)
    assert main(["info", str(folder)]) == 2
    assert "a Composer checkpoint (MosaicML); expected a model folder: write one with `bertkit convert" in \
        capsys.readouterr().err
    # and a Composer run's save folder given as a model folder: no config.json, what to do with the .pt
    run = tmp_path / "composer-run"
    run.mkdir()
    _composer_checkpoint(run / "ep0-ba2-rank0.pt", hf)
    assert main(["info", str(run)]) == 2
    assert f"ep0-ba2-rank0.pt alone may be a Composer checkpoint (MosaicML), which `bertkit convert " \
        f"{run / 'ep0-ba2-rank0.pt'} --out DIR --to hf`" in capsys.readouterr().err
    assert main(["info", str(run / "ep0-ba2-rank0.pt")]) == 2
    assert "a file, not a folder (expected a model folder with config.json and weights); a Composer checkpoint " \
        "(MosaicML) is made one with `bertkit convert" in capsys.readouterr().err


def test_a_mosaic_bert_folder_is_named_as_such_not_listed_as_missing_weights(tmp_path, capsys):
    """MosaicBERT on the Hub (mosaic-bert-base) is a folder with model_type bert and architectures BertForMaskedLM."""
    from safetensors.torch import save_file

    from bertkit.config import BertConfig

    folder = tmp_path / "mosaic-bert"
    BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               extra={"architectures": ["BertForMaskedLM"], "alibi_starting_size": 512}).save(folder)
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(60, 16),
               "bert.encoder.layer.0.attention.self.Wqkv.weight": torch.zeros(48, 16),
               "bert.encoder.layer.0.mlp.gated_layers.weight": torch.zeros(64, 16),
               "bert.encoder.layer.0.mlp.wo.weight": torch.zeros(16, 32)}, str(folder / "model.safetensors"))
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: MosaicBERT's weights (fused Wqkv" in err and "missing weights" not in err


def test_a_model_folders_own_file_an_empty_or_missing_file_are_refused_saying_what_to_give(tmp_path, capsys):
    from bertkit import BertForMaskedLM
    from tiny_folders import tiny_config

    def convert(path):
        code = main(["convert", str(path), "--out", str(tmp_path / "out"), "--to", "hf"])
        return code, capsys.readouterr().err

    folder = tmp_path / "model"
    BertForMaskedLM(tiny_config(vocab_size=60)).save_pretrained(folder)
    for name in ("model.safetensors", "config.json"):  # once "cannot read weights (UnpicklingError: ...a page...)"
        code, err = convert(folder / name)
        assert code == 2 and f"{folder / name}: a file of the model folder {folder}; expected the folder itself " \
            f"(`bertkit convert {folder} --out DIR --to ...`)" in err
    nvidia = tmp_path / "nvidia"
    assert main(["convert", str(folder), "--out", str(nvidia), "--to", "nvidia"]) == 0
    code, err = convert(nvidia / "bert_model.pt")  # a .pt, but NVIDIA's: its folder is what converts
    assert code == 2 and "a file of the model folder" in err
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    code, err = convert(tmp_path / "tensor.pt")
    assert code == 2 and "expected torch.save's {'state': {'model': state dict, 'integrations': ...}}, as " in err
    (tmp_path / "empty.pt").write_bytes(b"")
    code, err = convert(tmp_path / "empty.pt")
    assert code == 2 and "empty.pt: an empty file; expected weights written by torch.save" in err
    code, err = convert(tmp_path / "gone.pt")
    assert code == 2 and "gone.pt: no such file or folder (expected a model folder, or a Composer checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_an_fsdp_sharded_checkpoint_is_refused_with_the_command_that_gathers_it_and_that_command_works(tmp_path,
                                                                                                     capsys):
    import warnings

    import torch.distributed.checkpoint as dcp

    from bertkit import BertForMaskedLM

    hf = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                                              num_attention_heads=2, intermediate_size=32)).eval()
    full = torch.load(_composer_checkpoint(tmp_path / "full.pt", hf), weights_only=False)
    sharded = tmp_path / "ep0-ba2"  # what Composer's FSDP run saves in place of ep0-ba2-rank0.pt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed ... uninitialized": one process, as intended
        dcp.save({"state": {k: full["state"][k] for k in ("model", "integrations", "metadata")}},
                 checkpoint_id=str(sharded))
    for given in (sharded, next(sharded.glob("*.distcp"))):
        assert main(["convert", str(given), "--out", str(tmp_path / "out"), "--to", "hf"]) == 2
        err = capsys.readouterr().err
        assert "a sharded checkpoint (FSDP's" in err and f"dcp_to_torch_save('{sharded}', 'checkpoint.pt')" in err
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(sharded), str(tmp_path / "checkpoint.pt"))
    assert main(["convert", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "out"), "--to", "hf"]) == 0
    ours = BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-5)


def test_a_peft_adapter_checkpoint_and_malformed_config_or_tokenizer_entries_are_one_line_errors(tmp_path, capsys):
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))

    def convert(name, change):
        path = _composer_checkpoint(tmp_path / name, hf)
        checkpoint = torch.load(path, weights_only=False)
        change(checkpoint["state"])
        torch.save(checkpoint, path)
        code = main(["convert", str(path), "--out", str(tmp_path / "out"), "--to", "hf"])
        return code, capsys.readouterr().err

    def peft(state):  # as Composer 0.32.1 saved a HuggingFaceModel(peft_config=LoraConfig(...)): the adapter alone
        lora = "model.base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
        state["model"] = {lora: torch.zeros(4, 16)}
        state["integrations"]["huggingface"]["model"]["peft_config"] = {"file_extension": ".json",
                                                                          "content": {"peft_type": "LORA"}}
        state["integrations"]["huggingface"]["model"]["config"]["class"] = \
            "peft.peft_model.PeftModelForSequenceClassification"

    code, err = convert("peft.pt", peft)  # once "does not fit BertModel: missing weights: ..."
    assert code == 2 and "peft.pt: a PEFT checkpoint (an adapter such as LoRA on the model)" in err
    code, err = convert("content.pt", lambda s: s["integrations"]["huggingface"]["model"]["config"].update(
        content="{}"))  # once a TypeError's traceback
    assert code == 2 and "['config']['content'] is a str; expected config.json's object" in err
    code, err = convert("tokenizer.pt", lambda s: s["integrations"]["huggingface"].update(tokenizer=["vocab.txt"]))
    assert code == 2 and "['huggingface']['tokenizer'] is a list; expected the tokenizer's files by name" in err
    assert not (tmp_path / "out").exists()
