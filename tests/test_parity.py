"""Parity with Hugging Face transformers on the same weights: forward, losses, gradients, checkpoints both ways."""

import logging

import pytest
import torch

import bertkit
from bertkit.model import set_kernels
from bertkit import BertConfig, BertkitError

transformers = pytest.importorskip("transformers")

HIDDEN_ATOL = 1e-5
LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-4


def batch(vocab_size: int, B: int = 4, T: int = 24, seed: int = 0):
    """A padded pair batch: [CLS] A [SEP] B [SEP] with different lengths, segment ids and an attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (B, T), generator=g)
    lengths = torch.tensor([T, T - 7, T // 2, 6])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    types = torch.zeros_like(ids)
    for b, n in enumerate(lengths.tolist()):
        ids[b, 0] = 2
        ids[b, n // 2] = ids[b, n - 1] = 3
        types[b, n // 2 + 1 : n] = 1
    ids = ids * mask  # pad id 0
    types = types * mask
    return ids, types, mask


def mlm_labels(ids, mask, seed=1):
    g = torch.Generator().manual_seed(seed)
    pick = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
    pick[:, 1] = True  # at least one per row
    return torch.where(pick, ids, torch.full_like(ids, -100))


def config_for(name: str) -> BertConfig:
    return BertConfig.from_preset(name, vocab_size=1000, max_position_embeddings=64)


def hf_twin(model, cls_name: str, tmp_path):
    """Save a bertkit model and load it with transformers, asserting nothing is missing or unexpected."""
    model.save_pretrained(tmp_path)
    hf, info = getattr(transformers, cls_name).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    return hf.eval()


def assert_grads_match(ours, theirs):
    """`theirs` is the transformers model, or its parameters by bertkit's names."""
    named = theirs if isinstance(theirs, dict) else dict(theirs.named_parameters())
    hf_grads = {n: p.grad for n, p in named.items()}
    largest = max(g.abs().max() for g in hf_grads.values() if g is not None)
    for name, p in ours.named_parameters():
        g_hf = hf_grads[name]
        assert p.grad is not None and g_hf is not None, name
        if g_hf.abs().max() < 1e-6 * largest:
            # a gradient that is exactly zero in theory (softmax is shift-invariant: attention key biases, the
            # span head's bias and the last LayerNorm bias under the span loss) is rounding noise in both
            # implementations, so only its smallness is comparable
            assert p.grad.abs().max() < 1e-6 * largest, name
            continue
        rel = (p.grad - g_hf).abs().max() / g_hf.abs().max()
        assert rel < GRAD_RTOL, f"{name}: relative gradient difference {rel:.2e}"


@pytest.fixture(params=["tiny", "mini", "minilm"])
def pretrained_pair(request, tmp_path, minilm_dir):
    """(bertkit BertForPreTraining, transformers BertForPreTraining) on identical weights, dropout off."""
    if request.param == "minilm":
        ours = bertkit.BertForPreTraining.from_pretrained(minilm_dir)  # real encoder, fresh pretraining heads
    else:
        torch.manual_seed(0)
        ours = bertkit.BertForPreTraining(config_for(request.param))
    return ours.eval(), hf_twin(ours, "BertForPreTraining", tmp_path)


def test_encoder_forward(pretrained_pair):
    ours, theirs = pretrained_pair
    ids, types, mask = batch(ours.config.vocab_size)
    with torch.no_grad():
        a = ours.bert(ids, types, mask)
        b = theirs.bert(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    assert (a.last_hidden_state[real] - b.last_hidden_state[real]).abs().max() < HIDDEN_ATOL
    assert (a.pooler_output - b.pooler_output).abs().max() < HIDDEN_ATOL


def test_every_layers_hidden_states_match(pretrained_pair):
    """output_hidden_states: the embeddings' output and every block's, as transformers gives them (the features of
    the paper's feature-based approach), on the packed and the padded kernel alike."""
    ours, theirs = pretrained_pair
    ids, types, mask = batch(ours.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        b = theirs.bert(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        for packing in ("always", "never"):
            a = set_kernels(ours, packing=packing).bert(ids, types, mask, output_hidden_states=True)
            assert len(a.hidden_states) == len(b.hidden_states) == ours.config.num_hidden_layers + 1
            for x, y in zip(a.hidden_states, b.hidden_states):
                assert (x[real] - y[real]).abs().max() < HIDDEN_ATOL
            assert torch.equal(a.hidden_states[-1], a.last_hidden_state)
    assert ours.bert(ids, types, mask).hidden_states is None


def test_pretraining_loss_and_gradients(pretrained_pair):
    ours, theirs = pretrained_pair
    ids, types, mask = batch(ours.config.vocab_size)
    labels = mlm_labels(ids, mask)
    nsp = torch.tensor([0, 1, 1, 0])
    a = ours(ids, types, mask, labels=labels, next_sentence_label=nsp)
    b = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    assert abs(a.loss.item() - b.loss.item()) < LOSS_ATOL
    a.loss.backward()
    b.loss.backward()
    assert_grads_match(ours, theirs)


def test_masked_positions_loss_equals_full_sequence_loss(pretrained_pair):
    ours, theirs = pretrained_pair
    ids, types, mask = batch(ours.config.vocab_size)
    labels = mlm_labels(ids, mask)
    nsp = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        sparse = ours(ids, types, mask, labels=labels, next_sentence_label=nsp, masked_positions=labels != -100)
        full = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    assert sparse.prediction_logits.shape == (int((labels != -100).sum()), ours.config.vocab_size)
    assert abs(sparse.loss.item() - full.loss.item()) < LOSS_ATOL
    picked = full.prediction_logits[labels != -100]
    assert (sparse.prediction_logits - picked).abs().max() < HIDDEN_ATOL


@pytest.mark.parametrize("source", ["mini", "minilm"])
@pytest.mark.parametrize(
    "cls_name, num_labels",
    [
        ("BertForSequenceClassification", 3),
        ("BertForSequenceClassification", 1),  # regression (STS-B)
        ("BertForQuestionAnswering", 2),
        ("BertForTokenClassification", 5),
        ("BertForMaskedLM", 2),
    ],
)
def test_fine_tuning_heads(source, cls_name, num_labels, tmp_path, minilm_dir):
    cls = getattr(bertkit, cls_name)
    torch.manual_seed(0)
    if source == "minilm":
        ours = cls.from_pretrained(minilm_dir, num_labels=num_labels)
    else:
        ours = cls(config_for(source).__class__.from_preset(source, vocab_size=1000, num_labels=num_labels))
    ours.eval()
    theirs = hf_twin(ours, cls_name, tmp_path)
    ids, types, mask = batch(ours.config.vocab_size)
    if cls_name == "BertForQuestionAnswering":
        mask = torch.ones_like(mask)  # with padding the QA loss differs by design: see test_qa_padding_is_masked
    kwargs = {}
    if cls_name == "BertForSequenceClassification":
        kwargs["labels"] = torch.tensor([0.5, 1.0, 2.5, 4.0]) if num_labels == 1 else torch.tensor([0, 2, 1, 2])
    elif cls_name == "BertForQuestionAnswering":
        kwargs = {"start_positions": torch.tensor([3, 5, 1, 30]), "end_positions": torch.tensor([4, 9, 2, 31])}
    elif cls_name == "BertForTokenClassification":
        kwargs["labels"] = torch.randint(0, num_labels, ids.shape).masked_fill(mask == 0, -100)
    else:
        kwargs["labels"] = mlm_labels(ids, mask)
    a = ours(ids, types, mask, **kwargs)
    b = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask, **kwargs)
    assert abs(a.loss.item() - b.loss.item()) < LOSS_ATOL
    a.loss.backward()
    b.loss.backward()
    assert_grads_match(ours, theirs)


@pytest.mark.parametrize("source", ["mini", "minilm"])
def test_multi_label_head_matches_transformers(source, tmp_path, minilm_dir):
    """problem_type multi_label_classification (`finetune --multi-label`): transformers' loss, binary cross-entropy
    over every label, and its gradients, on the same weights."""
    folder = minilm_dir
    if source == "mini":
        torch.manual_seed(0)
        folder = tmp_path / "mini"
        bertkit.BertModel(config_for("mini")).save_pretrained(folder)
    torch.manual_seed(0)
    ours = bertkit.BertForSequenceClassification.from_pretrained(folder, num_labels=5,
                                                                 problem_type="multi_label_classification").eval()
    theirs = hf_twin(ours, "BertForSequenceClassification", tmp_path / "twin")
    assert theirs.config.problem_type == "multi_label_classification"
    ids, types, mask = batch(ours.config.vocab_size)
    labels = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 1], [0, 1, 0, 0, 0]])
    a = ours(ids, types, mask, labels=labels)  # bertkit takes the 0/1 rows as integers, transformers as floats
    b = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels.float())
    assert (a.logits - b.logits).abs().max() < HIDDEN_ATOL
    assert abs(a.loss.item() - b.loss.item()) < LOSS_ATOL
    a.loss.backward()
    b.loss.backward()
    assert_grads_match(ours, theirs)


def test_qa_padding_is_masked(tmp_path):
    """With padding, span logits agree on real tokens, and the loss is transformers' with pad logits excluded."""
    torch.manual_seed(0)
    ours = bertkit.BertForQuestionAnswering(config_for("mini")).eval()
    theirs = hf_twin(ours, "BertForQuestionAnswering", tmp_path)
    ids, types, mask = batch(1000)
    start, end = torch.tensor([3, 5, 1, 4]), torch.tensor([4, 9, 2, 5])
    with torch.no_grad():
        a = ours(ids, types, mask, start_positions=start, end_positions=end)
        b = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    assert (a.start_logits[real] - b.start_logits[real]).abs().max() < HIDDEN_ATOL
    assert (a.end_logits[real] - b.end_logits[real]).abs().max() < HIDDEN_ATOL
    masked = [x.masked_fill(~real, float("-inf")) for x in (b.start_logits, b.end_logits)]
    expected = (torch.nn.functional.cross_entropy(masked[0], start) + torch.nn.functional.cross_entropy(masked[1], end)) / 2
    assert abs(a.loss.item() - expected.item()) < LOSS_ATOL


@pytest.mark.parametrize("labels", [{"id2label": {0: "entailment", 1: "neutral", 2: "contradiction"}},
                                    {"num_labels": 1}], ids=["mnli", "regression"])
def test_a_span_model_started_from_a_classifier_of_other_labels_loads_in_transformers(labels, tmp_path):
    """transformers sizes qa_outputs by num_labels, so the span model's config.json says 2 (start, end) whatever
    the classifier it was fine-tuned from said."""
    torch.manual_seed(0)
    bertkit.BertForSequenceClassification(BertConfig.from_preset("tiny", vocab_size=1000, **labels)).save_pretrained(
        tmp_path / "classifier")
    ours = bertkit.BertForQuestionAnswering.from_pretrained(tmp_path / "classifier").eval()
    theirs = hf_twin(ours, "BertForQuestionAnswering", tmp_path / "span")
    ids, types, mask = batch(1000)
    with torch.no_grad():
        a = ours(ids, types)
        b = theirs(input_ids=ids, token_type_ids=types)
    assert (a.start_logits - b.start_logits).abs().max() < HIDDEN_ATOL
    assert bertkit.BertForQuestionAnswering.from_pretrained(tmp_path / "span").config.num_labels == 2


def test_multiple_choice(tmp_path):
    torch.manual_seed(0)
    ours = bertkit.BertForMultipleChoice(config_for("tiny")).eval()
    theirs = hf_twin(ours, "BertForMultipleChoice", tmp_path)
    ids, types, mask = batch(1000, B=4)
    ids, types, mask = (x.view(2, 2, -1) for x in (ids, types, mask))
    labels = torch.tensor([1, 0])
    a = ours(ids, types, mask, labels=labels)
    b = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels)
    assert (a.logits - b.logits).abs().max() < HIDDEN_ATOL
    assert abs(a.loss.item() - b.loss.item()) < LOSS_ATOL


def test_multiple_choice_takes_position_ids_for_every_choice(tmp_path):
    """(1, T) position ids shared by every example and choice, as transformers takes them (it crashed here)."""
    torch.manual_seed(0)
    ours = bertkit.BertForMultipleChoice(config_for("tiny")).eval()
    theirs = hf_twin(ours, "BertForMultipleChoice", tmp_path)
    ids, types, mask = (x.view(2, 2, -1) for x in batch(1000, B=4))
    positions = torch.arange(ids.shape[-1])[None] + 3
    with torch.no_grad():
        a = ours(ids, types, mask, position_ids=positions)
        b = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask, position_ids=positions)
    assert (a.logits - b.logits).abs().max() < HIDDEN_ATOL


@pytest.mark.parametrize("safe", [True, False])
def test_loads_a_transformers_checkpoint(tmp_path, safe):
    """transformers writes (safetensors, or pytorch_model.bin), bertkit reads: same MLM logits."""
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256
    )
    theirs = transformers.BertForPreTraining(hf_config).eval()
    theirs.save_pretrained(tmp_path)
    if not safe:
        # the pre-safetensors format (transformers 5 no longer writes it): a pickled dict of every tensor,
        # tied decoder copies and the position_ids buffer included
        (tmp_path / "model.safetensors").unlink()
        torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    ours = bertkit.BertForPreTraining.from_pretrained(tmp_path).eval()
    ids, types, mask = batch(1000)
    with torch.no_grad():
        a = ours(ids, types, mask)
        b = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    assert (a.prediction_logits[real] - b.prediction_logits[real]).abs().max() < HIDDEN_ATOL
    assert (a.seq_relationship_logits - b.seq_relationship_logits).abs().max() < HIDDEN_ATOL
    from bertkit.checkpoint import describe_model  # `bertkit info` counts the tied decoder copies once
    assert describe_model(tmp_path)["parameters"].startswith(f"{ours.num_parameters():,} ")


def test_an_untied_decoder_loads_both_ways_with_its_own_weights(tmp_path):
    """A checkpoint whose masked-LM decoder is not the embedding table (tie_word_embeddings false) keeps its decoder:
    same logits, loss and gradients, and the folder bertkit writes loads back into transformers untied."""
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=256, tie_word_embeddings=False)
    theirs = transformers.BertForPreTraining(hf_config).eval()
    with torch.no_grad():  # untied, transformers 5 adds the decoder's own bias (cls.predictions.bias is unused)
        theirs.cls.predictions.decoder.bias.normal_()
    theirs.save_pretrained(tmp_path / "hf")
    ours = bertkit.BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.tie_word_embeddings is False
    assert torch.equal(ours.cls.predictions.decoder.weight, theirs.cls.predictions.decoder.weight)
    assert not torch.equal(ours.cls.predictions.decoder.weight, ours.bert.embeddings.word_embeddings.weight)
    ids, types, mask = batch(1000)
    labels, nsp = mlm_labels(ids, mask), torch.tensor([0, 1, 1, 0])
    a = ours(ids, types, mask, labels=labels, next_sentence_label=nsp)
    b = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    assert abs(a.loss.item() - b.loss.item()) < LOSS_ATOL
    a.loss.backward()
    b.loss.backward()
    assert_grads_match(ours, {**dict(theirs.named_parameters()),
                              "cls.predictions.bias": theirs.cls.predictions.decoder.bias})
    again = hf_twin(ours, "BertForPreTraining", tmp_path / "ours")
    with torch.no_grad():
        c = again(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    assert (a.prediction_logits[real] - c.prediction_logits[real]).abs().max() < HIDDEN_ATOL
    # the decoder counts once in `bertkit info` (safetensors writes the bias once), and the tied default is unchanged
    from bertkit.checkpoint import describe_model
    assert describe_model(tmp_path / "ours")["parameters"].startswith(f"{ours.num_parameters():,} ")
    assert bertkit.BertForPreTraining(config_for("tiny")).cls.predictions.decoder is None


def test_bare_encoder_checkpoint_into_head_model_and_back(tmp_path, minilm_dir, caplog):
    """MiniLM's keys have no `bert.` prefix and carry the old position_ids buffer; heads are reported as new."""
    with caplog.at_level(logging.WARNING, logger="bertkit"):
        clf = bertkit.BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    assert "newly initialised" in caplog.text and "classifier.weight" in caplog.text
    encoder = bertkit.BertModel.from_pretrained(minilm_dir)
    for name, p in encoder.state_dict().items():
        assert torch.equal(p, clf.state_dict()[f"bert.{name}"]), name
    # and a head model's checkpoint loads into the bare encoder, its heads unused
    clf.save_pretrained(tmp_path)
    again = bertkit.BertModel.from_pretrained(tmp_path)
    assert all(torch.equal(p, encoder.state_dict()[n]) for n, p in again.state_dict().items())


def test_errors_name_the_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    model = bertkit.BertForPreTraining(config_for("tiny"))
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["bert.encoder.layer.1.output.dense.weight"]
    state["bert.encoder.layer.0.attention.self.query.bias"] = torch.zeros(7)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(BertkitError) as err:
        bertkit.BertForPreTraining.from_pretrained(tmp_path)
    assert "bert.encoder.layer.1.output.dense.weight" in str(err.value)
    assert "attention.self.query.bias: checkpoint (7,) vs model (128,)" in str(err.value)


def test_pickled_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    bertkit.BertConfig.from_preset("tiny").save(tmp_path)
    torch.save({"embeddings.word_embeddings.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(BertkitError, match="cannot read weights: it pickles print, which torch.load"):
        bertkit.BertModel.from_pretrained(tmp_path)


def test_a_left_to_right_model_is_transformers_decoder_and_hides_the_future(tmp_path):
    """is_decoder (the paper's LTR row): transformers' causal BertModel on the same weights gives the same hidden
    states of the real tokens, and changing a later token leaves every earlier position's output unchanged."""
    torch.manual_seed(0)
    config = config_for("mini")
    config.is_decoder = True
    ours = bertkit.BertModel(config).eval()
    theirs = hf_twin(ours, "BertModel", tmp_path)
    assert theirs.config.is_decoder
    ids, types, mask = batch(1000)
    for m in (mask, torch.ones_like(mask)):  # the causal mask with padding, and SDPA's is_causal without
        with torch.no_grad():
            a = ours(ids, types, m).last_hidden_state
            b = theirs(input_ids=ids, token_type_ids=types, attention_mask=m).last_hidden_state
        real = m.bool()
        assert (a[real] - b[real]).abs().max() < HIDDEN_ATOL
        changed = ids.clone()
        changed[:, 5] = (changed[:, 5] + 1) % 1000
        with torch.no_grad():
            c = ours(changed, types, m).last_hidden_state
        assert torch.equal(a[:, :5], c[:, :5])
        assert (a[:, 5:][real[:, 5:]] - c[:, 5:][real[:, 5:]]).abs().max() > 1e-3
    config.is_decoder = False  # and the bidirectional model does see the change
    with torch.no_grad():
        bidirectional = bertkit.BertModel(config).eval()
        assert not torch.equal(bidirectional(ids, types, mask).last_hidden_state[:, :5],
                               bidirectional(changed, types, mask).last_hidden_state[:, :5])


@pytest.mark.parametrize("cls_name", ["BertForSequenceClassification", "BertForQuestionAnswering",
                                      "BertForTokenClassification"])
def test_a_bilstm_head_trains_saves_and_loads_back(cls_name, tmp_path):
    """The paper's "+ BiLSTM": a BiLSTM between encoder and head, randomly initialised over a pretrained encoder,
    kept in config.json and the weights, so the saved model gives the same outputs; padding changes nothing."""
    torch.manual_seed(0)
    encoder = bertkit.BertModel(config_for("mini"))
    encoder.save_pretrained(tmp_path / "encoder")
    cls = getattr(bertkit, cls_name)
    model = cls.from_pretrained(tmp_path / "encoder", bilstm=True).eval()
    assert model.bilstm is not None and model.config.bilstm
    ids, types, mask = batch(1000)
    out = model(ids, types, mask)
    logits = out.logits if out.logits is not None else out.start_logits
    logits.sum().backward()
    assert model.bilstm.weight_ih_l0.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "tuned")
    again = cls.from_pretrained(tmp_path / "tuned").eval()
    assert again.config.bilstm
    with torch.no_grad():
        a, b = model(ids, types, mask), again(ids, types, mask)
        short = model(ids[3:, :6], types[3:, :6], mask[3:, :6])  # row 3 is 6 real tokens: the same without padding
    key = "logits" if a.logits is not None else "start_logits"
    assert torch.equal(a[key], b[key])
    per_token = key == "start_logits" or a[key].ndim == 3  # the tagger's logits are per token too
    torch.testing.assert_close(a[key][3:, :6] if per_token else a[key][3:], short[key], atol=1e-5, rtol=1e-5)
