"""Google's TensorFlow checkpoints without TensorFlow: the LevelDB table and tensor bundle read and written, bad
files refused in one line, and (only where TensorFlow is installed) TensorFlow's own reader and writer as the
reference."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from bertkit import tf_checkpoint as tfc
from bertkit.errors import BertkitError


def _crc_by_bytes(data: bytes) -> int:
    return tfc._advance(0xFFFFFFFF, data) ^ 0xFFFFFFFF


@pytest.mark.parametrize("n", [0, 1, 7, 4095, 4096, 4097, 65536 + 3, 1 << 20, (1 << 20) + 4096 * 3 + 5])
def test_crc32c_of_numpy_lanes_is_the_byte_by_byte_crc(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    assert tfc.crc32c(data) == _crc_by_bytes(data.tobytes())


def test_crc32c_check_value_and_leveldb_mask():
    assert tfc.crc32c(b"123456789") == 0xE3069283  # the published CRC-32C check value
    assert tfc.mask(0) == 0xA282EAD8


def _entries(n: int) -> list[tuple[bytes, bytes]]:
    """Sorted keys sharing long prefixes (as variable names do), with values of varied length."""
    keys = sorted(f"bert/encoder/layer_{i}/attention/self/{part}/kernel".encode()
                  for i in range(n // 4) for part in ("query", "key", "value", "output"))
    return [(b"", b"header")] + [(k, bytes([i % 251]) * (i % 37)) for i, k in enumerate(keys)]


def _index_block(path) -> list[tuple[bytes, bytes]]:
    data = path.read_bytes()
    footer = data[-48:]
    _, pos = tfc._varint(footer, 0, 40, "")
    _, pos = tfc._varint(footer, pos, 40, "")
    offset, pos = tfc._varint(footer, pos, 40, "")
    size, _ = tfc._varint(footer, pos, 40, "")
    return tfc._block_entries(data[offset:offset + size], path, "index")


def test_a_table_of_several_blocks_with_prefix_compressed_keys_and_restarts_reads_back(tmp_path):
    entries = _entries(400)
    path = tmp_path / "t.index"
    tfc.write_table(path, entries, block_size=1024)
    blocks = _index_block(path)
    assert len(blocks) >= 10  # several data blocks
    offset, pos = tfc._varint(blocks[0][1], 0, 20, "")
    size, _ = tfc._varint(blocks[0][1], pos, 20, "")
    first = path.read_bytes()[offset:offset + size]
    assert int.from_bytes(first[-4:], "little") >= 2  # restart points inside a block
    # prefix compression: the keys take about half of what they would written out whole
    values = sum(len(v) for _, v in entries)
    assert path.stat().st_size - values < 0.6 * sum(len(k) for k, _ in entries)
    assert tfc.read_table(path) == entries


def test_a_bundle_of_every_supported_dtype_reads_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "a/float32": rng.standard_normal((3, 5)).astype(np.float32),
        "a/float16": rng.standard_normal((4,)).astype(np.float16),
        "b/int64": np.array(1234567890123, dtype=np.int64),
        "b/int32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "c/empty": np.zeros((0, 4), np.float32),
    }
    bf16 = torch.randn(7, 2).to(torch.bfloat16)
    tfc.write_checkpoint(tmp_path / "m.ckpt", {**arrays, "a/bfloat16": bf16}, block_size=64)
    got = tfc.read_arrays(tmp_path / "m.ckpt")
    for name, value in arrays.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        assert np.array_equal(got[name], value)
    assert torch.equal(torch.from_numpy(got["a/bfloat16"].view(np.int16)).view(torch.bfloat16), bf16)
    shards, entries = tfc.read_index(tmp_path / "m.ckpt.index")
    assert shards == 1 and entries["a/bfloat16"].dtype == 14 and entries["b/int64"].shape == ()


@pytest.fixture
def small_ckpt(tmp_path):
    arrays = {f"bert/v{i}": np.full((10, 10), i, np.float32) for i in range(40)}
    tfc.write_checkpoint(tmp_path / "m.ckpt", arrays, block_size=256)
    return tmp_path / "m.ckpt"


def _index(prefix):
    return prefix.parent / f"{prefix.name}.index"


def _data(prefix):
    return prefix.parent / f"{prefix.name}.data-00000-of-00001"


@pytest.mark.parametrize("cut", [0, 10, 47, 100, -1, -49])
def test_a_truncated_index_is_one_line_naming_it(small_ckpt, cut):
    index = _index(small_ckpt)
    index.write_bytes(index.read_bytes()[:cut])
    with pytest.raises(BertkitError, match=rf"^{index}: .*expected a TensorFlow checkpoint") as e:
        tfc.read_arrays(small_ckpt)
    assert "\n" not in str(e.value)


def test_an_index_with_another_magic_number_is_not_a_checkpoint(small_ckpt):
    index = _index(small_ckpt)
    index.write_bytes(index.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BertkitError, match="no table magic number at its end"):
        tfc.read_arrays(small_ckpt)


def test_a_flipped_byte_in_an_index_block_fails_its_checksum(small_ckpt):
    index = _index(small_ckpt)
    data = bytearray(index.read_bytes())
    data[30] ^= 0x40
    index.write_bytes(bytes(data))
    with pytest.raises(BertkitError, match=r"data block 0 at byte 0 does not match its checksum \(corrupted\)"):
        tfc.read_arrays(small_ckpt)


def test_a_snappy_block_is_refused_by_name(tmp_path):
    path = tmp_path / "t.index"
    tfc.write_table(path, _entries(8))
    data = bytearray(path.read_bytes())
    size = len(tfc._build_block(_entries(8), 16))
    data[size] = 1  # the compression byte of the first data block, then its checksum made right again
    data[size + 1:size + 5] = struct.pack("<I", tfc.mask(tfc.crc32c(bytes(data[:size + 1]))))
    path.write_bytes(bytes(data))
    with pytest.raises(BertkitError, match="data block 0 at byte 0 is snappy-compressed; expected uncompressed"):
        tfc.read_table(path)


def test_a_truncated_or_damaged_data_file_is_named(small_ckpt):
    data = _data(small_ckpt)
    original = data.read_bytes()
    data.write_bytes(original[:-10])
    with pytest.raises(BertkitError, match=rf"^{data}: 15,990 bytes, but bert/v9 is at bytes 15,600-16,000 "
                                          r"\(truncated\?\)"):
        tfc.read_arrays(small_ckpt)
    damaged = bytearray(original)
    damaged[401] ^= 1
    data.write_bytes(bytes(damaged))
    with pytest.raises(BertkitError, match=rf"^{data}: bert/v1's bytes do not match the checksum in m.ckpt.index"):
        tfc.read_arrays(small_ckpt)
    data.unlink()
    with pytest.raises(BertkitError, match=rf"^{data}: not found; expected the data file that m.ckpt.index names"):
        tfc.read_arrays(small_ckpt)


def test_blocks_damaged_behind_a_valid_checksum_are_one_line_errors(small_ckpt):
    """Bytes changed inside a block whose checksum is then made right again (what a buggy writer, not a bad disk,
    would leave): whatever the table or protobuf parsing meets is a BertkitError, never another exception."""
    import random

    index = _index(small_ckpt)
    original = index.read_bytes()
    blocks = [_handle(h) for _, h in _index_block(index)]
    rng = random.Random(0)
    for _ in range(300):
        data = bytearray(original)
        offset, size = rng.choice(blocks)
        for _ in range(rng.randint(1, 3)):
            data[offset + rng.randrange(size)] = rng.randrange(256)
        checksum = tfc.mask(tfc.crc32c(bytes(data[offset:offset + size + 1])))
        data[offset + size + 1:offset + size + 5] = struct.pack("<I", checksum)
        index.write_bytes(bytes(data))
        try:
            tfc.read_arrays(small_ckpt)
        except BertkitError as e:
            assert "\n" not in str(e)


def _handle(value: bytes) -> tuple[int, int]:
    offset, pos = tfc._varint(value, 0, len(value), "")
    return offset, tfc._varint(value, pos, len(value), "")[0]


def _bundle(tmp_path, entry: bytes, shards: int = 1):
    """A checkpoint whose one entry is `entry` (a BundleEntryProto's bytes), with `shards` data files of 8 bytes."""
    header = tfc._field(1, shards) + tfc._field(3, tfc._field(1, 1))
    tfc.write_table(tmp_path / "x.ckpt.index", [(b"", header), (b"v", entry)])
    for shard in range(shards):
        (tmp_path / f"x.ckpt.data-{shard:05d}-of-{shards:05d}").write_bytes(bytes(8))
    return tmp_path / "x.ckpt"


def _entry(dtype: int, dims: tuple, size: int, shard: int = 0, crc: int = 0) -> bytes:
    shape = b"".join(tfc._field(2, tfc._field(1, d)) for d in dims)
    return (tfc._field(1, dtype) + tfc._field(2, shape) + tfc._field(3, shard) + tfc._field(5, size)
            + tfc._put_varint(6 << 3 | 5) + struct.pack("<I", crc))


@pytest.mark.parametrize("dtype, name", [(7, "string"), (10, "bool"), (8, "complex64"), (20, "resource")])
def test_a_dtype_bertkit_cannot_load_is_named(tmp_path, dtype, name):
    prefix = _bundle(tmp_path, _entry(dtype, (2,), 8))
    with pytest.raises(BertkitError, match=rf"x.ckpt.index: v has dtype {name}; expected float32, float16, bfloat16 "
                                           "or an integer type"):
        tfc.read_arrays(prefix)


def test_entries_that_disagree_with_their_shape_or_shards_are_named(tmp_path):
    with pytest.raises(BertkitError, match=r"v is 8 bytes for shape \(3,\) of float32; expected 12"):
        tfc.read_arrays(_bundle(tmp_path, _entry(1, (3,), 8)))
    with pytest.raises(BertkitError, match="v is in shard 2; expected one of the header's 1 shards"):
        tfc.read_arrays(_bundle(tmp_path, _entry(1, (2,), 8, shard=2)))


def test_a_tensor_in_the_second_of_two_shards_is_read_from_it(tmp_path):
    value = np.array([1.5, -2.0], np.float32)
    prefix = _bundle(tmp_path, _entry(1, (2,), 8, shard=1, crc=tfc.mask(tfc.crc32c(value.tobytes()))), shards=2)
    (tmp_path / "x.ckpt.data-00001-of-00002").write_bytes(value.tobytes())
    assert np.array_equal(tfc.read_arrays(prefix)["v"], value)
    (tmp_path / "x.ckpt.data-00001-of-00002").unlink()
    with pytest.raises(BertkitError, match=r"x.ckpt.data-00001-of-00002: not found; .*\(shard 2 of 2\)"):
        tfc.read_arrays(prefix)


def test_a_big_endian_bundle_is_refused(tmp_path):
    header = tfc._field(1, 1) + tfc._field(2, 1)
    tfc.write_table(tmp_path / "x.ckpt.index", [(b"", header)])
    with pytest.raises(BertkitError, match="written big-endian; expected a little-endian checkpoint"):
        tfc.read_index(tmp_path / "x.ckpt.index")


# ---- TensorFlow itself as the reference (skipped where it is not installed: it is no dependency of bertkit) -------


def test_tensorflow_reads_what_bertkit_writes_and_bertkit_reads_what_tensorflow_writes(tmp_path):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(1)
    # enough variables, with long shared prefixes, for TensorFlow's index to need prefix compression and restarts
    arrays = {f"bert/encoder/layer_{i}/attention/self/query/kernel": rng.standard_normal((8, 4)).astype(np.float32)
              for i in range(40)}
    arrays["cls/predictions/output_bias"] = rng.standard_normal(30).astype(np.float16)
    arrays["global_step"] = np.array(77, np.int64)
    bf16 = torch.randn(3, 3).to(torch.bfloat16)

    (tmp_path / "ours").mkdir()
    tfc.write_checkpoint(tmp_path / "ours" / "bert_model.ckpt", {**arrays, "b16": bf16}, block_size=512)
    reader = tf.train.load_checkpoint(str(tmp_path / "ours" / "bert_model.ckpt"))
    assert set(reader.get_variable_to_shape_map()) == set(arrays) | {"b16"}
    for name, value in arrays.items():
        got = reader.get_tensor(name)  # TensorFlow checks each tensor's CRC as it reads it
        assert got.dtype == value.dtype and np.array_equal(got, value)
    assert np.array_equal(np.asarray(reader.get_tensor("b16"), np.float32), bf16.float().numpy())

    graph = tf.Graph()
    with graph.as_default():
        variables = [tf.compat.v1.get_variable(name, initializer=value) for name, value in arrays.items()]
        variables.append(tf.compat.v1.get_variable("b16", initializer=tf.constant(bf16.float().numpy(), tf.bfloat16)))
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(tmp_path / "theirs" / "bert_model.ckpt"))
    got = tfc.read_arrays(tmp_path / "theirs" / "bert_model.ckpt")
    for name, value in arrays.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value)
    assert torch.equal(torch.from_numpy(got["b16"].view(np.int16)).view(torch.bfloat16), bf16)


def test_an_index_tensorflow_writes_in_several_blocks_is_read_whole(tmp_path):
    """TensorFlow closes an index block past 256 KiB and keys the index block by shortened separators: 3,000
    names of 100 characters make two blocks."""
    tf = pytest.importorskip("tensorflow")
    names = [f"bert/{i * 7919:08d}/kernel_{'of_a_long_name_' * 6}{i}" for i in range(3000)]
    graph = tf.Graph()
    with graph.as_default():
        for i, name in enumerate(names):
            tf.compat.v1.get_variable(name, initializer=np.full(2, i, np.float32))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(tmp_path / "bert_model.ckpt"))
    assert len(_index_block(tmp_path / "bert_model.ckpt.index")) >= 2
    got = tfc.read_arrays(tmp_path / "bert_model.ckpt")
    assert set(got) == set(names) and all(np.array_equal(got[n], np.full(2, i, np.float32)) for i, n in enumerate(names))


# ---- Google's folders: bert_config.json, vocab.txt, bert_model.ckpt -------------------------------------------------


def _google_names(layers: int) -> set[str]:
    """The variables Google's modeling.py and run_pretraining.py create for BertForPreTraining, written out here
    rather than derived from bertkit's mapping, which they check."""
    names = {"bert/embeddings/word_embeddings", "bert/embeddings/token_type_embeddings",
             "bert/embeddings/position_embeddings", "bert/embeddings/LayerNorm/gamma", "bert/embeddings/LayerNorm/beta",
             "bert/pooler/dense/kernel", "bert/pooler/dense/bias",
             "cls/predictions/transform/dense/kernel", "cls/predictions/transform/dense/bias",
             "cls/predictions/transform/LayerNorm/gamma", "cls/predictions/transform/LayerNorm/beta",
             "cls/predictions/output_bias", "cls/seq_relationship/output_weights", "cls/seq_relationship/output_bias"}
    for i in range(layers):
        layer = f"bert/encoder/layer_{i}"
        for dense in ("attention/self/query", "attention/self/key", "attention/self/value", "attention/output/dense",
                      "intermediate/dense", "output/dense"):
            names |= {f"{layer}/{dense}/kernel", f"{layer}/{dense}/bias"}
        for norm in ("attention/output/LayerNorm", "output/LayerNorm"):
            names |= {f"{layer}/{norm}/gamma", f"{layer}/{norm}/beta"}
    return names


def _tiny(cls, **overrides):
    from tiny_folders import tiny_config

    torch.manual_seed(0)
    model = cls(tiny_config(**{"vocab_size": 60, **overrides})).eval()
    with torch.no_grad():  # every parameter distinct from its initial value, biases and LayerNorms included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _batch(vocab_size: int):
    torch.manual_seed(1)
    ids = torch.randint(5, vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "token_type_ids": (torch.arange(9) > 4).long().expand(3, 9), "attention_mask": mask}


def test_google_names_are_the_ones_googles_code_creates_and_the_kernels_are_transposed(tmp_path):
    from bertkit import BertForPreTraining

    model = _tiny(BertForPreTraining)
    tfc.save_google(model, tmp_path)
    arrays = tfc.read_arrays(tmp_path / "bert_model.ckpt")
    assert set(arrays) == _google_names(2)
    state = model.state_dict()
    q = state["bert.encoder.layer.1.attention.self.query.weight"]
    assert np.array_equal(arrays["bert/encoder/layer_1/attention/self/query/kernel"], q.T.numpy())  # [in, out]
    nsp = state["cls.seq_relationship.weight"]
    assert np.array_equal(arrays["cls/seq_relationship/output_weights"], nsp.numpy())  # [2, H], as it is
    import json

    config = json.loads((tmp_path / "bert_config.json").read_text())
    assert config == {"attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                      "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
                      "max_position_embeddings": 512, "num_attention_heads": 2, "num_hidden_layers": 2,
                      "type_vocab_size": 2, "vocab_size": 60}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_written_in_float32_as_googles_variables_are(tmp_path, dtype):
    from bertkit import BertModel

    model = _tiny(BertModel).to(dtype)
    tfc.save_google(model, tmp_path)
    arrays = tfc.read_arrays(tmp_path / "bert_model.ckpt")
    assert {a.dtype for a in arrays.values()} == {np.dtype(np.float32)}
    embeddings = model.state_dict()["embeddings.word_embeddings.weight"].float().numpy()
    assert np.array_equal(arrays["bert/embeddings/word_embeddings"], embeddings)


@pytest.mark.parametrize("name, kwargs, architecture, output", [
    ("BertForPreTraining", {}, "BertForPreTraining", "prediction_logits"),
    ("BertForMaskedLM", {}, "BertForMaskedLM", "logits"),
    ("BertForSequenceClassification", {"num_labels": 3}, "BertForSequenceClassification", "logits"),
    ("BertForQuestionAnswering", {}, "BertForQuestionAnswering", "start_logits"),
    ("BertModel", {}, "BertModel", "last_hidden_state"),
])
def test_a_model_written_as_google_reads_back_with_identical_weights_and_outputs(tmp_path, name, kwargs,
                                                                                   architecture, output):
    from bertkit import BertConfig
    from bertkit.model import MODEL_CLASSES

    cls = MODEL_CLASSES[name]
    model = _tiny(cls, **kwargs)
    tfc.save_google(model, tmp_path, block_size=512)  # an index of several blocks
    assert len(_index_block(tmp_path / "bert_model.ckpt.index")) > 2
    config = BertConfig.load(tmp_path)
    assert config.extra["architectures"] == [architecture] and config.num_labels == kwargs.get("num_labels", 2)
    back = cls.from_pretrained(tmp_path).eval()
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    batch = _batch(60)
    with torch.no_grad():
        assert torch.equal(model(**batch)[output], back(**batch)[output])


def test_the_real_checkpoint_round_trips_exactly(minilm_dir, tmp_path):
    from bertkit import BertModel, Tokenizer

    model = BertModel.from_pretrained(minilm_dir).eval()
    tfc.save_google(model, tmp_path, Tokenizer.from_pretrained(minilm_dir))
    back = BertModel.from_pretrained(tmp_path).eval()
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert tokenizer.lowercase  # the uncased vocabulary, with no tokenizer_config.json to say so
    batch = tokenizer.encode_batch(["The cat sat on the mat.", "A longer sentence, with more words in it."],
                                   return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, back(**batch).last_hidden_state)


def test_optimizer_slots_and_global_step_are_skipped_and_unknown_variables_named(tmp_path, caplog):
    from bertkit import BertModel

    model = _tiny(BertModel)
    tfc.save_google(model, tmp_path)
    arrays = tfc.read_arrays(tmp_path / "bert_model.ckpt")
    arrays.update({f"{name}/adam_m": value for name, value in list(arrays.items())})
    arrays.update({"global_step": np.array(10, np.int64), "loss/some_extra": np.zeros(2, np.float32)})
    tfc.write_checkpoint(tmp_path / "bert_model.ckpt", arrays)
    back = BertModel.from_pretrained(tmp_path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert "not a variable of Google's BERT, skipped: loss/some_extra" in caplog.text


def _cased_vocab(directory, cased: bool):
    words = ["The", "Apple", "Paris", "London", "Word"] * 4 if cased else []
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(30)), *words, "the", "apple"]
    (directory / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")


@pytest.mark.parametrize("cased", [True, False])
def test_a_google_folders_casing_comes_from_its_vocabulary(tmp_path, cased):
    from bertkit import Tokenizer

    (tmp_path / "bert_config.json").write_text("{}")
    _cased_vocab(tmp_path, cased)
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert tokenizer.lowercase is not cased
    assert tokenizer.encode("Apple")["input_ids"][1] == tokenizer.backend.token_to_id("Apple" if cased else "apple")


def test_a_run_classifier_folder_names_its_labels_from_the_weights(tmp_path, capsys):
    from bertkit import BertForSequenceClassification
    from bertkit.cli import main

    tfc.save_google(_tiny(BertForSequenceClassification, num_labels=3), tmp_path)
    _cased_vocab(tmp_path, cased=False)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "BertForSequenceClassification" in out and "classifier" in out and "uncased" in out


def test_a_google_folder_whose_weights_disagree_with_bert_config_is_refused_before_loading(tmp_path, capsys):
    import json

    from bertkit import BertModel
    from bertkit.cli import main

    tfc.save_google(_tiny(BertModel), tmp_path)
    config = json.loads((tmp_path / "bert_config.json").read_text())
    (tmp_path / "bert_config.json").write_text(json.dumps({**config, "vocab_size": 50}))
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/bert_model.ckpt.index: does not fit BertModel: shape mismatch: " \
           "embeddings.word_embeddings.weight: checkpoint (60, 32) vs model (50, 32)" in err
    (tmp_path / "bert_config.json").write_text(json.dumps({**config, "num_attention_heads": 0}))
    assert main(["info", str(tmp_path)]) == 2
    assert "bert_config.json: num_attention_heads is 0; expected a positive integer" in capsys.readouterr().err


def test_a_folder_with_a_tf2_checkpoint_or_none_is_named(tmp_path, capsys):
    from bertkit.cli import main

    (tmp_path / "bert_config.json").write_text("{}")
    assert main(["info", str(tmp_path)]) == 2
    assert "no weights found (expected model.safetensors, pytorch_model.bin, Google's bert_model.ckpt.index or " \
        "NVIDIA's one .pt file)" in capsys.readouterr().err
    tfc.write_checkpoint(tmp_path / "bert_model.ckpt", {"model/layer_with_weights-0/embeddings": np.zeros(2, "f4")})
    assert main(["info", str(tmp_path)]) == 2
    assert "no bert/embeddings/word_embeddings (found model/layer_with_weights-0/embeddings)" \
        in capsys.readouterr().err


def test_a_run_classifier_output_folder_loads_the_checkpoint_its_checkpoint_file_names(tmp_path, capsys):
    """run_classifier.py leaves model.ckpt-0, model.ckpt-N, ... and TensorFlow's `checkpoint` file naming the last."""
    from bertkit import BertForSequenceClassification
    from bertkit.cli import main

    old, new = _tiny(BertForSequenceClassification), _tiny(BertForSequenceClassification, num_labels=3)
    for model, prefix in ((old, "model.ckpt-0"), (new, "model.ckpt-3668")):
        tfc.save_google(model, tmp_path / prefix)
        for path in (tmp_path / prefix).iterdir():
            target = path.name.replace("bert_model.ckpt", prefix)
            path.rename(tmp_path / target)
    assert main(["info", str(tmp_path)]) == 2
    assert "several checkpoints (model.ckpt-0.index, model.ckpt-3668.index) and no `checkpoint` file naming one" \
        in capsys.readouterr().err
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-3668"\n'
                                         'all_model_checkpoint_paths: "model.ckpt-0"\n'
                                         'all_model_checkpoint_paths: "model.ckpt-3668"\n')
    back = BertForSequenceClassification.from_pretrained(tmp_path)
    assert back.config.num_labels == 3 and torch.equal(back.classifier.weight, new.classifier.weight)


def test_finetune_starts_from_a_google_folder(tmp_path):
    from bertkit import BertModel
    from bertkit.tasks.finetune import FinetuneConfig, finetune

    google = tmp_path / "google"
    tfc.save_google(_tiny(BertModel), google)
    _cased_vocab(google, cased=False)
    rows = "".join(f"{text}\t{label}\n" for text, label in [("the apple", "a"), ("w1 w2", "b")] * 4)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows)
    record = finetune(FinetuneConfig(model_dir=str(google), task="custom", train_file=str(tmp_path / "train.tsv"),
                                     eval_file=str(tmp_path / "train.tsv"), out_dir=str(tmp_path / "run"), epochs=1,
                                     batch_size=4, max_length=16, threads=1))
    assert record and (tmp_path / "run" / "model.safetensors").is_file()


def test_tensorflow_and_bertkit_agree_on_a_google_bert_checkpoint(tmp_path):
    """TensorFlow's Saver writes Google's variables from known arrays (with Adam's slots and global_step, as
    run_pretraining.py leaves them): bertkit loads exactly those arrays. bertkit writes a model: TensorFlow reads
    exactly its arrays under the names Google's code creates."""
    tf = pytest.importorskip("tensorflow")
    from bertkit import BertForPreTraining

    model = _tiny(BertForPreTraining)
    expected = _google_names(2)
    rng = np.random.default_rng(2)
    shapes = {}
    for key, value in model.state_dict().items():
        name, transposed = tfc.google_name(key) or (None, False)
        if name is not None:
            shapes[name] = tuple(reversed(value.shape)) if transposed else tuple(value.shape)
    assert set(shapes) == expected
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    graph = tf.Graph()
    with graph.as_default():
        for name, value in arrays.items():
            tf.compat.v1.get_variable(name, initializer=value)
            tf.compat.v1.get_variable(f"{name}/adam_m", initializer=np.zeros_like(value))
            tf.compat.v1.get_variable(f"{name}/adam_v", initializer=np.zeros_like(value))
        tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(tmp_path / "theirs" / "bert_model.ckpt"))
    tfc.save_google(model, tmp_path / "config-source")  # bert_config.json for the tiny shapes
    config = (tmp_path / "config-source" / "bert_config.json").read_bytes()
    (tmp_path / "theirs" / "bert_config.json").write_bytes(config)
    loaded = BertForPreTraining.from_pretrained(tmp_path / "theirs").state_dict()
    for key in model.state_dict():
        mapped = tfc.google_name(key)
        if mapped is None:  # the decoder: the word embeddings, tied
            assert torch.equal(loaded[key], torch.from_numpy(arrays["bert/embeddings/word_embeddings"]))
            continue
        name, transposed = mapped
        assert torch.equal(loaded[key], torch.from_numpy(arrays[name].T.copy() if transposed else arrays[name])), key

    tfc.save_google(model, tmp_path / "ours")
    reader = tf.train.load_checkpoint(str(tmp_path / "ours" / "bert_model.ckpt"))
    assert set(reader.get_variable_to_shape_map()) == expected
    state = model.state_dict()
    for key, value in state.items():
        mapped = tfc.google_name(key)
        if mapped is not None:
            name, transposed = mapped
            want = value.T.numpy() if transposed else value.numpy()
            got = reader.get_tensor(name)
            assert got.dtype == np.float32 and np.array_equal(got, want), name


# ---- bertkit convert ------------------------------------------------------------------------------------------------


def test_convert_to_google_and_back_gives_a_folder_transformers_loads_with_the_same_outputs(minilm_dir, tmp_path,
                                                                                             capsys):
    from bertkit import BertModel, Tokenizer
    from bertkit.cli import main

    transformers = pytest.importorskip("transformers")
    google, hf = tmp_path / "google", tmp_path / "hf"
    assert main(["convert", str(minilm_dir), "--out", str(google), "--to", "google"]) == 0
    assert sorted(p.name for p in google.iterdir()) == ["bert_config.json", "bert_model.ckpt.data-00000-of-00001",
                                                       "bert_model.ckpt.index", "vocab.txt"]
    assert main(["convert", str(google), "--out", str(hf), "--to", "hf"]) == 0
    assert "wrote" in capsys.readouterr().out
    tokenizer = Tokenizer.from_pretrained(hf)
    assert tokenizer.lowercase
    batch = tokenizer.encode_batch(["The cat sat.", "A longer sentence, with more words in it."], return_tensors="pt")
    theirs = transformers.BertModel.from_pretrained(str(hf)).eval()
    ours = BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        want = ours(**batch).last_hidden_state
        real = batch["attention_mask"].bool()  # padding's rows hold nothing (bertkit skips them)
        assert torch.allclose(theirs(**batch).last_hidden_state[real], want[real], atol=1e-5)
        assert torch.equal(BertModel.from_pretrained(hf).eval()(**batch).last_hidden_state, want)


def test_convert_refuses_what_googles_layout_cannot_hold_and_a_folder_with_files(tmp_path, capsys):
    from bertkit import BertForTokenClassification, BertModel
    from bertkit.cli import main

    _tiny(BertForTokenClassification).save_pretrained(tmp_path / "ner")
    assert main(["convert", str(tmp_path / "ner"), "--out", str(tmp_path / "g"), "--to", "google"]) == 2
    assert "a BertForTokenClassification; Google's BERT code has no such head" in capsys.readouterr().err
    _tiny(BertModel, is_decoder=True).save_pretrained(tmp_path / "ltr")
    assert main(["convert", str(tmp_path / "ltr"), "--out", str(tmp_path / "g"), "--to", "google"]) == 2
    assert "is_decoder (a left-to-right model; Google's BERT attends both ways)" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("mine")
    _tiny(BertModel).save_pretrained(tmp_path / "enc")
    assert main(["convert", str(tmp_path / "enc"), "--out", str(tmp_path / "g"), "--to", "google"]) == 2
    assert "holds files; expected an empty or new folder (or --overwrite)" in capsys.readouterr().err


def test_a_model_through_every_layout_convert_writes_comes_back_bit_for_bit(minilm_dir, tmp_path):
    """hf -> google -> nvidia -> composer -> hf: each layout holds every weight exactly (transposed, padded, prefixed
    and tied copies undone on the way back) and the vocabulary with its casing."""
    from safetensors.torch import load_file

    from bertkit import BertForPreTraining, Tokenizer
    from bertkit.cli import main

    tokenizer = Tokenizer.from_pretrained(minilm_dir)
    source = tmp_path / "hf"
    _tiny(BertForPreTraining, vocab_size=tokenizer.vocab_size).save_pretrained(source, tokenizer=tokenizer)
    chain = [("google", "google"), ("nvidia", "nvidia"), ("composer", "composer"), ("hf", "back")]
    given = source
    for layout, name in chain:
        assert main(["convert", str(given), "--out", str(tmp_path / name), "--to", layout]) == 0
        given = tmp_path / name / "composer_checkpoint.pt" if layout == "composer" else tmp_path / name
    before, after = load_file(str(source / "model.safetensors")), load_file(str(given / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert (given / "vocab.txt").read_text() == (source / "vocab.txt").read_text()
    assert Tokenizer.from_pretrained(given).lowercase
    assert json.loads((given / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
