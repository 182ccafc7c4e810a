import json

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
    with pytest.raises(BertkitError, match="no config.json"):
        BertConfig.load(tmp_path / "nowhere")
