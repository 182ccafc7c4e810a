"""GLUE and custom text-classification data: the nine task specs, file readers, HF loading, submission files."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bertkit.config import parse_json
from bertkit.errors import BertkitError, missing, where

logger = logging.getLogger("bertkit")


@dataclass
class TextExample:
    """One sentence or sentence pair with its label: a class index, a float (regression), a tuple of class indices
    (multi-label) or None (test)."""

    guid: str
    text_a: str
    text_b: str | None
    label: int | float | tuple[int, ...] | None
    line: int | None = field(default=None, compare=False)  # where it is in its file, for messages about it
    group: str | None = field(default=None, compare=False)  # custom files' --group column: rows held out together


@dataclass(frozen=True)
class TaskSpec:
    """How one GLUE task ships: files per split, columns, labels, metrics and leaderboard file names."""

    name: str  # GLUE's spelling, also the data folder name
    files: dict[str, str]  # split -> file name inside the task folder
    text_a: str  # column name; for header-less CoLA the names below are positional
    text_b: str | None
    label: str
    guid: str  # the id column of test.tsv, the one the submission's `index` repeats
    labels: tuple[str, ...]  # label strings in class-index order; () for regression
    metrics: tuple[str, ...]
    submissions: dict[str, str]  # test split -> leaderboard file name
    hf_config: str  # the `nyu-mll/glue` config name
    hf_text: tuple[str, ...]  # the HF column names for text_a (and text_b)
    skip_broken_rows: bool = False

    @property
    def is_regression(self) -> bool:
        return not self.labels


_SPLITS = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

# Label orders follow the Hugging Face `glue` dataset, so class indices (and id2label of a fine-tuned
# checkpoint) mean the same thing on both sides; MNLI's is not alphabetical there, hence not here either.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        # CoLA train/dev have no header: source, label, original label, sentence; test.tsv has `index sentence`.
        TaskSpec("CoLA", _SPLITS, "sentence", None, "label", "index", _BINARY, ("mcc",), {"test": "CoLA.tsv"},
                 "cola", ("sentence",)),
        TaskSpec("SST-2", _SPLITS, "sentence", None, "label", "index", _BINARY, ("accuracy",),
                 {"test": "SST-2.tsv"}, "sst2", ("sentence",)),
        TaskSpec("MRPC", _SPLITS, "#1 String", "#2 String", "Quality", "index", _BINARY, ("f1", "accuracy"),
                 {"test": "MRPC.tsv"}, "mrpc", ("sentence1", "sentence2")),
        TaskSpec("STS-B", _SPLITS, "sentence1", "sentence2", "score", "index", (), ("pearson", "spearman"),
                 {"test": "STS-B.tsv"}, "stsb", ("sentence1", "sentence2")),
        # The real QQP release has a few rows broken by embedded newlines; they carry no usable pair, and
        # dropping a handful of 364k rows does not move the score, so QQP skips them (with a warning).
        TaskSpec("QQP", _SPLITS, "question1", "question2", "is_duplicate", "id", _BINARY, ("f1", "accuracy"),
                 {"test": "QQP.tsv"}, "qqp", ("question1", "question2"), skip_broken_rows=True),
        TaskSpec("MNLI",
                 {"train": "train.tsv", "dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv",
                  "test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv"},
                 "sentence1", "sentence2", "gold_label", "index", ("entailment", "neutral", "contradiction"),
                 ("accuracy",),
                 # AX (GLUE's diagnostic.tsv, same columns as MNLI's test) is scored with the MNLI model.
                 {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv", "diagnostic": "AX.tsv"},
                 "mnli", ("premise", "hypothesis")),
        TaskSpec("QNLI", _SPLITS, "question", "sentence", "label", "index", _NLI2, ("accuracy",),
                 {"test": "QNLI.tsv"}, "qnli", ("question", "sentence")),
        TaskSpec("RTE", _SPLITS, "sentence1", "sentence2", "label", "index", _NLI2, ("accuracy",),
                 {"test": "RTE.tsv"}, "rte", ("sentence1", "sentence2")),
        TaskSpec("WNLI", _SPLITS, "sentence1", "sentence2", "label", "index", _BINARY, ("accuracy",),
                 {"test": "WNLI.tsv"}, "wnli", ("sentence1", "sentence2")),
    ]
}

_COLA_COLUMNS = 4  # source, label, original label, sentence
_HF_SPLITS = {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}


def get_task(name: str) -> TaskSpec:
    """Look a task up by any common spelling: `SST-2`, `sst2`, `sts_b`."""
    key = name.lower().replace("-", "").replace("_", "")
    for spec in TASKS.values():
        if spec.name.lower().replace("-", "") == key:
            return spec
    raise BertkitError(f"unknown GLUE task {name!r} (expected one of {', '.join(TASKS)})")


# Microsoft's MRPC files (and GLUE's MRPC, which copies their header) start with a UTF-8 byte-order mark that
# was once decoded as Latin-1 and re-encoded: the three characters "ï»¿". utf-8-sig drops only a true BOM.
_MOJIBAKE_BOM = "\u00ef\u00bb\u00bf"


def _open_rows(path: Path, delimiter: str, quoting: int) -> list[tuple[int, list[str]]]:
    """All rows with their line numbers, without the byte-order mark spreadsheets and MRPC put in front."""
    if not path.is_file():
        raise BertkitError(missing(path, "a tab- or comma-separated file with a header row"))
    # csv's own limit, 131,072 characters a field, refuses a long document that a .jsonl file may hold
    csv.field_size_limit(max(csv.field_size_limit(), MAX_JSONL_LINE_BYTES))
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            try:
                rows = [(reader.line_num, row) for row in reader if row]
            except csv.Error as e:
                raise BertkitError(f"{where(path, reader.line_num)}: {e}") from None
            except UnicodeDecodeError:
                raise BertkitError(_not_utf8(path)) from None
    except OSError as e:
        raise BertkitError(f"{path}: cannot read ({e.strerror or e})") from None
    if not rows:
        raise BertkitError(f"{path}: file is empty, expected a header row and examples")
    first = rows[0][1]
    first[0] = first[0].removeprefix(_MOJIBAKE_BOM).removeprefix("\ufeff")
    return rows


def _not_utf8(path: Path) -> str:
    """Where a file that failed to decode stops being UTF-8: the csv reader's error says neither line nor byte."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{where(path, number)}: not UTF-8 text (byte {e.start + 1} of the line); expected UTF-8"
    return f"{path}: not UTF-8 text; expected UTF-8"


def _label_index(value: str, labels: Sequence[str], path: Path, line: int) -> int:
    try:
        return labels.index(value)
    except ValueError:
        raise BertkitError(
            f"{where(path, line)}: unknown label {value!r} (expected one of {', '.join(labels)})"
        ) from None


def _float_label(value: str, path: Path, line: int) -> float:
    try:
        score = float(value)
    except ValueError:
        raise BertkitError(f"{where(path, line)}: label {value!r} is not a number (expected a float score)") from None
    if not math.isfinite(score):  # one NaN target makes the loss, and so the whole model, NaN
        raise BertkitError(f"{where(path, line)}: label {value!r} is not a finite number (expected a float score)")
    return score


def _column(header: list[str], name: str, path: Path) -> int:
    if name not in header:
        raise BertkitError(f"{where(path, 1)}: header has no column {name!r} (found {', '.join(header)})")
    return header.index(name)


def read_glue_file(task: str, path: str | Path) -> list[TextExample]:
    """Read one GLUE file (train/dev/test, or Microsoft's msr_paraphrase_*.txt for MRPC) into examples."""
    spec, path = get_task(task), Path(path)
    # GLUE text has unbalanced quotes (`"the witness`), so quotes are plain characters, never delimiters.
    rows = _open_rows(path, "\t", csv.QUOTE_NONE)
    first = rows[0][1]
    if spec.name == "CoLA" and first != ["index", "sentence"]:
        header = None  # train/dev: positional columns
        positions: dict[str, int] = {"text_a": 3, "label": 1}
        width, body = _COLA_COLUMNS, rows
    else:
        header, body, width = first, rows[1:], len(first)
        has_label = spec.label in header
        if not has_label and spec.guid not in header:
            raise BertkitError(
                f"{where(path, 1)}: header has neither the label column {spec.label!r} nor the test id column "
                f"{spec.guid!r} of {spec.name} (found {', '.join(header)})"
            )
        positions = {"text_a": _column(header, spec.text_a, path)}
        if spec.text_b is not None:
            positions["text_b"] = _column(header, spec.text_b, path)
        if has_label:
            positions["label"] = header.index(spec.label)
        if spec.guid in header:
            positions["guid"] = header.index(spec.guid)
    if not body:
        raise BertkitError(f"{path}: no examples after the header row")

    examples, skipped = [], []
    for line, row in body:
        if len(row) != width:
            if spec.skip_broken_rows:
                skipped.append(line)
                continue
            raise BertkitError(
                f"{where(path, line)}: {len(row)} tab-separated columns, expected {width}"
                + (f" ({', '.join(header)})" if header else " (source, label, original label, sentence)")
            )
        label: int | float | None = None
        if "label" in positions:
            value = row[positions["label"]]
            if spec.is_regression:
                label = _float_label(value, path, line)
            else:
                label = _label_index(value, spec.labels, path, line)
        guid = row[positions["guid"]] if "guid" in positions else f"{path.stem}-{len(examples)}"
        text_b = row[positions["text_b"]] if "text_b" in positions else None
        examples.append(TextExample(guid, row[positions["text_a"]], text_b, label, line))
    if not examples:
        raise BertkitError(f"{path}: all {len(skipped)} rows are broken (expected {width} columns each)")
    if skipped:
        logger.warning("%s: skipped %d broken rows (wrong column count), first at lines %s",
                    path, len(skipped), ", ".join(map(str, skipped[:5])))
    return examples


def read_glue(task: str, data_dir: str | Path, split: str) -> list[TextExample]:
    """Read a split of a GLUE task from its folder in the layout `download_glue_data.py` makes."""
    spec = get_task(task)
    if split not in spec.files:
        raise BertkitError(f"{spec.name} has no split {split!r} (expected one of {', '.join(spec.files)})")
    return read_glue_file(spec.name, Path(data_dir) / spec.files[split])


def _infer_labels(values: list[str]) -> list[str]:
    """Sorted label strings, numerically when all are numbers so that '2' comes before '10'.

    The order must be a function of the labels alone: a set's iteration order changes from process to process,
    and a resumed run reads its classes again. So equal numbers ('1', '1.0') are ordered by their text, and a
    set with 'nan' (which compares neither below nor above anything) is sorted as text.
    """
    unique = set(values)
    try:
        numbers = {value: float(value) for value in unique}
    except ValueError:
        return sorted(unique)
    if any(math.isnan(number) for number in numbers.values()):
        return sorted(unique)
    return sorted(unique, key=lambda value: (numbers[value], value))


def _is_fraction(value: str) -> bool:
    """A number with a fractional part ('3.5'): a score, not a class name ('3', '3.0' or 'pos')."""
    try:
        return not float(value).is_integer()
    except (ValueError, OverflowError):
        return False


def read_records(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, object]]]:
    """(line, record) pairs from a .csv, .tsv or .jsonl file with named columns; a .csv/.tsv header must name
    `columns` (a .jsonl file's are checked on its records by the caller)."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise BertkitError(missing(path, "a .csv, .tsv or .jsonl file"))
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix not in (".csv", ".tsv"):
        raise BertkitError(f"{path}: unsupported file type {suffix!r} (expected .csv, .tsv or .jsonl)")
    # CSV from spreadsheets and pandas quotes fields that hold commas; TSV is taken as GLUE ships it, unquoted.
    delimiter, quoting = (",", csv.QUOTE_MINIMAL) if suffix == ".csv" else ("\t", csv.QUOTE_NONE)
    rows = _open_rows(path, delimiter, quoting)
    header = rows[0][1]
    # Only a column the task reads must be named once (else the last of them would be read, silently); others,
    # such as the unnamed columns a spreadsheet exports after the data (`text,label,,`), are never read.
    twice = sorted({name for name in header if header.count(name) > 1 and name in columns})
    if twice:
        raise BertkitError(f"{where(path, rows[0][0])}: column {twice[0]!r} appears {header.count(twice[0])} times in "
                           "the header; expected each column named once")
    for column in columns:  # named at the header's line: the rows below it are not where the name is missing
        if column not in header:
            raise BertkitError(f"{where(path, rows[0][0])}: no column {column!r} (found {', '.join(header)})")
    records = []
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise BertkitError(f"{where(path, line)}: {len(row)} columns, expected {len(header)} ({', '.join(header)})")
        records.append((line, dict(zip(header, row))))
    if not records:
        raise BertkitError(f"{path}: no examples after the header row")
    return records


# One example per line: a longer line is not a labelled text (and json.loads on it would take that much again).
MAX_JSONL_LINE_BYTES = 10_000_000


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, object]]]:
    """(line, object) per non-blank line of a JSON lines file, read a bounded line at a time."""
    if not path.is_file():
        raise BertkitError(missing(path, "a JSON lines file, one object per line"))
    records = []
    try:
        with open(path, "rb") as f:
            # not text-mode lines: JSON strings may hold U+2028, which str.splitlines would split at
            for line, raw in enumerate(iter(lambda: f.readline(MAX_JSONL_LINE_BYTES + 1), b""), start=1):
                if len(raw) > MAX_JSONL_LINE_BYTES:
                    raise BertkitError(
                        f"{where(path, line)}: line longer than {MAX_JSONL_LINE_BYTES:,} bytes; expected one JSON "
                        "object (an example) per line"
                    )
                try:
                    text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise BertkitError(f"{where(path, line)}: not UTF-8 text (expected UTF-8)") from None
                if not text.strip():
                    continue
                record = parse_json(text, path, "a flat JSON object per line", line)
                if not isinstance(record, dict):
                    raise BertkitError(f"{where(path, line)}: expected a JSON object per line")
                records.append((line, record))
    except OSError as e:
        raise BertkitError(f"{path}: cannot read ({e.strerror or e})") from None
    if not records:
        raise BertkitError(f"{path}: file is empty, expected one JSON object per line")
    return records


def text_field(value, path: Path, line: int, column: str) -> str:
    """A text field as a str: JSON strings as they are, numbers written out; anything else is an error."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise BertkitError(f"{where(path, line)}: column {column!r} is {type(value).__name__}; expected text")


def read_custom(
    path: str | Path,
    text_a: str,
    label: str | None,
    text_b: str | None = None,
    labels: Sequence[str] | None = None,
    is_regression: bool = False,
    label_sep: str | None = None,
    group: str | None = None,
) -> tuple[list[TextExample], list[str]]:
    """Read a user's own .csv/.tsv/.jsonl classification or regression data; returns examples and label list.

    Pass the train file's label list when reading dev/test so that indices agree; without it the labels are
    inferred (sorted) from this file. `label=None` reads unlabelled data. With `label_sep`, multi-label data: each
    example's label field holds any number of labels (none too), separated by it (or a JSON list in a .jsonl),
    and its label is the tuple of their indices, sorted (`multi_label_names`). `group` names a column read as each
    example's group (a document, a speaker: rows that --eval-split and --folds keep together).
    """
    path = Path(path)
    wanted = [c for c in (text_a, text_b, label, group) if c is not None]
    records = read_records(path, wanted)
    for column in wanted:
        if column not in records[0][1]:
            line, record = records[0]
            raise BertkitError(f"{where(path, line)}: no column {column!r} (found {', '.join(map(str, record))})")
    multi_label = label is not None and label_sep is not None
    names = {}  # multi-label: line -> its label names
    label_list: list[str] = []
    if multi_label:
        for line, record in records:
            if record.get(label) is not None:  # a missing one is named in the loop below
                names[line] = multi_label_names(record[label], path, line, label, label_sep)
        label_list = list(labels) if labels is not None else _infer_labels([n for row in names.values() for n in row])
    elif label is not None and not is_regression:
        label_list = list(labels) if labels is not None else _infer_labels([str(r.get(label)) for _, r in records])
        fractions = [v for v in label_list if _is_fraction(v)]
        if labels is None and fractions:  # a score file read without --regression: every value became a class
            logger.warning("%s: column %r holds scores such as %s; read as %d classes (expected --regression to "
                           "predict a score)", path, label, fractions[0], len(label_list))
        alike = [v for v in label_list if v != v.strip() and v.strip() in label_list]
        if labels is None and alike:  # 'pos ' beside 'pos': a stray space in the file, trained as its own class
            logger.warning("%s: column %r holds %r beside %r, read as %d classes (expected each label written one "
                           "way)", path, label, alike[0], alike[0].strip(), len(label_list))

    examples = []
    for line, record in records:
        for column in wanted:
            if record.get(column) is None:
                raise BertkitError(f"{where(path, line)}: column {column!r} is missing or null")
        value: int | float | tuple[int, ...] | None = None
        if multi_label:
            value = tuple(sorted(_label_index(name, label_list, path, line) for name in names[line]))
        elif label is not None:
            raw = record[label] if isinstance(record[label], bool) else text_field(record[label], path, line, label)
            raw = str(raw)
            if not raw.strip():  # else an unlabelled row would become a class of its own, named ''
                raise BertkitError(f"{where(path, line)}: column {label!r} is empty; expected a label")
            value = _float_label(raw, path, line) if is_regression else _label_index(raw, label_list, path, line)
        b = text_field(record[text_b], path, line, text_b) if text_b is not None else None
        examples.append(TextExample(f"{path.stem}-{line}", text_field(record[text_a], path, line, text_a), b, value, line,
                                    text_field(record[group], path, line, group) if group is not None else None))
    return examples, label_list


def multi_label_names(value, path: Path, line: int, column: str, sep: str) -> list[str]:
    """A multi-label field's label names: a JSON list of them, or a text split at `sep` (white space around each
    stripped; an empty field is no label)."""
    if isinstance(value, list):
        names = [text_field(v, path, line, column).strip() for v in value]
    else:
        text = value if isinstance(value, str) else text_field(value, path, line, column)
        names = [name.strip() for name in text.split(sep)] if text.strip() else []
    if any(not name for name in names):
        raise BertkitError(f"{where(path, line)}: column {column!r} ({value!r}) has an empty label; expected label "
                           f"names separated by {sep!r} (an empty field for none)")
    return list(dict.fromkeys(names))  # a label named twice holds once


def load_hf_glue(task: str, split: str) -> list[TextExample]:
    """Load a GLUE split through the Hugging Face `datasets` package (downloads on first use)."""
    spec = get_task(task)
    if split not in spec.files:
        raise BertkitError(f"{spec.name} has no split {split!r} (expected one of {', '.join(spec.files)})")
    from bertkit.data.download import hub_dataset

    rows = hub_dataset("nyu-mll/glue", spec.hf_config, _HF_SPLITS.get(split, split))
    examples = []
    for row in rows:
        label = row["label"]
        # HF marks hidden test labels with -1; its class indices already match `spec.labels`.
        value = None if label == -1 else (float(label) if spec.is_regression else int(label))
        text_b = row[spec.hf_text[1]] if len(spec.hf_text) > 1 else None
        examples.append(TextExample(str(row["idx"]), row[spec.hf_text[0]], text_b, value))
    return examples


def write_submission(
    task: str, predictions: Sequence[int | float], out_dir: str | Path, split: str = "test",
    ids: Sequence[str] | None = None,
) -> Path:
    """Write the leaderboard file (`index<TAB>prediction`, in test-file order) and return its path. `index` is each
    example's id from the test file (`ids`, the examples' guid), so that a row the reader skipped shifts nothing;
    without ids, the position."""
    spec = get_task(task)
    if split not in spec.submissions:
        raise BertkitError(
            f"{spec.name} has no submission for split {split!r} (expected one of {', '.join(spec.submissions)})"
        )
    out = Path(out_dir) / spec.submissions[split]
    out.parent.mkdir(parents=True, exist_ok=True)
    if ids is not None and len(ids) != len(predictions):
        raise BertkitError(f"{len(predictions)} predictions for {len(ids)} ids; expected one per test example")
    lines = ["index\tprediction"]
    for i, p in enumerate(predictions):
        index = i if ids is None else ids[i]
        if spec.is_regression:
            lines.append(f"{index}\t{float(p):.3f}")
        elif not 0 <= int(p) < len(spec.labels):
            raise BertkitError(f"prediction {i} is class {p}, expected 0..{len(spec.labels) - 1} for {spec.name}")
        else:
            # GLUE scores label strings: 0/1 for the binary tasks, entailment/... for the NLI ones.
            lines.append(f"{index}\t{spec.labels[int(p)]}")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
