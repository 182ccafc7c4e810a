"""Pruned models at inference, in bertkit and in transformers: the same folders, the same batches, side by side.

For the run of benchmarks/prune_study.py (MiniLM fine-tuned on SST-2) and each of its pruned folders found in
--study, both libraries load the folder (transformers' BertForSequenceClassification, its SDPA attention) and
classify the same --batches batches of --batch-size SST-2 dev sentences (padded to each batch's longest); after a
warm-up pass, --rounds passes, the two libraries and the folders taking turns, the fastest of each kept. Reported:
seconds per batch, bertkit's speed over transformers' on each folder, each folder's speed-up over the unpruned run
in each library, and the largest difference of their logits (the folders load both ways).

    python benchmarks/prune_speed.py --threads 2 --out benchmarks/prune_speed.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bertkit.data.batching import collate
from bertkit.data.glue import read_glue_file
from bertkit.model import BertForSequenceClassification
from bertkit.tasks.classification import encode
from bertkit.tasks.prune import batch_seconds
from bertkit.tokenizer import Tokenizer
from run import data_dir, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=Path("runs") / "prune")
    parser.add_argument("--cells", nargs="+", default=["run", "prune-L6-W768", "prune-L6-W384", "prune-L6-W192",
                                                        "prune-L4-W1536", "prune-L3-W1536", "prune-L4-W768",
                                                        "prune-L3-W384", "prune-L2-W768"])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "prune_speed.json")
    args = parser.parse_args()

    import transformers

    torch.set_num_threads(args.threads)
    folders = {c: args.study / c for c in args.cells if (args.study / c / "config.json").exists()}
    tokenizer = Tokenizer.from_pretrained(folders["run"])
    sentences = read_glue_file("SST-2", data_dir() / "glue" / "SST-2" / "dev.tsv")[: args.batches * args.batch_size]
    rows = encode(sentences, tokenizer, 128, with_labels=False)
    batches = [collate(rows[s: s + args.batch_size], tokenizer.pad_id) for s in range(0, len(rows), args.batch_size)]
    models = {}
    for name, folder in folders.items():
        ours = BertForSequenceClassification.from_pretrained(folder).eval()
        theirs = transformers.BertForSequenceClassification.from_pretrained(folder, attn_implementation="sdpa").eval()
        models[name] = {"bertkit": ours, "transformers": theirs}
    difference = {}
    with torch.no_grad():
        for name, sides in models.items():
            a, b = (torch.cat([m(**batch)["logits"] for batch in batches]) for m in sides.values())
            difference[name] = float((a - b).abs().max())
    # every folder in both libraries, taking turns: a warm-up pass, then the fastest of --rounds
    order = [(name, side) for name, sides in models.items() for side in sides]
    seconds = batch_seconds([models[name][side] for name, side in order], batches, torch.device("cpu"), args.rounds)
    best = {name: {} for name in models}
    for (name, side), s in zip(order, seconds):
        best[name][side] = s
    results = {}
    for name in models:
        ours, theirs = best[name]["bertkit"], best[name]["transformers"]
        results[name] = {
            "parameters": models[name]["bertkit"].num_parameters(),
            "seconds_per_batch": {"bertkit": round(ours, 5), "transformers": round(theirs, 5)},
            "bertkit_over_transformers": round(theirs / ours, 3),
            "speedup_over_run": {"bertkit": round(best["run"]["bertkit"] / ours, 3),
                                 "transformers": round(best["run"]["transformers"] / theirs, 3)},
            "max_logit_difference": difference[name]}
        print(name, json.dumps(results[name]), flush=True)
    report = {"batches": args.batches, "batch_size": args.batch_size, "rounds": args.rounds, "threads": args.threads,
              "sentences": "SST-2 dev, padded to each batch's longest", "transformers": transformers.__version__,
              "torch": torch.__version__, "machine": machine(), "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
