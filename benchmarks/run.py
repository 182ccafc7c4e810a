"""Side-by-side speed and memory: bertkit against transformers on the same config, weights, batches and threads.

    python benchmarks/run.py --suite cpu                 # every case, results into benchmarks/results/
    python benchmarks/run.py --cases pretrain-mini       # one case

Each case builds both models from the same weights, feeds both the same batches of real text from
$BERTKIT_DATA, alternates bertkit and transformers round by round (warm-up rounds excluded) and reports
tokens/s for both, their ratio, model FLOP utilisation against the measured fp32 matmul peak of this
machine, and peak memory (each side measured alone in a fresh subprocess, as the peak resident set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import bertkit
from bertkit.model import flops_per_token

HERE = Path(__file__).resolve().parent
SIDES = ("bertkit", "transformers")


def data_dir() -> Path:
    root = os.environ.get("BERTKIT_DATA") or str(HERE.parent.parent / "shared" / "data")
    if not Path(root).is_dir():
        sys.exit(f"benchmarks need the real data: set BERTKIT_DATA (tried {root})")
    return Path(root)


def machine() -> dict:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    import transformers

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """The best fp32 GEMM rate this machine sustains at these threads: the denominator of MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------------------------
# Inputs: real text, tokenized once


def tokenizer():
    return bertkit.Tokenizer.from_pretrained(data_dir() / "checkpoints" / "all-MiniLM-L6-v2")


def pretraining_batches(batch_size: int, n_batches: int, max_length: int = 128, seed: int = 0) -> list[dict]:
    """MLM+NSP batches built by bertkit's own data pipeline from the python-docs corpus: the corpus's natural
    length distribution (most examples fill max_length, short ones where documents end or by short_seq_prob)."""
    from bertkit.data.prepare import PreparedCorpus, prepare
    from bertkit.data.pretraining import PretrainingDataset

    tok = tokenizer()
    out = Path(tempfile.gettempdir()) / "bertkit-bench-prepared"
    prepare([str(data_dir() / "corpus" / "python-docs-3.11.txt")], tok, out, progress=False)
    ds = PretrainingDataset(PreparedCorpus(out), tok, max_length=max_length, seed=seed)
    order = random.Random(seed).sample(range(len(ds)), batch_size * n_batches)
    return [ds.collate([ds[i] for i in order[k * batch_size : (k + 1) * batch_size]]) for k in range(n_batches)]


def sst2_sentences(split: str = "train") -> list[str]:
    from bertkit.data.glue import read_glue

    return [ex.text_a for ex in read_glue("SST-2", data_dir() / "glue" / "SST-2", split)]


def pad_batch(encoded: list[dict], tok) -> dict:
    longest = max(len(e["input_ids"]) for e in encoded)
    out = {k: torch.zeros(len(encoded), longest, dtype=torch.long) for k in ("input_ids", "token_type_ids", "attention_mask")}
    out["input_ids"].fill_(tok.pad_id)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        for k in out:
            out[k][i, :n] = torch.tensor(e[k])
    return out


def length_grouped(items: list, length, batch_size: int, seed: int) -> list[list]:
    """Shuffle, then sort by length inside chunks of 50 batches, so each batch holds similar lengths."""
    items = items[:]
    random.Random(seed).shuffle(items)
    chunk = 50 * batch_size
    batches = []
    for c in range(0, len(items), chunk):
        part = sorted(items[c : c + chunk], key=length)
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    random.Random(seed + 1).shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------------------------
# Models: the same weights on both sides


def twin_models(cls_name: str, config: bertkit.BertConfig):
    import transformers

    torch.manual_seed(0)
    ours = getattr(bertkit, cls_name)(config)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = getattr(transformers, cls_name).from_pretrained(d, attn_implementation="sdpa")
    return {"bertkit": ours, "transformers": theirs}


def config_for(preset: str, **kw) -> bertkit.BertConfig:
    return bertkit.BertConfig.from_preset(preset, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Cases: each returns {side: (step function over one unit of work, real tokens in that unit)} plus FLOPs per token


@dataclass
class Case:
    name: str
    what: str
    config: bertkit.BertConfig
    seq_len: int
    training: bool
    units: dict = field(default_factory=dict)  # side -> list of (callable, real_tokens)


def _train_step(model, optimizer, batch, call):
    optimizer.zero_grad(set_to_none=True)
    loss = call(model, batch)
    loss.backward()
    optimizer.step()


def case_pretrain(preset: str, batch_size: int, n_batches: int) -> Case:
    config = config_for(preset)
    models = twin_models("BertForPreTraining", config)
    batches = pretraining_batches(batch_size, n_batches)
    case = Case(f"pretrain-{preset}", f"MLM+NSP training step, {preset}, batch {batch_size}, length 128 (real corpus lengths)", config, 128, True)
    from bertkit.train.optim import build_optimizer

    def ours(model, b):
        return model(b["input_ids"], b["token_type_ids"], b["attention_mask"], labels=b["labels"],
                     next_sentence_label=b["next_sentence_label"], masked_positions=b["labels"] != -100).loss

    def theirs(model, b):
        return model(**b).loss

    for side, call in (("bertkit", ours), ("transformers", theirs)):
        model = models[side].train()
        opt = build_optimizer(model, "adamw", 1e-4, 0.01)
        case.units[side] = [(lambda b=b, m=model, o=opt, c=call: _train_step(m, o, b, c), int(b["attention_mask"].sum())) for b in batches]
    return case


def case_finetune_sst2(preset: str, batch_size: int, n_examples: int) -> Case:
    """An epoch over the same SST-2 examples: bertkit with length-grouped batches, transformers with its own
    dynamic padding (random batches padded to their longest); both unpadded work compared per real token."""
    tok = tokenizer()
    config = config_for(preset, num_labels=2)
    models = twin_models("BertForSequenceClassification", config)
    sentences = random.Random(0).sample(sst2_sentences(), n_examples)
    encoded = [tok.encode(s, max_length=128) for s in sentences]
    labels = [i % 2 for i in range(n_examples)]
    items = list(zip(encoded, labels))
    random.Random(0).shuffle(items)
    plain = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    grouped = length_grouped(items, lambda x: len(x[0]["input_ids"]), batch_size, seed=0)
    case = Case(f"finetune-sst2-{preset}", f"SST-2 fine-tuning epoch over {n_examples} sentences, {preset}, batch {batch_size}", config, 64, True)
    from bertkit.train.optim import build_optimizer

    for side, batches in (("bertkit", grouped), ("transformers", plain)):
        model = models[side].train()
        opt = build_optimizer(model, "adamw", 2e-5, 0.01)
        units = []
        for group in batches:
            b = pad_batch([e for e, _ in group], tok)
            b["labels"] = torch.tensor([y for _, y in group])
            units.append((lambda b=b, m=model, o=opt: _train_step(m, o, b, lambda m, b: m(**b).loss), int(b["attention_mask"].sum())))
        case.units[side] = [(lambda us=units: [u() for u, _ in us], sum(n for _, n in units))]
    return case


def case_squad(preset: str, batch_size: int, n_batches: int) -> Case:
    """SQuAD windows of up to 384 tokens (doc stride 128); both sides padded to the longest window in the batch."""
    from bertkit.data.squad import featurize, read_squad

    tok = tokenizer()
    config = config_for(preset)
    models = twin_models("BertForQuestionAnswering", config)
    examples = read_squad(data_dir() / "squad" / "dev-v1.1.json")
    examples = random.Random(0).sample(examples, batch_size * n_batches)
    features = featurize(examples, tok, max_length=384, doc_stride=128)[: batch_size * n_batches]
    case = Case(f"finetune-squad-{preset}", f"SQuAD v1.1 fine-tuning step, {preset}, batch {batch_size}, length 384", config, 384, True)
    from bertkit.train.optim import build_optimizer

    batches = []
    for k in range(0, len(features), batch_size):
        group = features[k : k + batch_size]
        enc = [{"input_ids": f.input_ids[: sum(f.attention_mask)], "token_type_ids": f.token_type_ids[: sum(f.attention_mask)],
                "attention_mask": f.attention_mask[: sum(f.attention_mask)]} for f in group]
        b = pad_batch(enc, tok)
        b["start_positions"] = torch.tensor([f.start_position for f in group])
        b["end_positions"] = torch.tensor([f.end_position for f in group])
        batches.append(b)
    for side in SIDES:
        model = models[side].train()
        opt = build_optimizer(model, "adamw", 3e-5, 0.01)
        case.units[side] = [(lambda b=b, m=model, o=opt: _train_step(m, o, b, lambda m, b: m(**b).loss), int(b["attention_mask"].sum())) for b in batches]
    return case


def case_inference(preset: str, batch_size: int, n_batches: int) -> Case:
    tok = tokenizer()
    config = config_for(preset, num_labels=2)
    models = twin_models("BertForSequenceClassification", config)
    sentences = random.Random(1).sample(sst2_sentences("dev"), batch_size * n_batches)
    batches = [pad_batch([tok.encode(s, max_length=128) for s in sentences[k : k + batch_size]], tok)
               for k in range(0, len(sentences), batch_size)]
    case = Case(f"inference-b{batch_size}-{preset}", f"SST-2 dev classification, inference, {preset}, batch {batch_size}", config, 64, False)

    def run(model, b):
        with torch.inference_mode():
            model(**b)

    for side in SIDES:
        model = models[side].eval()
        case.units[side] = [(lambda b=b, m=model: run(m, b), int(b["attention_mask"].sum())) for b in batches]
    return case


CASES = {
    "pretrain-mini": lambda a: case_pretrain("mini", 32, a.batches),
    "pretrain-base": lambda a: case_pretrain("base", 8, a.batches),
    "finetune-sst2": lambda a: case_finetune_sst2(a.preset, 32, 32 * a.batches),
    "finetune-squad": lambda a: case_squad(a.preset, 4, a.batches),
    "inference-b32": lambda a: case_inference(a.preset, 32, a.batches),
    "inference-b1": lambda a: case_inference(a.preset, 1, 8 * a.batches),
}


def measure(case: Case, rounds: int, warmup: int) -> dict:
    """Alternate sides unit by unit; the first `warmup` rounds are not counted."""
    seconds = {s: [] for s in SIDES}
    tokens = {s: 0 for s in SIDES}
    for r in range(warmup + rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for side in order:
            for fn, n in case.units[side]:
                dt = _time(fn)
                if r >= warmup:
                    seconds[side].append(dt)
                    tokens[side] += n
    out = {}
    for side in SIDES:
        total = sum(seconds[side])
        out[side] = {"tokens_per_s": tokens[side] / total, "seconds": total,
                     "median_unit_s": statistics.median(seconds[side])}
    return out


def peak_memory_mb(case_name: str, side: str, args) -> float:
    """Peak resident memory of one side running the case alone, in a fresh process."""
    cmd = [sys.executable, __file__, "--probe", case_name, side, "--batches", str(args.batches),
           "--preset", args.preset, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def probe(case_name: str, side: str, args) -> None:
    case = CASES[case_name](args)
    for other in SIDES:
        if other != side:
            case.units[other] = []
    import gc

    gc.collect()
    for fn, _ in case.units[side]:
        fn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["cpu"], help="run every case")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="run these cases")
    parser.add_argument("--preset", default="base", help="model size for the fine-tuning and inference cases")
    parser.add_argument("--batches", type=int, default=3, help="batches per side per round")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds, not counted")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, the same for both")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON results and the plot")
    parser.add_argument("--probe", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        return probe(*args.probe, args)
    names = list(CASES) if args.suite else (args.cases or parser.error("give --suite cpu or --cases"))
    info = machine()
    info["matmul_peak_gflops"] = peak = matmul_peak_gflops()
    print(json.dumps(info))
    results = []
    for name in names:
        case = CASES[name](args)
        r = measure(case, args.rounds, args.warmup)
        flops = flops_per_token(case.config, case.seq_len, case.training)
        row = {"case": name, "what": case.what, "ratio": r["bertkit"]["tokens_per_s"] / r["transformers"]["tokens_per_s"]}
        for side in SIDES:
            row[side] = {**r[side], "mfu": r[side]["tokens_per_s"] * flops / (peak * 1e9)}
            if not args.no_memory:
                row[side]["peak_mb"] = peak_memory_mb(name, side, args)
        results.append(row)
        b, t = row["bertkit"], row["transformers"]
        mem = f"  peak MB {b['peak_mb']:.0f} vs {t['peak_mb']:.0f}" if not args.no_memory else ""
        print(f"{name:16s} bertkit {b['tokens_per_s']:9.0f} tok/s  transformers {t['tokens_per_s']:9.0f} tok/s  "
              f"ratio {row['ratio']:.2f}x  MFU {b['mfu']:.0%} vs {t['mfu']:.0%}{mem}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}.json").write_text(json.dumps({"machine": info, "args": vars(args), "results": results}, indent=2))
    plot(results, info, out / "ratios.png")
    print(f"wrote {out / (stamp + '.json')} and {out / 'ratios.png'}")


def plot(results: list[dict], info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(results) + 1.5))
    names = [r["case"] for r in results]
    ratios = [r["ratio"] for r in results]
    ax.barh(names, ratios, color=["tab:green" if x >= 1 else "tab:red" for x in ratios])
    ax.axvline(1.0, color="black", lw=1)
    for y, x in enumerate(ratios):
        ax.text(x, y, f" {x:.2f}x", va="center")
    ax.set_xlabel("bertkit tokens/s ÷ transformers tokens/s (higher is better)")
    ax.set_title(f"{info['cpu']}, {info['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
