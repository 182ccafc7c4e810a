"""Knowledge distillation on SST-2 (`finetune --teacher`, `--transfer-file`): does a small student learn more from
a teacher's outputs, and from unlabelled text the teacher labels, than from the labels alone?

The setting of Turc et al. 2019 (Well-Read Students Learn Better) at CPU scale: few labels, many unlabelled texts.
all-MiniLM-L6-v2 (6 layers, 384 wide) is the teacher, fine-tuned on the first --labelled SST-2 training sentences;
the student is its first two layers (the same embeddings, a third of the encoder). Cells, each a `bertkit
finetune` run in --out, skipped when its metrics.json exists (so a stopped study resumes cell by cell):

- teacher: the 6 layers on the labelled sentences;
- labels: the student on the labelled sentences, trained on their labels;
- teacher-targets: the student on the same sentences, trained on the teacher's outputs only;
- teacher-transfer: the same plus the next --transfer sentences, unlabelled, that the teacher labels;
- gold-transfer: the student on the labelled and the transfer sentences with their true labels (what the teacher
  stands in for: the labels nobody paid for);
- teacher-transfer-T<t>, for each --temperatures t: teacher-transfer at that --distill-temperature.

All on SST-2's dev set (872 sentences), the same lr, epochs and batch size, seeds from --seeds. The summary (dev
accuracy of each cell's best epoch, and of its last) goes to --summary (docs/distill/sst2.json).

    python benchmarks/distill_sst2.py --threads 2 --seeds 0
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from bertkit import BertModel, Tokenizer
from bertkit.tasks.finetune import FinetuneConfig, finetune
from run import study_parser



def write_csv(path: Path, rows: list[tuple[str, str]], labelled: bool = True) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"] if labelled else ["text"])
        for sentence, label in rows:
            out.writerow([sentence, "positive" if label == "1" else "negative"] if labelled else [sentence])
    return str(path)


def first_layers(model_dir: Path, layers: int, out: Path) -> str:
    """The model's embeddings and first `layers` encoder blocks as a pretrained folder."""
    if not (out / "config.json").exists():
        model = BertModel.from_pretrained(model_dir)
        model.encoder.layer = model.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
        model.save_pretrained(out, tokenizer=Tokenizer.from_pretrained(model_dir))
    return str(out)


def main() -> None:
    parser = study_parser(__doc__, "distill", "distill/sst2.json")
    parser.add_argument("--labelled", type=int, default=3000)
    parser.add_argument("--transfer", type=int, default=20000)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--temperatures", type=float, nargs="*", default=[],
                        help="teacher-transfer again at each of these temperatures (1: the cell itself)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    glue = args.data / "glue" / "SST-2"
    rows = [line.rstrip("\n").split("\t") for line in open(glue / "train.tsv", encoding="utf-8")][1:]
    labelled, transfer = rows[:args.labelled], rows[args.labelled:args.labelled + args.transfer]
    files = {"labelled": write_csv(args.out / "labelled.csv", labelled),
             "transfer": write_csv(args.out / "transfer.csv", transfer, labelled=False),
             "gold": write_csv(args.out / "labelled-and-transfer.csv", labelled + transfer),
             "dev": write_csv(args.out / "dev.csv", [tuple(r) for r in (line.rstrip("\n").split("\t") for line in
                                                                      open(glue / "dev.tsv", encoding="utf-8"))][1:])}
    teacher_model = args.data / "checkpoints" / "all-MiniLM-L6-v2"
    student_model = first_layers(teacher_model, args.student_layers, args.out / f"student-L{args.student_layers}")
    summary = {"teacher_model": teacher_model.name, "student": f"its first {args.student_layers} layers",
               "labelled": len(labelled), "transfer": len(transfer), "dev": "SST-2 dev (872)", "lr": args.lr,
               "epochs": args.epochs, "torch": torch.__version__, "cells": {}}
    if args.summary.exists():  # the cells of earlier runs of the study (other seeds, temperatures) stay
        summary["cells"] = json.loads(args.summary.read_text())["cells"]
    for seed in args.seeds:
        teacher = str(args.out / f"teacher-s{seed}")
        cells = {"teacher": (str(teacher_model), files["labelled"], {}),
                 "labels": (student_model, files["labelled"], {}),
                 "teacher-targets": (student_model, files["labelled"], {"teacher": teacher}),
                 "teacher-transfer": (student_model, files["labelled"], {"teacher": teacher,
                                                                         "transfer_file": files["transfer"]}),
                 "gold-transfer": (student_model, files["gold"], {})}
        cells |= {f"teacher-transfer-T{t:g}": (student_model, files["labelled"], {
            "teacher": teacher, "transfer_file": files["transfer"], "distill_temperature": t})
            for t in args.temperatures if t != 1}
        for name, (model, train, extra) in cells.items():
            out, key = args.out / f"{name}-s{seed}", f"{name}-s{seed}"
            threads = summary["cells"].get(key, {}).get("threads", args.threads)  # of the invocation that ran it
            if not (out / "metrics.json").exists():
                threads = args.threads
                finetune(FinetuneConfig(model_dir=model, out_dir=str(out), task="custom", text_a="text",
                                        train_file=train, eval_file=files["dev"], lr=args.lr, epochs=args.epochs,
                                        seed=seed, threads=args.threads, resume="auto", **extra))
            record = json.loads((out / "metrics.json").read_text())
            summary["cells"][key] = {
                "accuracy": record["best"]["accuracy"], "best_epoch": record["best_epoch"],
                "last_epoch_accuracy": record["epochs"][-1]["accuracy"], "train_rows": record["train_rows"],
                "train_seconds": round(sum(e.get("train_seconds", 0) for e in record["epochs"]), 1), "threads": threads}
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(json.dumps(summary, indent=2) + "\n")
            print(name, seed, summary["cells"][key], flush=True)


if __name__ == "__main__":
    main()
