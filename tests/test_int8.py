"""int8 inference (bertkit.quantize.to_int8): close to float32, really quantized, unpadded path kept."""

import copy

import pytest
import torch
from torch import nn

from bertkit import BertForQuestionAnswering, BertForSequenceClassification, BertkitError, BertModel
from bertkit.model import BertSelfAttention
from bertkit.quantize import Int8Linear, has_vnni, int8_engine, to_int8
from conftest import data_path
from tiny_folders import save_tiny, tiny_config, varied


def tiny(cls=BertForSequenceClassification, **overrides):
    torch.manual_seed(0)
    config = tiny_config(99, **overrides)
    return varied(cls(config).eval())


def padded_batch(lengths, vocab=99, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), T), generator=g)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    types = torch.zeros_like(ids)
    types[:, T // 2:] = 1
    return {"input_ids": ids * mask, "token_type_ids": types * mask, "attention_mask": mask}


def test_int8_logits_within_tolerance_of_float32():
    model = tiny()
    batch = padded_batch([12, 7, 3, 12])
    with torch.no_grad():
        want = model(**batch).logits
        got = to_int8(copy.deepcopy(model))(**batch).logits
    scale = 1 + want.abs().max()
    assert (got - want).abs().max() <= 0.05 * scale
    assert not torch.equal(got, want)  # it did run in int8


def test_int8_replaces_every_linear_and_fuses_qkv():
    model = to_int8(tiny())
    float_linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert float_linears == []
    attentions = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    assert len(attentions) == 2
    for attention in attentions:
        assert isinstance(attention.qkv, Int8Linear) and attention.qkv.out_features == 3 * 32
        assert not hasattr(attention, "query")
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float32
    assert all(m.reduce_range == (not has_vnni()) for m in model.modules() if isinstance(m, Int8Linear))
    assert all(m.engine == int8_engine() for m in model.modules() if isinstance(m, Int8Linear))


def test_int8_engine_follows_the_cpu_and_both_engines_compute_the_same_sums(monkeypatch):
    """oneDNN (AMX's int8 tiles) where the CPU has AMX, the x86 default elsewhere; the same weights packed for each
    give the same outputs, whichever engine is global when they run."""
    import bertkit.quantize as Q

    reduce_range = not Q.has_vnni()  # this CPU's: 8-bit inputs saturate the AVX2 kernels' 16-bit sums
    monkeypatch.setattr(Q, "cpu_flags", lambda: "flags : fpu avx512f avx512_vnni amx_tile amx_int8 amx_bf16\n")
    assert Q.int8_engine() == "onednn" and Q.has_vnni()
    monkeypatch.setattr(Q, "cpu_flags", lambda: "flags : fpu avx2\n")
    assert Q.int8_engine() == "x86" and not Q.has_vnni()
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 96), torch.randn(40, 64)
    with torch.no_grad():
        onednn, x86 = (Int8Linear(linear, reduce_range=reduce_range, engine=e)(x) for e in ("onednn", "x86"))
        torch.testing.assert_close(onednn, x86, atol=1e-4, rtol=1e-4)
        assert (onednn - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


def test_int8_rows_are_the_same_alone_or_padded_in_a_batch():
    """The unpadded path is kept: padding changes nothing for a row but the activation ranges it shares (rows
    are quantized with one scale per call), so a row alone and in a padded batch agree within the int8 step."""
    model = to_int8(tiny())
    batch = padded_batch([10, 4, 7])
    with torch.no_grad():
        together = model(**batch).logits
        for i, n in enumerate([10, 4, 7]):
            alone = model(**{k: v[i:i + 1, :n] for k, v in batch.items()}).logits
            assert torch.allclose(alone, together[i:i + 1], atol=0.05 * (1 + together.abs().max()))


def test_int8_question_answering_masks_padding():
    model = to_int8(tiny(BertForQuestionAnswering))
    batch = padded_batch([9, 5])
    with torch.no_grad():
        out = model(**batch)
    lowest = torch.finfo(torch.float32).min
    assert (out.start_logits[1, 5:] == lowest).all() and (out.end_logits[1, 5:] == lowest).all()
    assert (out.start_logits[1, :5] > lowest).all()


def test_int8_keeps_an_untied_decoder_in_float32_and_an_int8_model_is_not_saved(tmp_path):
    """An untied masked-LM decoder is read for its weight, as the tied one (the embeddings) is: it stays float32.
    An int8 model's packed weights are not in its state dict, so saving it is refused instead of half-written."""
    from bertkit import BertForMaskedLM

    model = tiny(BertForMaskedLM, tie_word_embeddings=False)
    batch = padded_batch([8, 5])
    with torch.no_grad():
        want = model(**batch).logits
        quantized = to_int8(copy.deepcopy(model))
        got = quantized(**batch).logits
    assert type(quantized.cls.predictions.decoder) is nn.Linear
    real = batch["attention_mask"].bool()
    step = 0.05 if has_vnni() else 0.1  # inputs in 7 bits without VNNI: twice the quantization step
    assert (got[real] - want[real]).abs().max() <= step * (1 + want[real].abs().max())
    with pytest.raises(BertkitError, match="an int8 model cannot be saved"):
        quantized.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("layout", ["google", "nvidia"])
def test_an_int8_model_is_not_saved_in_google_or_nvidia_layout(tmp_path, layout):
    """save_google and save_nvidia wrote an int8 model's state dict, which has none of its linear layers: a
    checkpoint without the encoder's attention and feed-forward weights, refused only when loaded."""
    from bertkit.tf_checkpoint import save_google, save_nvidia

    save = {"google": save_google, "nvidia": save_nvidia}[layout]
    with pytest.raises(BertkitError, match="an int8 model cannot be saved"):
        save(to_int8(tiny()), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_int8_refuses_a_model_off_the_cpu():
    model = tiny().to("meta")
    with pytest.raises(BertkitError, match="int8 inference runs on the CPU; the model is on meta"):
        to_int8(model)


def test_int8_refuses_a_bfloat16_model_before_its_first_forward():
    """A bfloat16 model was quantized, then its first forward failed inside torch's int8 GEMM (a RuntimeError:
    "data type of input should be float")."""
    with pytest.raises(BertkitError, match="int8 quantizes a float32 model; the model holds bfloat16"):
        to_int8(tiny().to(torch.bfloat16))


def test_int8_minilm_sentence_embeddings_stay_close():
    """The real checkpoint on real sentences: mean-pooled embeddings (what all-MiniLM-L6-v2 is trained for) keep a
    cosine similarity with float32's above 0.98 for every sentence and above 0.99 on average where the CPU has VNNI
    (measured: 0.986 and 0.992). Without VNNI the inputs keep 7 bits (see bertkit.quantize) and the bounds are 0.93
    and 0.965 (measured on an AVX2-only EPYC: 0.943 and 0.972); one scale per matrix, PyTorch's default, gives 0.893
    and 0.935, below both."""
    from bertkit import Tokenizer

    directory = data_path("checkpoints", "all-MiniLM-L6-v2")
    lines = data_path("glue", "SST-2", "dev.tsv").read_text(encoding="utf-8").splitlines()[1:33]
    tokenizer = Tokenizer.from_pretrained(directory)
    batch = tokenizer.encode_batch([line.split("\t")[0] for line in lines], max_length=128, return_tensors="pt")
    model = BertModel.from_pretrained(directory).eval()
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def embed(m):
        with torch.no_grad():
            hidden = m(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).last_hidden_state
        return (hidden * mask).sum(1) / mask.sum(1)

    want = embed(model)
    got = embed(to_int8(model))
    cosine = torch.nn.functional.cosine_similarity(got, want)
    worst, mean = (0.98, 0.99) if has_vnni() else (0.93, 0.965)
    assert cosine.min() > worst and cosine.mean() > mean, (cosine.min(), cosine.mean())


def test_predict_and_evaluate_take_int8(tmp_path):
    """The Python API's int8=True gives the same labels as float32 on a model whose margins are wide."""
    from bertkit.tasks.evaluation import evaluate, predict

    directory = save_tiny(tmp_path / "model")
    texts = ["the movie was good", "an awful boring film", "it is not very fun", "great"]
    fp32 = predict(directory, texts)
    int8 = predict(directory, texts, int8=True)
    assert [r["text"] for r in int8] == texts
    for a, b in zip(fp32, int8):
        if abs(a["probability"] - 0.5) > 0.05:
            assert a["label"] == b["label"]
        assert abs(a["probability"] - b["probability"]) < 0.05
    (tmp_path / "dev.csv").write_text("sentence,label\n" + "".join(f"{t},{r['label']}\n" for t, r in zip(texts, fp32)))
    scores = evaluate(directory, task="custom", eval_file=str(tmp_path / "dev.csv"), int8=True)
    assert scores["accuracy"] >= 75.0
