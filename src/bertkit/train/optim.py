"""Optimisers (AdamW, LAMB) and learning-rate schedules: the paper's linear warm-up then linear decay to zero, and
Cramming's triangle."""

from __future__ import annotations

import math

import torch
from torch import nn

from bertkit.errors import BertkitError


def param_groups(model: nn.Module, weight_decay: float, layer_lr_decay: float = 1.0) -> list[dict]:
    """Decay every weight matrix; not biases, LayerNorm parameters or the MLM output bias (as the original BERT).

    With `layer_lr_decay` below 1 (layer-wise learning-rate decay, ELECTRA's fine-tuning recipe), each group also
    has an `lr_scale`: 1 for the heads and the pooler, `layer_lr_decay` for the top encoder block, its square for
    the block below, ..., `layer_lr_decay` ** (L + 1) for the embeddings (`parameter_depth`)."""
    depths = {name: parameter_depth(name) for name, _ in model.named_parameters()}
    top = max((d for d in depths.values() if d is not None), default=0) + 1  # the pooler's and heads' depth
    groups: dict[tuple[int, bool], list] = {}  # (layers below the top, a vector): the parameters
    for name, p in model.named_parameters():
        if p.requires_grad:
            height = 0 if layer_lr_decay == 1 or depths[name] is None else top - depths[name]
            groups.setdefault((height, p.ndim < 2 or "LayerNorm" in name), []).append(p)
    if layer_lr_decay == 1:
        return [{"params": groups.get((0, vector), []), "weight_decay": 0.0 if vector else weight_decay}
                for vector in (False, True)]
    return [{"params": params, "weight_decay": 0.0 if vector else weight_decay, "lr_scale": layer_lr_decay ** height}
            for (height, vector), params in sorted(groups.items())]


def parameter_depth(name: str) -> int | None:
    """How deep a parameter sits in the encoder: 0 for the embeddings, i + 1 for encoder block i, None above the
    encoder (the pooler, a task head)."""
    parts = name.split(".")
    if "embeddings" in parts:
        return 0
    for i in range(len(parts) - 2):
        if parts[i] == "encoder" and parts[i + 1] == "layer":
            return int(parts[i + 2]) + 1
    return None


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019): Adam's update rescaled per tensor by ||w|| / ||update||.

    The trust ratio lets every layer take a step proportional to its own weight norm, which is what keeps
    very large batches (32k and more) stable for BERT pretraining where plain Adam diverges. A group with
    `adapt` False takes Adam's step unscaled: `build_optimizer` so marks the biases and LayerNorm parameters, as
    Google's LAMB (exclude_from_layer_adaptation) and NVIDIA's FusedLAMB (use_nvlamb off) leave them.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, adapt=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adapt=adapt))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # a checkpoint saved before `adapt` existed: the trust ratio everywhere
            group.setdefault("adapt", True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    w_norm, u_norm = p.norm(), update.norm()
                    update.mul_(torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm)))
                p.add_(update, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-6,
                    layer_lr_decay: float = 1.0):
    """AdamW (the paper's Adam with decoupled weight decay) or LAMB, over `param_groups`; each group's lr is `lr`
    times its `lr_scale` where it has one (`layer_lr_decay` below 1).

    AdamW is torch's fused kernel on the CPU and CUDA: one pass over each tensor instead of one per operation. On a
    2-core Xeon it took a BERT-Base pretraining step (batch 8 x 128) from 3.08 s to 2.60 s in fp32 and from 1.88 s to
    1.23 s under bf16 autocast; the same updates to float rounding (benchmarks/RESULTS.md, stop 34)."""
    groups = [g | {"lr": lr * g["lr_scale"]} if "lr_scale" in g else g
              for g in param_groups(model, weight_decay, layer_lr_decay)]
    if name == "adamw":
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    if name == "lamb":  # biases and LayerNorm (the groups of vectors) without the trust ratio, as in BERT's
        # recipes; chosen by group, not by its decay rate: with --weight-decay 0 the matrices keep the trust ratio
        return Lamb([g | {"adapt": not g["params"] or g["params"][0].ndim > 1} for g in groups], lr=lr, betas=betas,
                    eps=eps)
    raise BertkitError(f"unknown optimizer {name!r} (expected adamw or lamb)")


def optimizer_step(model: nn.Module, optimizer, scheduler, loss: torch.Tensor, max_grad_norm: float, scaler=None,
                   d=None) -> bool:
    """After backward: unscale (fp16), clip, then step the optimizer, unless the loss or the gradient norm is nan or
    inf; then no update is made. The schedule advances either way, so the lr keeps following the step count (as
    with fp16 loss scaling, whose overflow steps the scaler skips by itself and are not counted here). Returns
    whether the update was made; every process takes the same decision.

    Checking costs one device-to-host copy per step; a skipped NaN step is worth more than that on any device.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
    bad = ~torch.isfinite(loss.detach().float())
    if scaler is None or not scaler.is_enabled():
        bad = bad | ~torch.isfinite(norm.float())
    bad = bad.float().reshape(1)
    if d is not None and d.enabled:  # gradients agree across processes after DDP, losses do not
        import torch.distributed as dist

        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    ok = not bool(bad.item())
    if ok:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return ok


def warmup_linear(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over `warmup_steps`, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def triangle(optimizer, total_steps: int, start: float = 0.25, peak_at: float = 0.75) -> torch.optim.lr_scheduler.LambdaLR:
    """Cramming's budget triangle: from `start` x the peak lr, up linearly to the peak at `peak_at` of the run, then
    linearly down to 0 at `total_steps`. No warm-up from 0: the run starts at a quarter of the peak."""

    def factor(step: int) -> float:
        x = step / max(1, total_steps)
        return max(0.0, min(start + x * (1 - start) / peak_at, (1 - x) / (1 - peak_at)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_steps_for(total_steps: int, warmup: float) -> int:
    """`warmup` below 1 is a fraction of the run (fine-tuning's 10%), otherwise a step count (pretraining's 10k)."""
    # rounded before the ceiling: a decimal fraction is not exact in binary, and 0.07 x 100 is 7.000000000000001
    return int(math.ceil(round(warmup * total_steps, 6))) if warmup < 1 else int(warmup)
