import pytest
import torch

from bertkit import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertkitError,
    BertModel,
)
from bertkit.model import Kernels, Layout, flops_per_token, packs, set_dropout, set_kernels
from tiny_folders import left_padded


def tiny(**kw) -> BertConfig:
    return BertConfig(**{"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "max_position_embeddings": 64, **kw})


@pytest.mark.parametrize("preset, expected", [("base", 110e6), ("large", 335e6)])
def test_parameter_counts(preset, expected):
    with torch.device("meta"):  # no memory, no init: just the shapes
        n = BertModel(BertConfig.from_preset(preset)).num_parameters()
    assert abs(n - expected) / expected < 0.01, n


def test_removing_padding_changes_nothing():
    """A sequence alone and the same sequence inside a padded batch give the same states."""
    torch.manual_seed(0)
    model = BertModel(tiny()).eval()
    ids = torch.randint(5, 300, (3, 16))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for b, n in enumerate([16, 9, 4]):
            alone = model(ids[b : b + 1, :n])
            assert torch.allclose(batch.last_hidden_state[b, :n], alone.last_hidden_state[0], atol=1e-5)
            assert torch.allclose(batch.pooler_output[b], alone.pooler_output[0], atol=1e-5)
        assert batch.last_hidden_state[2, 4:].abs().max() == 0  # padding is not computed


def test_position_and_segment_ids_for_the_whole_batch_broadcast_over_a_padded_batch():
    """(1, T) position_ids and token_type_ids, as transformers takes them, with padding (the packed path)."""
    torch.manual_seed(0)
    model = BertModel(tiny()).eval()
    ids = torch.randint(5, 300, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    types = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        one = model(ids, types, mask, position_ids=torch.arange(6)[None]).last_hidden_state
        full = model(ids, types.expand(3, 6), mask, position_ids=torch.arange(6).expand(3, 6)).last_hidden_state
    assert torch.equal(one, full)


def test_masked_positions_pick_the_same_logits():
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny()).eval()
    ids = torch.randint(5, 300, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 1], labels[1, 5] = 7, 8, 9
    with torch.no_grad():
        full = model(ids, attention_mask=mask, labels=labels)
        sparse = model(ids, attention_mask=mask, labels=labels, masked_positions=labels != -100)
    assert sparse.prediction_logits.shape == (3, 300)
    assert torch.allclose(sparse.prediction_logits, full.prediction_logits[labels != -100], atol=1e-5)
    assert torch.allclose(sparse.loss, full.loss, atol=1e-6)


def test_decoder_is_tied_to_the_embeddings():
    model = BertForPreTraining(tiny())
    names = {n for n, _ in model.named_parameters()}
    assert "cls.predictions.decoder.weight" not in names  # one table, used twice
    ids = torch.randint(5, 300, (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_regression_head_with_one_label():
    model = BertForSequenceClassification(tiny(num_labels=1))
    out = model(torch.randint(5, 300, (3, 8)), labels=torch.tensor([0.5, 2.0, 4.5]))
    assert out.logits.shape == (3, 1) and out.loss.ndim == 0


@pytest.mark.parametrize("problem_type, num_labels", [("regression", 2), ("single_label_classification", 1)])
def test_a_classifier_refuses_a_problem_type_it_would_train_or_read_otherwise(problem_type, num_labels):
    """transformers' multi-output regression head is not bertkit's one-output regression, nor one softmax label a
    classifier: a folder that says so is refused, not served or trained with the wrong loss."""
    with pytest.raises(BertkitError, match=f"problem_type '{problem_type}' with num_labels {num_labels} is not"):
        BertForSequenceClassification(tiny(num_labels=num_labels, extra={"problem_type": problem_type}))
    for problem_type, num_labels in [("single_label_classification", 3), ("regression", 1),
                                     ("multi_label_classification", 3)]:
        model = BertForSequenceClassification(tiny(num_labels=num_labels, extra={"problem_type": problem_type}))
        assert model.multi_label == (problem_type == "multi_label_classification")


def test_init_matches_the_paper():
    torch.manual_seed(0)
    model = BertModel(BertConfig.from_preset("mini", vocab_size=5000))
    w = model.encoder.layer[0].intermediate.dense.weight
    assert abs(w.std().item() - 0.02) < 0.001 and model.encoder.layer[0].intermediate.dense.bias.abs().max() == 0
    assert model.embeddings.word_embeddings.weight[0].abs().max() == 0  # the [PAD] row


def test_flops_per_token_counts_the_dense_layers():
    c = BertConfig.from_preset("base")
    # 6 * non-embedding parameters is the usual rule of thumb; attention adds 12 * L * T * H
    dense_params = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert flops_per_token(c, 128) == 6 * dense_params + 3 * 12 * 4 * 128 * 768


def test_fused_qkv_cache_follows_weight_updates():
    torch.manual_seed(0)
    model = BertModel(tiny()).eval()
    ids = torch.randint(5, 300, (2, 8))
    with torch.no_grad():
        before = model(ids).last_hidden_state
        model.encoder.layer[0].attention.self.key.weight.mul_(2.0)  # an in-place update, as an optimizer makes
        after = model(ids).last_hidden_state
    fresh = BertModel(tiny()).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(before, after)
        assert torch.allclose(after, fresh(ids).last_hidden_state, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["fused", "for-loop"])
def test_fused_qkv_cache_follows_a_training_step_between_evaluations(optimizer):
    """Evaluate, train a step, evaluate: the second evaluation sees the new Q/K/V weights. torch's fused AdamW (what
    bertkit trains with) changes weights without bumping their versions, so a cache keyed on versions alone kept
    the first evaluation's Q/K/V for every later one."""
    torch.manual_seed(0)
    model = BertModel(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **({"fused": True} if optimizer == "fused" else {}))
    ids = torch.randint(5, 300, (2, 8))
    with torch.no_grad():
        model.eval()(ids)  # fills the cache
    model.train()(ids).last_hidden_state.square().mean().backward()
    opt.step()
    fresh = BertModel(tiny()).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).last_hidden_state, fresh(ids).last_hidden_state, atol=1e-6)


def test_fused_qkv_cache_of_a_frozen_layer_made_under_inference_mode_trains_after_it():
    """A frozen layer keeps its fused Q/K/V weight cached under autograd; one cached under torch.inference_mode is
    an inference tensor, which autograd refuses to save, so training after such an evaluation crashed."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny(num_labels=2))
    model.bert.encoder.layer[0].requires_grad_(False)  # the lower layer frozen, the upper one fine-tuned
    ids = torch.randint(5, 300, (2, 8))
    with torch.inference_mode():
        want = model.eval()(ids).logits
    loss = model(ids, labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert torch.equal(model(ids).logits.detach(), want)
    assert model.bert.encoder.layer[1].attention.self.query.weight.grad.abs().sum() > 0


def test_bf16_training_on_the_cpu_attends_in_fp32(monkeypatch):
    """Under bf16 autocast on the CPU, attention that will be differentiated runs in fp32 (PyTorch's CPU attention
    backward is 2-6x slower in bf16); inference keeps bf16. Either way the loss is the fp32 model's within bf16
    rounding, and training gets the same gradients."""
    import bertkit.model as M

    seen = []
    sdpa = M.F.scaled_dot_product_attention
    monkeypatch.setattr(M.F, "scaled_dot_product_attention",
                        lambda q, *args, **kw: seen.append(q.dtype) or sdpa(q, *args, **kw))
    torch.manual_seed(0)
    model = BertForPreTraining(tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ids = torch.randint(5, 300, (4, 16))
    mask = torch.ones_like(ids)
    mask[2:, 10:] = 0
    labels = torch.where(mask.bool() & (torch.rand(ids.shape) < 0.3), ids, -100)
    want = model(ids, attention_mask=mask, labels=labels).loss
    want.backward()
    want_grad = model.bert.encoder.layer[0].attention.self.query.weight.grad.clone()
    model.zero_grad()
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids, attention_mask=mask, labels=labels).loss
    got.backward()
    assert seen and set(seen) == {torch.float32}
    got_grad = model.bert.encoder.layer[0].attention.self.query.weight.grad
    assert abs(got.item() - want.item()) < 0.05
    assert torch.allclose(got_grad, want_grad, atol=0.05 * want_grad.abs().max())
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, attention_mask=mask)
    assert set(seen) == {torch.bfloat16}


@pytest.mark.slow
def test_compiled_blocks_match_eager_on_cpu():
    """--compile on CPU (slow: inductor compiles C++ for a minute on a small machine)."""
    from bertkit.model import compile_blocks

    torch.manual_seed(0)
    config = BertConfig.from_preset("tiny", vocab_size=500)
    eager = BertForPreTraining(config).eval()
    compiled = BertForPreTraining(config).eval()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    ids = torch.randint(5, 500, (4, 32))
    mask = torch.ones_like(ids)
    mask[2:, 20:] = 0
    labels = torch.where((torch.rand(ids.shape) < 0.2) & mask.bool(), ids, -100)
    labels[:, 1] = ids[:, 1]
    a = eager(ids, attention_mask=mask, labels=labels, masked_positions=labels != -100).loss
    b = compiled(ids, attention_mask=mask, labels=labels, masked_positions=labels != -100).loss
    assert abs(a.item() - b.item()) < 1e-5


def test_set_dropout_turns_every_dropout_off_and_keeps_the_config():
    config = BertConfig.from_preset("tiny", vocab_size=100)
    model = BertForPreTraining(config).train()
    ids = torch.randint(5, 100, (2, 12))
    a, b = model(ids).prediction_logits, model(ids).prediction_logits
    assert not torch.equal(a, b)  # dropout on: two passes differ
    set_dropout(model, 0.0)
    torch.testing.assert_close(model(ids).prediction_logits, model(ids).prediction_logits, rtol=0, atol=0)
    assert model.config.hidden_dropout_prob == 0.1 and model.config.attention_probs_dropout_prob == 0.1


def _pretraining_batch(seed: int = 0):
    """Four rows of lengths 20, 7, 20, 15 with masked-LM labels and NSP labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (4, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 15:] = 0
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.3) & mask.bool(), ids, -100)
    labels[:, 1] = ids[:, 1]
    return dict(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=torch.tensor([0, 1, 1, 0]),
                masked_positions=labels != -100)


def _loss_and_grads(model, batch, **kernels):
    set_kernels(model, **{**vars(Kernels()), **kernels})
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def varlen_reference(q, k, v, offsets, max_length, dropout_p, causal):
    """FlashAttention's varlen contract for the CPU, sequence by sequence, checking the offsets it is given: int32,
    from 0 to the last row, none longer than max_length (the kernel would leave such rows unwritten)."""
    assert offsets.dtype == torch.int32 and dropout_p == 0.0
    bounds = offsets.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0], bounds
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        assert 0 <= end - start <= max_length, (start, end, max_length)
        if end > start:
            qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # (nh, j, hs)
            y = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
            pieces.append(y.transpose(0, 1))
    return torch.cat(pieces)


@pytest.mark.parametrize("kernels", [dict(packing="never"), dict(packing="always"),
                                     dict(packing="always", pack_multiple=16),
                                     dict(packing="always", attention="varlen"),
                                     dict(packing="always", attention="varlen", pack_multiple=16),
                                     dict(packing="always", attention="varlen", pack_multiple=48)])
@pytest.mark.parametrize("is_decoder", [False, True])
def test_every_kernel_choice_gives_the_same_loss_and_gradients(kernels, is_decoder, monkeypatch):
    """Packed rows (attention on the re-padded batch, or varlen attention on the rows themselves; with or without
    filler rows up to a multiple) and the padded batch: the same loss and gradients in fp32. Varlen attention runs
    the kernel's contract written out for the CPU (the CUDA kernel itself: tests/test_cuda.py)."""
    import bertkit.model as M

    monkeypatch.setattr(M, "varlen_attention", varlen_reference)
    torch.manual_seed(0)
    model = BertForPreTraining(tiny(is_decoder=is_decoder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    batch = _pretraining_batch()
    loss, grads = _loss_and_grads(model, batch)
    other_loss, other_grads = _loss_and_grads(model, batch, **kernels)
    assert torch.allclose(loss, other_loss, atol=1e-6)
    assert grads.keys() == other_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], other_grads[name], atol=1e-6), name


def test_filler_rows_round_the_packed_count_up_and_varlen_offsets_keep_their_shape():
    """Lengths 5, 2, 8 of 8 positions: 15 real tokens, rounded up to 16 or 20 with padding positions in order; the
    offsets end with filler sequences of at most T rows, as many for every batch of the same multiple."""
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, 2:] = 0
    real = [0, 1, 2, 3, 4, 8, 9, 16, 17, 18, 19, 20, 21, 22, 23]
    for multiple, filler, offsets in [(8, [5], [0, 5, 7, 15, 16]), (20, [5, 6, 7, 10, 11], [0, 5, 7, 15, 20, 20, 20]),
                                      (64, list(range(5, 8)) + list(range(10, 16)), [0, 5, 7, 15, 23] + [24] * 7)]:
        layout = Layout(mask, 3, 8, width=4, kernels=Kernels(attention="varlen", pack_multiple=multiple))
        assert layout.indices.tolist() == real + filler
        assert layout.offsets.tolist() == offsets and layout.offsets.dtype == torch.int32
    mask[2, 3:] = 0  # other lengths, the same number of offsets
    assert len(Layout(mask, 3, 8, width=4, kernels=Kernels(attention="varlen", pack_multiple=20)).offsets) == 7
    assert Layout(mask, 3, 8, width=4, kernels=Kernels(attention="varlen")).offsets.tolist() == [0, 5, 7, 10]
    # varlen attention needs packed rows, and windowed attention keeps its own path
    assert Layout(mask, 3, 8, width=4, kernels=Kernels(attention="varlen", packing="never")).offsets is None
    assert Layout(mask, 3, 8, width=4, window=4, kernels=Kernels(attention="varlen")).offsets is None
    # filler rows are computed but not read: the padded output is zero at padding, bar the filler positions
    x = torch.arange(1.0, 17.0)[:, None]
    out = Layout(mask, 3, 8, width=4, kernels=Kernels(pack_multiple=8)).pad(x)
    assert out.shape == (3, 8, 1) and out[2, 3:].abs().sum() == 0


def test_static_compilation_of_packed_rows_with_filler_compiles_once_for_every_real_length():
    """Packed rows rounded up to a multiple keep one shape across batches of different real lengths: compiled for
    static shapes (about 15 s of C++ on a cold cache), never recompiled, the same outputs as eager."""
    import torch._dynamo

    from bertkit.model import compile_blocks

    torch.manual_seed(0)
    eager = BertModel(tiny()).eval()
    compiled = BertModel(tiny()).eval()
    compiled.load_state_dict(eager.state_dict())
    set_kernels(eager, packing="always", pack_multiple=32)
    compile_blocks(set_kernels(compiled, packing="always", pack_multiple=32), "static")
    ids = torch.randint(5, 300, (4, 24))
    # 70, 75 and 84 real tokens of 96 positions all round up to 96 rows; the second call recompiles once, as the
    # inference cache of the fused Q/K/V weights fills, and no call after it may
    for n, lengths in enumerate([(24, 20, 16, 10), (24, 20, 16, 10), (24, 24, 20, 7), (12, 24, 24, 24)]):
        mask = (torch.arange(24) < torch.tensor(lengths)[:, None]).long()
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=n > 1):
            want, got = (model(ids, attention_mask=mask).last_hidden_state for model in (eager, compiled))
        assert torch.allclose(want, got, atol=1e-5), lengths


def test_cpu_attention_rounds_a_packed_batch_up_to_whole_blocks_of_16():
    """On the CPU, packed rows are re-padded for attention to T rounded up to 16 positions, the extra keys masked;
    a padded batch, windowed attention and a GPU keep T."""
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 7:] = 0
    layout = Layout(mask, 3, 20, width=8)
    assert layout.span == 32 and layout.attn_mask.shape == (3, 1, 1, 32)
    assert layout.attn_mask[:, 0, 0, 20:].sum() == 0 and layout.attn_mask[:, 0, 0, :20].sum() == 47
    assert layout.span_indices.tolist() == list(range(20)) + list(range(32, 39)) + list(range(64, 84))
    x = torch.arange(47.0)[:, None]
    assert torch.equal(layout.from_attention(layout.to_attention(x)), x)
    assert layout.to_attention(x).shape == (3, 32, 1) and layout.pad(x).shape == (3, 20, 1)
    causal = Layout(mask, 3, 20, width=8, causal=True)
    assert causal.attn_mask.shape == (3, 1, 32, 32) and not causal.attn_mask[0, 0, 3, 4]
    assert Layout(mask, 3, 20, width=8, kernels=Kernels(packing="never")).span == 20
    assert Layout(mask, 3, 20, width=8, window=8).span == 20
    assert Layout(mask, 3, 32, width=8).span == 32  # already whole blocks


def test_varlen_attention_says_what_it_needs_on_the_cpu():
    from bertkit.model import varlen_attention

    q = torch.zeros(5, 2, 8)
    offsets = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="FlashAttention's CUDA kernel, which takes CUDA tensors in float16 or "
                                         "bfloat16 .autocast.; got torch.float32 on cpu"):
        varlen_attention(q, q, q, offsets, 5, 0.0, False)


def test_kernel_choices_are_checked_and_the_packing_rule_follows_the_device():
    with pytest.raises(ValueError, match="packing='sometimes'; expected one of auto, always, never"):
        Kernels(packing="sometimes")
    with pytest.raises(ValueError, match="attention='flash'; expected one of padded, varlen"):
        Kernels(attention="flash")
    with pytest.raises(ValueError, match="pack_multiple=0; expected a whole number >= 1"):
        Kernels(pack_multiple=0)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    assert Layout(mask, 2, 8, width=64).indices is not None  # the CPU packs
    assert Layout(mask, 2, 8, width=64, kernels=Kernels(packing="never")).indices is None
    assert packs(Kernels(), on_gpu=False, elements=1)
    assert not packs(Kernels(), on_gpu=True, elements=(1 << 24) - 1)  # a GPU keeps small batches padded
    assert packs(Kernels(), on_gpu=True, elements=1 << 24)
    assert packs(Kernels(packing="always"), on_gpu=True, elements=1)
    assert not packs(Kernels(packing="never"), on_gpu=False, elements=1 << 30)


def test_static_compilation_keeps_batches_padded_so_that_shapes_repeat():
    from bertkit.model import compile_blocks

    model = BertModel(tiny())
    compile_blocks(model)
    assert model.kernels.packing == "auto"  # dynamic shapes: packed batches may change their token count
    compile_blocks(model, "static")
    assert model.kernels.packing == "never"
    set_kernels(model, packing="auto", pack_multiple=64)  # packed token counts rounded up repeat too
    compile_blocks(model, "static")
    assert model.kernels.packing == "auto"
    with pytest.raises(ValueError, match="compile mode 'cudagraphs'; expected one of dynamic, static"):
        compile_blocks(model, "cudagraphs")


def test_a_left_to_right_classifier_reads_the_last_real_token_of_left_padding_and_float_masks():
    """A causal model summarises an input by its last real token: with padding on the left that is position T - 1,
    not the count of real tokens - 1, and a float attention mask (as transformers takes) picks the same token."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny(is_decoder=True, num_labels=3)).eval()
    ids = torch.randint(5, 300, (2, 10))
    mask, positions = left_padded(ids, {1: 4})
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
        alone = model(ids[1:, 4:]).logits
        floats = model(ids, attention_mask=mask.float(), position_ids=positions).logits
    assert torch.allclose(batch[1], alone[0], atol=1e-5)
    assert torch.equal(floats, batch)


@pytest.mark.parametrize("packing", ["always", "never"])
def test_a_classifier_reads_the_cls_token_of_left_padding_on_every_kernel(packing):
    """[CLS] is the first real token: with padding on the left the pooler reads it there, not position 0 (a padding
    position, zeros once packed), so a left-padded row classifies as it does alone, whichever way the batch runs."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny(num_labels=3)).eval()
    set_kernels(model, packing=packing)
    ids = torch.randint(5, 300, (3, 10))
    mask, positions = left_padded(ids, {1: 4, 2: 7})
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
        for b, start in ((1, 4), (2, 7)):
            alone = model(ids[b : b + 1, start:]).logits
            assert torch.allclose(batch[b], alone[0], atol=1e-5), b
        assert torch.equal(model(ids, attention_mask=mask.float(), position_ids=positions).logits, batch)


def test_labels_at_padding_are_not_scored_on_any_kernel():
    """`labels = input_ids` puts labels on padding: packed, the masked LM scored zeros there and packing=never the
    padding tokens' states (two losses for one batch), and `masked_positions=labels != -100` failed on a shape
    mismatch. Both now leave padding out, as the token classifier does."""
    torch.manual_seed(0)
    ids = torch.randint(5, 300, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    losses = []
    for packing in ("always", "never"):
        torch.manual_seed(0)
        mlm = set_kernels(BertForPreTraining(tiny()).eval(), packing=packing)
        tagger = set_kernels(BertForTokenClassification(tiny(num_labels=3)).eval(), packing=packing)
        everywhere = torch.ones_like(ids, dtype=torch.bool)
        with torch.no_grad():
            full = mlm(ids, attention_mask=mask, labels=ids).masked_lm_loss
            selected = mlm(ids, attention_mask=mask, labels=ids, masked_positions=everywhere)
            tags = tagger(ids, attention_mask=mask, labels=ids % 3).loss
            assert torch.allclose(full, mlm(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss)
            assert torch.allclose(selected.masked_lm_loss, full) and selected.prediction_logits.shape[0] == mask.sum()
            real_tags = (ids % 3).masked_fill(mask == 0, -100)
            assert torch.allclose(tags, tagger(ids, attention_mask=mask, labels=real_tags).loss)
        losses.append((full, tags))
    for packed, never in zip(*losses):
        assert torch.allclose(packed, never, atol=1e-5)


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
def test_a_bilstm_reads_the_real_tokens_of_left_padding(cls):
    """The BiLSTM runs over a row's real tokens wherever the padding is: a left-padded row gives what it gives
    alone (it read the row's first positions, padding, and missed as many real tokens at the end)."""
    torch.manual_seed(0)
    model = cls(tiny(num_labels=3, bilstm=True)).eval()
    ids = torch.randint(5, 300, (2, 10))
    mask, positions = left_padded(ids, {1: 4})
    name = "logits" if cls is BertForSequenceClassification else "start_logits"
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions)[name]
        alone = model(ids[1:, 4:])[name]
    got = batch[1] if name == "logits" else batch[1, 4:]
    assert torch.allclose(got, alone[0], atol=1e-5)


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
def test_a_bilstm_takes_a_row_of_padding_alone(cls):
    """A row with no real token runs as it does without the BiLSTM (pack_padded_sequence refused a length of 0 with a
    RuntimeError), and the other rows are unchanged."""
    torch.manual_seed(0)
    model = cls(tiny(num_labels=3, bilstm=True)).eval()
    ids = torch.randint(5, 300, (2, 10))
    mask = torch.ones_like(ids)
    mask[1] = 0
    name = "logits" if cls is BertForSequenceClassification else "start_logits"
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)[name]
        alone = model(ids[:1])[name]
    assert torch.allclose(batch[0], alone[0], atol=1e-5)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less_for_backward(padded):
    """Each block run again in backward, with the dropout masks of its first run: the same loss and gradients (packed
    rows too), while what autograd keeps outside the blocks is a fraction of what it keeps without."""
    torch.manual_seed(0)
    model = BertForPreTraining(tiny(num_hidden_layers=4)).train()  # dropout 0.1: the rerun must draw the same masks
    ids = torch.randint(5, 300, (4, 40))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 25:] = mask[3, 10:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 3::7] = ids[:, 3::7]

    def run(enable: bool):
        model.activation_checkpointing_enable(enable)
        model.zero_grad(set_to_none=True)
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, attention_mask=mask, labels=labels, next_sentence_label=torch.tensor([0, 1, 1, 0])).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(kept)

    loss, grads, kept = run(False)
    loss_again, grads_again, kept_checkpointed = run(True)
    assert torch.equal(loss, loss_again)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_again[name], rtol=0, atol=1e-7), name
    assert kept_checkpointed < kept / 3
    # in evaluation, and without gradients, nothing is run twice: the flag changes nothing
    model.eval()
    with torch.no_grad():
        checkpointed = model(ids, attention_mask=mask).prediction_logits
        model.gradient_checkpointing_disable()  # transformers' older name, kept as theirs is
        assert not model.bert.encoder.activation_checkpointing
        assert torch.equal(checkpointed, model(ids, attention_mask=mask).prediction_logits)
