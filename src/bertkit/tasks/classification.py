"""Sentence and sentence-pair classification (or regression): the GLUE tasks and a user's own files."""

from __future__ import annotations

import collections
import io
import logging
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bertkit.checkpoint import atomic_write_text
from bertkit.data.corpus import replace_lone_surrogates
from bertkit.data.glue import TextExample, get_task, read_custom, read_glue_file, write_submission
from bertkit.errors import BertkitError
from bertkit.model import BertForSequenceClassification
from bertkit.tasks.inference import infer

logger = logging.getLogger("bertkit")

# Microsoft's MRPC release, which GLUE's train/dev are cut from; its test file is what GLUE scores MRPC on.
MSR_TRAIN, MSR_TEST = "msr_paraphrase_train.txt", "msr_paraphrase_test.txt"
CLASSES_FILE = "classes.md"  # a classification run's per class scores and confusion matrix, of its best epoch


@dataclass
class TextTask:
    """Examples and scoring of one classification/regression task; the first eval split picks the best epoch."""

    name: str  # GLUE's spelling, or "custom"
    labels: list[str]  # class names in index order; empty for regression
    metrics: tuple[str, ...]
    train: list[TextExample] = field(default_factory=list)
    evals: dict[str, list[TextExample]] = field(default_factory=dict)  # split -> labelled examples
    tests: dict[str, list[TextExample]] = field(default_factory=dict)  # split -> examples for a submission file
    multi_label: bool = False  # any number of `labels` per example (a tuple of indices): a sigmoid each
    held_out: list[int] = field(default_factory=list)  # where the HELD_OUT rows were in the training examples

    model_class = BertForSequenceClassification

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def table_metrics(self) -> list[str]:
        """The columns of the results table: every metric of every eval split."""
        return [metric_key(i, split, m) for i, split in enumerate(self.evals) for m in self.metrics]

    def model_overrides(self) -> dict:
        # regression is one output named like transformers' default, so that its pipelines read it too
        overrides = {"id2label": dict(enumerate(self.labels)) if self.labels else {0: "LABEL_0"}}
        return overrides | ({"problem_type": MULTI_LABEL} if self.multi_label else {})

    def headline(self, metrics: dict[str, float]) -> float:
        from bertkit.tasks.metrics import headline_score

        return headline_score({m: metrics[m] for m in self.metrics})

    @property
    def result_keys(self) -> tuple[str, ...]:
        """The fields of one example's `result`."""
        if self.is_regression:
            return ("score",)
        return ("labels", "probabilities") if self.multi_label else ("label", "probability")

    def result(self, prediction, probabilities) -> dict:
        """One example's `predict` output as `bertkit predict` and `serve` give it: the score, the label and its
        probability, or (multi-label) the labels predicted and every label's probability."""
        if self.is_regression:
            return {"score": float(prediction)}
        if self.multi_label:
            return {"labels": [name for name, on in zip(self.labels, prediction) if on],
                    "probabilities": {name: float(p) for name, p in zip(self.labels, probabilities)}}
        return {"label": self.labels[int(prediction)], "probability": float(probabilities[int(prediction)])}

    def gold(self, examples: Sequence[TextExample]) -> list:
        """The examples' labels as `predict` gives its predictions: multi-label ones as 0/1 rows."""
        return [multi_hot(e.label, len(self.labels)) if self.multi_label else e.label for e in examples]

    def balanced_pos_weight(self) -> torch.Tensor:
        """Multi-label: each label's negatives / positives in the training examples (1 where it has none of either),
        the weight of its positive term in binary cross-entropy that makes both count alike."""
        gold = torch.tensor(self.gold(self.train), dtype=torch.float32)
        positives = gold.sum(0)
        negatives = len(gold) - positives
        both = (positives > 0) & (negatives > 0)
        return torch.where(both, negatives / positives.clamp(min=1), torch.ones_like(positives))

    def balanced_class_weight(self) -> torch.Tensor:
        """Single-label: each class's weight in cross-entropy, examples / (classes x its examples) over the training
        examples and the classes they have (sklearn's "balanced"; 1 for a class with none), so that every class
        weighs as much in all."""
        if self.is_regression or self.multi_label:
            raise BertkitError(f"{self.name} is {'regression' if self.is_regression else 'multi-label'}; class "
                               "weights are for single-label classification (multi-label: --pos-weight)")
        counts = torch.bincount(torch.tensor([e.label for e in self.train]), minlength=len(self.labels)).float()
        weights = len(self.train) / (int((counts > 0).sum()) * counts.clamp(min=1))
        return torch.where(counts > 0, weights, torch.ones_like(weights))

    def train_rows(self, tokenizer, config) -> list[dict]:
        rows = encode(self.train, tokenizer, config.max_length, with_labels=not self.multi_label)
        if self.multi_label:  # as 0/1 rows, which collate stacks
            for row, label in zip(rows, self.gold(self.train)):
                row["labels"] = label
        return rows

    def logits(self, model, tokenizer, examples: Sequence[TextExample], config, device) -> torch.Tensor:
        rows = encode(examples, tokenizer, config.max_length, with_labels=False)
        return infer(model, rows, config.eval_batch_size, tokenizer.pad_id, device, ("logits",))["logits"]

    def predict(self, model, tokenizer, examples: Sequence[TextExample], config, device) -> np.ndarray:
        """Class indices (or scores for regression) and, for classification, softmax probabilities (N, C);
        multi-label: a 0/1 matrix (N, C), each label's sigmoid at or above config.label_threshold, and the
        sigmoids."""
        return self.decide(self.logits(model, tokenizer, examples, config, device), config)

    def decide(self, logits: torch.Tensor, config):
        """`predict`'s answer from the model's logits."""
        if self.is_regression:
            return logits[:, 0].numpy(), logits[:, 0].numpy()
        if self.multi_label:
            probabilities = torch.sigmoid(logits).numpy()
            return (probabilities >= config.label_threshold).astype(np.int64), probabilities
        return logits.argmax(-1).numpy(), torch.softmax(logits, -1).numpy()

    def evaluate(self, model, tokenizer, config, device, logits_out: dict | None = None):
        """Metrics on every eval split (extra splits prefixed with their name) and the writer of the outputs: for
        classification, CLASSES_FILE (per class scores and the confusion matrix of the first split; multi-label: per
        label scores). `logits_out`, when given, receives each split's logits (what `evaluate --calibrate` fits)."""
        logits = {split: self.logits(model, tokenizer, examples, config, device)
                  for split, examples in self.evals.items()}
        if logits_out is not None:
            logits_out.update(logits)
        metrics, report = self.scores(logits, config)

        def write_outputs(out_dir: Path) -> None:
            if report is not None:
                atomic_write_text(Path(out_dir) / CLASSES_FILE, report)

        return metrics, write_outputs

    def scores(self, logits: dict[str, torch.Tensor], config) -> tuple[dict, str | None]:
        """The metrics of every eval split from its logits (any model's: an ensemble's averaged ones too), and the
        per class (label) report of the first split (None for regression)."""
        from bertkit.tasks.metrics import calibration_scores, class_report, compute_metrics  # scipy, sklearn: seconds

        metrics, report = {}, None
        for i, (split, examples) in enumerate(self.evals.items()):
            predictions, probabilities = self.decide(logits[split], config)
            gold = self.gold(examples)
            scores = compute_metrics(self.metrics, predictions, gold)
            if self.labels and not self.multi_label:  # how well its probabilities are calibrated: ECE and NLL
                scores |= calibration_scores(probabilities, gold)
            metrics.update({metric_key(i, split, m): v for m, v in scores.items()})
            if i == 0 and not self.is_regression:
                report = class_report(self.labels, predictions, gold,
                                      f"{self.name} per {'label' if self.multi_label else 'class'}: {split}, "
                                      f"{len(examples):,} examples")
        return metrics, report

    def write_test_predictions(self, model, tokenizer, config, device, out_dir: Path) -> list[Path]:
        """GLUE's leaderboard files for the test splits that were found."""
        written = []
        for split, examples in self.tests.items():
            predictions, _ = self.predict(model, tokenizer, examples, config, device)
            ids = [e.guid for e in examples]
            # GLUE's test files number their rows; one without that column (a labelled file) gets "dev-0", ...
            # from the reader, and its rows are numbered by position instead
            ids = ids if all(i.isdigit() for i in ids) else None
            written.append(write_submission(self.name, predictions, out_dir, split, ids))
        return written


MULTI_LABEL = "multi_label_classification"  # transformers' problem_type: what config.json says of such a head


def is_multi_label(model_config) -> bool:
    """Whether a model folder's config.json makes its classifier multi-label (a sigmoid per label)."""
    return model_config.extra.get("problem_type") == MULTI_LABEL


def multi_hot(indices: Sequence[int], size: int) -> tuple[int, ...]:
    """A multi-label example's label indices as one 0/1 per label (a tuple: collate stacks it as one row)."""
    return tuple(int(i in indices) for i in range(size))


def metric_key(index: int, split: str, metric: str) -> str:
    """`accuracy` for the first eval split, `dev_mismatched_accuracy` for MNLI's second."""
    return metric if index == 0 else f"{split}_{metric}"


def encode(examples: Sequence[TextExample], tokenizer, max_length: int, with_labels: bool) -> list[dict]:
    """Token ids per example, unpadded (batches are padded when they are made)."""
    pairs = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    encoded = tokenizer.encode_batch([e.text_a for e in examples], pairs, max_length=max_length, padding=False)
    rows = [{"input_ids": ids, "token_type_ids": types}
            for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"])]
    if with_labels:
        for row, example in zip(rows, examples):
            row["labels"] = example.label
    return rows


def _checked(examples: list[TextExample], path: Path, what: str) -> list[TextExample]:
    if any(e.label is None for e in examples):
        raise BertkitError(f"{path}: has no labels; expected a labelled file for {what}")
    return examples


def _with_text(examples: list[TextExample], path: Path) -> list[TextExample]:
    """Training examples without an empty (or all white space) text: such a row teaches nothing and is most
    likely a broken export, so it is skipped, counted and named in a warning. Eval files are scored whole."""
    def has_text(e: TextExample) -> bool:
        return bool(e.text_a.strip()) and (e.text_b is None or bool(e.text_b.strip()))

    kept = [e for e in examples if has_text(e)]
    if len(kept) < len(examples):
        empty = [str(e.line if e.line is not None else e.guid) for e in examples if not has_text(e)]
        if not kept:
            raise BertkitError(f"{path}: every example has an empty text; expected text to train on")
        logger.warning("%s: skipped %d training example(s) with an empty text (first at line %s)",
                    path, len(empty), ", ".join(empty[:5]))
    return kept


def _glue_files(spec, config) -> tuple[Path | None, dict[str, Path], dict[str, Path]]:
    """The train file, eval files and test files of a GLUE task, from explicit files or the task folder."""
    folder = Path(config.data_dir) if config.data_dir else None
    if folder is not None and not folder.is_dir():
        raise BertkitError(f"{folder}: no such folder; expected the {spec.name} folder of the GLUE data")
    found = {split: folder / name for split, name in spec.files.items() if folder and (folder / name).is_file()}
    if spec.name == "MRPC" and folder and "train" not in found and (folder / MSR_TRAIN).is_file():
        # Microsoft's release instead of GLUE's split: train on its train file, score on its test file
        found = {"train": folder / MSR_TRAIN, "dev": folder / MSR_TEST}
    if "diagnostic" in spec.submissions and folder:
        # AX, scored with the MNLI model: GLUE's download keeps it in a folder of its own beside MNLI's
        for path in (folder / "diagnostic.tsv", folder.parent / "diagnostic" / "diagnostic.tsv"):
            if path.is_file():
                found["diagnostic"] = path
                break
    train = Path(config.train_file) if config.train_file else found.get("train")
    if config.eval_file:
        evals = {"dev": Path(config.eval_file)}
    else:
        evals = {s: p for s, p in found.items() if s.startswith("dev")}
    if config.test_file:
        tests = {next(iter(spec.submissions)): Path(config.test_file)}
    else:
        tests = {s: p for s, p in found.items() if s in spec.submissions}
    return train, evals, tests


def load_text_task(config, need_train: bool = True, labels: Sequence[str] | None = None) -> TextTask:
    """Read the task's data as `config` names it; `labels` (a model's id2label) fixes the order of custom labels."""
    if config.task.lower() in ("", "custom"):
        return _load_custom(config, need_train, labels)
    spec = get_task(config.task)
    train_file, eval_files, test_files = _glue_files(spec, config)
    if (need_train or splits(config)) and train_file is None:
        raise BertkitError(
            f"no training data for {spec.name}: expected --data-dir with {spec.files['train']} or --train-file"
        )
    if not eval_files and not splits(config):
        dev = next(s for s in spec.files if s.startswith("dev"))
        raise BertkitError(
            f"no evaluation data for {spec.name}: expected --data-dir with {spec.files[dev]} or --eval-file"
        )
    task = TextTask(spec.name, list(spec.labels), spec.metrics)
    if need_train or splits(config):  # the held-out rows come from the training file: evaluate reads it too
        task.train = _with_text(_checked(read_glue_file(spec.name, train_file), train_file, "training"), train_file)
    task.evals = {s: _checked(read_glue_file(spec.name, p), p, "evaluation") for s, p in eval_files.items()}
    if splits(config):
        hold_out(task, config)
    if config.predict:
        task.tests = {s: read_glue_file(spec.name, p) for s, p in test_files.items()}
        if not test_files:
            logger.warning("no test file for %s (expected test.tsv in --data-dir, or --test-file): "
                        "no submission file written", spec.name)
    return task


def _load_custom(config, need_train: bool, labels: Sequence[str] | None) -> TextTask:
    if (need_train or splits(config)) and not config.train_file:
        raise BertkitError("a custom task needs --train-file (a .csv, .tsv or .jsonl with named columns), or --task")
    if not config.eval_file and not splits(config):
        raise BertkitError("a custom task needs --eval-file (labelled, same columns as the training file), or "
                           "--eval-split 0.1 to score on a tenth of the training file held out")
    if config.predict:
        raise BertkitError("--predict writes GLUE submission files; label your own test data with `bertkit predict`")

    def read(path, label_list, group=None):
        return read_custom(path, config.text_a, config.label, config.text_b, label_list, config.regression,
                           config.label_sep if config.multi_label else None, group)

    if need_train or splits(config):
        train, labels = read(config.train_file, labels, config.group)
        train = _with_text(train, Path(config.train_file))
    else:
        train = []
    if labels is None and not config.regression:
        raise BertkitError("the label order of a custom task comes from its training file or the model's id2label")
    evals = {"dev": read(config.eval_file, None if config.regression else labels)[0]} if config.eval_file else {}
    # the best epoch is the best mean of the two, as GLUE's MRPC averages F1 and accuracy: accuracy alone would
    # prefer a model that always says the common class of an unbalanced file
    metrics = ("pearson", "spearman") if config.regression else ("accuracy", "macro_f1")
    if config.multi_label:  # the best epoch by the mean of the three
        metrics = ("micro_f1", "macro_f1", "subset_accuracy")
    if not config.regression and len(labels) < 2:
        raise BertkitError(f"{config.train_file}: only one label ({', '.join(labels)}); expected at least two "
                           f"{'labels' if config.multi_label else 'classes'}")
    task = TextTask("custom", [] if config.regression else list(labels), metrics, train, evals,
                    multi_label=config.multi_label)
    if splits(config):
        hold_out(task, config)
    return task


def splits(config) -> bool:
    """Whether the run scores on rows held out of its training file (--eval-split, --folds)."""
    return bool(config.folds or config.eval_split)


HELD_OUT = "held-out"  # the eval split cut from the training file (--eval-split, --folds): scored first


def stratum_keys(labels: Sequence, regression: bool = False) -> list:
    """What a split is stratified by, per example: its label (a regressor's: the tenth of the scores' ranks it falls
    in; a multi-label example's: its set of labels)."""
    if not regression:
        return list(labels)
    keys: list = [0] * len(labels)
    for rank, i in enumerate(sorted(range(len(labels)), key=lambda i: labels[i])):
        keys[i] = rank * 10 // len(labels)
    return keys


def strata(labels: Sequence, seed: int, regression: bool = False) -> list[list[int]]:
    """The examples' indices grouped by `stratum_keys`, each group shuffled; the same labels and seed give the same
    groups."""
    groups: dict = {}
    for i, key in enumerate(stratum_keys(labels, regression)):
        groups.setdefault(key, []).append(i)
    rng = random.Random(seed)
    ordered = [groups[key] for key in sorted(groups, key=repr)]
    for group in ordered:
        rng.shuffle(group)
    return ordered


def stratified_order(labels: Sequence, seed: int, regression: bool = False) -> list[int]:
    """The examples' indices in a random order whose every first stretch is a stratified sample: each group of
    `strata` spread evenly over the order at a random offset, so that the first tenth holds each label's tenth
    (within one example)."""
    rng = random.Random(seed + 1)
    keyed = []
    for group in strata(labels, seed, regression):
        offset = rng.random()
        keyed += [((j + offset) / len(group), rng.random(), i) for j, i in enumerate(group)]
    return [i for *_, i in sorted(keyed)]


def stratified_folds(labels: Sequence, folds: int, seed: int, regression: bool = False,
                     groups: Sequence | None = None) -> list[int]:
    """Each example's fold, 1 to `folds`: every group of `strata` dealt round the folds in turn, the deal going on
    from group to group, so that each fold holds each label's share within one example and the folds' sizes differ
    by one at most. With `groups` (a value per example), the examples of one group share a fold: the groups, largest
    first (ties in random order), each go to the fold whose labels it fills least past their share."""
    fold = [0] * len(labels)
    if groups is None:
        dealt = 0
        for stratum in strata(labels, seed, regression):
            for i in stratum:
                fold[i] = dealt % folds + 1
                dealt += 1
        return fold
    keys = stratum_keys(labels, regression)
    totals = collections.Counter(keys)
    members: dict = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    units = [members[g] for g in sorted(members, key=repr)]
    random.Random(seed).shuffle(units)
    units.sort(key=len, reverse=True)
    counts = [collections.Counter() for _ in range(folds)]
    sizes = [0] * folds
    for unit in units:
        mine = collections.Counter(keys[i] for i in unit)
        k = min(range(folds), key=lambda k: (max((counts[k][s] + n) / totals[s] for s, n in mine.items()), sizes[k], k))
        counts[k].update(mine)
        sizes[k] += len(unit)
        for i in unit:
            fold[i] = k + 1
    return fold


def hold_out(task: TextTask, config) -> None:
    """Move the rows --eval-split or --folds/--fold names out of the training examples into an eval split of their
    own, `HELD_OUT`, scored first (it picks the best epoch); the task's other eval data, if any, is scored after it."""
    labels, n = [e.label for e in task.train], len(task.train)
    groups = [e.group for e in task.train] if config.group else None
    if config.folds or groups is not None:  # with --group, --eval-split F is one fold of round(1 / F) folds
        k, fold = (config.folds, config.fold) if config.folds else (max(2, round(1 / config.eval_split)), 1)
        folds = stratified_folds(labels, k, config.split_seed, task.is_regression, groups)
        held = {i for i, f in enumerate(folds) if f == fold}
        what = (f"fold {config.fold} of {config.folds}" if config.folds
                else f"--eval-split {config.eval_split:g} by --group")
    else:
        held = set(stratified_order(labels, config.split_seed, task.is_regression)[:round(config.eval_split * n)])
        what = f"--eval-split {config.eval_split:g}"
    if not held or len(held) == n:
        raise BertkitError(f"{what} of {n} training examples leaves {n - len(held)} to train on and {len(held)} to "
                           "score; expected some of each (a larger training file, or another split)")
    task.held_out = sorted(held)
    task.evals = {HELD_OUT: [task.train[i] for i in task.held_out], **task.evals}
    task.train = [e for i, e in enumerate(task.train) if i not in held]


def read_input_lines(inputs, source: str = "<stdin>") -> list[str]:
    """The lines of `bertkit predict`'s input: a file path, a binary stream or an iterable of lines (bytes or str).

    Lines end at "\\n" only, so a text holding a form feed or U+2028 stays one line (one output line per input
    line); bytes must be UTF-8 (a line that is not is an error naming it); a byte-order mark is dropped; lone
    surrogates in str lines become U+FFFD.
    """
    if isinstance(inputs, (str, Path)):
        with open_input(inputs) as f:
            return read_input_lines(f, str(inputs))
    return [decode_line(number, line, source) for number, line in enumerate(inputs, start=1)]


def input_lines(inputs, source: str) -> Callable[[], Iterator[tuple[int, str]]]:
    """A function giving each line of `inputs` (a path, a binary stream, or lines) with its number, decoded as
    `read_input_lines` decodes them, from the first line on each time it is called, a line at a time: a file is read
    again, a binary stream copied to an unnamed temporary file first; lines given in memory are kept there. So a
    large input is read twice (once to check it, once to use it) and never held whole."""
    if isinstance(inputs, (str, Path)):
        def raw() -> Iterator[bytes]:
            with open_input(inputs) as f:
                yield from f
    elif hasattr(inputs, "read") and not isinstance(inputs, io.TextIOBase):
        spool = tempfile.TemporaryFile()  # gone when closed, or when the function is
        shutil.copyfileobj(inputs, spool)

        def raw() -> Iterator[bytes]:
            spool.seek(0)
            yield from spool
    else:
        kept = list(inputs)

        def raw() -> Iterator[bytes | str]:
            return iter(kept)

    return lambda: ((number, decode_line(number, line, source)) for number, line in enumerate(raw(), start=1))


def open_input(path: str | Path):
    """An input file, opened to read its bytes (an error naming it if it cannot be)."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise BertkitError(f"{path}: cannot read ({e.strerror or e}); expected a UTF-8 text file") from None


def decode_line(number: int, line: bytes | str, source: str) -> str:
    """Line `number` of an input as `read_input_lines` takes it."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BertkitError(f"{source}:{number}: not UTF-8 text (byte {e.start + 1} of the line); "
                               "expected UTF-8") from None
    return replace_lone_surrogates(line.removeprefix("\ufeff") if number == 1 else line)


def is_blank(example: TextExample) -> bool:
    """Whether a line read by `parse_lines` holds no text to label."""
    return not example.text_a.strip() and example.text_b is None


def parse_lines(lines, source: str = "<stdin>") -> list[TextExample]:
    """One example per line, `text` or `text<TAB>pair`, blank lines included (see `is_blank`): the output of
    `bertkit predict` keeps one line per input line. A line of more than two fields, a mix of single texts and
    pairs, or input without any text is an error."""
    parsed = (parse_line(number, line, source) for number, line in enumerate(lines, start=1))
    return list(checked_lines(parsed, source))


def parse_line(number: int, line: str, source: str) -> TextExample:
    """Line `number` as `parse_lines` reads it (not yet checked against the other lines)."""
    line = line.rstrip("\r\n")
    parts = line.split("\t") if line.strip() else [line]
    if len(parts) > 2:
        raise BertkitError(f"{source}:{number}: {len(parts)} tab-separated fields; expected a text or text<TAB>pair")
    return TextExample(str(number), parts[0], parts[1] if len(parts) == 2 else None, None, number)


def checked_lines(examples: Iterable[TextExample], source: str) -> Iterator[TextExample]:
    """`parse_line`'s examples as they come, stopped with an error at the first that mixes single texts and pairs,
    or at the end when no line had a text."""
    first = None
    for example in examples:
        if first is None and not is_blank(example):
            first = example
        elif first is not None and not is_blank(example) and (example.text_b is None) != (first.text_b is None):
            raise BertkitError(f"{source}:{example.line}: mixes single texts and text<TAB>pair lines; expected one "
                               f"kind throughout (line {first.line} is "
                               f"{'a single text' if first.text_b is None else 'a pair'})")
        yield example
    if first is None:
        raise BertkitError(f"{source}: no text to label; expected one text (or text<TAB>pair) per line")
