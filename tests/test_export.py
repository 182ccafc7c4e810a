"""ONNX export (bertkit.export): the graph computes what bertkit computes, at any batch and length; int8 is close."""

import json
from pathlib import Path
from collections import Counter

import numpy as np
import pytest
import torch

from bertkit import BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification, BertkitError, BertModel
from bertkit.export import INPUTS, ExportConfig, export, session
from tiny_folders import save_tiny, tiny_config, tokenizer_in

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each exportable architecture as a tiny folder, exported: name -> (model folder, onnx folder, report)."""
    root = tmp_path_factory.mktemp("export")
    made = {}
    for name, cls, labels in [("classifier", BertForSequenceClassification, 2), ("regressor", BertForSequenceClassification, 1),
                              ("qa", BertForQuestionAnswering, 2), ("encoder", BertModel, 2)]:
        model_dir = save_tiny(root / name, cls, num_labels=labels)
        report = export(ExportConfig(model_dir=model_dir, out=str(root / f"{name}-onnx")))
        made[name] = (model_dir, root / f"{name}-onnx", report)
    return made


def random_batch(batch, length, vocab, seed, pad=True):
    """Token ids unseen by the export's check, rows of different lengths, segment ids 0 then 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    lengths = torch.randint(2, length + 1, (batch,), generator=g) if pad else torch.full((batch,), length)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    types = (torch.arange(length)[None, :] >= lengths[:, None] // 2).long() * mask
    return {"input_ids": ids * mask, "token_type_ids": types, "attention_mask": mask}


@pytest.mark.parametrize("name", ["classifier", "regressor", "qa", "encoder"])
def test_exported_onnx_equals_bertkit_at_any_batch_and_length(exported, name):
    model_dir, out, report = exported[name]
    cls = {"classifier": BertForSequenceClassification, "regressor": BertForSequenceClassification,
           "qa": BertForQuestionAnswering, "encoder": BertModel}[name]
    model = cls.from_pretrained(model_dir).eval()
    sess = session(out / "model.onnx")
    assert [o.name for o in sess.get_outputs()] == report["outputs"]
    for seed, (batch, length, pad) in enumerate([(1, 3, False), (5, 17, True), (2, 64, True), (8, 9, False)]):
        inputs = random_batch(batch, length, model.config.vocab_size, seed, pad)
        with torch.no_grad():
            out_bertkit = model(**inputs)
        out_onnx = sess.run(None, {k: inputs[k].numpy() for k in INPUTS})
        keep = inputs["attention_mask"].bool().numpy()
        for output_name, got in zip(report["outputs"], out_onnx):
            want = out_bertkit[output_name].numpy()
            assert got.shape == want.shape
            if output_name in ("start_logits", "end_logits", "last_hidden_state"):
                got, want = got[keep], want[keep]  # padding: nothing to read (QA: the dtype's minimum in both)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_export_writes_tokenizer_config_and_report(exported):
    from bertkit import Tokenizer

    model_dir, out, report = exported["classifier"]
    for name in ("model.onnx", "model.int8.onnx", "export.json", "config.json", "vocab.txt", "tokenizer.json"):
        assert (out / name).is_file(), name
    text = "the movie was not very good"
    assert Tokenizer.from_pretrained(out).encode(text) == Tokenizer.from_pretrained(model_dir).encode(text)
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    written = json.loads((out / "export.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["inputs"] == {name: ["batch", "length"] for name in INPUTS}
    assert written["check"]["float32"]["worst"] <= 1e-4
    assert 0 < written["check"]["int8"]["max_abs_diff"]


def test_int8_onnx_is_quantized_and_within_tolerance(exported):
    model_dir, out, _ = exported["classifier"]
    ops = Counter(node.op_type for node in onnx.load(str(out / "model.int8.onnx")).graph.node)
    assert ops["DynamicQuantizeLinear"] > 0 and ops["MatMulInteger"] > 0
    fp32, int8 = session(out / "model.onnx"), session(out / "model.int8.onnx")
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    inputs = {k: v.numpy() for k, v in random_batch(16, 20, vocab, seed=7).items()}
    want, got = fp32.run(None, inputs)[0], int8.run(None, inputs)[0]
    assert np.abs(got - want).max() <= 0.1 * (1 + np.abs(want).max())
    assert not np.array_equal(got, want)


def test_export_without_int8(tmp_path):
    model_dir = save_tiny(tmp_path / "m")
    report = export(ExportConfig(model_dir=model_dir, out=str(tmp_path / "o"), int8=False))
    assert report["files"] == {"float32": "model.onnx"} and not (tmp_path / "o" / "model.int8.onnx").exists()
    # transformers truncates to model_max_length: the model's 128 positions, not BERT's usual 512
    assert json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())["model_max_length"] == 128


def test_export_without_int8_removes_an_earlier_int8_graph(tmp_path):
    """Exporting another model into the same --out with --no-int8 left the first model's model.int8.onnx there."""
    export(ExportConfig(model_dir=save_tiny(tmp_path / "classifier"), out=str(tmp_path / "o")))
    assert (tmp_path / "o" / "model.int8.onnx").exists()
    export(ExportConfig(model_dir=save_tiny(tmp_path / "regressor", num_labels=1), out=str(tmp_path / "o"), int8=False))
    assert not (tmp_path / "o" / "model.int8.onnx").exists()


def test_export_of_a_model_with_one_segment_embedding(tmp_path):
    """type_vocab_size 1 (no sentence B): the check runs single texts only, instead of indexing past the table."""
    (tmp_path / "m").mkdir()
    tokenizer = tokenizer_in(tmp_path / "m")
    torch.manual_seed(0)
    BertModel(tiny_config(tokenizer.vocab_size, type_vocab_size=1)).save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    report = export(ExportConfig(model_dir=str(tmp_path / "m"), out=str(tmp_path / "o"), int8=False))
    assert report["check"]["float32"]["worst"] <= 1e-4


def test_export_refuses_what_it_cannot_export(tmp_path):
    model_dir = save_tiny(tmp_path / "pretraining", BertForPreTraining)
    with pytest.raises(BertkitError, match="architecture BertForPreTraining; expected one of"):
        export(ExportConfig(model_dir=model_dir, out=str(tmp_path / "o")))
    with pytest.raises(BertkitError, match="no such folder"):
        export(ExportConfig(model_dir=str(tmp_path / "missing"), out=str(tmp_path / "o")))
    (tmp_path / "file").write_text("x")
    classifier = save_tiny(tmp_path / "classifier")
    with pytest.raises(BertkitError, match="a file, not a folder; expected a folder for --out"):
        export(ExportConfig(model_dir=classifier, out=str(tmp_path / "file")))
    with pytest.raises(BertkitError, match="--opset is 9; expected 14 or more"):
        export(ExportConfig(model_dir=classifier, out=str(tmp_path / "o"), opset=9))
    with pytest.raises(BertkitError, match="--opset is 99; expected 14 or more .*and at most"):  # was a RuntimeError
        export(ExportConfig(model_dir=classifier, out=str(tmp_path / "o"), opset=99))
    assert not (tmp_path / "o").exists()
    from bertkit.extend import ExtendConfig, extend

    extend(ExtendConfig(model_dir=classifier, out=str(tmp_path / "windowed"), max_length=256, attention_window=32))
    with pytest.raises(BertkitError, match="attention_window 32; expected a model with full attention"):
        export(ExportConfig(model_dir=str(tmp_path / "windowed"), out=str(tmp_path / "o")))


def test_export_refuses_a_bilstm_model_before_writing(tmp_path):
    """`finetune --bilstm` makes such a classifier; torch.onnx failed on its LSTM with a RuntimeError traceback."""
    (tmp_path / "m").mkdir()
    tokenizer = tokenizer_in(tmp_path / "m")
    config = tiny_config(tokenizer.vocab_size, bilstm=True)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    with pytest.raises(BertkitError, match="bilstm true .*expected a model without one to export"):
        export(ExportConfig(model_dir=str(tmp_path / "m"), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_export_into_another_models_folder_is_refused_before_it_replaces_its_files(tmp_path):
    """--out naming another model's folder had its config.json and tokenizer replaced by the exported model's."""
    model_dir, other = save_tiny(tmp_path / "m"), Path(save_tiny(tmp_path / "other", seed=1))
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    with pytest.raises(BertkitError, match="holds another model \\(model.safetensors\\).*expected .* itself"):
        export(ExportConfig(model_dir=str(model_dir), out=str(other)))
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("layout", ["google", "sharded"])
def test_export_into_another_model_of_any_layout_is_refused(tmp_path, layout):
    """Only model.safetensors and pytorch_model.bin were seen as a model: a folder of Google's layout or of sharded
    weights got the exported model's config.json (over the shards', or shadowing bert_config.json) and no longer
    loaded."""
    from safetensors.torch import load_file, save_file

    from bertkit.tf_checkpoint import save_google
    from bertkit.tokenizer import Tokenizer

    model_dir, source = save_tiny(tmp_path / "m"), Path(save_tiny(tmp_path / "other", num_labels=3, seed=1))
    other = tmp_path / layout
    if layout == "google":
        save_google(BertForSequenceClassification.from_pretrained(source), other, Tokenizer.from_pretrained(source))
    else:  # the weights in two shards and their index, as transformers writes a large model
        other.mkdir()
        for name in ("config.json", "vocab.txt"):
            (other / name).write_bytes((source / name).read_bytes())
        state = load_file(str(source / "model.safetensors"))
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, str(other / shard))
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (other / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    with pytest.raises(BertkitError, match="holds another model .*expected .* itself"):
        export(ExportConfig(model_dir=str(model_dir), out=str(other), int8=False))
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before
    assert BertForSequenceClassification.from_pretrained(other).config.num_labels == 3


def test_export_check_fails_on_a_graph_that_differs(tmp_path, monkeypatch):
    """The check is real: a graph traced from other weights than the folder's is refused."""
    import bertkit.export as export_module

    model_dir = save_tiny(tmp_path / "m")
    real_trace = export_module.trace

    def trace_other_weights(model, outputs, example, path, opset):
        with torch.no_grad():
            model.classifier.bias.add_(1.0)
        real_trace(model, outputs, example, path, opset)
        with torch.no_grad():
            model.classifier.bias.sub_(1.0)

    monkeypatch.setattr(export_module, "trace", trace_other_weights)
    with pytest.raises(BertkitError, match="model.onnx: ONNX Runtime's logits differs from bertkit's by 1.*"
                                           r"\(nothing written: --out is as it was\)"):
        export(ExportConfig(model_dir=model_dir, out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()  # not left looking like a good export, nor an empty folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.parametrize("failure", ["interrupted", "failed check"])
def test_a_failed_export_leaves_an_earlier_export_as_it_was(tmp_path, monkeypatch, failure):
    """Exporting again into a folder removed the earlier export's graphs when the new export failed its check or was
    interrupted (Ctrl-C in the int8 step): the earlier, checked graph was lost, and nothing replaced it."""
    import bertkit.export as export_module

    export(ExportConfig(model_dir=save_tiny(tmp_path / "classifier"), out=str(tmp_path / "o")))
    before = files_of(tmp_path / "o")

    def broken(fp32_path, int8_path):
        if failure == "interrupted":
            raise KeyboardInterrupt
        raise BertkitError("model.int8.onnx: differs")

    monkeypatch.setattr(export_module, "quantize_int8", broken)
    with pytest.raises(KeyboardInterrupt if failure == "interrupted" else BertkitError):
        export(ExportConfig(model_dir=save_tiny(tmp_path / "regressor", num_labels=1), out=str(tmp_path / "o")))
    assert files_of(tmp_path / "o") == before  # no partial folder either


def test_an_export_killed_before_its_files_moved_is_cleaned_up_by_the_next(tmp_path):
    """A kill -9 leaves the staging folder; the next export into the same folder starts from an empty one."""
    from bertkit.export import STAGING_DIR

    (tmp_path / "o" / STAGING_DIR).mkdir(parents=True)
    (tmp_path / "o" / STAGING_DIR / "model.onnx").write_bytes(b"half a graph")
    export(ExportConfig(model_dir=save_tiny(tmp_path / "m"), out=str(tmp_path / "o"), int8=False))
    assert not (tmp_path / "o" / STAGING_DIR).exists()
    assert {"model.onnx", "export.json", "config.json", "vocab.txt"} <= set(files_of(tmp_path / "o"))


def test_export_command_line(tmp_path, capsys):
    from bertkit.cli import main

    model_dir = save_tiny(tmp_path / "m")
    assert main(["export", model_dir, "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "model.onnx" in printed and "model.int8.onnx" in printed
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("bertkit: error: ") and error.count("\n") == 1 and "missing: no such folder" in error


def test_export_of_a_google_folder_writes_the_config_it_read(tmp_path):
    """A folder of Google's layout has bert_config.json, no config.json: the export's config.json is the config
    bertkit read, with the architecture its checkpoint's heads showed."""
    from bertkit.tf_checkpoint import save_google
    from bertkit.tokenizer import Tokenizer

    source = Path(save_tiny(tmp_path / "hf", BertForSequenceClassification, num_labels=3))
    model = BertForSequenceClassification.from_pretrained(source)
    save_google(model, tmp_path / "google", Tokenizer.from_pretrained(source))
    report = export(ExportConfig(model_dir=str(tmp_path / "google"), out=str(tmp_path / "onnx"), int8=False))
    assert report["architecture"] == "BertForSequenceClassification"
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["num_labels"] == 3
