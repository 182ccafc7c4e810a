"""Does a domain's vocabulary help continued pretraining? `bertkit vocab extend` against the model's own vocabulary,
on the Python documentation.

The model is --model, a pretraining folder (bertkit's books-corpus `mini` by default: its vocabulary was trained on
books). The Python 3.11 documentation is split by document, every tenth held out. Two arms continue pretraining on
the training documents at the same steps, batch, length, learning rate and seed (MLM + NSP, as the model was
pretrained): `own`, with the model's vocabulary, and `extended`, after `vocab extend --add N` on the same training
documents. Measured on the held-out documents:

- fertility: word pieces per word (the words BERT's pre-tokenizer finds), also on the Linux documentation (another
  technical domain, not used) and on book text (the model's own domain);
- whole-word recovery: in each of the first --eval-sentences held-out sentences, 15% of the words (at least one;
  the same words for both arms, seeded by the sentence) have every piece masked; a word is recovered when every
  piece's most probable token is right. Over all masked words, and over those the new tokens split differently.
  Before continued pretraining as well (the extended model's new rows are only the mean of their old pieces);
- seconds per step (a step is the same batch of 128-token sequences in both arms, so with fewer pieces per word
  the extended arm reads more words per step).

Each arm's run folder is in --out (pretraining resumes where it stopped); the summary goes to --summary
(docs/vocab/python-docs.json).

    python benchmarks/vocab_domain.py --model runs/long-phase/len128/checkpoints/step-00002800 --threads 2
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from bertkit import BertForMaskedLM, Tokenizer
from bertkit.extend import VocabExtendConfig, vocab_extend
from run import machine, study_parser


def split_documents(corpus: Path, out: Path) -> tuple[Path, Path]:
    """The corpus (a sentence a line, blank lines between documents) as train.txt and held.txt, every tenth
    document held out."""
    train, held = out / "train.txt", out / "held.txt"
    if not held.exists():
        documents = corpus.read_text(encoding="utf-8").split("\n\n")
        train.write_text("\n\n".join(d for i, d in enumerate(documents) if i % 10 != 9), encoding="utf-8")
        held.write_text("\n\n".join(d for i, d in enumerate(documents) if i % 10 == 9), encoding="utf-8")
    return train, held


def sentences(path: Path, count: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    found = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if len(line.split()) >= 5:
                found.append(line.strip())
            if len(found) == count:
                break
    return found


def fertility(tokenizer: Tokenizer, texts: list[str]) -> float:
    """Word pieces per word."""
    split = tokenizer.word_pieces(texts)
    return sum(len(ids) for words in split for ids, _ in words) / sum(map(len, split))


@torch.no_grad()
def word_recovery(model_dir: Path, texts: list[str], reference: Tokenizer, threads: int) -> dict:
    """Whole-word recovery (%) on `texts`, over all masked words and over those `reference` (the other arm's
    tokenizer) splits differently from this folder's."""
    torch.set_num_threads(threads)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = BertForMaskedLM.from_pretrained(model_dir).eval()
    right = {"all": [0, 0], "changed": [0, 0]}
    for index, text in enumerate(texts):
        words = tokenizer.word_pieces([text])[0]
        other = reference.word_pieces([text])[0]
        if len(words) != len(other):
            continue
        chosen = random.Random(index).sample(range(len(words)), max(1, round(0.15 * len(words))))
        ids, spans = [tokenizer.cls_id], {}
        for w, (pieces, _) in enumerate(words):
            spans[w] = range(len(ids), len(ids) + len(pieces))
            ids += pieces
        ids = ids[:127] + [tokenizer.sep_id]
        masked = torch.tensor([ids])
        chosen = [w for w in chosen if spans[w].stop <= 127]
        for w in chosen:
            masked[0, list(spans[w])] = tokenizer.mask_id
        logits = model(masked).logits[0]
        guess = logits.argmax(-1).tolist()
        for w in chosen:
            correct = all(guess[p] == ids[p] for p in spans[w])
            for kind in ("all", "changed") if words[w][0] != other[w][0] else ("all",):
                right[kind][0] += correct
                right[kind][1] += 1
    return {f"recovered_{kind}": round(100 * r / max(n, 1), 2) for kind, (r, n) in right.items()} | {
        "masked_words": right["all"][1], "changed_words": right["changed"][1]}


def pretrain(model_dir: Path, corpus: Path, out: Path, args) -> dict:
    """Continue pretraining `model_dir` on `corpus` into `out` (resumed if stopped); its last checkpoint and speed."""
    done = out / "done.json"
    if not done.exists():
        command = [sys.executable, "-m", "bertkit.cli", "pretrain", "--model-dir", str(model_dir), "--corpus",
                   str(corpus), "--out-dir", str(out), "--max-length", "128", "--batch-size", str(args.batch_size),
                   "--max-steps", str(args.steps), "--lr", str(args.lr), "--warmup", "0.06", "--seed", "0",
                   "--threads", str(args.threads), "--save-every", str(args.steps // 4), "--eval-every", "0",
                   "--resume", "auto"]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        done.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    return {"checkpoint": checkpoints[-1], "seconds": json.loads(done.read_text())["seconds"]}


def main() -> None:
    parser = study_parser(__doc__, "vocab-domain", "vocab/python-docs.json")
    parser.add_argument("--model", type=Path, required=True, help="a pretraining folder to continue")
    parser.add_argument("--add", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-sentences", type=int, default=2000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.data / "corpus"
    train, held = split_documents(corpus / "python-docs-3.11.txt", args.out)
    extended_dir = args.out / "extended-start"
    if not (extended_dir / "config.json").exists():
        vocab_extend(VocabExtendConfig(model_dir=str(args.model), files=[str(train)], out=str(extended_dir),
                                       add=args.add, overwrite=True))
    own, extended = Tokenizer.from_pretrained(args.model), Tokenizer.from_pretrained(extended_dir)
    texts = {"python-docs held out": sentences(held, args.eval_sentences),
             "linux-docs": sentences(corpus / "linux-docs-6.1.txt", args.eval_sentences),
             "books": sentences(corpus / "gutenberg-en-06.txt.gz", args.eval_sentences)}
    summary = {"model": str(args.model), "added": args.add, "steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "machine": machine(),
               "fertility": {name: {"own": round(fertility(own, t), 4), "extended": round(fertility(extended, t), 4)}
                             for name, t in texts.items()}}
    held_texts = texts["python-docs held out"]
    summary["before"] = {"own": word_recovery(args.model, held_texts, extended, args.threads),
                         "extended": word_recovery(extended_dir, held_texts, own, args.threads)}
    summary["after"] = {}
    for arm, start, reference in (("own", args.model, extended), ("extended", extended_dir, own)):
        run = pretrain(start, train, args.out / arm, args)
        summary["after"][arm] = word_recovery(run["checkpoint"], held_texts, reference, args.threads) | {
            "seconds_per_step": round(run["seconds"] / args.steps, 3)}
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print(arm, summary["after"][arm], flush=True)
    print(json.dumps({k: summary[k] for k in ("fertility", "before", "after")}, indent=1))


if __name__ == "__main__":
    main()
