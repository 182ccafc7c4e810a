"""The CUDA paths: parity with transformers on the GPU, bf16/fp16 autocast, fused AdamW, pretraining and fine-tuning
runs on a GPU. Skipped where there is no CUDA device (CI has none); run by hand on a GPU machine:

    BERTKIT_DATA=... python -m pytest -q tests/test_cuda.py
"""

import pytest
import torch

import bertkit
from bertkit import BertConfig
from bertkit.train.optim import build_optimizer
from bertkit.train.precision import resolve
from test_parity import assert_grads_match, batch, hf_twin, mlm_labels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
transformers = pytest.importorskip("transformers")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 parity needs true fp32 GEMMs: no TF32 for these tests."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def twins(tmp_path, preset="mini"):
    torch.manual_seed(0)
    ours = bertkit.BertForPreTraining(BertConfig.from_preset(preset, vocab_size=1000, max_position_embeddings=64))
    theirs = hf_twin(ours, "BertForPreTraining", tmp_path)
    return ours.to(CUDA), theirs.to(CUDA)


def pretraining_inputs(seed=0):
    ids, types, mask = batch(1000, B=4, T=24, seed=seed)
    labels = mlm_labels(ids, mask)
    return [t.to(CUDA) for t in (ids, types, mask, labels)] + [torch.tensor([0, 1, 1, 0], device=CUDA)]


def test_forward_loss_and_gradients_match_transformers_on_cuda(tmp_path):
    ours, theirs = twins(tmp_path)
    ours.eval(), theirs.eval()
    ids, types, mask, labels, nsp = pretraining_inputs()
    a = ours(ids, types, mask, labels=labels, next_sentence_label=nsp)
    b = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    real = mask.bool()
    assert (a.prediction_logits[real] - b.prediction_logits[real]).abs().max() < 1e-4
    assert (a.seq_relationship_logits - b.seq_relationship_logits).abs().max() < 1e-5
    assert abs(a.loss.item() - b.loss.item()) < 1e-5
    a.loss.backward()
    b.loss.backward()
    assert_grads_match(ours, theirs)


def test_masked_positions_loss_equals_full_loss_on_cuda(tmp_path):
    ours, _ = twins(tmp_path)
    ours.eval()
    ids, types, mask, labels, nsp = pretraining_inputs(seed=3)
    full = ours(ids, types, mask, labels=labels, next_sentence_label=nsp).loss
    sparse = ours(ids, types, mask, labels=labels, next_sentence_label=nsp, masked_positions=labels != -100).loss
    assert abs(full.item() - sparse.item()) < 1e-5


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_autocast_tracks_fp32(tmp_path, precision):
    """Under autocast the loss stays within 1% of fp32, and a few optimizer steps (GradScaler for fp16) lower it."""
    ours, _ = twins(tmp_path)
    ids, types, mask, labels, nsp = pretraining_inputs()
    ours.eval()
    reference = ours(ids, types, mask, labels=labels, next_sentence_label=nsp).loss.item()
    p = resolve(precision, CUDA)
    assert p.dtype is {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert p.scaler.is_enabled() == (precision == "fp16")
    with p.autocast():
        half = ours(ids, types, mask, labels=labels, next_sentence_label=nsp).loss.item()
    assert abs(half - reference) < 0.01 * reference
    ours.train()
    optimizer = build_optimizer(ours, "adamw", 1e-3, 0.01)
    losses = []
    for _ in range(20):
        optimizer.zero_grad(set_to_none=True)
        with p.autocast():
            loss = ours(ids, types, mask, labels=labels, next_sentence_label=nsp).loss
        p.scaler.scale(loss).backward()
        p.scaler.step(optimizer)
        p.scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0, losses


def test_adamw_is_fused_on_cuda(tmp_path):
    ours, _ = twins(tmp_path, "tiny")
    assert build_optimizer(ours, "adamw", 1e-4, 0.01).defaults["fused"] is True
    assert build_optimizer(ours.cpu(), "adamw", 1e-4, 0.01).defaults["fused"] is None


def test_pretrain_runs_on_cuda_in_bf16_and_resumes(tmp_path):
    """The whole pretraining loop on the GPU in bf16, then a run resumed from its step-40 checkpoint ends where the
    uninterrupted run ended (closely: GPU kernels with atomics are not bitwise repeatable)."""
    import shutil

    from conftest import data_path

    from bertkit.checkpoint import list_checkpoints
    from bertkit.data.prepare import prepare
    from bertkit.tokenizer import train_vocab
    from bertkit.train.logs import read_csv
    from bertkit.train.pretrain import PretrainConfig, pretrain

    lines = data_path("corpus", "python-docs-3.11.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    text = tmp_path / "slice.txt"
    text.write_text("".join(lines[:4000]), encoding="utf-8")
    tokenizer = train_vocab([text], tmp_path / "tokenizer", vocab_size=500, show_progress=False)
    prepare([text], tokenizer, tmp_path / "data", heldout_fraction=0.1, progress=False)
    cfg = PretrainConfig(tokenizer=str(tmp_path / "tokenizer"), data=str(tmp_path / "data"), max_length=64,
                         batch_size=32, lr=1e-3, max_steps=80, log_every=1, eval_every=40, eval_batches=4,
                         save_every=40, keep_last=0, precision="bf16", out_dir=str(tmp_path / "whole"))
    whole = pretrain(cfg)
    assert whole["step"] == 80
    losses = [float(r["loss"]) for r in read_csv(tmp_path / "whole" / "train.csv")]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.4, losses
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(list_checkpoints(tmp_path / "split" / "checkpoints")[-1])  # as if it died after step 40
    resumed = pretrain(PretrainConfig(**{**vars(cfg), "out_dir": str(tmp_path / "split"), "resume": "auto"}))
    assert resumed["step"] == 80
    assert abs(resumed["loss"] - whole["loss"]) < 0.02 * whole["loss"], (resumed, whole)


@pytest.mark.parametrize("precision, grad_accum", [("fp32", 1), ("bf16", 1), ("fp16", 2)])
def test_finetune_runs_on_cuda(tmp_path, precision, grad_accum):
    """A short SST-2 fine-tuning on the GPU from a small random BERT learns the training rows, in each precision
    (fp16 with loss scaling, and gradient accumulation)."""
    from conftest import data_path

    from bertkit.tasks.finetune import FinetuneConfig, finetune
    from bertkit.tokenizer import train_vocab

    sst2 = data_path("glue", "SST-2")
    rows = sst2.joinpath("train.tsv").read_text(encoding="utf-8").splitlines()
    data = tmp_path / "SST-2"
    data.mkdir()
    data.joinpath("train.tsv").write_text("\n".join(rows[:2001]) + "\n", encoding="utf-8")
    data.joinpath("dev.tsv").write_text("\n".join(rows[:1] + rows[2001:2401]) + "\n", encoding="utf-8")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(r.split("\t")[0] for r in rows[1:5001]), encoding="utf-8")
    tokenizer = train_vocab([text], tmp_path / "tokenizer", vocab_size=2000, show_progress=False)
    torch.manual_seed(0)
    model = bertkit.BertForSequenceClassification(BertConfig.from_preset("mini", vocab_size=tokenizer.vocab_size, num_labels=2))
    model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    record = finetune(FinetuneConfig(task="SST-2", data_dir=str(data), model_dir=str(tmp_path / "model"),
                                     out_dir=str(tmp_path / "out"), epochs=3, lr=5e-4, batch_size=32 // grad_accum,
                                     grad_accum=grad_accum, precision=precision, device="cuda"))
    # percent; the majority class of these dev rows is 51. At lr 1e-4 a random mini stayed there for 3 epochs (fp16 on
    # an H200, and fp32 on the CPU with the same 16 x 2 batches): the test, not the precision, was short of margin;
    # at 5e-4 the CPU's fp32 runs reach 71-73
    assert record["best"]["accuracy"] > 55, record


def test_compiled_blocks_match_eager_on_cuda(tmp_path):
    """--compile: the same loss and gradients as eager, for padded and unpadded batches, without renaming weights."""
    from bertkit.model import compile_blocks

    eager, _ = twins(tmp_path)
    compiled, _ = twins(tmp_path / "again")
    compile_blocks(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    eager.eval(), compiled.eval()
    for seed in (0, 1):
        ids, types, mask, labels, nsp = pretraining_inputs(seed)
        if seed == 1:
            mask = torch.ones_like(mask)  # no padding: the other path through the blocks
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            loss = model(ids, types, mask, labels=labels, next_sentence_label=nsp, masked_positions=labels != -100).loss
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-4, losses
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            assert (a.grad - b.grad).abs().max() <= 1e-3 * a.grad.abs().max() + 1e-7, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_windowed_attention_on_cuda_matches_the_cpu(dtype):
    """The blocked windows run through CUDA's SDPA kernels (masked: the memory-efficient one); the same outputs as
    on the CPU, within the dtype's tolerance."""
    from bertkit.model import LocalWindows

    torch.manual_seed(0)
    keep = torch.ones(2, 300, dtype=torch.bool)
    keep[1, 250:] = False
    glob = torch.zeros_like(keep)
    glob[:, [0, 7]] = True
    q, k, v = (torch.randn(2, 4, 300, 32) for _ in range(3))
    want = LocalWindows(keep, glob, 32).attend(q, k, v, 0.0)
    got = LocalWindows(keep.cuda(), glob.cuda(), 32).attend(q.cuda().to(dtype), k.cuda().to(dtype),
                                                            v.cuda().to(dtype), 0.0)
    real = keep[:, None, :, None]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float().cpu() * real, want * real, rtol=tolerance, atol=tolerance)


def test_windowed_model_on_cuda_without_an_attention_mask():
    """model(input_ids) with no mask: the window masks are made on the input's device (they were made on the CPU,
    and SDPA refused them beside CUDA queries)."""
    torch.manual_seed(0)
    model = bertkit.BertModel(BertConfig.from_preset("tiny", vocab_size=1000, max_position_embeddings=512,
                                                     attention_window=64)).eval()
    ids = torch.randint(5, 1000, (2, 300))
    with torch.no_grad():
        want = model(ids).last_hidden_state
        got = model.to(CUDA)(ids.to(CUDA)).last_hidden_state
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def _loss_and_grads(model, inputs, **kernels):
    from bertkit.model import Kernels, set_kernels

    ids, types, mask, labels, nsp = inputs
    set_kernels(model, **{**vars(Kernels()), **kernels})
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, types, mask, labels=labels, next_sentence_label=nsp, masked_positions=labels != -100).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernels", [dict(packing="never"), dict(packing="always"),
                                     dict(packing="always", attention="varlen"),
                                     dict(packing="always", attention="varlen", pack_multiple=64)])
def test_every_kernel_choice_matches_on_cuda_in_bf16(tmp_path, kernels):
    """The padded batch, the packed tokens, and varlen (FlashAttention) attention on them, with filler rows or
    without: the same loss and gradients as the default choice, within bf16's tolerance."""
    from bertkit.model import set_dropout

    model, _ = twins(tmp_path)
    set_dropout(model, 0.0)
    inputs = pretraining_inputs()
    loss, grads = _loss_and_grads(model, inputs)
    other_loss, other_grads = _loss_and_grads(model, inputs, **kernels)
    assert abs(loss - other_loss) < 2e-2 * abs(loss), (loss, other_loss)
    for name, g in grads.items():
        assert (g - other_grads[name]).abs().max() <= 5e-2 * g.abs().max() + 1e-6, name


def test_static_compiled_blocks_on_bucketed_padded_batches_match_eager(tmp_path):
    """compile_blocks(mode="static") keeps the batch padded; its length bucketed, shapes repeat: the same outputs as
    eager."""
    from bertkit.model import compile_blocks, set_kernels

    eager, _ = twins(tmp_path)
    compiled, _ = twins(tmp_path / "again")
    set_kernels(eager.eval(), packing="never")
    compile_blocks(compiled.eval(), "static")
    ids, types, mask, _, _ = pretraining_inputs()
    pad = torch.nn.functional.pad
    ids, types, mask = pad(ids, (0, 8)), pad(types, (0, 8)), pad(mask, (0, 8))  # 24 -> 32 positions
    with torch.no_grad():
        want = eager.bert(ids, types, mask).last_hidden_state
        for _ in range(3):  # compiled once, then reused
            got = compiled.bert(ids, types, mask).last_hidden_state.clone()
    real = mask.bool()
    assert (want - got)[real].abs().max() < 1e-3


def test_varlen_attention_trains_with_attention_dropout(tmp_path):
    """FlashAttention draws the attention dropout itself (PyTorch's public varlen_attn has none): a training step
    with BERT's 0.1 gives finite gradients, and dropout changes the loss. Attention dropout alone: with the hidden
    dropout on as well, the loss changed even where the kernel was given no dropout."""
    from bertkit.model import BertSelfAttention, set_dropout, set_kernels

    model, _ = twins(tmp_path)
    set_kernels(set_dropout(model.train(), 0.0), packing="always", attention="varlen")
    for module in model.modules():
        if isinstance(module, BertSelfAttention):
            module.dropout_p = 0.1
    ids, types, mask, labels, nsp = pretraining_inputs()
    losses = []
    for _ in range(2):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, types, mask, labels=labels, next_sentence_label=nsp, masked_positions=labels != -100).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses.append(loss.item())
    assert losses[0] != losses[1]


@pytest.mark.parametrize("kernels", [{}, {"packing": "always", "attention": "varlen"}], ids=["as-shipped", "varlen"])
def test_activation_checkpointing_gives_the_same_gradients_on_cuda(tmp_path, kernels):
    """Each block run again in backward on the GPU, dropout on (CUDA's RNG state kept for the rerun, FlashAttention's
    own dropout included): the same loss and gradients as without, under bf16 autocast."""
    from bertkit.model import set_kernels

    model, _ = twins(tmp_path)
    set_kernels(model.train(), **kernels)
    ids, types, mask, labels, nsp = pretraining_inputs()
    runs = []
    for on in (False, True):
        model.activation_checkpointing_enable(on)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, types, mask, labels=labels, next_sentence_label=nsp, masked_positions=labels != -100).loss
        loss.backward()
        runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert runs[0][0] == runs[1][0]
    for name, grad in runs[0][1].items():
        assert torch.allclose(grad, runs[1][1][name], rtol=0, atol=1e-6), name


def test_static_compiled_blocks_on_packed_rows_with_filler_match_eager_without_recompiling(tmp_path):
    """Packed rows rounded up to a multiple (Kernels.pack_multiple) under varlen attention keep one shape across
    batches of different real lengths: compiled once for static shapes, never recompiled, the same outputs as
    eager."""
    import torch._dynamo

    from bertkit.model import compile_blocks, set_kernels

    eager, _ = twins(tmp_path)
    compiled, _ = twins(tmp_path / "again")
    choices = dict(packing="always", attention="varlen", pack_multiple=32)
    set_kernels(eager.eval(), **choices)
    compile_blocks(set_kernels(compiled.eval(), **choices), "static")
    assert compiled.bert.kernels.packing == "always"
    ids, types, _, _, _ = pretraining_inputs()  # (4, 24): 96 positions; 65 to 96 real tokens round up to 96
    # the second call recompiles once, as the inference cache of the fused Q/K/V weights fills; none after it may
    for n, lengths in enumerate([(24, 20, 16, 10), (24, 20, 16, 10), (24, 24, 20, 7), (12, 24, 24, 24)]):
        mask = (torch.arange(24, device=CUDA) < torch.tensor(lengths, device=CUDA)[:, None]).long()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), \
                torch._dynamo.config.patch(error_on_recompile=n > 1):
            want = eager.bert(ids, types, mask).last_hidden_state.float()
            got = compiled.bert(ids, types, mask).last_hidden_state.float()
        real = mask.bool()
        assert (want - got)[real].abs().max() < 5e-2, lengths


def test_two_processes_over_nccl_equal_one_accumulating_two(tmp_path):
    """torchrun with NCCL: two processes (on two GPUs, or both on the one GPU there is) train as one process that
    accumulates their two micro-batches."""
    import subprocess
    import sys

    from conftest import data_path

    from bertkit.data.prepare import prepare
    from bertkit.tokenizer import train_vocab
    from bertkit.train.logs import read_csv

    lines = data_path("corpus", "python-docs-3.11.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    text = tmp_path / "slice.txt"
    text.write_text("".join(lines[:3000]), encoding="utf-8")
    tokenizer = train_vocab([text], tmp_path / "tokenizer", vocab_size=500, show_progress=False)
    prepare([text], tokenizer, tmp_path / "data", heldout_fraction=0.1, progress=False)
    BertConfig.from_preset("tiny", vocab_size=500, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save(tmp_path)
    common = ["pretrain", "--model", str(tmp_path / "config.json"), "--tokenizer", str(tmp_path / "tokenizer"),
              "--data", str(tmp_path / "data"), "--max-length", "64", "--batch-size", "8", "--max-steps", "10",
              "--log-every", "1", "--eval-every", "0", "--save-every", "0"]
    pair = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "bertkit.cli", *common, "--out-dir", str(tmp_path / "pair")],
                          capture_output=True, text=True)
    if pair.returncode and "Duplicate GPU" in pair.stdout + pair.stderr:
        pytest.skip("NCCL refuses two processes on one GPU (Duplicate GPU detected): needs two GPUs")
    assert pair.returncode == 0, (pair.stdout + pair.stderr)[-3000:]
    single = subprocess.run([sys.executable, "-m", "bertkit.cli", *common, "--out-dir", str(tmp_path / "single"),
                             "--grad-accum", "2"], capture_output=True, text=True)
    assert single.returncode == 0, (single.stdout + single.stderr)[-3000:]
    two, one = read_csv(tmp_path / "pair" / "train.csv"), read_csv(tmp_path / "single" / "train.csv")
    assert len(two) == len(one) == 10
    for r2, r1 in zip(two, one):
        assert float(r2["loss"]) == pytest.approx(float(r1["loss"]), rel=1e-3), r2["step"]
