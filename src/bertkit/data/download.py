"""`bertkit download`: GLUE and SQuAD fetched into the folders bertkit's readers take, for a machine with a network.

SQuAD comes from its official site, the four files the paper's runs read (train and dev of v1.1 and v2.0), each
checked to be SQuAD's JSON before it is kept. GLUE comes from the Hugging Face Hub's `nyu-mll/glue` through the
`datasets` package (`pip install datasets`; GLUE's original zip files have moved more than once): each split is
written as a tab-separated file in the layout GLUE's own download made (`SST-2/train.tsv`, `MNLI/dev_matched.tsv`,
`diagnostic/diagnostic.tsv`), with the columns bertkit's GLUE reader looks for and the labels spelled as GLUE spells
them, so `--data-dir` reads it like the original. A tab or line break inside a text, which that layout cannot hold,
becomes a space. Files already there are kept (a run cut short fetches only what is missing); each is written whole
or not at all.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from bertkit.config import option
from bertkit.errors import BertkitError

logger = logging.getLogger("bertkit")

SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/{name}"
SQUAD_FILES = {"1.1": ("train-v1.1.json", "dev-v1.1.json"), "2.0": ("train-v2.0.json", "dev-v2.0.json")}


@dataclass
class DownloadConfig:
    """`bertkit download`: the CLI's flags are these fields."""

    what: Literal["glue", "squad"] = option("", "glue (through the datasets package, from the Hugging Face Hub) or "
                                            "squad (from its official site)", positional=True)
    out: str = option("", "the folder to write into: GLUE's task folders, or SQuAD's JSON files", required=True)
    tasks: list[str] = option([], "GLUE tasks (none: all nine and the diagnostic set)")
    versions: list[str] = option(["1.1", "2.0"], "SQuAD versions")


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
    from bertkit.data.glue import TextExample, hf_glue_rows

    rows = hf_glue_rows("ax", "test")
    return [TextExample(str(row["idx"]), row["premise"], row["hypothesis"], None) for row in rows]


def _fetch(url: str, path: Path) -> None:
    """`url` into `path`, whole or not at all, with a progress bar; a network failure names the URL."""
    from bertkit.checkpoint import atomic_write

    def write(tmp: str) -> None:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=path.name) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        try:
            data = json.loads(Path(tmp).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BertkitError(f"{url}: not JSON ({e}); expected SQuAD's dataset file (nothing kept)") from None
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise BertkitError(f"{url}: no 'data' list; expected SQuAD's dataset file (nothing kept)")

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, write)
    except OSError as e:  # URLError and HTTPError are OSErrors; a full disk is atomic_write's own error
        raise BertkitError(f"{url}: cannot download ({e}); expected a network connection to it") from None


def download_squad(versions: list[str], out: Path) -> list[Path]:
    """SQuAD's train and dev files of `versions` into `out`."""
    unknown = [v for v in versions if v not in SQUAD_FILES]
    if unknown:
        raise BertkitError(f"--versions {' '.join(unknown)}: expected {' or '.join(SQUAD_FILES)}")
    written = []
    for name in (name for v in versions for name in SQUAD_FILES[v]):
        path = out / name
        if path.is_file():
            logger.info("%s: there already, kept", path)
            continue
        _fetch(SQUAD_URL.format(name=name), path)
        written.append(path)
    return written


def download(config: DownloadConfig) -> list[Path]:
    if config.what not in ("glue", "squad"):
        raise BertkitError(f"{config.what!r}: expected glue or squad")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise BertkitError(f"--out {out}: a file; expected a folder")
    if config.what == "squad":
        return download_squad(config.versions, out)
    return download_glue(config.tasks, out)
