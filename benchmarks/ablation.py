"""What each of bertkit's optimisations pays: bertkit as shipped against bertkit with that one optimisation undone.

    python benchmarks/ablation.py                                  # every optimisation on the default cases
    python benchmarks/ablation.py --cases pretrain-mini --undo padded-encoder

The cases, batches, timing and alternation are those of benchmarks/run.py (only bertkit's model is built). Each
variant patches bertkit for the duration of its own steps only, so the shipped and the undone versions run on the
same model, optimizer and batches, alternating round by round. The ratio shipped / undone is what the optimisation
pays; below 1 it costs. It also reports how much of a pretraining step the optimizer takes, which decides whether
a sparse update of the embedding matrix could pay.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

import run
from bertkit import model as M


@contextmanager
def patched(owner, name: str, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


# The optimisations, each undone by one patch -------------------------------------------------------------------

_pretraining_forward = M.BertForPreTraining.forward


def _every_position(self, *args, masked_positions=None, **kwargs):
    return _pretraining_forward(self, *args, **kwargs)  # labels of -100 skip the unmasked positions in the loss


def _three_gemms(self, x, layout):
    B, S = layout.batch, layout.span
    q, k, v = (layout.to_attention(linear(x)).view(B, S, self.num_heads, self.head_size).transpose(1, 2)
               for linear in (self.query, self.key, self.value))
    y = layout.attend(q, k, v, self.dropout_p if self.training else 0.0)
    return layout.from_attention(y.transpose(1, 2).reshape(B, S, self.num_heads * self.head_size))


def _attention_by_hand(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        T = q.shape[-2]
        attn_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return F.dropout(scores.softmax(-1), dropout_p) @ v


UNDO = {
    "mlm-on-every-position": lambda: patched(M.BertForPreTraining, "forward", _every_position),
    # every layer on the padded (B, T, H) batch; the same masks (padding, causal, windows)
    "padded-encoder": lambda: patched(M, "packs", lambda *args: False),
    # the GPU's rule (small batches stay padded) undone: always packed (the same as shipped on the CPU)
    "packing-rule": lambda: patched(M, "packs", lambda *args: True),
    "three-qkv-gemms": lambda: patched(M.BertSelfAttention, "forward", _three_gemms),
    "attention-by-hand": lambda: patched(M.F, "scaled_dot_product_attention", _attention_by_hand),
    # the CPU's re-padded length inside attention kept at T instead of rounded up to whole blocks of 16
    "attention-blocks-of-16": lambda: patched(M, "ATTENTION_MULTIPLE", 1),
    # with --bf16 on the CPU: training attends in bf16 instead of fp32
    "fp32-attention-in-bf16-training": lambda: patched(M, "attends_in_fp32", lambda q: False),
    # with --kernels attention=varlen: Q, K, V re-padded for one masked SDPA call instead
    "varlen-attention": lambda: patched(M, "sequence_offsets", lambda *args: None),
    # with --kernels pack_multiple=...: the real tokens only, their count changing every batch
    "filler-rows": lambda: patched(M, "with_filler_rows", lambda keep, indices, multiple: indices),
}
PRETRAINING_ONLY = {"mlm-on-every-position"}  # it cannot matter in the other cases, so it is not measured there
CPU_BF16_ONLY = {"fp32-attention-in-bf16-training"}  # the same: only training on the CPU under --bf16
# choices that are off by default, each with the --kernels choice that turns it on: undone only where it is on
OPT_IN = {"varlen-attention": "attention=varlen", "filler-rows": "pack_multiple=1024"}


def turned_on(undo: str, kernels: M.Kernels) -> bool:
    name = OPT_IN[undo].partition("=")[0]
    return getattr(kernels, name) != getattr(M.Kernels(), name)


DEFAULT_CASES = ["pretrain-mini", "pretrain-base", "finetune-squad", "inference-b32"]


def not_on_path(undo: str, bench, kernels: M.Kernels, compiled: bool, shipped: list) -> str | None:
    """Why undoing `undo` would change nothing in this case (None when it changes something): its row would time
    the same code twice and report the noise as what the optimisation pays."""
    if undo == "attention-blocks-of-16" and bench.gpu:
        return "a GPU's re-padded attention is not rounded up to blocks"
    if undo == "attention-by-hand" and kernels.attention == "varlen":
        return "varlen attention calls no SDPA"
    if undo == "three-qkv-gemms" and (compiled or kernels.attention == "varlen"):
        return ("compiled blocks keep the forward they were traced with" if compiled else
                "the three-GEMM forward re-pads, so it would undo varlen attention as well")
    if undo == "packing-rule" or undo in ON_PACKED_ROWS:
        layouts = layouts_of(shipped[0][0])
        if undo == "packing-rule" and not any(padded and not packed for padded, packed, _ in layouts):
            return "the shipped rule packs every batch of this case already"  # "always packed" changes nothing
        if undo in ON_PACKED_ROWS and not any(packed for _, packed, _ in layouts):
            return "no batch of this case is packed (none has padding, or the packing rule keeps it padded)"
        if undo == "attention-blocks-of-16" and not any(rounded for _, _, rounded in layouts):
            return "every packed batch's length is a whole number of blocks of 16 already"  # pretraining's 128
    return None


# undone variants that only change how packed rows are computed: where every batch stays padded they change nothing
ON_PACKED_ROWS = {"padded-encoder", "attention-blocks-of-16", "varlen-attention", "filler-rows"}


def layouts_of(unit) -> list[tuple[bool, bool, bool]]:
    """(padded, packed, rounded up for attention) for each batch layout that one run of `unit` builds."""
    seen, init = [], M.Layout.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append((self.attn_mask is not None, self.indices is not None, self.span != self.length))

    with patched(M.Layout, "__init__", record):
        unit()
    return seen


def undone(units: list, undo) -> list:
    def call(fn):
        with undo():
            fn()

    return [(lambda fn=fn: call(fn), n) for fn, n in units]


def optimizer_share(preset: str, batch_size: int, repeats: int = 5) -> dict:
    """One pretraining step split into forward + backward and the AdamW update, and the embedding matrix's share of
    the parameters: a sparse embedding update can save at most the update's share of the step."""
    from bertkit.train.optim import build_optimizer

    torch.manual_seed(0)
    model = M.BertForPreTraining(run.config_for(preset)).train()
    (batch,) = run.pretraining_batches(batch_size, 1)
    opt = build_optimizer(model, "adamw", 1e-4, 0.01)
    backward, update = [], []
    for _ in range(repeats + 1):
        opt.zero_grad(set_to_none=True)
        t = time.perf_counter()
        model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], labels=batch["labels"],
              next_sentence_label=batch["next_sentence_label"], masked_positions=batch["labels"] != -100).loss.backward()
        backward.append(time.perf_counter() - t)
        t = time.perf_counter()
        opt.step()
        update.append(time.perf_counter() - t)
    fwd_bwd, step = min(backward[1:]), min(update[1:])
    total = sum(p.numel() for p in model.parameters())
    return {"case": f"pretrain-{preset}", "forward_backward_s": fwd_bwd, "optimizer_s": step,
            "optimizer_share": step / (fwd_bwd + step),
            "embedding_share_of_parameters": model.bert.embeddings.word_embeddings.weight.numel() / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=[c for c in run.CASES if c != "prepare"], default=DEFAULT_CASES)
    parser.add_argument("--undo", nargs="+", choices=list(UNDO), help="optimisations to undo (default: every one "
                        "that is on: " + ", ".join(OPT_IN) + " only with their --kernels choice)")
    run.add_case_arguments(parser, batches=2)
    run.add_kernel_arguments(parser)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16 autocast, as in run.py")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = M.Kernels(**run.kernel_choices(parser, args.kernels))
    for undo in set(args.undo or []) & set(OPT_IN):
        if not turned_on(undo, kernels):
            parser.error(f"--undo {undo}: it is off unless turned on, e.g. --kernels {OPT_IN[undo]}")
    args.undo = args.undo or [u for u in UNDO if u not in OPT_IN or turned_on(u, kernels)]
    bench = run.bench_from(parser, args, args.device, only="bertkit")
    info = run.machine(bench)
    print(json.dumps(info))
    rows = []
    for name in args.cases:
        case = run.CASES[name](bench, args)
        shipped = case.units["bertkit"]
        for undo in args.undo:
            if undo in PRETRAINING_ONLY and not name.startswith("pretrain"):
                continue
            if undo in CPU_BF16_ONLY and (bench.gpu or not bench.cpu_bf16 or not case.training):
                continue
            reason = not_on_path(undo, bench, kernels, bool(args.compile), shipped)
            if reason:
                rows.append({"case": name, "undone": undo, "not_measured": reason})
                print(f"{name:16s} undo {undo:22s} not measured: {reason}", flush=True)
                continue
            case.units = {"shipped": shipped, undo: undone(shipped, UNDO[undo])}
            r = run.measure(bench, case, args.rounds, args.warmup)
            row = {"case": name, "undone": undo, "shipped_tokens_per_s": r["shipped"]["tokens_per_s"],
                   "undone_tokens_per_s": r[undo]["tokens_per_s"]}
            row["pays"] = row["shipped_tokens_per_s"] / row["undone_tokens_per_s"]
            rows.append(row)
            print(f"{name:16s} undo {undo:22s} shipped {row['shipped_tokens_per_s']:8.0f} tok/s  undone "
                  f"{row['undone_tokens_per_s']:8.0f} tok/s  pays {row['pays']:.2f}x", flush=True)
        del case
    shares = [optimizer_share(p, 32 if p == "mini" else 8) for p in ("mini", "base")
              if f"pretrain-{p}" in args.cases and not bench.gpu]
    for s in shares:
        print(f"{s['case']:16s} AdamW update {s['optimizer_s'] * 1e3:.0f} ms of a {1e3 * (s['forward_backward_s'] + s['optimizer_s']):.0f} ms "
              f"step ({s['optimizer_share']:.1%}); word embeddings hold {s['embedding_share_of_parameters']:.0%} of the parameters")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ablation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": info, "args": vars(args), "results": rows, "optimizer": shares}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
