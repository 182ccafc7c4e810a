"""The paper's last pretraining phase at length 512 (its appendix A.2), measured: what it buys a model pretrained at 128.

BERT was pretrained at length 128 for 90% of its steps and at 512 for the last 10%, "to learn the positional
embeddings" past 128 cheaply. This pretrains `mini` on the books corpus at length 128 (masked LM alone, the first
phase of the README's MLM-first recipe), then continues that model for a tenth as many steps two ways with
`bertkit pretrain --then`: at length 512 (batch 8, the same token positions a step) and, as the control with the
same compute, at length 128 (batch 32). All three are read with `bertkit perplexity` on the same held-out text of
the corpus: 512-token examples whole, the same examples in 128-token pieces (the same masked tokens, each seeing
only its piece), and 128-token examples.

    python benchmarks/long_phase.py --threads 2      # ~1 h on 2 cores: vocabulary, corpus, 3 runs, the readings

Runs go to --work (resumable: each run continues with --resume auto, a finished one is only read again); the
readings, each run's held-out evaluation and the machine to --out (JSON) and a table beside it (.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import machine  # noqa: E402

from bertkit.checkpoint import list_checkpoints  # noqa: E402
from bertkit.tasks.perplexity import PerplexityConfig, perplexity  # noqa: E402
from bertkit.train.logs import read_csv  # noqa: E402
from bertkit.train.pretrain import PretrainConfig, pretrain  # noqa: E402

READINGS = {"512 whole": dict(max_length=512, pieces=128), "128 whole": dict(max_length=128)}


def inputs(work: Path, threads: int) -> tuple[Path, Path]:
    """A 16,000-token vocabulary and the prepared books corpus (the README's), built once into --work."""
    from bertkit.data.prepare import prepare
    from bertkit.tokenizer import Tokenizer, train_vocab, tokenizer_threads

    tokenizer_threads(threads)
    corpus = sorted(str(p) for p in (Path(os.environ["BERTKIT_DATA"]) / "corpus").glob("gutenberg-en-*.txt.gz"))
    vocab, data = work / "vocab-16k", work / "corpus-16k"
    if not (vocab / "vocab.txt").is_file():
        train_vocab(corpus, vocab, vocab_size=16000, show_progress=False)
    print(prepare(corpus, Tokenizer.from_pretrained(vocab), data, progress=False))  # skips what is done
    return vocab, data


def run(cfg: PretrainConfig, start: Path | None = None) -> Path:
    """Train `cfg` (from `start`, the first run's last checkpoint, for a --then run), or continue it; its last
    checkpoint."""
    out = Path(cfg.out_dir)
    began = bool(list_checkpoints(out / "checkpoints"))
    pretrain(PretrainConfig(**{**vars(cfg), "resume": "auto" if began or start is None else str(start)}))
    return list_checkpoints(out / "checkpoints")[-1]


def read(model: Path, data: Path, threads: int, batches: int) -> dict:
    scores = {}
    for name, options in READINGS.items():
        result = perplexity(PerplexityConfig(model_dir=str(model), data=str(data), batches=batches, threads=threads,
                                             **options))
        scores[name] = result["whole"]
        if "pieces" in result:
            scores["512 in 128-token pieces"] = result["pieces"]
    return scores


def table(result: dict) -> str:
    names = ["512 whole", "512 in 128-token pieces", "128 whole"]
    lines = ["| model | steps | " + " | ".join(f"{n}: MLM loss / acc" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for row in result["rows"]:
        cells = [f"{row['scores'][n]['masked_lm_loss']:.3f} / {100 * row['scores'][n]['accuracy']:.1f}"
                 for n in names]
        lines.append(f"| {row['name']} | {row['steps']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2800, help="steps of the first run at length 128")
    parser.add_argument("--then-steps", type=int, default=None, help="steps of each continuation (default: a "
                        "tenth of --steps)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the continuations")
    parser.add_argument("--batches", type=int, default=40, help="held-out batches of 4 examples read")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/long-phase"))
    parser.add_argument("--out", type=Path, default=None, help="default: docs/long/last-phase-512-lrLR.json")
    args = parser.parse_args()
    more = args.then_steps or args.steps // 10
    out = args.out or HERE.parent / "docs" / "long" / f"last-phase-512-lr{args.lr:g}.json"
    vocab, data = inputs(args.work, args.threads)
    common = dict(model="mini", tokenizer=str(vocab), data=str(data), objective="mlm", max_steps=args.steps,
                  eval_every=400, save_every=400, keep_last=1, threads=args.threads)
    first = run(PretrainConfig(**common, out_dir=str(args.work / "len128")))
    rows = [{"name": "length 128", "steps": args.steps, "run": "len128"}]
    for name, then in (("then 512", ["max_length=512", "batch_size=8"]), ("then 128", [])):
        folder = f"{name.replace(' ', '-')}-lr{args.lr:g}"  # one first run, continuations at several lrs
        then = [*then, f"max_steps={more}", f"lr={args.lr}"]
        run(PretrainConfig(**common, then=then, out_dir=str(args.work / folder)), start=first)
        rows.append({"name": f"{name} ({' '.join(then)})", "steps": args.steps + more, "run": folder})
    for row in rows:
        model = list_checkpoints(args.work / row["run"] / "checkpoints")[-1]
        row["scores"] = read(model, data, args.threads, args.batches)
        row["own_eval"] = read_csv(args.work / row["run"] / "eval.csv")[-1]
        print(row["name"], {k: round(v["masked_lm_loss"], 3) for k, v in row["scores"].items()}, flush=True)
    result = {"machine": machine(), "steps": args.steps, "then_steps": more, "then_lr": args.lr,
              "examples_read": 4 * args.batches, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
