"""Sentence embeddings on the CPU: `bertkit embed` against sentence-transformers, same model, texts and run.

all-MiniLM-L6-v2 (the shared checkpoint) embeds real texts two ways: bertkit's path (`bertkit.tasks.embed`:
tokenize, batches of similar length, the packed encoder, mean pooling, normalize) and SentenceTransformer.encode
(which also sorts by length, then pads each batch for transformers' encoder with SDPA attention). Both at batch 32,
the same longest input, normalized vectors; model loading is left out of both. Two inputs: short sentences (SST-2
train) and paragraphs (SQuAD v1.1 dev contexts, cut at --max-length). The rounds alternate the two libraries; each
figure is the best round. The largest difference between the two's vectors is reported beside the speeds, and what
the vectors are worth: the Spearman correlation of the two sentences' cosine similarity with the gold score on STS-B
dev (1,500 pairs), as sentence-transformers' own evaluation reads it, for mean and for [CLS] pooling. bertkit's
int8 path (`embed --int8`) runs beside them, with its vectors' mean cosine to the float32 ones.

    python benchmarks/embed_speed.py --threads 1 2 --out benchmarks/embed_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import machine  # noqa: E402

from bertkit import BertModel, Tokenizer  # noqa: E402
from bertkit.tasks.classification import parse_lines  # noqa: E402
from bertkit.tasks.embed import embed_rows, encode_lines  # noqa: E402


def texts(data: Path, sentences: int, paragraphs: int) -> dict[str, list[str]]:
    lines = (data / "glue" / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    short = list(dict.fromkeys(line.split("\t")[0] for line in lines))[:sentences]
    squad = json.loads((data / "squad" / "dev-v1.1.json").read_text(encoding="utf-8"))
    contexts = [p["context"] for article in squad["data"] for p in article["paragraphs"]]
    return {"SST-2 sentences": short, "SQuAD paragraphs": list(dict.fromkeys(contexts))[:paragraphs]}


def bertkit_embed(model, tokenizer, items: list[str], max_length: int) -> np.ndarray:
    rows, _ = encode_lines(tokenizer, parse_lines(items), max_length)
    vectors = embed_rows(model, rows, [-1], "mean", normalize=True, batch_size=32, pad_id=tokenizer.pad_id)
    return torch.stack(vectors).numpy()


def sts_spearman(data: Path, model_dir: Path) -> dict[str, float]:
    """STS-B dev: Spearman x 100 of the cosine of each pair's vectors against the gold score, per pooling (and
    mean pooling in int8)."""
    from scipy.stats import spearmanr

    from bertkit.tasks.embed import EmbedConfig, embed

    rows = [line.split("\t") for line in (data / "glue" / "STS-B" / "dev.tsv").read_text(encoding="utf-8")
            .splitlines()[1:]]
    gold = [float(r[9]) for r in rows]
    scores = {}
    for name, pool, int8 in (("mean", "mean", False), ("cls", "cls", False), ("mean int8", "mean", True)):
        config = EmbedConfig(model_dir=str(model_dir), pool=pool, normalize=True, int8=int8)
        first, second = (torch.stack([r["embedding"] for r in embed(config, inputs=[row[i] for row in rows])])
                         for i in (7, 8))
        scores[name] = round(100 * float(spearmanr((first * second).sum(1).numpy(), gold).statistic), 2)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: $BERTKIT_DATA/checkpoints/all-MiniLM-L6-v2")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--paragraphs", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "embed_speed.json")
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    data = Path(os.environ["BERTKIT_DATA"])
    model_dir = args.model or data / "checkpoints" / "all-MiniLM-L6-v2"
    from bertkit.quantize import to_int8

    ours, tokenizer = BertModel.from_pretrained(model_dir).eval(), Tokenizer.from_pretrained(model_dir)
    int8 = to_int8(BertModel.from_pretrained(model_dir).eval())
    theirs = SentenceTransformer(str(model_dir), device="cpu")
    theirs.max_seq_length = args.max_length
    runs = {
        "bertkit": lambda items: bertkit_embed(ours, tokenizer, items, args.max_length),
        "sentence-transformers": lambda items: theirs.encode(items, batch_size=32, normalize_embeddings=True),
        "bertkit int8": lambda items: bertkit_embed(int8, tokenizer, items, args.max_length),
    }
    rows = []
    for name, items in texts(data, args.sentences, args.paragraphs).items():
        for threads in args.threads:
            torch.set_num_threads(threads)
            best, vectors = {}, {}
            for _ in range(args.rounds):
                for library, run in runs.items():
                    started = time.perf_counter()
                    vectors[library] = run(items)
                    best[library] = min(best.get(library, float("inf")), time.perf_counter() - started)
            encoded, _ = encode_lines(tokenizer, parse_lines(items), args.max_length)
            tokens = sum(len(r["input_ids"]) for r in encoded)
            row = {"texts": name, "count": len(items), "mean_tokens": round(tokens / len(items), 1),
                   "threads": threads, **{f"{k}_per_s": round(len(items) / v, 1) for k, v in best.items()},
                   "speedup": round(best["sentence-transformers"] / best["bertkit"], 2),
                   "int8_speedup": round(best["sentence-transformers"] / best["bertkit int8"], 2),
                   "max_abs_diff": float(np.abs(vectors["bertkit"] - vectors["sentence-transformers"]).max()),
                   "int8_mean_cosine": round(float((vectors["bertkit int8"] * vectors["bertkit"]).sum(1).mean()), 4)}
            rows.append(row)
            print(row, flush=True)
    import sentence_transformers

    sts = sts_spearman(data, model_dir)
    print("STS-B dev Spearman of the cosine:", sts)
    result = {"machine": machine(), "sentence_transformers": sentence_transformers.__version__,
              "model": str(model_dir), "max_length": args.max_length, "batch_size": 32, "rounds": args.rounds,
              "rows": rows, "stsb_dev_spearman": sts}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
