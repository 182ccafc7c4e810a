"""Linear probes on frozen features: how much of SST-2's label a model's representations carry before fine-tuning,
for a model folder and for the same network at random initialisation.

    python benchmarks/feature_probe.py --model-dir runs/books/mini-final/checkpoints/step-00006400

For each of the two (the folder's weights; the same architecture with fresh random weights, seed 0), the encoder
runs frozen on --train-sentences SST-2 training sentences (drawn at random, seed 0) and on the whole dev set, and a
logistic regression (`bertkit probe`'s: L-BFGS, features standardised; the best of three L2 strengths on dev) is
fitted on each kind of feature: the [CLS] hidden state, the pooler output, the mean of the last hidden states over real tokens, and the
mean of the embedding layer's output (token + position + segment, before any attention). Also the pooler's mean
|value| and its share of saturated units (|tanh| > 0.99). Dev accuracy of every probe is printed as a markdown
table and written to --out as JSON.

`bertkit probe` reads every layer's output of any GLUE task or labelled file this way, choosing the L2 strength
on held-out training rows instead. This asks where a pretrained model's sentence information sits when fine-tuning it does worse than training the
same network from scratch (the SST-2 row of docs/suite).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import machine  # noqa: E402

KINDS = ("cls", "pooler", "mean", "embeddings")
KIND_NAMES = {"cls": "[CLS]", "pooler": "pooler", "mean": "mean of last layer", "embeddings": "mean of embeddings"}


def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    rows = [line.rstrip("\n").split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


@torch.no_grad()
def features(model, tokenizer, texts: list[str], batch_size: int = 128) -> dict[str, torch.Tensor]:
    out = {kind: [] for kind in KINDS}
    for start in range(0, len(texts), batch_size):
        batch = tokenizer.encode_batch(texts[start:start + batch_size], max_length=128, return_tensors="pt")
        mask = batch["attention_mask"].unsqueeze(-1).float()
        result = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        hidden = result.last_hidden_state
        positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        embedded = model.embeddings(batch["input_ids"], batch["token_type_ids"], positions)
        out["cls"].append(hidden[:, 0])
        out["pooler"].append(result.pooler_output)
        out["mean"].append((hidden * mask).sum(1) / mask.sum(1))
        out["embeddings"].append((embedded * mask).sum(1) / mask.sum(1))
    return {kind: torch.cat(values) for kind, values in out.items()}


def probe(train_x, train_y, dev_x, dev_y) -> float:
    """Dev accuracy (%) of the best of three L2 strengths (chosen on dev, as this check was first run; `bertkit probe`
    chooses on rows held out of the training data). The fit is `bertkit probe`'s, run to convergence."""
    from bertkit.tasks.probe import LinearProbe

    labels, dev_labels, best = torch.tensor(train_y), torch.tensor(dev_y), 0.0
    for strength in (1e-4, 1e-3, 1e-2):  # the loss's `strength x |W|^2` is LinearProbe's l2 / 2 x |W|^2
        fit = LinearProbe.fit(train_x.double(), labels, "classes", 2 * strength, 2)
        best = max(best, (fit.logits(dev_x.double()).argmax(-1) == dev_labels).double().mean().item() * 100)
    return best


def probe_data(data: Path | None, train_sentences: int) -> tuple[tuple[list, list], tuple[list, list]]:
    """--train-sentences SST-2 training sentences (drawn at random, seed 0) and the whole dev set."""
    import os

    data = data or Path(os.environ.get("BERTKIT_DATA", "../shared/data")) / "glue" / "SST-2"
    train_x, train_y = read_sst2(data / "train.tsv")
    chosen = random.Random(0).sample(range(len(train_x)), min(train_sentences, len(train_x)))
    dev = read_sst2(data / "dev.tsv")
    return ([train_x[i] for i in chosen], [train_y[i] for i in chosen]), dev


def probe_model(model_dir: Path, train: tuple[list, list], dev: tuple[list, list], load_weights: bool = True) -> dict:
    """Every probe's dev accuracy for the folder's weights (or, load_weights=False, its network at random init,
    seed 0), and the pooler's mean |value| and saturated share."""
    from bertkit import BertModel, Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = BertModel.from_pretrained(model_dir, load_weights=load_weights).eval()
    train_f, dev_f = features(model, tokenizer, train[0]), features(model, tokenizer, dev[0])
    pooler = dev_f["pooler"]
    row = {f"probe_{kind}": probe(train_f[kind], train[1], dev_f[kind], dev[1]) for kind in KINDS}
    return row | {"pooler_mean_abs": pooler.abs().mean().item(),
                  "pooler_saturated_share": (pooler.abs() > 0.99).float().mean().item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="a model folder with its tokenizer")
    parser.add_argument("--data", type=Path, default=None, help="the SST-2 folder (default: $BERTKIT_DATA/glue/SST-2)")
    parser.add_argument("--train-sentences", type=int, default=4000, help="training sentences for the probes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "feature_probe.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, dev = probe_data(args.data, args.train_sentences)
    result = {"machine": machine(), "model_dir": str(args.model_dir), "train_sentences": len(train[0]),
              "dev_sentences": len(dev[0]), "rows": {}}
    for name, load in (("pretrained", True), ("random init", False)):
        row = probe_model(args.model_dir, train, dev, load_weights=load)
        result["rows"][name] = row
        print(f"{name}: {row}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| weights | " + " | ".join(KIND_NAMES.values()) + " | pooler saturated |")
    print("|---|---|---|---|---|---|")
    for name, row in result["rows"].items():
        print(f"| {name} | {row['probe_cls']:.1f} | {row['probe_pooler']:.1f} | {row['probe_mean']:.1f} | "
              f"{row['probe_embeddings']:.1f} | {100 * row['pooler_saturated_share']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
