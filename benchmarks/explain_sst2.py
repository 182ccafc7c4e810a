"""Are the shares `bertkit explain` gives faithful to the model? ERASER's comprehensiveness and sufficiency (DeYoung
et al. 2020) of every method on SST-2's dev sentences.

The model is all-MiniLM-L6-v2 fine-tuned on SST-2's training set for one epoch (--model, fine-tuned into it first
when it is not there: batch 32, lr 5e-5, seed 0). Each arm explains the predicted label of every dev sentence and
ranks its words by their shares (arms: integrated gradients of the probability or of the log-odds with the [PAD]
baseline, and of the probability with [MASK]; gradient x input; occlusion with each baseline; words in
random order, three seeds). For k = 1, 5, 10, 20 and 50% of a sentence's words (at least one), with p the predicted
label's probability:

- comprehensiveness: p(sentence) - p(sentence with its top k words deleted): high when the words ranked first were
  what the prediction rested on;
- sufficiency: p(sentence) - p(its top k words alone): low when they suffice.

A deleted word takes its tokens with it (the input gets shorter, as ERASER deletes). AOPC is the mean over the five
k. Each arm's explanations go to --out/ARM.jsonl and its scores to --summary (docs/explain/sst2.json) as it ends,
so a stopped study resumes arm by arm; the curves are drawn beside it (sst2-faithfulness.png), and the first 40
sentences' integrated gradients on an HTML page (sst2-examples.html).

    python benchmarks/explain_sst2.py --threads 2
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from bertkit import BertForSequenceClassification, Tokenizer
from bertkit.data.glue import read_glue
from bertkit.tasks.explain import explain, word_positions, write_html
from bertkit.tasks.finetune import FinetuneConfig, finetune
from bertkit.tasks.inference import infer
from run import machine, study_parser

FRACTIONS = (0.01, 0.05, 0.10, 0.20, 0.50)
ARMS = {  # name -> explain's options (None: random order)
    "ig-probability": {"method": "integrated-gradients"},
    "ig-log-odds": {"method": "integrated-gradients", "quantity": "log-odds"},
    "ig-probability-mask": {"method": "integrated-gradients", "baseline": "mask"},
    # of one quantity only: the gradient of the log-odds is the probability's times 1 / (p (1 - p)), so with two
    # labels the words rank the same
    "gradient-x-input": {"method": "gradient-x-input"},
    "occlusion": {"method": "occlusion"},
    "occlusion-mask": {"method": "occlusion", "baseline": "mask"},
    "random-s0": None, "random-s1": None, "random-s2": None,
}


def fine_tuned(model: Path, data: Path, threads: int) -> Path:
    if not (model / "metrics.json").exists():
        finetune(FinetuneConfig(model_dir=str(data / "checkpoints" / "all-MiniLM-L6-v2"), task="SST-2",
                                data_dir=str(data / "glue" / "SST-2"), out_dir=str(model), epochs=1, batch_size=32,
                                lr=5e-5, seed=0, threads=threads, overwrite=True))
    return model


def shares_of(arm: str, sentences: list[str], model: Path, out: Path, threads: int, page: Path
              ) -> tuple[list[list[float]], float]:
    """Each sentence's word shares by the arm (read back from out/ARM.jsonl when there), and seconds per sentence;
    integrated gradients' first arm also draws its first 40 sentences on `page`."""
    path = out / f"{arm}.jsonl"
    if path.exists():
        record = [json.loads(line) for line in path.read_text().splitlines()]
        return [r["shares"] for r in record[1:]], record[0]["seconds_per_sentence"]
    start = time.perf_counter()
    if ARMS[arm] is None:
        rng = np.random.default_rng(int(arm.rsplit("s", 1)[1]))
        tokenizer = Tokenizer.from_pretrained(model)
        shares = [rng.permutation(len(word_positions(tokenizer.encode_words(s)))).tolist() for s in sentences]
        deltas = []
    else:
        results = explain(model, sentences, threads=threads, device="cpu", **ARMS[arm])
        shares = [[w["attribution"] for w in r["words"]] for r in results]
        deltas = [r["delta"] / (abs(r["output"] - r["baseline_output"]) or 1.0) for r in results if "delta" in r]
        if arm == "ig-probability":
            write_html(results[:40], page, model.name, "integrated-gradients")
    seconds = (time.perf_counter() - start) / len(sentences)
    lines = [{"arm": arm, "seconds_per_sentence": seconds, "relative_deltas": deltas}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines + [{"shares": s} for s in shares]))
    return shares, seconds


def faithfulness(model, tokenizer, sentences: list[str], shares: list[list[float]], threads: int) -> dict:
    """Comprehensiveness and sufficiency (x 100, probability points) at each fraction, and their AOPC."""
    rows = []  # per sentence: the full input, then per fraction its input without / with only the top k
    for sentence, words in zip(sentences, shares):
        encoded = tokenizer.encode_words(sentence)
        positions = word_positions(encoded)
        order = np.argsort(-np.asarray(words, dtype=float), kind="stable")
        ids, inside = encoded["input_ids"], {p for w in positions for p in w}
        rows.append(ids)
        for fraction in FRACTIONS:
            k = max(1, round(fraction * len(positions)))
            top = {p for w in order[:k] for p in positions[w]}
            rows.append([t for i, t in enumerate(ids) if i not in top])  # [CLS] and [SEP] stay
            rows.append([t for i, t in enumerate(ids) if i in top or i not in inside])
    encoded_rows = [{"input_ids": r, "token_type_ids": [0] * len(r)} for r in rows]
    torch.set_num_threads(threads)
    logits = infer(model, encoded_rows, 64, tokenizer.pad_id, torch.device("cpu"), ("logits",))["logits"]
    p = torch.softmax(logits, -1).view(len(sentences), 1 + 2 * len(FRACTIONS), -1)
    predicted = p[:, 0].argmax(-1)
    chosen = p[torch.arange(len(sentences)), :, predicted]  # (N, 1 + 2F): the predicted label's probability
    full = chosen[:, :1]
    comprehensiveness = (full - chosen[:, 1::2]).mean(0) * 100
    sufficiency = (full - chosen[:, 2::2]).mean(0) * 100
    scores = {}
    for name, values in (("comprehensiveness", comprehensiveness), ("sufficiency", sufficiency)):
        scores[name] = {f"{round(100 * f)}%": round(v, 2) for f, v in zip(FRACTIONS, values.tolist())}
        scores[name]["aopc"] = round(values.mean().item(), 2)
    return scores


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [round(100 * f) for f in FRACTIONS]
    for arm, record in summary["arms"].items():
        style = dict(color="grey", alpha=0.5, linestyle=":") if arm.startswith("random") else {}
        for ax, name in zip(axes, ("comprehensiveness", "sufficiency")):
            ax.plot(x, [record[name][f"{k}%"] for k in x], marker="o", label=arm, **style)
    for ax, name, better in zip(axes, ("comprehensiveness", "sufficiency"), ("higher", "lower")):
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{k}%" for k in x])
        ax.set_xlabel("words ranked first")
        ax.set_ylabel("fall of the predicted label's probability (points)")
        ax.set_title(f"{name} ({better} is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Which words {summary['model']} rests on: SST-2 dev, {summary['sentences']} sentences")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = study_parser(__doc__, "explain", "explain/sst2.json")
    parser.add_argument("--model", type=Path, default=Path("runs") / "explain" / "minilm-sst2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="the first N dev sentences only (a quick look)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--plot", type=Path, default=None, help="the curves' PNG (default: beside --summary)")
    args = parser.parse_args()
    model_dir = fine_tuned(args.model, args.data, args.threads)
    sentences = [e.text_a for e in read_glue("SST-2", args.data / "glue" / "SST-2", "dev")][:args.limit]
    args.out.mkdir(parents=True, exist_ok=True)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    summary = json.loads(args.summary.read_text()) if args.summary.exists() else {}
    if summary.get("sentences") != len(sentences):
        summary = {}
    metrics = json.loads((model_dir / "metrics.json").read_text())
    summary |= {"model": model_dir.name, "dev_accuracy": round(metrics["best"]["accuracy"], 2),
                "sentences": len(sentences), "machine": machine()}
    summary.setdefault("arms", {})
    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = Tokenizer.from_pretrained(model_dir)
    for arm in args.arms:
        if arm in summary["arms"]:
            continue
        shares, seconds = shares_of(arm, sentences, model_dir, args.out, args.threads,
                                    args.summary.with_name(args.summary.stem + "-examples.html"))
        record = faithfulness(model, tokenizer, sentences, shares, args.threads)
        record["seconds_per_sentence"] = round(seconds, 4)
        deltas = json.loads((args.out / f"{arm}.jsonl").read_text().splitlines()[0])["relative_deltas"]
        if deltas:
            record["median_abs_relative_delta"] = round(float(np.median(np.abs(deltas))), 4)
            record["share_within_5_percent"] = round(float(np.mean(np.abs(deltas) < 0.05)), 4)
        summary["arms"][arm] = record
        args.summary.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{arm:<30} comprehensiveness AOPC {record['comprehensiveness']['aopc']:6.2f}  sufficiency AOPC "
              f"{record['sufficiency']['aopc']:6.2f}  {seconds:.3f} s/sentence", flush=True)
    plot(summary, args.plot or args.summary.with_name(args.summary.stem + "-faithfulness.png"))
    print(f"wrote {args.summary}")


if __name__ == "__main__":
    main()
