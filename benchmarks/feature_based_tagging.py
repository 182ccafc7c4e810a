"""The paper's Table 7: tagging with BERT's features frozen (the feature-based approach) against fine-tuning.

Section 5.3 of the paper tags CoNLL-2003 named entities with the activations of one or more layers of BERT-Base,
frozen, fed to a two-layer BiLSTM of 768 dimensions and a linear layer, and compares six choices of layers with
fine-tuning the whole model (dev F1: fine-tuning 96.4; embeddings 91.0, second-to-last hidden 95.6, last hidden
94.9, weighted sum of the last four 95.9, concatenation of the last four 96.1, weighted sum of all twelve 95.5).

This runs the same six on a model folder and a CoNLL task (by default the proper-noun task that
benchmarks/tagging_books.py writes, and all-MiniLM-L6-v2): each word's features are the hidden states at its first
WordPiece (`BertModel(output_hidden_states=True)`), computed once; the tagger is a two-layer BiLSTM whose width per
direction is the model's hidden size, trained with Adam (lr 1e-3, batches of 32 sentences, --epochs epochs, seed 0),
scored after every epoch with bertkit's conlleval scoring, the best epoch on dev kept (as fine-tuning keeps its best
epoch). A weighted sum learns one weight per layer (softmax-normalised, as ELMo's scalar mix). Given the
fine-tuning run's metrics.json (--fine-tuned), its best F1 is the table's first row.

    python benchmarks/tagging_books.py --threads 1                  # the task, and the fine-tuning run
    python benchmarks/feature_based_tagging.py --threads 1 --fine-tuned runs/tagging-books/pretrained/metrics.json

writes docs/tagging/feature-based.json and prints the table beside the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from bertkit import BertModel, Tokenizer
from bertkit.tasks.metrics import chunk_scores
from bertkit.tasks.tagging import encode, read_conll, tag_names

PAPER = {"fine-tuning": 96.4, "embeddings": 91.0, "second-to-last hidden": 95.6, "last hidden": 94.9,
         "weighted sum last four hidden": 95.9, "concat last four hidden": 96.1, "weighted sum all layers": 95.5}


def word_features(model, tokenizer, sentences, batch_size: int = 64) -> list[torch.Tensor]:
    """Per sentence, (words, L + 1, H): every layer's hidden state at each word's first piece."""
    pieces = [[ids for ids, _ in words] for words in tokenizer.word_pieces([s.words for s in sentences])]
    rows, places = encode(tokenizer, pieces, max_length=128)
    per_sentence: list[list] = [[None] * len(s.words) for s in sentences]
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.tensor([r["input_ids"] + [tokenizer.pad_id] * (width - len(r["input_ids"])) for r in batch])
            mask = (torch.arange(width) < torch.tensor([len(r["input_ids"]) for r in batch])[:, None]).long()
            states = torch.stack(model(ids, attention_mask=mask, output_hidden_states=True).hidden_states, 2)
            for b, (s, span, firsts) in enumerate(places[start:start + batch_size]):
                for w, at in zip(span, firsts):
                    per_sentence[s][w] = states[b, at]
    return [torch.stack(words) for words in per_sentence]


class Tagger(nn.Module):
    """Chosen layers -> (mixed or concatenated) -> 2-layer BiLSTM -> linear, as the paper's feature-based tagger."""

    def __init__(self, layers: list[int], mix: str, hidden: int, labels: int):
        super().__init__()
        self.layers, self.mix = layers, mix
        self.weights = nn.Parameter(torch.zeros(len(layers))) if mix == "sum" else None
        width = hidden * (len(layers) if mix == "concat" else 1)
        self.dropout = nn.Dropout(0.1)
        self.lstm = nn.LSTM(width, hidden, num_layers=2, bidirectional=True, batch_first=True, dropout=0.1)
        self.out = nn.Linear(2 * hidden, labels)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # features (B, W, L+1, H)
        chosen = features[:, :, self.layers]
        if self.mix == "sum":
            x = (chosen * torch.softmax(self.weights, 0)[:, None]).sum(2)
        else:
            x = chosen.flatten(2)
        packed = nn.utils.rnn.pack_padded_sequence(self.dropout(x), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=features.shape[1])
        return self.out(out)


def batches(features, tags, index, order, size):
    for start in range(0, len(order), size):
        chosen = [order[i] for i in range(start, min(start + size, len(order)))]
        lengths = torch.tensor([len(features[i]) for i in chosen])
        x = nn.utils.rnn.pad_sequence([features[i] for i in chosen], batch_first=True)
        y = nn.utils.rnn.pad_sequence([torch.tensor([index[t] for t in tags[i]]) for i in chosen], batch_first=True,
                                      padding_value=-100) if tags is not None else None
        yield chosen, x, lengths, y


def train_variant(name, layers, mix, train, dev, labels, hidden, epochs) -> dict:
    torch.manual_seed(0)
    index = {t: i for i, t in enumerate(labels)}
    tagger = Tagger(layers, mix, hidden, len(labels))
    optimizer = torch.optim.Adam(tagger.parameters(), lr=1e-3)
    (train_x, train_tags), (dev_x, dev_tags) = train, dev
    result = {"layers": layers, "mix": mix, "f1_by_epoch": [], "seconds": 0.0}
    for epoch in range(1, epochs + 1):
        tagger.train()
        start = time.perf_counter()
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(epoch)).tolist()
        for _, x, lengths, y in batches(train_x, train_tags, index, order, 32):
            logits = tagger(x, lengths)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        result["seconds"] += time.perf_counter() - start
        tagger.eval()
        predicted = [None] * len(dev_x)
        with torch.no_grad():
            for chosen, x, lengths, _ in batches(dev_x, None, index, list(range(len(dev_x))), 128):
                best = tagger(x, lengths).argmax(-1)
                for row, i in enumerate(chosen):
                    predicted[i] = [labels[c] for c in best[row, :lengths[row]].tolist()]
        scores, _ = chunk_scores(dev_tags, predicted)
        if scores["f1"] > result.get("best", {"f1": -1.0})["f1"]:
            result["best"], result["best_epoch"] = scores, epoch
        result["f1_by_epoch"].append(round(scores["f1"], 2))
        print(f"{name} epoch {epoch}: f1 {scores['f1']:.2f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = Path(os.environ.get("BERTKIT_DATA", "../shared/data"))
    parser.add_argument("--model-dir", type=Path, default=data / "checkpoints" / "all-MiniLM-L6-v2")
    parser.add_argument("--data-dir", type=Path, default=Path("runs/tagging-books"), help="train.txt and dev.txt")
    parser.add_argument("--fine-tuned", type=Path, help="the fine-tuning run's metrics.json, for the first row")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "tagging" /
                        "feature-based.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, dev = read_conll(args.data_dir / "train.txt"), read_conll(args.data_dir / "dev.txt")
    labels = tag_names(train)
    model, tokenizer = BertModel.from_pretrained(args.model_dir), Tokenizer.from_pretrained(args.model_dir)
    start = time.perf_counter()
    features = {"train": word_features(model, tokenizer, train), "dev": word_features(model, tokenizer, dev)}
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    variants = {"embeddings": ([0], "concat"), "second-to-last hidden": ([L - 1], "concat"),
                "last hidden": ([L], "concat"), "weighted sum last four hidden": (list(range(L - 3, L + 1)), "sum"),
                "concat last four hidden": (list(range(L - 3, L + 1)), "concat"),
                "weighted sum all layers": (list(range(1, L + 1)), "sum")}
    result = {"model": args.model_dir.name, "layers": L, "hidden": H, "train_sentences": len(train),
              "dev_sentences": len(dev), "epochs": args.epochs, "threads": args.threads,
              "feature_seconds": round(time.perf_counter() - start, 1), "variants": {}}
    if args.fine_tuned:
        record = json.loads(args.fine_tuned.read_text(encoding="utf-8"))
        result["variants"]["fine-tuning"] = {"best": record["best"], "best_epoch": record["best_epoch"],
                                             "f1_by_epoch": [round(e["f1"], 2) for e in record["epochs"]]}
    for name, (layers, mix) in variants.items():
        result["variants"][name] = train_variant(name, layers, mix, (features["train"], [s.tags for s in train]),
                                                 (features["dev"], [s.tags for s in dev]), labels, H, args.epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\n| system | dev F1 here ({args.model_dir.name}) | paper (BERT-Base, CoNLL-2003) |\n|---|---|---|")
    for name, v in result["variants"].items():
        print(f"| {name} | {v['best']['f1']:.1f} | {PAPER[name]} |")


if __name__ == "__main__":
    main()
