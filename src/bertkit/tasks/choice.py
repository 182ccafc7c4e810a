"""Multiple choice, as the paper's SWAG run (section 4.4): a sentence and its possible continuations, each
continuation read as its own pair `[CLS] sentence [SEP] continuation [SEP]`; a linear layer scores each pooled [CLS]
and a softmax over the continuations picks one.

Files are SWAG's: a .csv (or .jsonl) with the columns `sent1` (the sentence), `sent2` (the continuation's first
words, the same for every ending; may be empty), `ending0`, `ending1`, ... and `label` (the index of the right
ending, which every file read here has: SWAG's unlabelled test.csv is not scored). The continuation of ending i is `sent2 + " " + ending_i`, as transformers' SWAG
example reads it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bertkit.config import parse_json
from bertkit.data.corpus import replace_lone_surrogates
from bertkit.data.glue import read_records, text_field
from bertkit.errors import BertkitError
from bertkit.model import BertForMultipleChoice
from bertkit.tasks.classification import metric_key
from bertkit.tasks.inference import infer
from bertkit.tasks.tagging import data_files

# --data-dir's files: SWAG's own names (its dev set is val.csv)
DATA_FILES = {"train": ("train.csv", "train.jsonl"), "dev": ("val.csv", "dev.csv", "val.jsonl", "dev.jsonl")}
_ENDING = re.compile(r"ending(\d+)")


@dataclass
class ChoiceExample:
    id: str
    context: str  # sent1
    lead: str  # sent2: the first words of every continuation
    endings: list[str]
    label: int | None
    line: int | None = None

    def continuations(self) -> list[str]:
        return [f"{self.lead} {ending}".strip() for ending in self.endings]


def read_choices(path: str | Path) -> list[ChoiceExample]:
    """The examples of a SWAG-format file (see the module's docstring); a missing column, an ending count that is
    not 0, 1, ... or a label that is not one of the endings is an error naming the line."""
    path = Path(path)
    records = read_records(path, ["sent1", "sent2", "label"])
    line, first = records[0]
    numbers = sorted(int(m[1]) for name in first if (m := _ENDING.fullmatch(str(name))))
    if len(numbers) < 2 or numbers != list(range(len(numbers))):
        line = 1 if path.suffix.lower() in (".csv", ".tsv") else line  # a table's columns are its header's
        raise BertkitError(f"{path}:{line}: endings {', '.join(f'ending{n}' for n in numbers) or '(none)'}; expected "
                           "at least two columns ending0, ending1, ... numbered from 0")
    columns = ["sent1", "sent2", *(f"ending{n}" for n in numbers), "label"]
    examples = []
    for line, record in records:
        missing = [c for c in columns if record.get(c) is None]
        if missing:
            raise BertkitError(f"{path}:{line}: column {missing[0]!r} is missing or null")
        raw = str(record["label"]).strip()
        if not raw.isdecimal() or int(raw) >= len(numbers):  # isdigit takes "²", which int() refuses
            raise BertkitError(f"{path}:{line}: label {record['label']!r}; expected the number of the right ending, "
                               f"0 to {len(numbers) - 1}")
        ident = str(record.get("fold-ind") or record.get("id") or line)
        examples.append(ChoiceExample(ident, text_field(record["sent1"], path, line, "sent1"),
                                      text_field(record["sent2"], path, line, "sent2"),
                                      [text_field(record[f"ending{n}"], path, line, f"ending{n}") for n in numbers],
                                      int(raw), line))
    return examples


CHOICE_LINE = '{"context": ..., "endings": [...], "lead"?: ...}'


def parse_choice(number: int, line: str, source: str) -> ChoiceExample | None:
    """Line `number` of `predict`'s input to a multiple-choice model, `{"context": ..., "endings": [...],
    "lead"?: ...}` (`lead`, the first words of every ending, as SWAG's sent2): an example, or None for a blank line
    (its output line says so)."""
    if not line.strip():
        return None
    record = parse_json(line, source, f"{CHOICE_LINE} per line", number)
    endings = record.get("endings") if isinstance(record, dict) else None
    if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)
            and isinstance(record.get("context"), str) and isinstance(record.get("lead", ""), str)):
        raise BertkitError(f"{source}:{number}: expected a JSON object {CHOICE_LINE}: a string context, two or "
                           "more string endings")
    return ChoiceExample(str(number), replace_lone_surrogates(record["context"]),
                         replace_lone_surrogates(record.get("lead", "")),
                         [replace_lone_surrogates(e) for e in endings], None, number)


def encode(examples: Sequence[ChoiceExample], tokenizer, max_length: int, with_labels: bool) -> list[dict]:
    """One row per example: a list of token ids (and of segment ids) per ending, unpadded."""
    texts = [e.context for e in examples for _ in e.endings]
    pairs = [c for e in examples for c in e.continuations()]
    encoded = tokenizer.encode_batch(texts, pairs, max_length=max_length, padding=False)
    rows, at = [], 0
    for e in examples:
        n = len(e.endings)
        row = {"input_ids": encoded["input_ids"][at:at + n], "token_type_ids": encoded["token_type_ids"][at:at + n]}
        if with_labels:
            row["labels"] = e.label
        rows.append(row)
        at += n
    return rows


@dataclass
class ChoiceTask:
    """Examples and scoring of a multiple-choice task; the first eval split picks the best epoch."""

    train: list[ChoiceExample] = field(default_factory=list)
    evals: dict[str, list[ChoiceExample]] = field(default_factory=dict)

    name = "SWAG"
    metrics = ("accuracy",)
    model_class = BertForMultipleChoice

    @property
    def table_metrics(self) -> list[str]:
        return [metric_key(i, split, m) for i, split in enumerate(self.evals) for m in self.metrics]

    def model_overrides(self) -> dict:
        return {}

    def headline(self, metrics: dict[str, float]) -> float:
        return metrics["accuracy"]

    def train_rows(self, tokenizer, config) -> list[dict]:
        return encode(self.train, tokenizer, config.max_length, with_labels=True)

    def predict(self, model, tokenizer, examples: Sequence[ChoiceExample], config, device) -> np.ndarray:
        """The probability of every ending (N, endings); examples of one file have as many endings each."""
        rows = encode(examples, tokenizer, config.max_length, with_labels=False)
        logits = infer(model, rows, config.eval_batch_size, tokenizer.pad_id, device, ("logits",))["logits"]
        return torch.softmax(logits, -1).numpy()

    def evaluate(self, model, tokenizer, config, device):
        metrics = {}
        for i, (split, examples) in enumerate(self.evals.items()):
            chosen = self.predict(model, tokenizer, examples, config, device).argmax(-1)
            right = float(np.mean(chosen == np.array([e.label for e in examples])))
            metrics[metric_key(i, split, "accuracy")] = 100.0 * right
        return metrics, lambda out_dir: None


def choose(model, tokenizer, examples: Sequence[ChoiceExample | None], config, device) -> list[dict | None]:
    """Per example, the chosen ending, its number and every ending's probability (None for None): what `bertkit
    predict` and `bertkit serve` give for a multiple-choice model. Examples with as many endings run together."""
    results: list[dict | None] = [None] * len(examples)
    for count in sorted({len(e.endings) for e in examples if e is not None}):
        indices = [i for i, e in enumerate(examples) if e is not None and len(e.endings) == count]
        probabilities = ChoiceTask().predict(model, tokenizer, [examples[i] for i in indices], config, device)
        for i, p in zip(indices, probabilities):
            best = int(p.argmax())
            results[i] = {"choice": best, "ending": examples[i].endings[best],
                          "probabilities": [round(float(x), 6) for x in p]}
    return results


def load_choice_task(config, need_train: bool = True) -> ChoiceTask:
    """Read the SWAG-format files `config` names: --train-file/--eval-file, or --data-dir's (see DATA_FILES)."""
    if config.predict:
        raise BertkitError("--predict writes GLUE submission files; choose endings of your own with `bertkit predict`")
    train, evals = data_files(config, DATA_FILES, "a folder with SWAG's train.csv and val.csv")
    dev = evals.get("dev")
    if need_train and train is None:
        raise BertkitError("no training data for SWAG: expected --train-file, or --data-dir with train.csv")
    if dev is None:
        raise BertkitError("no evaluation data for SWAG: expected --eval-file, or --data-dir with val.csv")
    task = ChoiceTask(read_choices(train) if need_train else [], {"dev": read_choices(dev)})
    counts = {len(e.endings) for examples in [task.train, task.evals["dev"]] for e in examples}
    if len(counts) > 1:
        raise BertkitError(f"{train}: {sorted(counts)[0]} endings, {dev}: {sorted(counts)[-1]}; expected as many "
                           "endings in every file")
    return task
