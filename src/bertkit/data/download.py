"""`bertkit download`: GLUE, SQuAD, SWAG, tagged words and pretraining text fetched into what bertkit's readers take
(needs a network).

SQuAD comes from its official site, the four files the paper's runs read (train and dev of v1.1 and v2.0), each
checked to be SQuAD's JSON before it is kept; SWAG from its authors' repository (train.csv, val.csv, test.csv, its
regular format), each checked to be SWAG's CSV. GLUE comes from the Hugging Face Hub's `nyu-mll/glue` through the
`datasets` package (`pip install datasets`; GLUE's original zip files have moved more than once): each split is
written as a tab-separated file in the layout GLUE's own download made (`SST-2/train.tsv`, `MNLI/dev_matched.tsv`,
`diagnostic/diagnostic.tsv`), with the columns bertkit's GLUE reader looks for and the labels spelled as GLUE spells
them, so `--data-dir` reads it like the original. A tab or line break inside a text, which that layout cannot hold,
becomes a space. Files already there are kept (a run cut short fetches only what is missing); each is written whole
or not at all.

Tagging data (`bertkit download ner --dataset ...`) comes from a Hub dataset of token lists and tag lists (the
layout of the Hub's CoNLL-2003 copies), written as CoNLL files, `train.txt`, `dev.txt` and `test.txt`, a word and its
tag per line, which `finetune --task ner --data-dir` reads.

A pretraining corpus comes from any Hub dataset with a text column (`bertkit download corpus --dataset
wikimedia/wikipedia --dataset-config 20231101.en`), streamed rather than downloaded whole, as JSON lines of one document
each (`{"text": ...}`) in files of `--shard-documents` documents, which `prepare` and `pretrain --corpus` read as they
are. A fetch cut short keeps its whole files and, run again, goes on from where the stream stood (its state is kept
beside them, hidden), without fetching the rows they hold again.
"""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import logging
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from bertkit.config import option
from bertkit.errors import BertkitError, cause

logger = logging.getLogger("bertkit")

SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/{name}"
SQUAD_FILES = {"1.1": ("train-v1.1.json", "dev-v1.1.json"), "2.0": ("train-v2.0.json", "dev-v2.0.json")}
# SWAG's regular files, where its authors keep them (the dataset's repository)
SWAG_URL = "https://raw.githubusercontent.com/rowanz/swagaf/master/data/{name}"
SWAG_FILES = ("train.csv", "val.csv", "test.csv")


@dataclass
class DownloadConfig:
    """`bertkit download`: the CLI's flags are these fields."""

    what: Literal["glue", "squad", "swag", "ner", "corpus"] = option(
        "", "glue (through the datasets package, from the Hugging Face Hub), squad (from its official site), swag "
        "(from its authors' repository), ner "
        "(a Hub dataset of tagged words, through the datasets package) or corpus (the documents of a Hub dataset, "
        "through the datasets package)", positional=True)
    out: str = option("", "the folder to write into: GLUE's task folders, SQuAD's JSON files, SWAG's .csv files, "
                      "the CoNLL files of a tagging dataset, or the corpus's JSON lines files", required=True)
    tasks: list[str] = option([], "glue: the tasks (none: all nine and the diagnostic set)")
    versions: list[str] = option(["1.1", "2.0"], "squad: the versions")
    dataset: str = option("", "corpus, ner: the Hub dataset (wikimedia/wikipedia, a CoNLL-2003 copy, ...), or a "
                          "local dataset folder")
    dataset_config: str = option("", "corpus, ner: its configuration, where it has several (20231101.en)")
    tokens_field: str = option("tokens", "ner: the column of each sentence's words")
    tags_field: str = option("ner_tags", "ner: the column of each sentence's tags (class indices named by the "
                             "dataset's features, or the tags themselves)")
    split: str = option("train", "corpus: the split")
    text_field: str = option("text", "corpus: the column that holds each document's text")
    max_documents: int = option(0, "corpus: stop after this many documents (0: all of the split)")
    shard_documents: int = option(10_000, "corpus: documents per .jsonl file (a file is written whole, so a fetch cut "
                                  "short loses at most one)")


def hub_dataset(name: str, config: str | None, split: str | None, streaming: bool = False):
    """The rows of one split of Hub dataset `name` (every split, by name, when None) through the `datasets` package
    (downloaded on first use, then read from its cache; `streaming` reads them as they arrive, nothing kept)."""
    try:
        import datasets
    except ImportError:
        raise BertkitError(f"{name} from the Hugging Face Hub needs the datasets package; expected it installed: pip "
                           "install datasets") from None
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # no network, no such dataset or split, the Hub down: datasets raises each its own way
        what = " ".join(part for part in (name, config, split) if part)
        raise BertkitError(f"{what}: cannot load it ({cause(e)}); expected that dataset, configuration and split "
                           "on the Hugging Face Hub with a network connection to it, or in the datasets "
                           "cache") from None


def _clean(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _glue_rows(spec, examples, labelled: bool) -> list[str]:
    """One split as GLUE's layout has it, header first: CoLA's labelled files have none (source, label, original
    label, sentence), every other file names its columns."""
    from bertkit.data.glue import TASKS

    cola = spec is TASKS["CoLA"]
    if cola and labelled:
        return [f"hf\t{spec.labels[e.label]}\t\t{_clean(e.text_a)}" for e in examples]
    columns = [spec.guid, spec.text_a] + ([spec.text_b] if spec.text_b else []) + ([spec.label] if labelled else [])
    rows = ["\t".join(columns)]
    for e in examples:
        row = [e.guid, _clean(e.text_a)] + ([_clean(e.text_b or "")] if spec.text_b else [])
        if labelled:
            row.append(repr(float(e.label)) if spec.is_regression else spec.labels[e.label])
        rows.append("\t".join(row))
    return rows


def _write_lines(path: Path, lines: list[str]) -> None:
    from bertkit.checkpoint import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def download_glue(tasks: list[str], out: Path) -> list[Path]:
    """Every split of `tasks` (all nine and the diagnostic set when empty) as GLUE's files under `out`."""
    from bertkit.data.glue import TASKS, get_task, load_hf_glue

    specs = [get_task(t) for t in tasks] if tasks else list(TASKS.values())
    written = []
    jobs = [(spec, split, out / spec.name / name) for spec in specs for split, name in spec.files.items()]
    if any(spec.name == "MNLI" for spec in specs):
        jobs.append((None, "diagnostic", out / "diagnostic" / "diagnostic.tsv"))
    for spec, split, path in tqdm(jobs, desc="glue", unit="file"):
        if path.is_file():
            logger.info("%s: there already, kept", path)
            continue
        if spec is None:  # GLUE's diagnostic set (AX), scored with the MNLI model: MNLI's test columns
            mnli = TASKS["MNLI"]
            examples = _load_ax()
            lines = _glue_rows(mnli, examples, labelled=False)
        else:
            examples = load_hf_glue(spec.name, split)
            labelled = all(e.label is not None for e in examples)
            lines = _glue_rows(spec, examples, labelled)
        _write_lines(path, lines)
        written.append(path)
    return written


def _load_ax():
    """GLUE's diagnostic set through `datasets` (config `ax`, its one split, unlabelled)."""
    from bertkit.data.glue import TextExample

    rows = hub_dataset("nyu-mll/glue", "ax", "test")
    return [TextExample(str(row["idx"]), row["premise"], row["hypothesis"], None) for row in rows]


def _check_squad(url: str, tmp: str) -> None:
    try:
        data = json.loads(Path(tmp).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BertkitError(f"{url}: not JSON ({e}); expected SQuAD's dataset file (nothing kept)") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BertkitError(f"{url}: no 'data' list; expected SQuAD's dataset file (nothing kept)")


def _check_swag(url: str, tmp: str) -> None:
    """SWAG's regular files: a CSV whose header names sent1, sent2 and the endings (read by choice.read_choices)."""
    with open(tmp, encoding="utf-8", errors="replace") as f:
        header = f.readline().strip().split(",")
    if not {"sent1", "sent2", "ending0", "ending1"} <= set(header):
        raise BertkitError(f"{url}: header {','.join(header)[:80]!r}; expected SWAG's CSV with sent1, sent2, "
                           "ending0, ... (nothing kept)")


def _fetch(url: str, path: Path, check) -> None:
    """`url` into `path`, whole or not at all, with a progress bar; a network failure names the URL. `check(url,
    tmp)` raises when what came is not the file expected."""
    from bertkit.checkpoint import atomic_write

    def write(tmp: str) -> None:
        received = 0
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=path.name) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        # a connection closed early ends the read as the file's end would: only the length told says it was not
        if size is not None and received < size:
            raise BertkitError(f"{url}: cut short at {received:,} of its {size:,} bytes; expected the whole file "
                               "(nothing kept: run again)")
        check(url, tmp)

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, write)
    # URLError and HTTPError are OSErrors, a chunked reply cut short is an HTTPException (IncompleteRead); a full disk
    # is atomic_write's own error
    except (OSError, http.client.HTTPException) as e:
        raise BertkitError(f"{url}: cannot download ({e}); expected a network connection to it") from None


def _fetch_missing(url: str, out: Path, names, check) -> list[Path]:
    """Each of `names` not yet in `out` fetched from `url` (a format with {name}); returns the files written."""
    written = []
    for name in names:
        path = out / name
        if path.is_file():
            logger.info("%s: there already, kept", path)
            continue
        _fetch(url.format(name=name), path, check)
        written.append(path)
    return written


def download_swag(out: Path) -> list[Path]:
    """SWAG's train, val and test files (its regular format, test unlabelled) into `out`."""
    return _fetch_missing(SWAG_URL, out, SWAG_FILES, _check_swag)


def download_squad(versions: list[str], out: Path) -> list[Path]:
    """SQuAD's train and dev files of `versions` into `out`."""
    unknown = [v for v in versions if v not in SQUAD_FILES]
    if unknown:
        raise BertkitError(f"--versions {' '.join(unknown)}: expected {' or '.join(SQUAD_FILES)}")
    return _fetch_missing(SQUAD_URL, out, [name for v in versions for name in SQUAD_FILES[v]], _check_squad)


_SHARD = re.compile(r"-(\d{9})-(\d{9})\.jsonl")


def download_corpus(config: DownloadConfig, out: Path) -> list[Path]:
    """The documents of a Hub dataset's split as JSON lines files under `out`, `shard_documents` a file, each named
    by the range of the split's rows it holds (`wikimedia--wikipedia-20231101.en-train-000000000-000010000.jsonl`):
    files there from an earlier fetch are kept, and the stream goes on after the last row they cover: from where it
    stood (the stream's own state, kept beside them after each file, as `datasets` gives it: whole files of the
    dataset are not fetched again), else by streaming past the rows kept."""
    if not config.dataset:
        raise BertkitError("no dataset: expected --dataset, a Hugging Face Hub dataset with a text column")
    if config.max_documents < 0 or config.shard_documents < 1:
        raise BertkitError(f"--max-documents {config.max_documents} --shard-documents {config.shard_documents}: "
                           "expected 0 or more, and 1 or more")
    # a Hub id's owner and name, or a local dataset folder's path, without what would hide the files (`./my-set`)
    name = "--".join(part for part in Path(config.dataset).parts if part not in ("/", ".", "..")).lstrip(".")
    stem = "-".join(part.replace("/", "--") for part in (name or "dataset", config.dataset_config, config.split)
                    if part)
    ends = [int(m.group(2)) for path in out.glob(f"{stem}-*.jsonl")
            if (m := _SHARD.fullmatch(path.name[len(stem):]))]
    done = max(ends, default=0)
    wanted = config.max_documents or None
    if wanted is not None and done >= wanted:
        return []
    dataset = hub_dataset(config.dataset, config.dataset_config or None, config.split, streaming=True)
    state_file = out / f".{stem}-stream.json"  # hidden: prepare reads the folder's other files as the corpus
    skip = 0 if done and _resume(dataset, state_file, done) else done
    # without a state to go on from, the rows of the files kept are streamed past again (fetched, not written)
    rows = itertools.islice(iter(dataset), skip, None if wanted is None else skip + wanted - done)
    written = []
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=wanted, initial=done, unit="doc", desc=stem) as bar:
        while shard := _next_rows(rows, config, done):
            lines = []
            for i, row in enumerate(shard):
                if not isinstance(row, dict) or config.text_field not in row:
                    columns = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                    raise BertkitError(f"{config.dataset}: no text column {config.text_field!r} (its columns: "
                                       f"{columns}); expected --text-field naming it")
                text = row[config.text_field]
                if text is not None and not isinstance(text, str):
                    raise BertkitError(f"{config.dataset}: row {done + i}: {config.text_field!r} holds a "
                                       f"{type(text).__name__}; expected a string, the document's text")
                if text and text.strip():  # an empty document is no document, nor is a null (a nullable column's)
                    lines.append(json.dumps({"text": text}, ensure_ascii=False))
            path = out / f"{stem}-{done:09d}-{done + len(shard):09d}.jsonl"
            _write_lines(path, lines)
            written.append(path)
            done += len(shard)
            bar.update(len(shard))
            _keep_state(dataset, state_file, done)
    return written


def _resume(dataset, state_file: Path, done: int) -> bool:
    """Put a streamed dataset where an earlier fetch's files end, from the state kept beside them; False (stream
    past the rows instead) when there is none for exactly those rows, or the dataset cannot take it."""
    if not hasattr(dataset, "load_state_dict") or not state_file.is_file():
        return False
    try:
        kept = json.loads(state_file.read_text(encoding="utf-8"))
        if not isinstance(kept, dict) or kept.get("done") != done:
            return False
        dataset.load_state_dict(kept["state"])
    except Exception as e:  # a state of another datasets version, or a file cut short: the slow way still works
        logger.warning("%s: cannot go on from it (%s); streaming past the %d rows kept", state_file, cause(e), done)
        return False
    return True


def _keep_state(dataset, state_file: Path, done: int) -> None:
    """The stream's state after `done` rows, for a later fetch to go on from (where the dataset gives one)."""
    from bertkit.checkpoint import atomic_write_text

    if hasattr(dataset, "state_dict"):
        try:
            text = json.dumps({"done": done, "state": dataset.state_dict()})
        except (TypeError, ValueError):  # a state that is not plain data: resuming streams past the rows instead
            return
        atomic_write_text(state_file, text)


def _next_rows(rows, config: DownloadConfig, done: int) -> list:
    """The next `shard_documents` rows of the stream; a failure while streaming (the network gone, a file of the
    dataset that does not parse) is one line that says what is kept."""
    try:
        return list(itertools.islice(rows, config.shard_documents))
    except Exception as e:  # datasets, fsspec and pyarrow raise each their own
        raise BertkitError(f"{config.dataset}: reading stopped after row {done} ({cause(e)}); expected its rows to "
                           "the end (the files written are kept: run again to go on after them)") from None


NER_SPLITS = {"train": "train.txt", "validation": "dev.txt", "test": "test.txt"}  # the Hub's split -> the file


def _word(word: str) -> str:
    """A word as one column of a CoNLL line: a space or tab inside it, which would split it, becomes U+00A0."""
    return word.replace(" ", "\u00a0").replace("\t", "\u00a0")


def download_ner(config: DownloadConfig, out: Path) -> list[Path]:
    """The train, validation and test splits of a Hub dataset of tagged words (those it has) as CoNLL files under
    `out` (see NER_SPLITS), sentences in the dataset's order; a word without characters is left out with its tag
    (a CoNLL line cannot hold it), counted in a warning."""
    if not config.dataset:
        raise BertkitError("download ner needs --dataset, the Hub dataset of tagged words (with --tokens-field and "
                           "--tags-field its columns)")
    jobs = [(split, out / name) for split, name in NER_SPLITS.items() if not (out / name).is_file()]
    if not jobs:
        return []
    splits = hub_dataset(config.dataset, config.dataset_config or None, None)
    if "train" not in splits:
        raise BertkitError(f"{config.dataset}: splits {', '.join(splits)}; expected a train split")
    written = []
    for split, path in jobs:
        if split not in splits:
            logger.warning("%s: no %s split; %s not written", config.dataset, split, path.name)
            continue
        rows = splits[split]
        missing = [f for f in (config.tokens_field, config.tags_field) if f not in rows.features]
        if missing:
            raise BertkitError(f"{config.dataset} ({split}): no column {', '.join(missing)}; its columns are "
                               f"{', '.join(rows.features)}: expected --tokens-field and --tags-field among them")
        names = getattr(getattr(rows.features[config.tags_field], "feature", None), "names", None)
        lines, dropped = [], 0
        for row in tqdm(rows, desc=path.name, unit="sentence"):
            words, tags = row[config.tokens_field], row[config.tags_field]
            if len(words) != len(tags):
                raise BertkitError(f"{config.dataset} ({split}): a row of {len(words)} words and {len(tags)} tags; "
                                   f"expected a tag for every word ({' '.join(map(str, words[:8]))} ...)")
            kept = [(w, names[t] if names else str(t)) for w, t in zip(words, tags) if str(w).strip()]
            dropped += len(words) - len(kept)
            if kept:
                lines += [f"{_word(str(w))} {t}" for w, t in kept] + [""]
        if dropped:
            logger.warning("%s: %d word(s) of white space alone left out with their tags", path, dropped)
        _write_lines(path, lines)
        written.append(path)
    return written


KINDS = ("glue", "squad", "swag", "ner", "corpus")


def download(config: DownloadConfig) -> list[Path]:
    if config.what not in KINDS:
        raise BertkitError(f"{config.what!r}: expected glue, squad, swag, ner or corpus")
    # a flag of another kind of download is a mix-up (`download glue --dataset x`), not something to ignore
    defaults = DownloadConfig(what=config.what)
    for f in dataclasses.fields(DownloadConfig):
        kinds = f.metadata["help"].split(":")[0].split(", ")
        if set(kinds) <= set(KINDS) and config.what not in kinds and \
                getattr(config, f.name) != getattr(defaults, f.name):
            commands = " and ".join(f"`bertkit download {kind}`" for kind in kinds)
            raise BertkitError(f"--{f.name.replace('_', '-')} is for {commands}; expected the flags of `bertkit "
                               f"download {config.what}` (see its --help)")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise BertkitError(f"--out {out}: a file; expected a folder")
    if config.what == "squad":
        return download_squad(config.versions, out)
    if config.what == "corpus":
        return download_corpus(config, out)
    if config.what == "ner":
        return download_ner(config, out)
    if config.what == "swag":
        return download_swag(out)
    return download_glue(config.tasks, out)
