"""Side-by-side speed and memory: bertkit against transformers on the same config, weights, batches and threads.

    python benchmarks/run.py --suite cpu                 # every CPU case, results into benchmarks/results/
    python benchmarks/run.py --cases pretrain-mini       # one case
    python benchmarks/run.py --suite gpu                 # on a CUDA GPU: bf16 autocast and fused AdamW on both sides
    python benchmarks/run.py --suite cpu --bf16          # on a CPU with bf16 units (AMX, AVX512-BF16): bf16 autocast

Each case builds both models from the same weights, feeds both the same batches of real text from
$BERTKIT_DATA, alternates bertkit and transformers round by round (warm-up rounds excluded) and reports
tokens/s for both, their ratio, model FLOP utilisation against the measured matmul peak of this
machine (in the precision the cases run in), and peak memory (CPU: each side alone in a fresh subprocess, as the peak
resident set; GPU: the peak of CUDA memory allocated above the weights and optimizer state while that side runs).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from dataclasses import dataclass, field
from pathlib import Path

import torch

import bertkit
from bertkit.config import PRESETS
from bertkit.model import COMPILE_MODES, flops_per_token

HERE = Path(__file__).resolve().parent
SIDES = ("bertkit", "transformers")


@dataclass
class Bench:
    """Where and how the cases run, passed to every case (no module state): the device (on CUDA both sides under
    bf16 autocast, on the CPU with `cpu_bf16`), bertkit's encoder blocks through torch.compile or not (transformers
    stays eager), and in a memory probe the one side to build."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compile: str | None = None  # a mode of bertkit.model.compile_blocks, or None: eager
    only: str | None = None
    kernels: dict = field(default_factory=dict)  # bertkit's Kernels choices (bertkit.model.set_kernels)
    bucket: int = 1  # pad every batch to a multiple of this many positions (shapes repeat; the padding is masked)
    cpu_bf16: bool = False  # on the CPU too, both sides under bf16 autocast (fp32 otherwise)
    activation_checkpointing: bool = False  # both sides keep only each block's input (rerun in backward)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def bf16(self) -> bool:
        return self.gpu or self.cpu_bf16

    def on_device(self, batch: dict) -> dict:
        from bertkit.data.batching import bucketed

        T = batch["input_ids"].shape[1]
        extra = bucketed(T, self.bucket) - T
        fills = {"input_ids": 0, "token_type_ids": 0, "attention_mask": 0, "labels": -100}
        return {k: (torch.nn.functional.pad(v, (0, extra), value=fills[k]) if extra and k in fills and v.dim() == 2
                    else v).to(self.device) for k, v in batch.items()}

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize(self.device)

    def time(self, fn) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t


def data_dir() -> Path:
    root = os.environ.get("BERTKIT_DATA") or str(HERE.parent.parent / "shared" / "data")
    if not Path(root).is_dir():
        sys.exit(f"benchmarks need the real data: set BERTKIT_DATA (tried {root})")
    return Path(root)


def study_parser(doc: str, out: str, summary: str) -> argparse.ArgumentParser:
    """The parser a study script starts from: --data (the shared data, default $BERTKIT_DATA), --out (its run
    folders, default runs/OUT) and --summary (its committed JSON, default docs/SUMMARY)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("BERTKIT_DATA", HERE.parent.parent / "shared"
                                                                           / "data")))
    parser.add_argument("--out", type=Path, default=Path("runs") / out)
    parser.add_argument("--summary", type=Path, default=HERE.parent / "docs" / summary)
    return parser


def machine(bench: Bench | None = None) -> dict:
    if bench is not None and bench.gpu:
        import transformers

        props = torch.cuda.get_device_properties(bench.device)
        return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cores": os.cpu_count(),
                "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                "python": platform.python_version(), "precision": "bf16 autocast"}
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
        "precision": "bf16 autocast" if bench is not None and bench.bf16 else "fp32",
    }


def bf16_emulated(bench: Bench) -> bool:
    """Whether the cases run bf16 on a CPU without bf16 instructions (AVX512-BF16, AMX): oneDNN then emulates it,
    at a rate that depends on the shapes so much (0.3 GFLOP/s for 2048-sized products on an AVX2 EPYC, several times
    that for a tiny model's) that no measured GEMM rate bounds a model's: no MFU is reported there."""
    return bench.bf16 and not bench.gpu and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def matmul_peak_gflops(bench: Bench, repeats: int = 8) -> float:
    """The best GEMM rate this machine sustains (bf16 on GPU; on CPU at these threads, fp32 or bf16 as the cases run):
    the denominator of MFU.
    The best of a square product and of base's FFN shapes at 4,096 tokens; main() measures it again after every case
    and keeps the highest, because a shared CPU's clock moves by ±15% from minute to minute."""
    if bench.gpu:
        shapes, dtype = [(8192, 8192, 8192)], torch.bfloat16
    else:
        shapes = [(2048, 2048, 2048), (4096, 768, 3072), (4096, 3072, 768)]
        dtype = torch.bfloat16 if bench.bf16 else torch.float32
    best_rate = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=bench.device, dtype=dtype), torch.randn(k, n, device=bench.device, dtype=dtype)
        for _ in range(2):
            a @ b
        best = min(bench.time(lambda: a @ b) for _ in range(repeats))
        best_rate = max(best_rate, 2 * m * k * n / best / 1e9)
    return best_rate


# ---------------------------------------------------------------------------------------------------------------
# Inputs: real text, tokenized once


def tokenizer():
    return bertkit.Tokenizer.from_pretrained(data_dir() / "checkpoints" / "all-MiniLM-L6-v2")


def pretraining_dataset(max_length: int = 128, seed: int = 0):
    """MLM+NSP examples built by bertkit's own data pipeline from the python-docs corpus (prepared once, in the temp
    folder): the corpus's natural length distribution (most fill max_length, short ones where documents end or by
    short_seq_prob)."""
    from bertkit.data.prepare import prepare
    from bertkit.data.shards import PreparedCorpus
    from bertkit.data.pretraining import PretrainingDataset

    tok = tokenizer()
    out = Path(tempfile.gettempdir()) / "bertkit-bench-prepared"
    prepare([str(data_dir() / "corpus" / "python-docs-3.11.txt")], tok, out, progress=False)
    return PretrainingDataset(PreparedCorpus(out), tok, max_length=max_length, seed=seed)


def pretraining_batches(batch_size: int, n_batches: int, max_length: int = 128, seed: int = 0) -> list[dict]:
    """`n_batches` collated batches of distinct examples drawn at random from pretraining_dataset()."""
    ds = pretraining_dataset(max_length, seed)
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



# ---------------------------------------------------------------------------------------------------------------
# Models: the same weights on both sides


def twin_models(bench: Bench, cls_name: str, config: bertkit.BertConfig, peer=None):
    """Both sides on the same weights; in a memory probe (bench.only set) just the probed side, so that its process holds
    one model and its peak memory is its own. peer: how the other side loads bertkit's saved folder (default:
    transformers' class of the same name, its SDPA attention)."""
    import gc

    import transformers

    torch.manual_seed(0)
    ours = getattr(bertkit, cls_name)(config)
    models = {}
    with tempfile.TemporaryDirectory() as d:
        if bench.only != "bertkit":
            ours.save_pretrained(d, tokenizer=tokenizer() if peer else None)
        if bench.only == "transformers":
            del ours
            gc.collect()
        else:
            ours.to(bench.device)
            from bertkit.model import compile_blocks, set_kernels

            set_kernels(ours, **bench.kernels)
            if bench.activation_checkpointing:
                ours.activation_checkpointing_enable()
            if bench.compile:
                compile_blocks(ours, bench.compile)
            models["bertkit"] = ours
        if bench.only != "bertkit" and peer is not None:
            models["transformers"] = peer(d).to(bench.device)
        elif bench.only != "bertkit":
            theirs = getattr(transformers, cls_name).from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)
            if bench.activation_checkpointing:  # its older name where a transformers lacks the new one
                getattr(theirs, "activation_checkpointing_enable", theirs.gradient_checkpointing_enable)()
            models["transformers"] = theirs.to(bench.device)
    return models


def config_for(preset: str, **kw) -> bertkit.BertConfig:
    return bertkit.BertConfig.from_preset(preset, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Cases: each returns {side: (step function over one unit of work, real tokens in that unit)} plus FLOPs per token


@dataclass
class Case:
    name: str
    what: str
    config: bertkit.BertConfig | None  # None: no model (data preparation)
    seq_len: float  # the attention term of flops_per_token: see attention_length
    training: bool
    units: dict = field(default_factory=dict)  # side -> list of (callable, real_tokens)
    batch_size: int = 0  # sequences per unit, where every unit is one batch of them (sequences/s is reported)
    models: dict = field(default_factory=dict)  # side -> model, so that a memory reading starts from the weights


def attention_length(lengths) -> float:
    """The attention term's length for MFU: each real token attends over its own sequence's n tokens, so a batch's
    attention FLOPs go with the sum of n^2 (the padded maximum counted 3-4% too many at lengths 384 and 512)."""
    lengths = [int(n) for n in lengths]
    return sum(n * n for n in lengths) / sum(lengths)


def real_lengths(batches) -> list[int]:
    return [int(n) for b in batches for n in b["attention_mask"].sum(1).tolist()]


def _train_step(bench: Bench, model, optimizer, batch, call):
    optimizer.zero_grad(set_to_none=True)
    with bench.autocast():
        loss = call(model, batch)
    loss.backward()
    optimizer.step()


def case_pretrain(bench: Bench, preset: str, batch_size: int, n_batches: int, max_length: int = 128) -> Case:
    config = config_for(preset)
    models = twin_models(bench, "BertForPreTraining", config)
    batches = [bench.on_device(b) for b in pretraining_batches(batch_size, n_batches, max_length)]
    name = f"pretrain-{preset}" + (f"-{max_length}" if max_length != 128 else "")
    case = Case(name, f"MLM+NSP training step, {preset}, batch {batch_size}, length {max_length} (real corpus lengths)",
                config, attention_length(real_lengths(batches)), True, batch_size=batch_size, models=models)
    from bertkit.train.optim import build_optimizer

    def ours(model, b):
        return model(b["input_ids"], b["token_type_ids"], b["attention_mask"], labels=b["labels"],
                     next_sentence_label=b["next_sentence_label"], masked_positions=b["labels"] != -100).loss

    def theirs(model, b):
        return model(**b).loss

    for side, call in (("bertkit", ours), ("transformers", theirs)):
        if side not in models:
            continue
        model = models[side].train()
        opt = build_optimizer(model, "adamw", 1e-4, 0.01)
        case.units[side] = [(lambda b=b, m=model, o=opt, c=call: _train_step(bench, m, o, b, c), int(b["attention_mask"].sum())) for b in batches]
    return case


def case_finetune_sst2(bench: Bench, preset: str, batch_size: int, n_examples: int, like_for_like: bool = False,
                       lora: bool = False) -> Case:
    """An epoch over the same SST-2 examples: bertkit with length-grouped batches (`finetune`'s own,
    `bertkit.data.batching.length_grouped_batches`), transformers with its own dynamic padding (random batches padded
    to their longest); both compared per real token. like_for_like: transformers gets the very same grouped batches
    (as its Trainer's group_by_length would give it), so that the model's share of the ratio shows apart from the
    batching's. lora: the same batches (like_for_like), LoRA rank 8 on query and value with the classifier and pooler
    trained, bertkit's (`finetune --lora-rank 8`) against peft's on transformers' model."""
    tok = tokenizer()
    config = config_for(preset, num_labels=2)
    models = twin_models(bench, "BertForSequenceClassification", config)
    like_for_like = like_for_like or lora
    if lora:
        from bertkit.model import add_lora

        if "bertkit" in models:
            add_lora(models["bertkit"], 8, 8.0, ("query", "value"))
        if "transformers" in models:
            import peft

            models["transformers"] = peft.get_peft_model(models["transformers"], peft.LoraConfig(
                task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules=["query", "value"],
                modules_to_save=["classifier", "pooler"]))
    sentences = random.Random(0).sample(sst2_sentences(), n_examples)
    encoded = [tok.encode(s, max_length=128) for s in sentences]
    labels = [i % 2 for i in range(n_examples)]
    items = list(zip(encoded, labels))
    random.Random(0).shuffle(items)
    plain = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    from bertkit.data.batching import length_grouped_batches

    grouped = [[items[i] for i in batch] for batch in
               length_grouped_batches([len(e["input_ids"]) for e, _ in items], batch_size, seed=0)]
    how = ", both sides on the same length-grouped batches" if like_for_like else ""
    case = Case(f"finetune-sst2-{preset}" + ("-lora" if lora else "-grouped" if like_for_like else ""),
                f"SST-2 fine-tuning epoch over {n_examples} sentences, {preset}, batch {batch_size}{how}", config,
                attention_length(len(e["input_ids"]) for e, _ in items), True, models=models)
    from bertkit.train.optim import build_optimizer

    for side, batches in (("bertkit", grouped), ("transformers", grouped if like_for_like else plain)):
        if side not in models:
            continue
        model = models[side].train()
        opt = build_optimizer(model, "adamw", 2e-5, 0.01)
        units = []
        for group in batches:
            b = pad_batch([e for e, _ in group], tok)
            b["labels"] = torch.tensor([y for _, y in group])
            b = bench.on_device(b)
            units.append((lambda b=b, m=model, o=opt: _train_step(bench, m, o, b, lambda m, b: m(**b).loss), int(b["attention_mask"].sum())))
        case.units[side] = [(lambda us=units: [u() for u, _ in us], sum(n for _, n in units))]
    return case


def case_finetune_embedding(bench: Bench, preset: str, batch_size: int, n_pairs: int) -> Case:
    """An epoch of CoSENT over STS-B training pairs (`finetune --task embedding`): bertkit's BertForSentenceEmbedding
    against sentence-transformers' model (loaded from bertkit's folder: the same weights) and its CoSENTLoss, on the
    same length-grouped batches of pairs, each side padding its own way; per real token of both texts."""
    from bertkit.data.batching import collate, length_grouped_batches
    from bertkit.data.glue import read_glue

    def sentence_transformer(folder):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(folder, device="cpu")

    tok = tokenizer()
    config = config_for(preset)
    models = twin_models(bench, "BertForSentenceEmbedding", config, peer=sentence_transformer)
    pairs = read_glue("STS-B", data_dir() / "glue" / "STS-B", "train")[:n_pairs]
    ids = [[tok.encode(text, max_length=128)["input_ids"] for text in (e.text_a, e.text_b)] for e in pairs]
    order = length_grouped_batches([max(map(len, row)) for row in ids], batch_size, seed=0)
    case = Case(f"finetune-embedding-{preset}", f"STS-B CoSENT epoch over {n_pairs} pairs, {preset}, batch "
                f"{batch_size} pairs, both sides on the same length-grouped batches", config,
                attention_length(len(t) for row in ids for t in row), True, models=models)
    from bertkit.train.optim import build_optimizer

    for side, model in models.items():
        model.train()
        opt = build_optimizer(model, "adamw", 2e-5, 0.01)
        units = []
        for batch in order:
            labels = torch.tensor([pairs[i].label for i in batch])
            if side == "bertkit":
                b = collate([{"input_ids": ids[i], "token_type_ids": [[0] * len(t) for t in ids[i]]} for i in batch],
                            tok.pad_id)
                b = bench.on_device(b | {"labels": labels})
                call = lambda m, b: m(**b).loss  # noqa: E731
            else:
                from sentence_transformers.sentence_transformer.losses import CoSENTLoss

                loss = CoSENTLoss(model)
                b = [bench.on_device(pad_batch([{"input_ids": ids[i][k], "token_type_ids": [0] * len(ids[i][k]),
                                                 "attention_mask": [1] * len(ids[i][k])} for i in batch], tok))
                     for k in (0, 1)]
                b = {"features": b, "labels": labels.to(bench.device)}
                call = lambda m, b, loss=loss: loss(b["features"], b["labels"])  # noqa: E731
            tokens = sum(len(ids[i][k]) for i in batch for k in (0, 1))
            units.append((lambda b=b, m=model, o=opt, c=call: _train_step(bench, m, o, b, c), tokens))
        case.units[side] = units
    return case


def case_squad(bench: Bench, preset: str, batch_size: int, n_batches: int) -> Case:
    """SQuAD windows of up to 384 tokens (doc stride 128); both sides padded to the longest window in the batch."""
    from bertkit.data.squad import featurize, read_squad

    tok = tokenizer()
    config = config_for(preset)
    models = twin_models(bench, "BertForQuestionAnswering", config)
    examples = read_squad(data_dir() / "squad" / "dev-v1.1.json")
    examples = random.Random(0).sample(examples, batch_size * n_batches)
    features = featurize(examples, tok, max_length=384, doc_stride=128)[: batch_size * n_batches]
    case = Case(f"finetune-squad-{preset}", f"SQuAD v1.1 fine-tuning step, {preset}, batch {batch_size}, length 384", config,
                attention_length(sum(f.attention_mask) for f in features), True, models=models)
    from bertkit.train.optim import build_optimizer

    batches = []
    for k in range(0, len(features), batch_size):
        group = features[k : k + batch_size]
        enc = [{"input_ids": f.input_ids[: sum(f.attention_mask)], "token_type_ids": f.token_type_ids[: sum(f.attention_mask)],
                "attention_mask": f.attention_mask[: sum(f.attention_mask)]} for f in group]
        b = pad_batch(enc, tok)
        b["start_positions"] = torch.tensor([f.start_position for f in group])
        b["end_positions"] = torch.tensor([f.end_position for f in group])
        batches.append(bench.on_device(b))
    for side in models:
        model = models[side].train()
        opt = build_optimizer(model, "adamw", 3e-5, 0.01)
        case.units[side] = [(lambda b=b, m=model, o=opt: _train_step(bench, m, o, b, lambda m, b: m(**b).loss), int(b["attention_mask"].sum())) for b in batches]
    return case


def case_inference(bench: Bench, preset: str, batch_size: int, n_batches: int) -> Case:
    tok = tokenizer()
    config = config_for(preset, num_labels=2)
    models = twin_models(bench, "BertForSequenceClassification", config)
    sentences = random.Random(1).sample(sst2_sentences("dev"), batch_size * n_batches)
    batches = [bench.on_device(pad_batch([tok.encode(s, max_length=128) for s in sentences[k : k + batch_size]], tok))
               for k in range(0, len(sentences), batch_size)]
    case = Case(f"inference-b{batch_size}-{preset}", f"SST-2 dev classification, inference, {preset}, batch {batch_size}",
                config, attention_length(real_lengths(batches)), False, models=models)

    def run(model, b):
        with torch.inference_mode(), bench.autocast():
            model(**b)

    for side in models:
        model = models[side].eval()
        case.units[side] = [(lambda b=b, m=model: run(m, b), int(b["attention_mask"].sum())) for b in batches]
    return case


def case_fill_mask(bench: Bench, preset: str, batch_size: int, n_batches: int) -> Case:
    """Filling in [MASK] (`bertkit predict` on a pretraining folder): SST-2 dev sentences with one word in five
    masked, bertkit's `fill_masks` against transformers' fill-mask pipeline (its batch_size) on the twin masked-LM
    model, the five first tokens of each mask; per real token."""
    import transformers

    from bertkit.tasks.classification import TextExample
    from bertkit.tasks.fill_mask import fill_masks

    tok = tokenizer()
    config = config_for(preset)
    models = twin_models(bench, "BertForMaskedLM", config)
    rng = random.Random(3)
    texts = []
    for sentence in rng.sample(sst2_sentences("dev"), batch_size * n_batches):
        words = sentence.split()
        texts.append(" ".join("[MASK]" if rng.random() < 0.2 or k == len(words) // 2 else w
                              for k, w in enumerate(words)))
    case = Case(f"fill-mask-{preset}", f"[MASK] filled in SST-2 dev sentences, {preset}, batch {batch_size}, "
                "against transformers' fill-mask pipeline", config,
                attention_length(len(tok.encode(t)["input_ids"]) for t in texts), False, models=models)
    chunks = [texts[k:k + batch_size] for k in range(0, len(texts), batch_size)]
    for side, model in models.items():
        model.eval()
        if side == "bertkit":
            run = lambda chunk, m=model: fill_masks(m, tok, [TextExample("", t, None, None) for t in chunk], 128,  # noqa: E731
                                                    batch_size, bench.device, 5)
        else:
            theirs = transformers.AutoTokenizer.from_pretrained(data_dir() / "checkpoints" / "all-MiniLM-L6-v2")
            pipe = transformers.pipeline("fill-mask", model=model, tokenizer=theirs, device=bench.device, top_k=5)
            run = lambda chunk, p=pipe: p(chunk, batch_size=batch_size)  # noqa: E731
        case.units[side] = [(lambda c=c, r=run: r(c), sum(len(tok.encode(t)["input_ids"]) for t in c))
                            for c in chunks]
    return case


def case_explain(bench: Bench, preset: str, n_sentences: int, steps: int = 50, batch_size: int = 25) -> Case:
    """Integrated gradients (`bertkit explain`) of SST-2 dev sentences, one sentence per unit: bertkit's `attribute`
    against Captum's LayerIntegratedGradients on transformers' model with the same weights, both on the word
    embeddings' output with the [PAD] baseline, the probability of one class, `steps` Gauss-Legendre points run
    `batch_size` at a time, and the output at both ends of the path (Captum's convergence delta); per real token of
    every point. Its MFU counts the forward passes only (the backward pass reaches the inputs, not the weights)."""
    from captum.attr import LayerIntegratedGradients

    from bertkit.tasks.explain import attribute

    tok = tokenizer()
    config = config_for(preset, num_labels=2)
    models = twin_models(bench, "BertForSequenceClassification", config)
    sentences = random.Random(2).sample(sst2_sentences("dev"), n_sentences)
    encoded = [tok.encode(s, max_length=128) for s in sentences]
    case = Case(f"explain-ig-{preset}", f"integrated gradients of SST-2 dev sentences, {preset}, {steps} points in "
                f"batches of {batch_size}, against Captum on transformers", config,
                attention_length(len(e["input_ids"]) for e in encoded), False, models=models)
    for side, model in models.items():
        model.eval().requires_grad_(False)
        units = []
        for e in encoded:
            ids, types = e["input_ids"], e["token_type_ids"]
            base = [i if i in (tok.cls_id, tok.sep_id) else tok.pad_id for i in ids]
            if side == "bertkit":
                run = lambda m=model, i=ids, t=types, b=base: attribute(m, i, t, 1, "integrated-gradients",  # noqa: E731
                                                                       steps, b, batch_size)
            else:
                def probability(input_ids, token_type_ids, m=model):
                    return torch.softmax(m(input_ids=input_ids, token_type_ids=token_type_ids).logits, -1)

                method = LayerIntegratedGradients(probability, model.bert.embeddings.word_embeddings)
                i, t, b = (torch.tensor([row], device=bench.device) for row in (ids, types, base))
                run = lambda m=method, i=i, t=t, b=b: m.attribute(  # noqa: E731
                    i, b, target=1, additional_forward_args=(t,), n_steps=steps, internal_batch_size=batch_size,
                    return_convergence_delta=True)
            units.append((run, len(ids) * steps))
        case.units[side] = units
    return case


def case_prepare(bench: Bench) -> Case:
    """Data preparation, tokens/s: bertkit's `prepare` (read, split documents and sentences, tokenize in batches of
    1,000, write memory-mapped shards and the manifest) against the step a transformers user runs before pretraining:
    the fast tokenizer over the same file's lines in batches of 1,000, ids gathered into one int32 array (no files
    written). Both use the Rust tokenizers library with its own threads; each side's unit is the whole corpus."""
    import itertools

    import numpy as np

    from bertkit.data.prepare import prepare

    corpus = data_dir() / "corpus" / "python-docs-3.11.txt"
    case = Case("prepare", "data preparation, python-docs corpus (3.3 MB), bert-base-uncased vocabulary", None, 0, False)
    if bench.only != "transformers":
        tok = tokenizer()

        def ours() -> int:
            with tempfile.TemporaryDirectory() as d:
                return prepare([str(corpus)], tok, d, progress=False).tokens

        case.units["bertkit"] = [(ours, ours())]
    if bench.only != "bertkit":
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(data_dir() / "checkpoints" / "all-MiniLM-L6-v2")

        def hf() -> int:
            lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
            ids = (theirs(lines[k : k + 1000], add_special_tokens=False)["input_ids"] for k in range(0, len(lines), 1000))
            return np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(ids)), dtype=np.int32).size

        case.units["transformers"] = [(hf, hf())]
    return case


# Batch sizes: what fits this CPU's caches and time, and what keeps an 80 GB GPU busy (at batch 128 a base step is
# still bound by the host's kernel launches: 267 ms of CPU against 144 ms of GPU time over 4 steps, --profile).
CASES = {  # name -> (bench, args) -> Case
    "pretrain-mini": lambda b, a: case_pretrain(b, "mini", a.pretrain_batch or (256 if b.gpu else 32), a.batches),
    "pretrain-base": lambda b, a: case_pretrain(b, "base", a.pretrain_batch or (256 if b.gpu else 8), a.batches),
    "pretrain-base-512": lambda b, a: case_pretrain(b, "base", a.pretrain_batch or (64 if b.gpu else 2), a.batches,
                                                          max_length=512),
    # BERT-Large phases 1 and 2 (NVIDIA's recipe: 128 then 512 tokens)
    "pretrain-large": lambda b, a: case_pretrain(b, "large", a.pretrain_batch or (256 if b.gpu else 4), a.batches),
    "pretrain-large-512": lambda b, a: case_pretrain(b, "large", a.pretrain_batch or (32 if b.gpu else 1), a.batches,
                                                            max_length=512),
    "finetune-sst2": lambda b, a: case_finetune_sst2(b, a.preset, 32, 32 * a.batches),
    "finetune-sst2-grouped": lambda b, a: case_finetune_sst2(b, a.preset, 32, 32 * a.batches, like_for_like=True),
    "finetune-sst2-lora": lambda b, a: case_finetune_sst2(b, a.preset, 32, 32 * a.batches, lora=True),
    "finetune-embedding": lambda b, a: case_finetune_embedding(b, a.preset, 16, 16 * a.batches),
    "finetune-squad": lambda b, a: case_squad(b, a.preset, 32 if b.gpu else 4, a.batches),
    "inference-b32": lambda b, a: case_inference(b, a.preset, 32, a.batches),
    "inference-b1": lambda b, a: case_inference(b, a.preset, 1, 8 * a.batches),
    "explain-ig": lambda b, a: case_explain(b, a.preset, 2 * a.batches),
    "fill-mask": lambda b, a: case_fill_mask(b, a.preset, 32, a.batches),
    "prepare": lambda b, a: case_prepare(b),
}
SUITES = {
    "cpu": ["pretrain-mini", "pretrain-base", "finetune-sst2", "finetune-sst2-grouped", "finetune-sst2-lora",
            "finetune-embedding", "finetune-squad", "inference-b32", "inference-b1", "explain-ig", "fill-mask", "prepare"],
    "gpu": [c for c in CASES if c != "prepare"],
    # issue 14's GPU targets: base pretraining at 128 and 512, BERT-Large phase 1, SQuAD at 384, inference at 1 and 32
    "gpu-targets": ["pretrain-base", "pretrain-base-512", "pretrain-large", "finetune-squad", "inference-b32",
                    "inference-b1"],
}


def measure(bench: Bench, case: Case, rounds: int, warmup: int) -> dict:
    """Alternate the sides round by round (each runs all its units in turn, in reversed order every other round); the
    first `warmup` rounds are not counted. The sides are the case's units' keys
    (bertkit and transformers here; benchmarks/ablation.py compares bertkit with itself)."""
    sides = list(case.units)
    seconds = {s: [] for s in sides}
    tokens = {s: 0 for s in sides}
    for r in range(warmup + rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            for fn, n in case.units[side]:
                dt = bench.time(fn)
                if r >= warmup:
                    seconds[side].append(dt)
                    tokens[side] += n
    out = {}
    for side in sides:
        total = sum(seconds[side])
        out[side] = {"tokens_per_s": tokens[side] / total, "seconds": total,
                     "median_unit_s": statistics.median(seconds[side])}
        if case.batch_size:
            out[side]["sequences_per_s"] = len(seconds[side]) * case.batch_size / total
    return out


def peak_memory_mb(bench: Bench, case_name: str, side: str, args, case: Case) -> float:
    """CPU: peak resident memory of a fresh process that builds one side only (model, optimizer, the case's batches)
    and runs its units.
    GPU: peak CUDA memory allocated above what was already held (both models' weights and optimizer state; their
    gradients and bertkit's inference cache of fused Q/K/V are dropped first) while one side runs."""
    if bench.gpu:
        for model in case.models.values():  # what the timed runs left (gradients, a cached fused Q/K/V) is not
            model.zero_grad(set_to_none=True)  # "already held": each side's run makes its own again
            for module in model.modules():
                if getattr(module, "_fused", None) is not None:
                    module._fused = None
        held = torch.cuda.memory_allocated(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
        for fn, _ in case.units[side]:
            fn()
        bench.sync()
        return (torch.cuda.max_memory_allocated(bench.device) - held) / 2**20
    cmd = [sys.executable, __file__, "--probe", case_name, side, "--batches", str(args.batches),
           "--preset", args.preset, "--threads", str(args.threads), "--bucket", str(args.bucket),
           "--kernels", *args.kernels] + (["--compile", args.compile] if args.compile else []) + \
          (["--pretrain-batch", str(args.pretrain_batch)] if args.pretrain_batch else []) + \
          (["--bf16"] if args.bf16 else []) + (["--activation-checkpointing"] if args.activation_checkpointing else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def probe(bench: Bench, case_name: str, side: str, args) -> None:
    """Build only `side` and run its units once; print this process's peak resident memory in MB."""
    case = CASES[case_name](dataclasses.replace(bench, only=side), args)
    for fn, _ in case.units[side]:
        fn()
    print(peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec; ru_maxrss would carry over the
    parent's peak at the time it forked this probe, which hid both sides' figures behind the suite's own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def profile(bench: Bench, case: Case) -> None:
    """Where each side's time goes: torch.profiler over one pass of its units, the top operators by self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.gpu else [])
    key = "self_cuda_time_total" if bench.gpu else "self_cpu_time_total"
    for side in SIDES:
        with profiler(activities=activities) as prof:
            for fn, _ in case.units[side]:
                fn()
            bench.sync()
        print(f"--- {case.name}, {side}")
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))


def whole_number(least: int):
    """An argparse type: a whole number of at least `least`. Checked up front: --rounds 0 or --batches 0 divided by
    zero only after every model was built and warmed up, and --pretrain-batch 0 fell back to the default."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = least - 1
        if n < least:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= {least}")
        return n

    return parse


def add_case_arguments(parser: argparse.ArgumentParser, batches: int) -> None:
    """The options that size and time the cases and say where results go (benchmarks/ablation.py takes them too)."""
    parser.add_argument("--preset", default="base", choices=list(PRESETS),
                        help="model size for the fine-tuning and inference cases")
    parser.add_argument("--batches", type=whole_number(1), default=batches, help="batches per side per round")
    parser.add_argument("--pretrain-batch", type=whole_number(1), help="sequences per step in the pretraining cases "
                        "(default: 256 at length 128 and 64 at 512 for base, 32 for large at 512, on a GPU; 32/8/2/4/1 "
                        "on a CPU)")
    parser.add_argument("--rounds", type=whole_number(1), default=2, help="measured rounds (after warm-up)")
    parser.add_argument("--warmup", type=whole_number(0), default=1, help="warm-up rounds, not counted")
    parser.add_argument("--threads", type=whole_number(1), default=os.cpu_count(),
                        help="torch threads, the same for every side")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON results (and run.py's plot)")


def add_kernel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", nargs="*", default=[], metavar="CHOICE=VALUE",
                        help="bertkit's kernel choices (bertkit.model.Kernels), e.g. packing=never attention=varlen "
                        "pack_multiple=1024")
    parser.add_argument("--bucket", type=int, default=1, help="pad every batch to a multiple of this many positions")
    parser.add_argument("--bf16", action="store_true", help="on the CPU too, both sides under bf16 autocast (it pays "
                        "where the CPU computes in bf16: AMX, AVX512-BF16; on CUDA it is always on)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="both sides with activation "
                        "checkpointing (activation_checkpointing_enable: each encoder block run again in backward)")
    parser.add_argument("--compile", nargs="?", const="dynamic", choices=list(COMPILE_MODES),
                        help="bertkit's encoder blocks through torch.compile in this mode (default dynamic; static "
                        "keeps batches padded, give it --bucket, or packed with --kernels pack_multiple=...; compiled "
                        "in the warm-up round; transformers stays eager)")


def kernel_choices(parser: argparse.ArgumentParser, given: list[str]) -> dict:
    from bertkit.model import Kernels

    defaults = vars(Kernels())
    choices = {}
    for item in given:
        name, _, value = item.partition("=")
        if name not in defaults:
            parser.error(f"--kernels {item}: expected one of {', '.join(defaults)}=VALUE")
        try:
            choices[name] = type(defaults[name])(value)
        except ValueError:
            parser.error(f"--kernels {item}: expected a whole number")  # the only field that is not a name
    try:
        Kernels(**choices)
    except ValueError as e:
        parser.error(f"--kernels: {e}")
    return choices


def bench_from(parser: argparse.ArgumentParser, args: argparse.Namespace, device: str, **fields) -> Bench:
    """The Bench that the options of `add_kernel_arguments` describe, on `device` (a usage error where that is CUDA
    and this machine has none)."""
    bench = Bench(torch.device(device), compile=args.compile, kernels=kernel_choices(parser, args.kernels),
                  bucket=args.bucket, cpu_bf16=args.bf16, activation_checkpointing=args.activation_checkpointing,
                  **fields)
    if bench.gpu and not torch.cuda.is_available():
        implied = " (the default of --suite gpu*)" if args.device is None else ""
        parser.error(f"--device cuda{implied}: no CUDA device here")
    return bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=list(SUITES), help="run every case of a suite (gpu: on CUDA, bf16 autocast)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="run these cases")
    add_case_arguments(parser, batches=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="where both sides run (default: cuda for --suite gpu)")
    add_kernel_arguments(parser)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-only", action="store_true", help="CPU: only the peak-memory subprocesses, no timing")
    parser.add_argument("--profile", action="store_true", help="after each case, profile both sides' units and print "
                        "the ten most expensive operators of each (torch.profiler)")
    parser.add_argument("--probe", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = bench_from(parser, args, args.device or ("cuda" if (args.suite or "").startswith("gpu") else "cpu"))
    if args.probe:
        return probe(bench, *args.probe, args)
    names = SUITES[args.suite] if args.suite else (args.cases or parser.error("give --suite cpu|gpu or --cases"))
    if args.memory_only:
        if bench.gpu:
            parser.error("--memory-only measures CPU processes; on a GPU the suite reports CUDA memory itself")
        for name in names:
            mb = {side: peak_memory_mb(bench, name, side, args, None) for side in SIDES}
            print(f"{name:18s} peak MB bertkit {mb['bertkit']:.0f}  transformers {mb['transformers']:.0f}  "
                  f"ratio {mb['bertkit'] / mb['transformers']:.2f}", flush=True)
        return
    info = machine(bench)
    no_peak = bf16_emulated(bench)
    peaks = [] if no_peak else [matmul_peak_gflops(bench)]
    print(json.dumps(info))
    results = []
    for name in names:
        case = CASES[name](bench, args)
        r = measure(bench, case, args.rounds, args.warmup)
        row = {"case": name, "what": case.what, "ratio": r["bertkit"]["tokens_per_s"] / r["transformers"]["tokens_per_s"],
               "flops_per_token": flops_per_token(case.config, case.seq_len, case.training) if case.config else None}
        for side in SIDES:
            row[side] = dict(r[side])
            if not args.no_memory:
                row[side]["peak_mb"] = peak_memory_mb(bench, name, side, args, case)
        results.append(row)
        if args.profile:
            profile(bench, case)
        del case
        if bench.gpu:
            torch.cuda.empty_cache()
        if not no_peak:
            peaks.append(matmul_peak_gflops(bench))
        b, t = row["bertkit"], row["transformers"]
        mem = f"  peak MB {b['peak_mb']:.0f} vs {t['peak_mb']:.0f}" if not args.no_memory else ""
        print(f"{name:16s} bertkit {b['tokens_per_s']:9.0f} tok/s  transformers {t['tokens_per_s']:9.0f} tok/s  "
              f"ratio {row['ratio']:.2f}x{mem}", flush=True)
    info["matmul_peak_gflops"] = peak = max(peaks, default=None)
    info["matmul_peak_gflops_readings"] = peaks
    if no_peak:
        print("no model FLOP utilisation: this CPU has no bf16 instructions, so bf16 is emulated and no GEMM rate "
              "bounds the cases' (see bf16_emulated)")
    elif any(row["flops_per_token"] for row in results):
        print(f"matmul peak {peak:.0f} GFLOP/s (the best of {len(peaks)} readings, {min(peaks):.0f} to {peak:.0f}); "
              "model FLOP utilisation on real tokens:")
    for row in results:
        if row["flops_per_token"] is None:
            continue  # no model FLOPs (data preparation)
        for side in SIDES:
            row[side]["mfu"] = None if no_peak else row[side]["tokens_per_s"] * row["flops_per_token"] / (peak * 1e9)
        if not no_peak:
            print(f"  {row['case']:16s} bertkit {row['bertkit']['mfu']:4.0%}  "
                  f"transformers {row['transformers']['mfu']:4.0%}")
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
    if "gpu" in info:
        where = info["gpu"] + ", bf16 autocast"
    else:
        where = f"{info['cpu']}, {info['threads']} torch thread" + "s" * (info["threads"] != 1) + \
            (", bf16 autocast" if info.get("precision") == "bf16 autocast" else "")
    ax.set_title(where, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
