"""Inputs longer than 512: windowed attention with global tokens (bertkit.model.LocalWindows) against attention
with the same pattern written as one dense mask, and `bertkit extend` (more positions, copied or interpolated)."""

import json
import pytest
import torch
import torch.nn.functional as F

from bertkit import BertConfig, Tokenizer
from bertkit.cli import main
from bertkit.errors import BertkitError
from bertkit.extend import ExtendConfig, extend, extend_positions
from bertkit.model import (BertForMaskedLM, BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification,
                           BertModel, LocalWindows)
from tests.tiny_folders import left_padded, save_tiny, tiny_config, varied


def dense_pattern(keep, global_mask, radius):
    """(B, T, T) bool: query i sees key j when j is a real token and |i - j| <= radius or either is global."""
    T = keep.shape[1]
    i = torch.arange(T)
    near = (i[:, None] - i[None]).abs() <= radius
    glob = global_mask & keep
    return (near[None] | glob[:, None, :] | glob[:, :, None]) & keep[:, None, :]


def dense_attention(q, k, v, keep, global_mask, radius):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_pattern(keep, global_mask, radius)[:, None])


def batch_with_padding(B=3, T=37):
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 30:] = False
    keep[2, 5:] = False
    glob = torch.zeros(B, T, dtype=torch.bool)
    glob[:, 0] = True
    glob[0, 3:6] = True  # more global tokens in one example than in the others
    glob[1, 33] = True  # a global mark on padding is ignored
    return keep, glob


@pytest.mark.parametrize("radius", [1, 2, 4, 7, 12, 13, 16, 36, 40])  # blocks up to 12, one mask from 13
def test_windows_equal_the_dense_pattern(radius):
    torch.manual_seed(0)
    keep, glob = batch_with_padding()
    q, k, v = (torch.randn(3, 2, 37, 8, dtype=torch.float64) for _ in range(3))
    got = LocalWindows(keep, glob, radius).attend(q, k, v, 0.0)
    want = dense_attention(q, k, v, keep, glob, radius)
    real = keep[:, None, :, None]
    torch.testing.assert_close(got * real, want * real, rtol=0, atol=1e-12)
    assert torch.isfinite(got).all()  # padding rows too: no empty softmax row


def test_a_window_covering_the_input_is_full_attention():
    torch.manual_seed(1)
    keep, _ = batch_with_padding()
    q, k, v = (torch.randn(3, 2, 37, 8, dtype=torch.float64) for _ in range(3))
    got = LocalWindows(keep, None, 36).attend(q, k, v, 0.0)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    real = keep[:, None, :, None]
    torch.testing.assert_close(got * real, want * real, rtol=0, atol=1e-12)


def test_gradients_match_the_dense_pattern():
    torch.manual_seed(2)
    keep, glob = batch_with_padding()
    inputs = [torch.randn(3, 2, 37, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    weight = torch.randn(3, 2, 37, 8, dtype=torch.float64) * keep[:, None, :, None]
    (LocalWindows(keep, glob, 5).attend(*inputs, 0.0) * weight).sum().backward()
    got = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    (dense_attention(*inputs, keep, glob, 5) * weight).sum().backward()
    for g, x in zip(got, inputs):
        torch.testing.assert_close(g, x.grad, rtol=0, atol=1e-12)


def test_memory_of_the_blocks_grows_linearly():
    """The masks the layers share are O(T * window), not O(T^2)."""
    sizes = []
    for T in (1024, 4096):
        w = LocalWindows(torch.ones(1, T, dtype=torch.bool), None, 64)
        sizes.append(w.block_mask.numel())
    assert sizes[1] == 4 * sizes[0]


class DenseWindows:
    """The windowed pattern as one dense (B, T, T) mask: the reference for the model-level tests."""

    def __init__(self, keep, global_mask, radius):
        if global_mask is None:
            global_mask = torch.zeros_like(keep)
            global_mask[:, 0] = True
        self.mask = dense_pattern(keep, global_mask.bool(), radius)[:, None]

    def attend(self, q, k, v, dropout_p):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def _inputs(B=3, T=40, vocab=100, seed=0):
    """B rows of T tokens, the second and third padded after 25 and 9, segment B from position 12."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1:2, 25:] = 0
    mask[2:3, 9:] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, 12:] = 1
    return ids, types, mask


@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification, BertForQuestionAnswering, BertForMaskedLM])
def test_windowed_models_equal_the_dense_reference(cls, monkeypatch):
    """Every head runs the windowed encoder (QA with the question as global tokens), padding included."""
    torch.manual_seed(0)
    model = varied(cls(tiny_config(attention_window=8, max_position_embeddings=64)).eval())
    ids, types, mask = _inputs()
    with torch.no_grad():
        got = model(ids, types, mask)
        monkeypatch.setattr("bertkit.model.LocalWindows", DenseWindows)
        want = model(ids, types, mask)
    names = {BertModel: ["last_hidden_state", "pooler_output"], BertForSequenceClassification: ["logits"],
             BertForQuestionAnswering: ["start_logits", "end_logits"], BertForMaskedLM: ["logits"]}[cls]
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
    full = type(model)(tiny_config(max_position_embeddings=64)).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(full(ids, types, mask)[names[0]], got[names[0]], atol=1e-4)  # the window matters


def test_an_example_gives_the_same_outputs_alone_and_in_a_padded_batch():
    torch.manual_seed(0)
    model = BertModel(tiny_config(attention_window=6, max_position_embeddings=64)).eval()
    ids, types, mask = _inputs()
    with torch.no_grad():
        batch = model(ids, types, mask).last_hidden_state
        for b in range(3):
            n = int(mask[b].sum())
            alone = model(ids[b:b + 1, :n], types[b:b + 1, :n]).last_hidden_state
            torch.testing.assert_close(batch[b:b + 1, :n], alone, rtol=1e-5, atol=1e-5)


def test_only_global_tokens_see_far_tokens_in_one_layer():
    """One block, window +-3: changing token 30 changes [CLS] (global) and tokens 27..33, and nothing else."""
    torch.manual_seed(0)
    model = BertModel(tiny_config(num_hidden_layers=1, attention_window=6, max_position_embeddings=64)).eval()
    ids, _, _ = _inputs(B=1)
    changed = ids.clone()
    changed[0, 30] = (ids[0, 30] + 1) % 100
    with torch.no_grad():
        a, b = model(ids).last_hidden_state[0], model(changed).last_hidden_state[0]
    moved = ((a - b).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
    assert moved == [0, 27, 28, 29, 30, 31, 32, 33]
    # a token marked global sees the change too
    glob = torch.zeros_like(ids, dtype=torch.bool)
    glob[0, [0, 5]] = True
    with torch.no_grad():
        a = model(ids, global_attention_mask=glob).last_hidden_state[0]
        b = model(changed, global_attention_mask=glob).last_hidden_state[0]
    assert ((a - b).abs().amax(-1) > 1e-6).nonzero().flatten().tolist() == [0, 5, 27, 28, 29, 30, 31, 32, 33]


def test_window_masks_are_built_on_the_inputs_device(monkeypatch):
    """Without an attention mask the windows were built from a mask made on the CPU: a windowed model on CUDA
    called as model(input_ids) failed with a device mismatch. The meta device stands in for CUDA here (its
    tensors cannot be read, so the masks are only looked at, not built)."""
    seen = []

    class Seen(Exception):
        pass

    class Spy:
        def __init__(self, keep, global_mask, radius):
            seen.append(keep.device)
            raise Seen  # stop before the masks are computed

    monkeypatch.setattr("bertkit.model.LocalWindows", Spy)
    model = BertModel(tiny_config(attention_window=8, max_position_embeddings=64)).to("meta").eval()
    with torch.no_grad(), pytest.raises(Seen):
        model(torch.zeros(2, 40, dtype=torch.long, device="meta"))
    assert seen == [torch.device("meta")]


def test_windowed_training_step_runs_with_dropout():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(attention_window=8, max_position_embeddings=64)).train()
    ids, types, mask = _inputs()
    out = model(ids, types, mask, labels=torch.tensor([0, 1, 0]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_config_checks_the_window():
    with pytest.raises(BertkitError, match="even number"):
        tiny_config(attention_window=7)
    with pytest.raises(BertkitError, match="is_decoder"):
        tiny_config(attention_window=8, is_decoder=True)
    config = tiny_config(attention_window=8, position_extension={"method": "copy", "from": 512, "to": 4096})
    back = BertConfig.from_dict(config.to_dict())
    assert back.attention_window == 8 and back.position_extension["to"] == 4096
    assert "attention_window" not in tiny_config().to_dict()  # an ordinary BERT's config.json is as before


# ---------------------------------------------------------------------------------------------------------------
# bertkit extend


def test_extend_positions():
    table = torch.randn(8, 4)
    copied = extend_positions(table, 20, "copy")
    assert torch.equal(copied[:8], table) and torch.equal(copied[8:16], table) and torch.equal(copied[16:], table[:4])
    stretched = extend_positions(table, 15, "interpolate")  # p * 7 / 14: every other row is a trained one
    assert torch.allclose(stretched[::2], table) and torch.allclose(stretched[1], (table[0] + table[1]) / 2)


@pytest.mark.parametrize("window", [0, 64])
def test_copy_keeps_the_outputs_of_short_inputs(tmp_path, window):
    source = save_tiny(tmp_path / "model")  # 128 positions
    done = extend(ExtendConfig(model_dir=source, out=str(tmp_path / "long"), max_length=512, attention_window=window))
    assert done["to"] == 512
    before = BertForSequenceClassification.from_pretrained(source).eval()
    after = BertForSequenceClassification.from_pretrained(tmp_path / "long").eval()
    assert after.config.max_position_embeddings == 512 and after.config.attention_window == window
    assert after.config.position_extension == {"method": "copy", "from": 128, "to": 512}
    ids, types, mask = _inputs(T=30, vocab=before.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(after(ids, types, mask).logits, before(ids, types, mask).logits, rtol=0, atol=0)
        long_ids = torch.randint(5, before.config.vocab_size, (2, 400))
        assert torch.isfinite(after(long_ids).logits).all()
    assert json.loads((tmp_path / "long" / "tokenizer_config.json").read_text())["model_max_length"] == 512


def test_interpolation_changes_short_inputs_but_keeps_the_ends(tmp_path):
    source = save_tiny(tmp_path / "model")
    extend(ExtendConfig(model_dir=source, out=str(tmp_path / "long"), max_length=255, method="interpolate",
                        attention_window=0))
    before = BertForSequenceClassification.from_pretrained(source)
    after = BertForSequenceClassification.from_pretrained(tmp_path / "long")
    old = before.bert.embeddings.position_embeddings.weight
    new = after.bert.embeddings.position_embeddings.weight
    torch.testing.assert_close(new[::2], old)  # 127 / 254: every other new position is a trained one


def test_transformers_loads_an_extended_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = save_tiny(tmp_path / "model")
    extend(ExtendConfig(model_dir=source, out=str(tmp_path / "long"), max_length=512, attention_window=0))
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "long").eval()
    ours = BertForSequenceClassification.from_pretrained(tmp_path / "long").eval()
    ids = torch.randint(5, ours.config.vocab_size, (2, 300))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls, num_labels", [(BertForPreTraining, 2), (BertForSequenceClassification, 3),
                                             (BertForQuestionAnswering, 2)])
def test_extend_keeps_the_heads_of_an_nvidia_folder(tmp_path, cls, num_labels):
    """NVIDIA's bert_config.json names no architecture: the folder was extended as a bare BertModel, its pretraining,
    classifier or QA head dropped without a word (`perplexity` then found no masked-LM head)."""
    from bertkit.tf_checkpoint import save_nvidia

    source = save_tiny(tmp_path / "model", cls=cls, num_labels=num_labels)
    model = cls.from_pretrained(source)
    save_nvidia(model, tmp_path / "nvidia", tokenizer=Tokenizer.from_pretrained(source))
    done = extend(ExtendConfig(model_dir=str(tmp_path / "nvidia"), out=str(tmp_path / "long"), max_length=256,
                               attention_window=0))
    assert done["architecture"] == cls.__name__
    after = cls.from_pretrained(tmp_path / "long")  # a head missing from the folder would be newly initialised
    assert after.config.num_labels == num_labels
    before, extended = model.state_dict(), after.state_dict()
    for key, value in before.items():
        if not key.endswith("position_embeddings.weight"):
            assert torch.equal(extended[key], value), key


def test_extend_refuses_bad_requests(tmp_path, monkeypatch):
    source = save_tiny(tmp_path / "model")
    with pytest.raises(BertkitError, match="expected more than the model's 128 positions"):
        extend(ExtendConfig(model_dir=source, out=str(tmp_path / "a"), max_length=128))
    with pytest.raises(BertkitError, match="inside the model folder|is the model folder"):
        extend(ExtendConfig(model_dir=source, out=source, max_length=512))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(BertkitError, match="--overwrite"):
        extend(ExtendConfig(model_dir=source, out=str(tmp_path / "full"), max_length=512))
    with pytest.raises(BertkitError, match="even number"):
        extend(ExtendConfig(model_dir=source, out=str(tmp_path / "b"), max_length=512, attention_window=7))
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    # a length whose table is past any BERT's size is refused as config.json would be, not allocated (128 GB here)
    def allocate(*args):
        raise AssertionError("the position table was allocated before the length was checked")

    monkeypatch.setattr("bertkit.extend.extend_positions", allocate)
    with pytest.raises(BertkitError, match="--max-length 1000000000: .* expected at most 10B"):
        extend(ExtendConfig(model_dir=source, out=str(tmp_path / "c"), max_length=10**9))


def test_extend_help_says_which_inputs_keep_their_outputs(capsys):
    """--help said inputs of up to 512 tokens keep their outputs; with the default window of 512 only those of up
    to 257 do: a 400-token input of all-MiniLM-L6-v2 changes by 0.86 in its hidden states."""
    with pytest.raises(SystemExit):
        main(["extend", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "keep their outputs with --attention-window 0" in text and "257 at the default 512" in text


def test_extend_command(tmp_path, capsys):
    source = save_tiny(tmp_path / "model")
    assert main(["extend", source, "--out", str(tmp_path / "long"), "--max-length", "1024",
                 "--attention-window", "128"]) in (0, None)
    assert "128 -> 1024 positions by copy, attention window 128" in capsys.readouterr().out
    config = json.loads((tmp_path / "long" / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024 and config["attention_window"] == 128


def test_windowed_attention_equals_transformers_longformer():
    """Longformer with its global projections set to the local ones computes bertkit's windowed pattern: the same
    hidden states on the same weights, [CLS] or several tokens global, padding included."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tiny_config(attention_window=16, max_position_embeddings=128)
    ours = varied(BertModel(config).eval())
    theirs = transformers.LongformerModel(transformers.LongformerConfig(
        vocab_size=config.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        attention_window=16, max_position_embeddings=128, type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12,
        hidden_act="gelu")).eval()
    state = dict(ours.state_dict())
    for key in list(state):
        for name in ("query", "key", "value"):
            if f"self.{name}." in key:
                state[key.replace(f"self.{name}.", f"self.{name}_global.")] = state[key]
    theirs.load_state_dict(state, strict=False)
    ids, types, mask = _inputs(B=3, T=70)
    positions = torch.arange(70).expand(3, 70)  # Longformer counts positions from 2 unless given them
    for globals_ in ([0], [0, 3, 4, 40]):
        glob = torch.zeros_like(ids)
        glob[:, globals_] = 1
        with torch.no_grad():
            want = theirs(input_ids=ids, attention_mask=mask, global_attention_mask=glob, token_type_ids=types,
                          position_ids=positions).last_hidden_state
            got = ours(ids, types, mask, positions, global_attention_mask=glob.bool()).last_hidden_state
        real = mask[..., None].bool()
        torch.testing.assert_close(got * real, want * real, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_length, window, said", [
    (200, 400, "reaches every one of the 200 positions: attention stays full"),
    (1024, 256, "wider than the 128 trained positions: with --method copy, tokens 128 apart in one window share"),
    (1024, 128, None),
    (1024, 0, None),
])
def test_extend_warns_of_a_window_that_saves_nothing_or_aliases_positions(tmp_path, caplog, max_length, window, said):
    source = save_tiny(tmp_path / "model")  # 128 positions
    with caplog.at_level("WARNING", logger="bertkit"):
        extend(ExtendConfig(model_dir=source, out=str(tmp_path / "long"), max_length=max_length,
                            attention_window=window))
    if said is None:
        assert "attention-window" not in caplog.text
    else:
        assert said in caplog.text


def test_cls_is_global_where_left_padding_puts_it():
    """Without global_attention_mask the global token is [CLS], the first real token: with padding on the left it is
    not position 0, and a left-padded row gives what it gives alone."""
    torch.manual_seed(0)
    config = tiny_config(attention_window=4, max_position_embeddings=64)
    model = varied(BertForSequenceClassification(config).eval())
    ids, _, _ = _inputs(B=2, T=30)
    mask, positions = left_padded(ids, {1: 8})
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
        alone = model(ids[1:, 8:]).logits
    torch.testing.assert_close(batch[1], alone[0], rtol=1e-5, atol=1e-5)
