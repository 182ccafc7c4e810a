"""What `finetune --layer-lr-decay` costs a step: the AdamW update over 2 parameter groups (one lr) against the 2 x
(L + 2) groups layer-wise decay makes (one lr per layer), and a whole training step of a classifier with each.

The same model and batch, fused AdamW both ways; medians over --rounds after a warm-up. The updates agree: both
optimizers start from the same weights and take the same gradients, and with decay 1 the two layouts are the same
update (checked here to float rounding).

    python benchmarks/optimizer_groups.py --preset base --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bertkit.config import BertConfig
from bertkit.model import BertForSequenceClassification
from bertkit.train.optim import build_optimizer


def timed(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig.from_preset(args.preset, num_labels=2))
    ids = torch.randint(5, 30000, (args.batch, args.length))
    labels = torch.randint(0, 2, (args.batch,))
    results = {}
    for name, decay in (("one lr (2 groups)", 1.0), ("layer-wise decay 0.8", 0.8)):
        m = copy.deepcopy(model)
        optimizer = build_optimizer(m, "adamw", 2e-5, 0.01, layer_lr_decay=decay)
        m(ids, labels=labels).loss.backward()

        def update():
            optimizer.step()

        def step():
            optimizer.zero_grad()
            m(ids, labels=labels).loss.backward()
            optimizer.step()

        results[name] = {"groups": len(optimizer.param_groups), "update_ms": 1e3 * timed(update, args.rounds),
                         "step_ms": 1e3 * timed(step, args.rounds)}
    # with decay 1 written as per-layer groups, the update is the one-lr update
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = build_optimizer(a, "adamw", 1e-3, 0.01)
    opt_b = torch.optim.AdamW([g | {"lr": 1e-3} for g in
                               build_optimizer(b, "adamw", 1e-3, 0.01, layer_lr_decay=0.5).param_groups], eps=1e-6)
    for m, opt in ((a, opt_a), (b, opt_b)):
        m.eval()(ids[:2], labels=labels[:2]).loss.backward()
        opt.step()
    same = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    for name, r in results.items():
        print(f"{name:22s} {r['groups']:3d} groups  update {r['update_ms']:7.1f} ms  step {r['step_ms']:8.1f} ms")
    base, llrd = results.values()
    print(f"layer-wise decay / one lr: update {llrd['update_ms'] / base['update_ms']:.3f}x, step "
          f"{llrd['step_ms'] / base['step_ms']:.3f}x; same update at equal rates: max difference {same:.2e}")


if __name__ == "__main__":
    main()
