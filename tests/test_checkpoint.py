"""Checkpoint files: written atomically, with the permissions an ordinary file write would give; malformed model
folders refused in one line naming the file and the field, before any large allocation."""

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bertkit import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertkitError, BertModel
from bertkit.checkpoint import read_state_dict, read_weight_shapes
from bertkit.cli import main
from tiny_folders import tiny_config


def test_saved_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig.from_preset("tiny", vocab_size=100, num_labels=2))
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_stated_dtype_is_the_one_written_and_a_new_head_replaces_stale_label_names(tmp_path):
    """A half-precision source's `dtype` would make transformers load bertkit's float32 weights in float16; and
    num_labels= given to from_pretrained wins over the folder's id2label (and problem_type) for another head."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, id2label={0: "NEGATIVE", 1: "POSITIVE"})
    transformers.BertModel(config).half().save_pretrained(tmp_path / "fp16")
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    BertModel.from_pretrained(tmp_path / "fp16").save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "float32"
    assert transformers.BertModel.from_pretrained(tmp_path / "ours").dtype == torch.float32
    clf = BertForSequenceClassification.from_pretrained(tmp_path / "fp16", num_labels=3)
    assert clf.config.num_labels == 3 and clf.classifier.weight.shape == (3, 32) and clf.config.id2label is None
    # a multi-label folder loads as one, and starts a new single-label or regression task
    values = json.loads((tmp_path / "ours" / "config.json").read_text()) | {"problem_type": "multi_label_classification"}
    (tmp_path / "ours" / "config.json").write_text(json.dumps(values))
    assert BertForSequenceClassification.from_pretrained(tmp_path / "ours").multi_label
    for labels in ({"id2label": {0: "a", 1: "b"}}, {"num_labels": 1}):
        clf = BertForSequenceClassification.from_pretrained(tmp_path / "ours", **labels)
        assert "problem_type" not in clf.config.extra and not clf.multi_label
    # a problem_type that is not this head's is refused, naming what is
    (tmp_path / "ours" / "config.json").write_text(json.dumps(values | {"problem_type": "regression"}))
    with pytest.raises(BertkitError, match="problem_type 'regression' with num_labels 2 is not supported"):
        BertForSequenceClassification.from_pretrained(tmp_path / "ours")


# ---- malformed model folders: one-line errors naming the file and the field, before any large allocation ----


def tiny_folder(path, **config_changes):
    """A saved 2-layer classifier (hidden 32), then config.json edited by `config_changes`."""
    torch.manual_seed(0)
    config = tiny_config(id2label={0: "neg", 1: "pos"})
    BertForSequenceClassification(config).save_pretrained(path)
    if config_changes:
        values = json.loads((path / "config.json").read_text()) | config_changes
        (path / "config.json").write_text(json.dumps(values))
    return path


class Counted(BertForSequenceClassification):
    """Records the device of every model built, so a test sees whether a real (not meta) one was allocated."""

    built: list[str] = []

    def __init__(self, config):
        super().__init__(config)
        Counted.built.append(self.classifier.weight.device.type)


@pytest.mark.parametrize("change, expected", [
    ({"vocab_size": 120}, r"word_embeddings.weight: checkpoint \(100, 32\) vs model \(120, 32\) \(config.json's vocab_size is 120\)"),
    ({"intermediate_size": 48}, r"intermediate.dense.weight: checkpoint \(64, 32\) vs model \(48, 32\) \(config.json's intermediate_size is 48\)"),
    ({"num_hidden_layers": 4}, r"the weights have 2 layers \(config.json's num_hidden_layers is 4\)"),
    ({"max_position_embeddings": 128}, r"config.json's max_position_embeddings is 128"),
    ({"id2label": {"0": "a", "1": "b", "2": "c"}}, r"classifier.weight: checkpoint \(2, 32\) vs model \(3, 32\) \(config.json's num_labels is 3\)"),
])
def test_weights_whose_shapes_disagree_with_the_config_are_refused_before_the_model_is_built(tmp_path, change, expected):
    tiny_folder(tmp_path, **change)
    Counted.built.clear()
    with pytest.raises(BertkitError, match=rf"model.safetensors: does not fit Counted: .*{expected}") as error:
        Counted.from_pretrained(tmp_path)
    assert "\n" not in str(error.value)
    assert Counted.built == ["meta"]  # compared from the safetensors header; no real model, no tensor read


@pytest.mark.parametrize("labels", [{"num_labels": 2}, {"id2label": {0: "neg", 1: "pos"}}])
def test_a_head_for_other_labels_than_asked_for_is_not_put_down_to_config_json(tmp_path, labels):
    """Fine-tuning RTE from a 3-label MNLI folder said "config.json's num_labels is 2", where config.json says 3."""
    BertForSequenceClassification(tiny_config(id2label={0: "a", 1: "b", 2: "c"})).save_pretrained(tmp_path)
    with pytest.raises(BertkitError, match=r"classifier.weight: checkpoint \(3, 32\) vs model \(2, 32\) \(num_labels is 2 "
                                           r"as asked for; config.json's is 3\)") as error:
        BertForSequenceClassification.from_pretrained(tmp_path, **labels)
    assert "config.json's num_labels is 2" not in str(error.value)


def test_a_new_head_takes_labels_named_as_transformers_users_name_them(tmp_path):
    """`from_pretrained(dir, num_labels=2, id2label=..., label2id=...)`, transformers' idiom, was refused as an
    unknown config field 'label2id'."""
    BertModel(tiny_config()).save_pretrained(tmp_path)
    id2label, label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model = BertForSequenceClassification.from_pretrained(tmp_path, num_labels=2, id2label=id2label, label2id=label2id)
    assert model.config.id2label == id2label and model.classifier.weight.shape == (2, 32)
    alone = BertForSequenceClassification.from_pretrained(tmp_path, label2id={"a": 0, "b": 1, "c": 2})
    assert alone.config.id2label == {0: "a", 1: "b", 2: "c"} and alone.config.num_labels == 3
    alone.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["label2id"] == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(BertkitError, match="label2id .* is not the inverse of id2label"):
        BertForSequenceClassification.from_pretrained(tmp_path, id2label=id2label, label2id={"pos": 0, "neg": 1})
    with pytest.raises(BertkitError, match="label2id is .*; expected an object of label name -> class index"):
        BertForSequenceClassification.from_pretrained(tmp_path, label2id=["neg", "pos"])


def test_problem_type_is_taken_as_an_override_as_config_json_s_is(tmp_path):
    """config.json's problem_type is read, but `from_pretrained(dir, num_labels=1, problem_type="regression")` was
    refused as an unknown config field."""
    BertModel(tiny_config()).save_pretrained(tmp_path)
    model = BertForSequenceClassification.from_pretrained(tmp_path, num_labels=1, problem_type="regression")
    assert model.config.extra["problem_type"] == "regression" and model.classifier.weight.shape == (1, 32)
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["problem_type"] == "regression"
    with pytest.raises(BertkitError, match=r"^problem_type 'regression' with num_labels 3 is not"):
        BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3, problem_type="regression")
    assert BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3,
                                                         problem_type="multi_label_classification").multi_label
    with pytest.raises(BertkitError, match="problem_type is 'softmax'; expected one of single_label_classification"):
        BertForSequenceClassification.from_pretrained(tmp_path, problem_type="softmax")


def test_an_untied_decoder_of_another_vocabulary_is_blamed_on_vocab_size_not_hidden_size(tmp_path):
    """The decoder's (V, H) rows were put down to config.json's hidden_size, which matched the weights."""
    BertForMaskedLM(tiny_config(tie_word_embeddings=False)).save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text()) | {"vocab_size": 120}
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(BertkitError, match=r"cls.predictions.decoder.weight: checkpoint \(100, 32\) vs model \(120, 32\) "
                                           r"\(config.json's vocab_size is 120\)$"):
        BertForMaskedLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("load_weights", [True, False])
def test_a_problem_type_the_model_cannot_train_names_the_config_json(tmp_path, capsys, load_weights):
    """The refusal of a problem_type the head cannot train (then multi-label) named no file, unlike every other bad
    value of config.json."""
    tiny_folder(tmp_path, problem_type="regression")
    with pytest.raises(BertkitError, match=rf"^{re.escape(str(tmp_path))}/config.json: problem_type 'regression'"):
        BertForSequenceClassification.from_pretrained(tmp_path, load_weights=load_weights)
    assert main(["info", str(tmp_path)]) == 2
    assert f"{tmp_path}/config.json: problem_type 'regression'" in capsys.readouterr().err


def test_bertkit_info_refuses_weights_that_disagree_with_the_config(tmp_path, capsys):
    tiny_folder(tmp_path, vocab_size=120)
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors: does not fit BertForSequenceClassification" in err
    assert "config.json's vocab_size is 120" in err


def test_bertkit_info_counts_parameters_from_the_header_alone(tmp_path, capsys):
    model = BertForSequenceClassification.from_pretrained(tiny_folder(tmp_path))
    assert main(["info", str(tmp_path)]) == 0
    assert f"parameters       {model.num_parameters():,}" in capsys.readouterr().out


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`bertkit info ... | head -1` (or predict into head) ended in a BrokenPipeError traceback."""
    import subprocess
    import sys

    tiny_folder(tmp_path)
    command = [sys.executable, "-c", "import sys; from bertkit.cli import main; sys.exit(main())", "info", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # long before the command, still importing, prints
    err = process.stderr.read()
    assert process.wait() == 141 and err == ""


@pytest.mark.parametrize("is_file, expected", [(True, "a file, not a folder"), (False, "no such folder")])
def test_a_file_or_nothing_where_a_model_folder_is_expected_is_named(tmp_path, capsys, is_file, expected):
    target = tmp_path / "model"
    if is_file:
        target.write_text("{}")
    with pytest.raises(BertkitError, match=rf"model: {expected} \(expected a model folder"):
        BertForSequenceClassification.from_pretrained(target)
    assert main(["info", str(target)]) == 2
    assert f"model: {expected}" in capsys.readouterr().err


def test_weights_file_that_is_a_folder_or_garbage_is_named(tmp_path):
    tiny_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(BertkitError, match=r"model.safetensors: cannot read weights"):
        BertForSequenceClassification.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(BertkitError, match=r"model.safetensors: a folder, not a file"):
        read_state_dict(tmp_path)


def sharded(path, index_text=None, drop=None):
    """The tiny model saved as two safetensors shards with an index (or the index text given)."""
    state = {k: v.contiguous() for k, v in BertModel(tiny_config()).state_dict().items()}
    tiny_config().save(path)
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for shard, keys in (("model-00001-of-00002.safetensors", names[:half]), ("model-00002-of-00002.safetensors", names[half:])):
        if shard != drop:
            save_file({k: state[k] for k in keys}, path / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    text = json.dumps({"metadata": {}, "weight_map": weight_map}) if index_text is None else index_text
    (path / "model.safetensors.index.json").write_text(text)
    return state


def test_sharded_checkpoint_loads_and_its_shapes_come_from_the_headers(tmp_path):
    state = sharded(tmp_path)
    assert read_weight_shapes(tmp_path) == {k: tuple(v.shape) for k, v in state.items()}
    model = BertModel.from_pretrained(tmp_path)
    assert all(model.state_dict()[k].equal(v) for k, v in state.items())


@pytest.mark.parametrize("index_text, drop, expected", [
    ("{not json", None, r"model.safetensors.index.json:1: not valid JSON"),
    ("[1, 2]", None, r"model.safetensors.index.json: weight_map is missing, empty or not an object"),
    ('{"weight_map": {}}', None, r"weight_map is missing, empty or not an object"),
    ('{"weight_map": {"a": 3}}', None, r"weight_map\['a'\] is 3; expected a shard file name"),
    ('{"weight_map": {"a": "../../etc/passwd"}}', None, r"weight_map\['a'\] is '../../etc/passwd'"),
    ("[" * 50_000, None, r"model.safetensors.index.json: JSON nested too deeply"),
    (None, "model-00002-of-00002.safetensors", r"weight_map names model-00002-of-00002.safetensors, not found in"),
])
def test_sharded_index_that_is_not_json_or_names_missing_shards_is_refused(tmp_path, index_text, drop, expected):
    sharded(tmp_path, index_text, drop)
    with pytest.raises(BertkitError, match=expected):
        BertModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
              'device" })'),  # safetensors' SafetensorError
])
def test_a_full_disk_while_saving_a_model_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch, error):
    """A fine-tuning run's best model (save_pretrained) on a full disk ended in safetensors' traceback."""
    import bertkit.checkpoint as checkpoint

    def full(state, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise error

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(BertkitError, match=r"model.safetensors: cannot write it \(.*No space left.*GiB free on its "
                                           "filesystem; expected room for it"):
        BertModel(tiny_config(50)).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):  # not the disk's: the traceback stays
        BertModel(tiny_config(50)).save_pretrained(tmp_path)


VOCAB = 93  # tiny_folders' vocabulary


class DataLoader:  # what NVIDIA's pretraining checkpoints keep beside the model
    pass


def _nvidia_folder(directory: Path, model, extra=None) -> Path:
    """A model folder as NVIDIA's BERT recipe leaves one: bert_config.json (the true vocab_size), vocab.txt, and a
    .pt holding {'model': state dict} beside the optimizer's state, with the vocabulary padded to a multiple of 8
    and Linear + activation modules named dense_act."""
    from tiny_folders import tokenizer_in

    from bertkit.tf_checkpoint import GOOGLE_FIELDS

    directory.mkdir()
    tokenizer_in(directory)
    config = model.config
    (directory / "bert_config.json").write_text(json.dumps({k: getattr(config, k) for k in GOOGLE_FIELDS}))
    padded = -(-config.vocab_size // 8) * 8
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(("word_embeddings.weight", "predictions.bias", "decoder.weight")):
            value = torch.cat([value, torch.randn(padded - config.vocab_size, *value.shape[1:])])
        for module in ("intermediate.dense.", "pooler.dense.", "transform.dense."):
            key = key.replace(module, module.replace("dense.", "dense_act."))
        state[key] = value
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "files": [0, "shard.hdf5"],
                "epoch": 1, **(extra or {})}, directory / "ckpt_8601.pt")
    return directory


def test_a_checkpoint_of_nvidias_recipe_loads_as_the_model_it_was(tmp_path):
    from bertkit import BertForPreTraining, Tokenizer

    from tiny_folders import varied

    torch.manual_seed(0)
    model = varied(BertForPreTraining(tiny_config(vocab_size=VOCAB)).eval())  # padded to 96 rows
    folder = _nvidia_folder(tmp_path / "nvidia", model)
    loaded = BertForPreTraining.from_pretrained(folder).eval()
    ids = torch.randint(5, VOCAB, (2, 12))
    with torch.no_grad():
        for name in ("prediction_logits", "seq_relationship_logits"):
            assert torch.equal(loaded(ids)[name], model(ids)[name]), name
    assert loaded.config.vocab_size == Tokenizer.from_pretrained(folder).vocab_size == VOCAB
    assert main(["info", str(folder)]) == 0


def test_a_checkpoint_that_pickles_more_than_tensors_is_refused_with_what_to_do(tmp_path, capsys):
    from bertkit import BertForPreTraining

    model = BertForPreTraining(tiny_config(vocab_size=VOCAB))
    folder = _nvidia_folder(tmp_path / "nvidia", model, {"data_loader": DataLoader()})
    with pytest.raises(BertkitError, match=r"ckpt_8601.pt: cannot read weights: it pickles test_checkpoint.DataLoader, .* \{'model': state dict\} as "
                       r"NVIDIA's"):
        BertForPreTraining.from_pretrained(folder)
    (folder / "ckpt_9000.pt").write_bytes(b"")
    with pytest.raises(BertkitError, match=r"several checkpoints \(ckpt_8601.pt, ckpt_9000.pt\); expected one .pt"):
        BertForPreTraining.from_pretrained(folder)


@pytest.mark.parametrize("cls", ["BertForPreTraining", "BertForQuestionAnswering"])
def test_convert_to_nvidia_writes_its_names_and_padding_and_reads_back_the_same_model(tmp_path, cls, capsys):
    import bertkit
    from tiny_folders import save_tiny

    source = save_tiny(tmp_path / "hf", cls=getattr(bertkit, cls))
    assert main(["convert", source, "--out", str(tmp_path / "nv"), "--to", "nvidia"]) == 0
    assert sorted(p.name for p in (tmp_path / "nv").iterdir()) == ["bert_config.json", "bert_model.pt", "vocab.txt"]
    state = torch.load(tmp_path / "nv" / "bert_model.pt", weights_only=True)["model"]
    assert state["bert.embeddings.word_embeddings.weight"].shape[0] == 96  # 93, padded to a multiple of 8
    # NVIDIA's scripts load with strict=False: a name of theirs that is missing is a weight silently left random.
    # Their modeling.py's names, written out by hand:
    names = {f"bert.embeddings.{e}_embeddings.weight" for e in ("word", "position", "token_type")}
    names |= {f"bert.embeddings.LayerNorm.{w}" for w in ("weight", "bias")}
    for i in range(2):
        for module in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                       "attention.output.LayerNorm", "intermediate.dense_act", "output.dense", "output.LayerNorm"):
            names |= {f"bert.encoder.layer.{i}.{module}.{w}" for w in ("weight", "bias")}
    if cls == "BertForPreTraining":
        for module in ("bert.pooler.dense_act", "cls.predictions.transform.dense_act",
                       "cls.predictions.transform.LayerNorm", "cls.seq_relationship"):
            names |= {f"{module}.{w}" for w in ("weight", "bias")}
        names |= {"cls.predictions.bias", "cls.predictions.decoder.weight"}
        assert torch.equal(state["cls.predictions.decoder.weight"], state["bert.embeddings.word_embeddings.weight"])
    else:
        names |= {"qa_outputs.weight", "qa_outputs.bias"}
    assert set(state) == names
    model = getattr(bertkit, cls)
    ids = torch.randint(5, VOCAB, (2, 9))
    with torch.no_grad():
        want, got = model.from_pretrained(source).eval()(ids), model.from_pretrained(tmp_path / "nv").eval()(ids)
    for name in ("prediction_logits", "start_logits", "end_logits"):
        if want[name] is not None:
            assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("cls, num_labels", [("BertForPreTraining", 2), ("BertForSequenceClassification", 3),
                                             ("BertForQuestionAnswering", 2), ("BertModel", 2)])
def test_an_nvidia_folder_is_read_as_the_heads_its_weights_hold(tmp_path, cls, num_labels):
    """NVIDIA's bert_config.json names no architecture: the folder was read as a bare encoder, so `convert` back to
    transformers' layout dropped its head, and a 3-label classifier did not load without num_labels=3."""
    import bertkit
    from tiny_folders import save_tiny

    source = save_tiny(tmp_path / "hf", cls=getattr(bertkit, cls), num_labels=num_labels)
    assert main(["convert", source, "--out", str(tmp_path / "nv"), "--to", "nvidia"]) == 0
    config = BertConfig.load(tmp_path / "nv")
    assert config.extra["architectures"] == [cls] and config.num_labels == num_labels
    assert main(["convert", str(tmp_path / "nv"), "--out", str(tmp_path / "back"), "--to", "hf"]) == 0
    model = getattr(bertkit, cls)
    want, got = model.from_pretrained(source).state_dict(), model.from_pretrained(tmp_path / "back").state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_overrides_given_with_a_config_leave_the_callers_config_as_it_was(tmp_path):
    """from_pretrained(dir, config=cfg, num_labels=3) set num_labels on cfg itself: a second model built from it
    got the first one's head."""
    config = tiny_config()
    BertModel(config).save_pretrained(tmp_path)
    model = BertForSequenceClassification.from_pretrained(tmp_path, config=config, num_labels=3)
    assert model.config.num_labels == 3 and config.num_labels == 2


def test_saving_where_a_file_is_names_the_file(tmp_path):
    """mkdir's "FileExistsError: [Errno 17] File exists" was all the model, its config and its tokenizer said."""
    from tiny_folders import tokenizer_in

    (tmp_path / "taken").write_text("mine")
    config = tiny_config(vocab_size=93)
    tokenizer = tokenizer_in(tmp_path)
    for save in (BertModel(config).save_pretrained, config.save, tokenizer.save_pretrained):
        with pytest.raises(BertkitError, match=r"taken: a file, not a folder; expected a folder to save into"):
            save(tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "mine"
