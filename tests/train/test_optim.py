"""LAMB against a by-hand transcription of the paper's update, the warm-up/decay schedule, parameter groups."""

import math

import pytest
import torch

from bertkit.config import BertConfig
from bertkit.errors import BertkitError
from bertkit.model import BertForPreTraining
from bertkit.train.optim import Lamb, build_optimizer, param_groups, triangle, warmup_linear, warmup_steps_for


def lamb_reference(w, grads, lr, betas, eps, weight_decay):
    """You et al. (2019), Algorithm 2, one tensor, written out step by step."""
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        r = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps) + weight_decay * w
        trust = w.norm() / r.norm() if w.norm() > 0 and r.norm() > 0 else 1.0
        w = w - lr * trust * r
    return w


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_lamb_follows_the_paper(weight_decay):
    torch.manual_seed(0)
    w0 = torch.randn(7, 5, dtype=torch.float64)
    grads = [torch.randn(7, 5, dtype=torch.float64) for _ in range(4)]
    p = torch.nn.Parameter(w0.clone())
    opt = Lamb([p], lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=weight_decay)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = lamb_reference(w0, grads, 0.01, (0.9, 0.999), 1e-6, weight_decay)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


def test_lamb_step_is_proportional_to_the_weight_norm():
    # The trust ratio: whatever the gradient's scale, a layer moves by lr * ||w|| (before Adam's bias terms).
    for scale in (1e-3, 1.0, 1e3):
        w = torch.nn.Parameter(torch.full((4,), 2.0))
        w.grad = torch.tensor([1.0, -1.0, 1.0, -1.0]) * scale
        Lamb([w], lr=0.1, weight_decay=0.0).step()
        assert (w.detach() - 2.0).norm().item() == pytest.approx(0.1 * 4.0, rel=1e-4)


def test_lamb_zero_weights_take_a_plain_adam_step():
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([0.5, -2.0, 1.0])
    Lamb([w], lr=0.1, eps=0.0, weight_decay=0.0).step()
    torch.testing.assert_close(w.detach(), torch.tensor([-0.1, 0.1, -0.1]))


@pytest.mark.parametrize("weight_decay", [0.01, 0.0])
def test_lamb_of_build_optimizer_leaves_biases_and_layer_norms_out_of_the_trust_ratio(weight_decay):
    """Google's LAMB for BERT (exclude_from_layer_adaptation = the weight-decay exclusions, by name) and NVIDIA's
    FusedLAMB (use_nvlamb off) scale only the matrices; a bias or LayerNorm takes Adam's step. Without weight decay
    the matrices keep their trust ratio."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    build_optimizer(model, "lamb", lr=0.1, weight_decay=weight_decay, eps=0.0).step()
    for name, p in model.named_parameters():
        adam = before[name] - 0.1 * grads[name].sign()  # Adam's first step: lr * g / |g|
        if name == "0.weight":  # the one matrix: ||step|| = lr * ||w|| by its trust ratio
            assert (p.detach() - before[name]).norm().item() == pytest.approx(0.1 * before[name].norm().item())
        else:
            torch.testing.assert_close(p.detach(), adam, msg=name)


def test_lamb_resumes_a_state_saved_before_adapt_existed():
    w = torch.nn.Parameter(torch.ones(3))
    state = Lamb([w], lr=0.1).state_dict()
    for group in state["param_groups"]:
        del group["adapt"]
    opt = Lamb([w], lr=0.1, adapt=False)
    opt.load_state_dict(state)
    w.grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["adapt"] is True


def test_lamb_trains_a_small_model():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = Lamb(model.parameters(), lr=0.02, weight_decay=0.0)
    first = None
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_schedule_warms_up_then_decays_to_zero():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = warmup_linear(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    lrs.append(sched.get_last_lr()[0])
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])  # the peak lr at the end of warm-up
    assert lrs[4:] == pytest.approx([(12 - s) / 8 for s in range(4, 13)])  # linear to 0 at the last step
    assert lrs[-1] == 0.0


def test_triangle_rises_from_a_quarter_to_the_peak_at_three_quarters_then_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = triangle(opt, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    lrs.append(sched.get_last_lr()[0])
    assert lrs[0] == pytest.approx(0.25) and lrs[75] == pytest.approx(1.0) and lrs[100] == 0.0
    assert max(lrs) == lrs[75] and lrs[50] == pytest.approx(0.75) and lrs[90] == pytest.approx(0.4)


def test_warmup_is_a_fraction_or_a_step_count():
    assert warmup_steps_for(1000, 0.1) == 100
    assert warmup_steps_for(1001, 0.1) == 101  # rounded up
    assert warmup_steps_for(100, 0.07) == 7 and warmup_steps_for(300, 0.07) == 21  # 0.07 x 100 is 7.000000000000001
    assert warmup_steps_for(1000, 250) == 250
    assert warmup_steps_for(1000, 0) == 0


def test_no_weight_decay_on_biases_and_layer_norms():
    model = BertForPreTraining(BertConfig.from_preset("tiny", vocab_size=50))
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"cls.predictions.bias", "bert.embeddings.LayerNorm.weight"}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_build_optimizer_names():
    model = torch.nn.Linear(2, 2)
    assert isinstance(build_optimizer(model, "adamw", 1e-3, 0.01), torch.optim.AdamW)
    lamb = build_optimizer(model, "lamb", 1e-3, 0.01, betas=(0.8, 0.9))
    assert isinstance(lamb, Lamb) and lamb.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(BertkitError, match="adamw or lamb"):
        build_optimizer(model, "sgd", 1e-3, 0.01)
    assert math.isclose(lamb.param_groups[0]["lr"], 1e-3)
