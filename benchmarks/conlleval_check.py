"""bertkit's tagging scores against conlleval.pl itself, the CoNLL shared tasks' official scorer.

conlleval.pl is not part of bertkit; fetch it (it needs perl) and point at it:

    curl -o /tmp/conlleval.pl https://www.clips.uantwerpen.be/conll2000/chunking/conlleval.txt
    python benchmarks/conlleval_check.py --conlleval /tmp/conlleval.pl [--predictions RUN/predictions.conll ...]

Two checks. 1: random gold and predicted IOB1 and IOB2 tags (invalid orders included, types with hyphens), scored
by both: the same counts of chunks (gold, found, correct; per type too) and the same percentages to the two
decimals conlleval prints. 2: each predictions.conll that a tagging run wrote (`word gold predicted` lines, the
script's input): the same again. E- and S- tags (IOBES) are left out: conlleval.pl has no S- tag (bertkit reads
them as seqeval does, tested in tests/tasks/test_tagging.py).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
from pathlib import Path

from bertkit.tasks.metrics import chunk_scores, chunks

TYPES = ["PER", "LOC", "ORG", "MISC", "B-X"]  # "B-X": conlleval splits a tag at its first hyphen only
OVERALL = re.compile(r"processed (\d+) tokens with (\d+) phrases; found: (\d+) phrases; correct: (\d+)\.\n"
                     r"accuracy: +([\d.]+)%; precision: +([\d.]+)%; recall: +([\d.]+)%; FB1: +([\d.]+)")
PER_TYPE = re.compile(r"^ *(\S+): precision: +([\d.]+)%; recall: +([\d.]+)%; FB1: +([\d.]+) +(\d+)$", re.M)


def random_sentences(rng: random.Random, n: int) -> tuple[list[list[str]], list[list[str]]]:
    gold, predicted = [], []
    for _ in range(n):
        length = rng.randint(1, 25)
        tags = ["O" if rng.random() < 0.6 else f"{rng.choice('BI')}-{rng.choice(TYPES)}" for _ in range(length)]
        gold.append(tags)
        predicted.append([t if rng.random() < 0.8 else
                          ("O" if rng.random() < 0.5 else f"{rng.choice('BI')}-{rng.choice(TYPES)}") for t in tags])
    return gold, predicted


def conlleval(script: Path, text: str) -> dict:
    out = subprocess.run(["perl", str(script)], input=text, capture_output=True, text=True, check=True).stdout
    tokens, gold, found, correct, accuracy, precision, recall, f1 = OVERALL.search(out).groups()
    types = {m[0]: {"precision": float(m[1]), "recall": float(m[2]), "f1": float(m[3]), "predicted": int(m[4])}
             for m in PER_TYPE.findall(out)}
    return {"tokens": int(tokens), "gold": int(gold), "predicted": int(found), "correct": int(correct),
            "accuracy": float(accuracy), "precision": float(precision), "recall": float(recall), "f1": float(f1),
            "types": types}


def bertkit_scores(gold, predicted) -> dict:
    scores, per_type = chunk_scores(gold, predicted)
    count = {name: sum(len(chunks(s)) for s in sentences) for name, sentences in (("gold", gold),
                                                                                ("predicted", predicted))}
    return {"tokens": sum(map(len, gold)), **count, "correct": sum(t["correct"] for t in per_type.values()),
            **scores, "types": per_type}


def compare(ours: dict, theirs: dict) -> dict:
    """The largest difference of a percentage, and whether every count agrees."""
    counts = all(ours[k] == theirs[k] for k in ("tokens", "gold", "predicted", "correct"))
    counts &= set(ours["types"]) == set(theirs["types"])
    gaps = [abs(ours[k] - theirs[k]) for k in ("accuracy", "precision", "recall", "f1")]
    for kind, t in theirs["types"].items():
        mine = ours["types"].get(kind, {})
        counts &= mine.get("predicted") == t["predicted"]
        gaps += [abs(mine.get(k, -1) - t[k]) for k in ("precision", "recall", "f1")]
    return {"counts_equal": counts, "largest_gap": max(gaps), "agree": counts and max(gaps) <= 0.005 + 1e-9}


def read_predictions(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    gold, predicted, g, p = [], [], [], []
    for line in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        if not line.strip():
            if g:
                gold.append(g), predicted.append(p)
            g, p = [], []
            continue
        *_, a, b = line.split(" ")
        g.append(a), p.append(b)
    return gold, predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conlleval", type=Path, required=True, help="path of conlleval.pl")
    parser.add_argument("--predictions", type=Path, nargs="*", default=[], help="predictions.conll files of runs")
    parser.add_argument("--sentences", type=int, default=3000, help="random sentences (check 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("conlleval_check.json"))
    args = parser.parse_args()
    gold, predicted = random_sentences(random.Random(args.seed), args.sentences)
    text = "".join("".join(f"w {a} {b}\n" for a, b in zip(g, p)) + "\n" for g, p in zip(gold, predicted))
    ours = bertkit_scores(gold, predicted)
    checks = {"random": {"sentences": len(gold), **compare(ours, conlleval(args.conlleval, text)),
                         "f1": round(ours["f1"], 4)}}
    for path in args.predictions:
        gold, predicted = read_predictions(path)
        ours, theirs = bertkit_scores(gold, predicted), conlleval(args.conlleval, path.read_text(encoding="utf-8"))
        checks[str(path)] = {"sentences": len(gold), **compare(ours, theirs), "f1": round(ours["f1"], 4)}
    for name, check in checks.items():
        print(f"{name}: {check}")
    version = re.search(r"# version: +(\S+)", args.conlleval.read_text(encoding="utf-8", errors="replace"))
    record = {"conlleval_version": version[1] if version else None, "checks": checks}
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if not all(c["agree"] for c in checks.values()):
        raise SystemExit("bertkit and conlleval.pl disagree")


if __name__ == "__main__":
    main()
