import json
from pathlib import Path

import pytest

from bertkit import BertConfig, BertkitError
from bertkit.config import PRESETS


def test_presets_follow_the_paper():
    for name, (layers, hidden, heads) in PRESETS.items():
        c = BertConfig.from_preset(name)
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (layers, hidden, heads)
        assert c.intermediate_size == 4 * hidden
        assert c.max_position_embeddings == 512 and c.type_vocab_size == 2
    assert PRESETS["base"] == (12, 768, 12) and PRESETS["large"] == (24, 1024, 16)


def test_a_preset_takes_overrides_of_its_own_sizes_too():
    c = BertConfig.from_preset("base", num_hidden_layers=6, hidden_size=384, num_attention_heads=6, vocab_size=8000)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.vocab_size) == (6, 384, 6, 8000)
    assert c.intermediate_size == 4 * 384  # follows the hidden size given, as without a preset
    with pytest.raises(BertkitError, match="not a multiple of num_attention_heads"):
        BertConfig.from_preset("tiny", num_attention_heads=3)


def test_hf_config_json_round_trip(tmp_path):
    c = BertConfig.from_preset("mini", vocab_size=8000, id2label={0: "neg", 1: "pos"})
    c.save(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "bert" and d["label2id"] == {"neg": 0, "pos": 1}
    again = BertConfig.load(tmp_path)
    assert again == c and again.num_labels == 2


def test_foreign_keys_survive_a_round_trip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2, "gradient_checkpointing": False, "transformers_version": "4.8.2"}))
    c = BertConfig.load(tmp_path)
    assert c.hidden_size == 64 and c.intermediate_size == 256
    assert c.to_dict()["transformers_version"] == "4.8.2"


def test_bad_configs_are_named(tmp_path):
    with pytest.raises(BertkitError, match="unknown preset"):
        BertConfig.from_preset("huge")
    with pytest.raises(BertkitError, match="not a multiple"):
        BertConfig(hidden_size=100, num_attention_heads=3)
    (tmp_path / "config.json").write_text('{"hidden_size": 64,\n "oops"}')
    with pytest.raises(BertkitError, match=r"config.json:2: not valid JSON"):
        BertConfig.load(tmp_path)
    with pytest.raises(BertkitError, match="nowhere: no such folder"):
        BertConfig.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BertkitError, match="no config.json"):
        BertConfig.load(tmp_path / "empty")


def write_config(folder, **values):
    """A folder holding config.json: a small valid config with `values` replaced (None deletes a key)."""
    config = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2} | values
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


@pytest.mark.parametrize("field, value, expected", [
    ("num_attention_heads", 0, "num_attention_heads is 0; expected a positive integer"),
    ("num_attention_heads", 5, "hidden_size 32 is not a multiple of num_attention_heads 5"),
    ("hidden_size", -768, "hidden_size is -768; expected a positive integer"),
    ("vocab_size", 0, "vocab_size is 0"),
    ("num_hidden_layers", 100_000, "num_hidden_layers is 100000; expected at most 1024"),
    ("intermediate_size", -1, "intermediate_size is -1"),
    ("max_position_embeddings", 0, "max_position_embeddings is 0"),
    ("type_vocab_size", 0, "type_vocab_size is 0"),
    ("pad_token_id", 100, r"pad_token_id is 100; expected a token id in 0..99"),
])
def test_config_with_an_out_of_range_size_is_refused_naming_the_file_and_field(tmp_path, field, value, expected):
    write_config(tmp_path, **{field: value})
    with pytest.raises(BertkitError, match=rf"config.json: {expected}"):
        BertConfig.load(tmp_path)


def test_config_with_zero_heads_is_refused_naming_the_field(tmp_path):
    with pytest.raises(BertkitError, match=r"config.json: num_attention_heads is 0"):
        BertConfig.load(write_config(tmp_path, num_attention_heads=0))


@pytest.mark.parametrize("values", [
    {"vocab_size": 10**12},
    {"hidden_size": 2**20, "num_attention_heads": 1},
    {"intermediate_size": 10**9, "num_hidden_layers": 24},
    {"max_position_embeddings": 10**11},
    {"num_labels": 10**11},
])
def test_config_that_would_need_tens_of_gigabytes_is_refused_before_any_allocation(tmp_path, values):
    write_config(tmp_path, **values)
    with pytest.raises(BertkitError, match=r"config.json: vocab_size .* make [\d,.]+B parameters .* expected at most 10B"):
        BertConfig.load(tmp_path)


def test_published_bert_sizes_are_all_accepted():
    """BERT-Large and Megatron-BERT 3.9B (the largest published BERT) stay under the size bound."""
    BertConfig.from_preset("large")
    megatron = BertConfig(vocab_size=29056, hidden_size=2560, num_hidden_layers=48, num_attention_heads=40)
    assert 3.8e9 < megatron.parameter_bound() < 4e9


@pytest.mark.parametrize("field, value, expected", [
    ("hidden_size", "768", "hidden_size is '768'; expected a positive integer"),
    ("hidden_size", 768.0, "hidden_size is 768.0; expected a positive integer"),
    ("num_hidden_layers", True, "num_hidden_layers is True; expected a positive integer"),
    ("vocab_size", None, None),  # a missing key takes the default
    ("hidden_dropout_prob", 1.5, r"hidden_dropout_prob is 1.5; expected a probability in \[0, 1\]"),
    ("attention_probs_dropout_prob", "0.1", "attention_probs_dropout_prob is '0.1'"),
    ("classifier_dropout", -0.1, "classifier_dropout is -0.1"),
    ("layer_norm_eps", 0, "layer_norm_eps is 0; expected a finite number > 0"),
    ("initializer_range", [0.02], "initializer_range is \\[0.02\\]"),
    ("hidden_act", 7, "hidden_act 7 is not supported"),
    ("model_type", ["bert"], "model_type is \\['bert'\\]; expected a string"),
    ("architectures", "BertModel", "architectures is 'BertModel'; expected a list of class names"),
    ("id2label", ["neg", "pos"], "id2label is \\['neg', 'pos'\\]; expected a non-empty object"),
])
def test_config_field_of_the_wrong_json_type_is_refused_naming_it(tmp_path, field, value, expected):
    write_config(tmp_path, **{field: value})
    if expected is None:
        assert BertConfig.load(tmp_path).vocab_size == 30522
        return
    with pytest.raises(BertkitError, match=rf"config.json: {expected}"):
        BertConfig.load(tmp_path)


def test_config_with_nan_in_json_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_dropout_prob": NaN}')
    with pytest.raises(BertkitError, match="hidden_dropout_prob is nan"):
        BertConfig.load(tmp_path)


@pytest.mark.parametrize("id2label, expected", [
    ({"zero": "neg", "one": "pos"}, "id2label key 'zero' is not an integer"),
    ({"-1": "neg", "0": "pos"}, "id2label key '-1' is not an integer"),
    ({"0": "neg", "2": "pos"}, r"id2label keys are 0, 2; expected 0..1"),
    ({"0": "neg", "1": 1}, r"id2label\['1'\] is 1; expected a label name"),
    ({}, "id2label is {}; expected a non-empty object"),
])
def test_id2label_keys_that_are_not_class_indices_are_refused(tmp_path, id2label, expected):
    write_config(tmp_path, id2label=id2label)
    with pytest.raises(BertkitError, match=rf"config.json: {expected}"):
        BertConfig.load(tmp_path)


@pytest.mark.parametrize("text, expected", [
    ("[1, 2]", "config is a JSON array; expected a JSON object"),
    ('"bert"', "config is a JSON string"),
    ("null", "config is a JSON null"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ('{"vocab_size": ' + "9" * 5000 + "}", "not usable JSON"),
])
def test_config_json_that_is_not_an_object_or_nested_too_deep_is_refused(tmp_path, text, expected):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(BertkitError, match=rf"config.json: {expected}"):
        BertConfig.load(tmp_path)


def test_config_json_that_is_huge_not_utf8_or_a_folder_is_refused(tmp_path):
    (tmp_path / "big").mkdir()
    with open(tmp_path / "big" / "config.json", "wb") as f:
        f.truncate(17 << 20)
    with pytest.raises(BertkitError, match=r"big/config.json: 17,825,792 bytes; expected a BERT config.json of at most"):
        BertConfig.load(tmp_path / "big")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "config.json").write_bytes(b'{"hidden_act": "g\xe9lu"}')
    with pytest.raises(BertkitError, match=r"latin1/config.json: not UTF-8 text"):
        BertConfig.load(tmp_path / "latin1")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "config.json").mkdir()
    with pytest.raises(BertkitError, match=r"dir/config.json: not a file"):
        BertConfig.load(tmp_path / "dir")


def test_a_json_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A process killed while rewriting metrics.json (after every epoch) or a run config left it cut short."""
    from bertkit.config import write_json

    path = tmp_path / "metrics.json"
    write_json(path, {"epochs": [1]})
    write_text = Path.write_text

    def killed(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt  # the process dies halfway through the write

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"epochs": [1, 2, 3]})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"epochs": [1]} and [p.name for p in tmp_path.iterdir()] == [path.name]
