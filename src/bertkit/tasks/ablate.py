"""The paper's ablations, rerun by one command: a grid of named variants, each pretrained at equal compute on one
corpus (same model size, steps, batch and recipe unless the variant changes it), over several pretraining seeds,
each pretrained model fine-tuned through the downstream suite (`bertkit.tasks.suite`), then one table and one plot.

A variant is a set of `bertkit pretrain` flags (and `--bilstm`, a fine-tuning flag), written as a command line
would write them; the grids below hold the paper's rows (Table 5: objectives and masking; appendix C.2: the masking
mix; Table 6: model size). Variants with the same pretraining flags share their pretrained models (LTR and
LTR + BiLSTM differ only in fine-tuning). Each pretrained model is also scored on the held-out chapters with the
same masks for every cell (`score_held_out`), so that rows trained with other maskings, rates or mixes compare.

A cell is (variant, pretraining seed). Everything a cell produced is kept in OUT_DIR/ablate.json as it finishes, and
each step inside a cell resumes on its own (pretraining with --resume auto, the suite cell by cell), so a grid
stopped anywhere, extended with variants or seeds, or given to another session reruns nothing already done.
"""

from __future__ import annotations

import argparse
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from bertkit.checkpoint import list_checkpoints
from bertkit.config import learning_rates, option
from bertkit.errors import BertkitError
from bertkit.train.rundir import check_output_path, make_dir

RESULTS_FILE = "ablate.json"
TABLE_FILE = "ablate.md"
PLOT_FILE = "ablate.png"

VARIANTS: dict[str, str] = {
    # Table 5: objectives, and the masking strategies bertkit has
    "mlm+nsp": "",  # BERT: the recipe's defaults (masked LM + next-sentence prediction, token masking)
    "mlm": "--objective mlm",  # "No NSP" (RoBERTa's finding)
    "mlm+sop": "--objective mlm+sop",  # ALBERT's sentence-order prediction in place of NSP
    "ltr": "--objective ltr",  # "LTR & No NSP": a left-to-right LM, causal also when fine-tuned
    "ltr+bilstm": "--objective ltr --bilstm",  # "+ BiLSTM": the same LTR models, a BiLSTM under every head
    "wwm": "--masking wwm",  # whole-word masking
    "span": "--masking span",  # SpanBERT's span masking
    # appendix C.2: what the chosen tokens become ([MASK] / unchanged / random, percent); and the masking rate
    "mix-80-10-10": "--mask-mix 80 10 10",
    "mix-100-0-0": "--mask-mix 100 0 0",
    "mix-80-0-20": "--mask-mix 80 0 20",
    "mix-80-20-0": "--mask-mix 80 20 0",
    "mix-0-20-80": "--mask-mix 0 20 80",
    "mix-0-0-100": "--mask-mix 0 0 100",
    "rate-15": "--mask-prob 0.15",
    # Table 6: model size at equal steps. The recipe's lr (1e-3, chosen on mini) leaves small on the unigram plateau
    # and medium at 5e-4 stays there through a loss spike (docs/findings.md): the wider and the deeper model each get
    # half the rate
    "tiny": "--model tiny",
    "mini": "--model mini",
    "mini-lr5e-4": "--model mini --lr 5e-4",  # mini at small's rate: what the lower rate alone costs
    "small-lr5e-4": "--model small --lr 5e-4",
    "medium-lr2.5e-4": "--model medium --lr 2.5e-4",
}
GRIDS: dict[str, tuple[str, ...]] = {
    "table5": ("mlm+nsp", "mlm", "mlm+sop", "ltr", "ltr+bilstm", "wwm", "span"),
    "masking-mix": ("mix-80-10-10", "mix-100-0-0", "mix-80-0-20", "mix-80-20-0", "mix-0-20-80", "mix-0-0-100", "rate-15"),
    "size": ("tiny", "mini", "mini-lr5e-4", "small-lr5e-4", "medium-lr2.5e-4"),
}
# the fine-tuning rates a grid is read at when --lrs is not given: at 3e-4 medium stays at SST-2's majority class and
# at 1e-4 tiny loses 8 points there (docs/findings.md), so the size grid gives every row both, each task's best on dev
GRID_LRS: dict[str, tuple[float, ...]] = {"size": (1e-4, 3e-4)}
DEFAULT_LRS = (3e-4,)
FINETUNE_FLAGS = ("--bilstm",)  # a variant's flags that belong to fine-tuning, not pretraining


def _default_corpus() -> list[str]:
    import os

    root = Path(os.environ.get("BERTKIT_DATA") or Path("..", "shared", "data"))
    return [str(root / "corpus" / f"gutenberg-en-{i:02d}.txt.gz") for i in range(7)]


@dataclass
class AblateConfig:
    """The `ablate` command's flags: which variants, at what budget, scored how."""

    out_dir: str = option("runs/ablate", "folder of ablate.json, ablate.md, ablate.png, the shared vocabulary and "
                          "prepared corpus, every cell's pretraining run and the suite's runs")
    grid: Literal["table5", "masking-mix", "size", "custom"] = option(
        "table5", "the variants to run (see the command's description), or 'custom' for --variants alone")
    variants: list[str] = option([], "more variants: names of the built-in ones, or NAME=FLAGS with pretrain flags "
                                 "(and --bilstm), e.g. 'mask40=--mask-prob 0.4'")
    seeds: int = option(2, "pretraining seeds per variant (seeds 0..N-1)")
    model: str = option("mini", "model size of every cell unless a variant sets --model")
    steps: int = option(800, "pretraining steps per cell (the budget: steps x batch x length tokens)")
    batch_size: int = option(32, "pretraining batch")
    max_length: int = option(128, "pretraining tokens per example")
    pretrain_flags: str = option("", "more `bertkit pretrain` flags for every cell, e.g. '--lr 5e-4 --warmup 0.05'")
    corpus: list[str] = option([], "raw text for the shared vocabulary and prepared corpus (default: the books "
                               "corpus, $BERTKIT_DATA/corpus/gutenberg-en-*.txt.gz)")
    vocab_size: int = option(16000, "vocabulary trained on --corpus")
    tasks: list[str] = option(["CoLA", "SST-2", "MRPC", "STS-B", "QNLI", "RTE", "squad1"],
                              "suite columns for every cell (see `bertkit suite --help`)")
    finetune_seeds: int = option(2, "fine-tuning seeds per task for every cell")
    lrs: list[float] = option([], "fine-tuning learning rates per task; the best mean on dev is reported (default: "
                              "3e-4; for --grid size 1e-4 and 3e-4: medium fails SST-2 at 3e-4, tiny does worse at "
                              "1e-4)")
    data_dir: str | None = option(None, "the shared data folder holding glue/ and squad/ (default: $BERTKIT_DATA)")
    threads: int = option(2, "torch threads of pretraining; the suite runs --jobs cells of one thread each")
    jobs: int = option(2, "suite cells at once")
    only_pretrain: bool = option(False, "pretrain the cells and stop (fine-tune another time)")
    merge_from: list[str] = option([], "other grids' OUT_DIRs whose cells and suite runs are first copied into this "
                                   "one (a second stream on the other core, another machine); a cell in both is "
                                   "merged field by field, its fine-tuning runs united")
    table_only: bool = option(False, "run nothing: merge --merge-from, score the models on disk, write the table and "
                              "plot of the cells there are")

    def __post_init__(self):
        self.lrs = learning_rates(self.lrs or GRID_LRS.get(self.grid, DEFAULT_LRS))  # flags arrive as strings
        if self.grid not in GRIDS and self.grid != "custom":
            raise BertkitError(f"--grid {self.grid}: unknown; expected one of {', '.join(GRIDS)} or custom")
        bad = [f"--{n.replace('_', '-')} {getattr(self, n)}" for n in ("seeds", "steps", "batch_size", "max_length",
                                                                        "finetune_seeds", "threads", "jobs")
               if getattr(self, n) < 1]
        if bad:
            raise BertkitError(f"ablate: {', '.join(bad)}; expected positive counts")
        self.variant_flags()  # a bad variant fails here, before any work

    def variant_flags(self) -> dict[str, str]:
        """Every variant of the run, name -> flags, in table order."""
        names = list(GRIDS.get(self.grid, ()))
        flags = {name: VARIANTS[name] for name in names}
        for spec in self.variants:
            name, sep, value = spec.partition("=")
            name = name.strip()
            if sep:
                flags[name] = value.strip()
            elif name in VARIANTS:
                flags[name] = VARIANTS[name]
            else:
                raise BertkitError(f"--variants {spec!r}: not a built-in variant ({', '.join(VARIANTS)}); expected "
                                   "one of them or NAME=FLAGS, e.g. 'mask40=--mask-prob 0.4'")
        if not flags:
            raise BertkitError("ablate: no variants; expected --grid or --variants")
        for name, value in flags.items():
            pretrain_args(self, value, name)
        return flags


def pretrain_args(config: AblateConfig, variant: str, name: str = "") -> tuple[dict, dict]:
    """A variant's flags on top of the grid's common ones -> (the PretrainConfig fields that differ from
    `bertkit pretrain`'s defaults, the fine-tuning options); a flag pretrain does not know fails naming the variant."""
    from bertkit.cli import add_dataclass_args, dataclass_from_args
    from bertkit.train.pretrain import PretrainConfig, check_model

    tokens = _split(variant, f"--variants: variant {name or variant!r}")
    finetune = {flag.lstrip("-"): True for flag in FINETUNE_FLAGS if flag in tokens}
    tokens = [t for t in tokens if t not in FINETUNE_FLAGS]
    common = ["--model", config.model, "--max-steps", str(config.steps), "--batch-size", str(config.batch_size),
              "--max-length", str(config.max_length), *_split(config.pretrain_flags, "--pretrain-flags")]
    parser = argparse.ArgumentParser(prog="a variant's flags", add_help=False, exit_on_error=False)
    add_dataclass_args(parser, PretrainConfig)
    try:
        given, rest = parser.parse_known_args(common + tokens)
        if rest:
            raise argparse.ArgumentError(None, f"unrecognized {' '.join(rest)}")
        chosen = dataclass_from_args(PretrainConfig, given)
        check_model(chosen)  # pretrain says it only after the grid's vocabulary and corpus are built: minutes
    except (argparse.ArgumentError, BertkitError) as e:
        raise BertkitError(f"variant {name or variant!r} ({variant or 'no flags'}, with the common flags "
                           f"{' '.join(common)}): {e}; expected `bertkit pretrain` flags (and --bilstm)") from None
    base = PretrainConfig()
    fields = {k: v for k, v in vars(chosen).items() if v != getattr(base, k)}
    # --model-dir sets the tokenizer to its own: that flag is the one the user gave
    shared = [f"--{k.replace('_', '-')}" for k in SHARED_INPUTS
              if k in fields and not (k == "tokenizer" and "model_dir" in fields)]
    if shared:  # every cell reads the grid's one vocabulary and prepared corpus: these would do nothing
        raise BertkitError(f"variant {name or variant!r} ({variant}): {', '.join(shared)} set the inputs every cell "
                           "shares; expected them as the grid's own --corpus and --vocab-size")
    # run_pretraining sets these for every cell, so a variant's were dropped without a word (--seed 3 pretrained
    # seed 0 again), or they break the grid: --stop-at ends a cell short of the steps its record claims, and
    # --overwrite with the cell's --resume auto is refused only after the shared inputs are built
    own = [f"--{k.replace('_', '-')}" for k in CELL_FIELDS if k in fields]
    if own:
        given = variant + (f"; --pretrain-flags {config.pretrain_flags}" if config.pretrain_flags else "")
        raise BertkitError(f"variant {name or variant!r} ({given or 'no flags'}): {', '.join(own)} set by ablate "
                           "for every cell (each runs to the grid's --steps, at seeds 0 to --seeds minus 1, in a run "
                           "folder of its own that it resumes); expected flags that change what is pretrained (and "
                           "the grid's own --seeds, --steps, --threads, --out-dir)")
    return fields, finetune


def _split(flags: str, what: str) -> list[str]:
    """Flags written as a command line writes them, split as the shell would; an unclosed quote is named."""
    try:
        return shlex.split(flags)
    except ValueError as e:  # shlex's "No closing quotation" or "No escaped character"
        raise BertkitError(f"{what} ({flags}): {e}; expected `bertkit pretrain` flags as a command line writes "
                           "them, e.g. '--lr 5e-4 --warmup 0.05'") from None


SHARED_INPUTS = ("corpus", "format", "text_field", "vocab_size", "tokenizer", "data", "model_dir")
# PretrainConfig fields ablate chooses per cell (run_pretraining), or that would end or restart a cell on their own
CELL_FIELDS = ("seed", "out_dir", "threads", "eval_every", "eval_batches", "save_every", "keep_last", "resume",
               "overwrite", "stop_at")


def pretrain_key(fields: dict) -> str:
    """The folder name of a pretraining setting: its fields in order, so that two variants with the same
    pretraining share it (ltr and ltr+bilstm)."""
    parts = [f"{k}={'-'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in sorted(fields.items())]
    return "".join(c if c.isalnum() or c in "-_.=," else "-" for c in ",".join(parts))


# ---------------------------------------------------------------------------------------------------------------
# Cells


def _load(path: Path) -> dict:
    from bertkit.tasks.suite import read_results

    return read_results(path, "the ablation's results")


def save_cell(path: Path, key: str, cell: dict) -> None:
    """Write one cell into ablate.json; two grids into one folder keep each other's cells."""
    from bertkit.tasks.suite import save_entry

    save_entry(path, key, cell)


def cell_key(variant: str, seed: int) -> str:
    return f"{variant}/seed={seed}"


def shared_inputs(config: AblateConfig, out: Path) -> tuple[str, str]:
    """The vocabulary and prepared corpus every cell shares, built once into OUT_DIR/inputs."""
    from bertkit.train.pretrain import PretrainConfig, build_inputs

    corpus = config.corpus or _default_corpus()
    # fresh=False: the grid's cells were pretrained on these inputs, so other ones are refused, not rebuilt
    return build_inputs(PretrainConfig(corpus=corpus, vocab_size=config.vocab_size), out / "inputs", fresh=False,
                        remedy=f"another --out-dir (or {out / 'inputs'} deleted, with the grid's cells)")


def run_pretraining(config: AblateConfig, fields: dict, seed: int, inputs: tuple[str, str], out: Path) -> dict:
    """Pretrain one setting and seed (continuing a stopped run); its held-out scores, time and final checkpoint."""
    from bertkit.train.pretrain import PretrainConfig, pretrain

    run_dir = out / "pretrain" / (pretrain_key(fields) or "defaults") / f"seed-{seed}"
    cfg = PretrainConfig(**{**fields, "tokenizer": inputs[0], "data": inputs[1], "out_dir": str(run_dir),
                            "seed": seed, "threads": config.threads, "eval_every": 0, "eval_batches": 25,
                            "save_every": 200, "keep_last": 1, "resume": "auto"})
    started = time.perf_counter()
    result = pretrain(cfg)
    checkpoint = list_checkpoints(run_dir / "checkpoints")[-1]
    tokens = cfg.max_steps * cfg.batch_size * cfg.grad_accum * cfg.max_length
    seconds = result.get("train_seconds") or time.perf_counter() - started  # over every resume of the run
    return {"pretrain": {k: v for k, v in result.items() if isinstance(v, (int, float))}, "checkpoint": str(checkpoint),
            "pretrain_seconds": seconds, "token_positions": tokens, "pretrain_fields": _as_json(fields)}


def _as_json(fields: dict) -> dict:
    """Pretraining fields as ablate.json keeps them (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def check_budget(results_path: Path, key: str, cell: dict, fields: dict) -> None:
    """Refuse a cell pretrained with other fields than the grid gives it now (the common --steps, --model,
    --batch-size, --max-length, --pretrain-flags, or the variant's own): its scores would pass for this budget's."""
    stored = cell.get("pretrain_fields")
    if stored is None:  # not pretrained here yet (a record merged from a grid that only fine-tuned it)
        return
    now = _as_json(fields)
    differ = sorted(k for k in {*stored, *now} if stored.get(k) != now.get(k))
    if differ:
        def shown(values):
            return ", ".join(f"{k}={values.get(k, 'default')}" for k in differ)

        raise BertkitError(f"{results_path}: cell {key} was pretrained with {shown(stored)}; now {shown(now)}; "
                           "expected the same --steps, --model, --batch-size, --max-length and --pretrain-flags as "
                           "its grid (or another --out-dir)")


def score_cell(config: AblateConfig, fields: dict, checkpoint: str) -> dict:
    """The cell's model on the held-out chapters of its run's prepared corpus, with the masking every cell shares
    (`score_held_out`: 15% token masking, 80/10/10, the grid's length, the cell's own input form); {} for a
    left-to-right model, which has no masked-LM reading."""
    import json

    import torch

    from bertkit.data.pretraining import OBJECTIVES
    from bertkit.train.pretrain import CONFIG_NAME, PretrainConfig, score_held_out

    objective = fields.get("objective", PretrainConfig().objective)
    if OBJECTIVES[objective].causal:
        return {}
    run_config = Path(checkpoint).parents[1] / CONFIG_NAME
    if not run_config.is_file():
        raise BertkitError(f"{checkpoint}: no {CONFIG_NAME} in its run folder {run_config.parent}; expected the "
                           "checkpoint of a `bertkit pretrain` run (its vocabulary and corpus are read from there)")
    run = json.loads(run_config.read_text(encoding="utf-8"))
    torch.set_num_threads(config.threads)
    return score_held_out(checkpoint, run["tokenizer"], run["data"], objective=objective, max_length=config.max_length)


def pretrained_again(config: AblateConfig, fields: dict, key: str, cell: dict, again: dict, suite_dir: Path) -> dict:
    """A cell whose model was gone (a record copied without its models), pretrained again: the same model if it scores
    the same on the held-out masks to the last digit, as it does under the same code, and its recorded fine-tuning
    runs are this checkpoint's; if not (a change of code or machine moved the floats), they were another model's, and
    are dropped so that the suite runs again on this one rather than mixing the two in one row."""
    from bertkit.tasks.suite import RESULTS_FILE as SUITE_FILE, read_results, save_entry

    held_out = score_cell(config, fields, again["checkpoint"])
    same = not cell.get("held_out") or held_out == cell["held_out"]  # a left-to-right model has no reading: trusted
    if not same:
        runs = len(cell.get("suite", {}).get("cells", {}))
        print(f"ablate: {key} pretrained again is not the model of its {runs} recorded fine-tuning run(s) (held-out "
              f"masked-LM loss {held_out.get('masked_lm_loss')!r}, recorded {cell['held_out'].get('masked_lm_loss')!r});"
              " they are run again on it", flush=True)
        again = {k: v for k, v in again.items() if k not in ("suite", "suite_from")}
    row = read_results(suite_dir / SUITE_FILE).get(key)
    if row:  # the suite's row of this cell names the model it fine-tuned: now this checkpoint
        save_entry(suite_dir / SUITE_FILE, key, {**row, "model_dir": again["checkpoint"],
                                                  "cells": row["cells"] if same else {}})
    return {**again, "held_out": held_out}


def merge_grid(source: Path, out: Path) -> int:
    """Copy another grid's cells (ablate.json) and suite runs (suite/suite.json) into OUT_DIR's, a key in both
    merged field by field (the newer record's fields win); returns how many entries changed."""
    from bertkit.tasks.suite import RESULTS_FILE as SUITE_FILE, read_results, save_entry

    if not (source / RESULTS_FILE).is_file():
        raise BertkitError(f"--merge-from {source}: no {RESULTS_FILE} there; expected the --out-dir of another grid")
    changed = 0
    for name in (RESULTS_FILE, f"suite/{SUITE_FILE}"):
        if not (source / name).is_file():
            continue
        theirs, ours = read_results(source / name), read_results(out / name)
        for key, value in theirs.items():
            merged = _merged(ours.get(key, {}), value)
            if merged != ours.get(key):
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                save_entry(out / name, key, merged)
                changed += 1
    return changed


def _merged(ours: dict, theirs: dict) -> dict:
    """Two records of one cell or suite row, field by field (theirs win), and their fine-tuning runs (a suite row's
    "cells", a cell's "suite" "cells") as the union, so that a record with fewer runs never drops the other's. Records
    of two different models (a cell pretrained again that scored otherwise, `pretrained_again`; a suite row of another
    model folder) are not merged: theirs replaces ours."""
    if (ours.get("held_out") and theirs.get("held_out") and ours["held_out"] != theirs["held_out"]
            or ours.get("model_dir", theirs.get("model_dir")) != theirs.get("model_dir", ours.get("model_dir"))):
        return theirs
    merged = {**ours, **theirs}
    if isinstance(ours.get("cells"), dict) and isinstance(theirs.get("cells"), dict):
        merged["cells"] = {**ours["cells"], **theirs["cells"]}
    if isinstance(ours.get("suite"), dict) and isinstance(theirs.get("suite"), dict):
        merged["suite"] = _merged(ours["suite"], theirs["suite"])
    return merged


def ablate(config: AblateConfig) -> dict:
    """Run what the grid still lacks; returns {"cells": every cell, "table": the markdown table}."""
    from bertkit.tasks.suite import SuiteConfig, suite

    out = Path(config.out_dir)
    check_output_path(out, "--out-dir", {})
    make_dir(out, "--out-dir")
    results_path = out / RESULTS_FILE
    variants = config.variant_flags()
    for source in config.merge_from:
        print(f"ablate: {merge_grid(Path(source), out)} record(s) merged from {source}", flush=True)
    inputs, wanted = None, wanted_runs(config)
    for seed in range(config.seeds):  # every variant's first seed first: a grid stopped early is still a table
        for name, flags in variants.items():
            fields, finetune = pretrain_args(config, flags, name)
            key = cell_key(name, seed)
            cell = _load(results_path).get(key, {})
            if cell and cell.get("flags") != flags:
                raise BertkitError(f"{results_path}: cell {key} was run with flags {cell.get('flags')!r}; now "
                                   f"{flags!r}; expected the same flags (or another variant name, or another --out-dir)")
            check_budget(results_path, key, cell, fields)
            done = cell.get("suite", {}).get("cells", {})
            needs_model = not config.only_pretrain and not wanted <= done.keys()
            if config.table_only:
                if "checkpoint" in cell and "held_out" not in cell and Path(cell["checkpoint"]).is_dir():
                    save_cell(results_path, key, {**cell, "held_out": score_cell(config, fields, cell["checkpoint"])})
                continue
            # the model is gone (a grid's record copied to another machine): pretraining again gives it back, as a
            # run is a function of its flags and seed
            if "pretrain" not in cell or (needs_model and not Path(cell["checkpoint"]).is_dir()):
                inputs = inputs or shared_inputs(config, out)
                print(f"ablate: pretraining {key} ({flags or 'the defaults'})", flush=True)
                again = {**cell, "variant": name, "seed": seed, "flags": flags,
                         **run_pretraining(config, fields, seed, inputs, out)}
                cell = pretrained_again(config, fields, key, cell, again, out / "suite") if "checkpoint" in cell else again
                save_cell(results_path, key, cell)
            if "held_out" not in cell and Path(cell["checkpoint"]).is_dir():
                cell = {**cell, "held_out": score_cell(config, fields, cell["checkpoint"])}
                save_cell(results_path, key, cell)
            recorded = _load(results_path) if needs_model else {}
            twin = finetuned_twin(recorded, key, cell, wanted)
            if twin:  # the same pretrained model, fine-tuned the same way: its scores are this cell's
                print(f"ablate: {key} has {twin}'s pretrained model; its suite results are this cell's", flush=True)
                other = recorded[twin]  # the same run: its time too, if it was measured over more of it
                cell = {**cell, "suite": other["suite"], "suite_from": twin,
                        "pretrain_seconds": max(cell["pretrain_seconds"], other.get("pretrain_seconds", 0.0))}
                save_cell(results_path, key, cell)
            elif needs_model:
                print(f"ablate: fine-tuning {key} on {', '.join(config.tasks)}", flush=True)
                suite_config = SuiteConfig(model_dir=cell["checkpoint"], label=key, out_dir=str(out / "suite"),
                                           tasks=list(config.tasks), seeds=config.finetune_seeds, lrs=config.lrs,
                                           jobs=config.jobs, threads=1, bilstm=bool(finetune.get("bilstm")),
                                           **({"data_dir": config.data_dir} if config.data_dir else {}))
                row = suite(suite_config)["results"][key]
                cell = {**cell, "suite": {"cells": row["cells"], "wall_seconds": row.get("wall_seconds", 0.0)}}
                save_cell(results_path, key, cell)
    cells = with_suite_runs(_load(results_path), out / "suite")
    table = results_table(cells, list(variants))
    (out / TABLE_FILE).write_text(table, encoding="utf-8")
    plot(cells, list(variants), out / PLOT_FILE)
    return {"cells": cells, "table": table}


def with_suite_runs(cells: dict, suite_dir: Path) -> dict:
    """The cells with every fine-tuning run their suite finished: a cell whose suite was stopped part way (or run
    again at more rates) has those runs only in suite/suite.json until its suite completes, and the table shows them.
    A suite row counts for a cell of the same key fine-tuned from the same checkpoint."""
    from bertkit.tasks.suite import RESULTS_FILE as SUITE_FILE, read_results

    if not (suite_dir / SUITE_FILE).is_file():
        return cells
    rows = read_results(suite_dir / SUITE_FILE)
    merged = {}
    for key, cell in cells.items():
        row = rows.get(key, {})
        model = Path(row.get("model_dir", cell.get("checkpoint", ""))).resolve()
        same_model = model == Path(cell.get("checkpoint", "")).resolve()
        if row.get("cells") and same_model and "suite_from" not in cell:
            cell = {**cell, "suite": _merged({"cells": row["cells"]}, cell.get("suite", {}))}
        merged[key] = cell
    return merged


def wanted_runs(config: AblateConfig) -> set[str]:
    """The suite runs a cell needs: every task at every rate and fine-tuning seed (the suite's keys)."""
    from bertkit.tasks.suite import cell_key as run_key

    return {run_key(task, lr, seed) for task in config.tasks for lr in config.lrs
            for seed in range(1, config.finetune_seeds + 1)}


def finetuned_twin(cells: dict, key: str, cell: dict, wanted: set[str]) -> str | None:
    """Another cell of this grid with the same pretrained model (its run folder: the same pretraining flags and seed,
    as BERT's 80/10/10 mix written out shares the default's) and the same fine-tuning (a BiLSTM or not), whose suite
    already has every wanted run: fine-tuning it again would repeat the same runs."""
    bilstm = "--bilstm" in cell.get("flags", "").split()
    here = Path(cell["checkpoint"]).resolve()
    for other_key, other in cells.items():
        done = other.get("suite", {}).get("cells", {}).keys()
        if (other_key != key and "checkpoint" in other and Path(other["checkpoint"]).resolve() == here
                and ("--bilstm" in other.get("flags", "").split()) == bilstm and wanted <= done):
            return other_key
    return None


# ---------------------------------------------------------------------------------------------------------------
# The table and the plot


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def glue_columns(cells: dict, variants: list[str]) -> set[str]:
    """The GLUE columns of a table of these variants: every GLUE task that some cell of theirs was fine-tuned on."""
    from bertkit.tasks.suite import TASKS

    runs = {key.split("/")[0] for c in cells.values() if c.get("variant") in variants
            for key in c.get("suite", {}).get("cells", {})}
    return {name for name, task in TASKS.items() if task.glue and name in runs}


def variant_scores(cells: dict, variant: str, glue_tasks: set[str]) -> dict:
    """Per column, the values over the variant's pretraining seeds: each seed's suite score (mean over fine-tuning
    seeds at the task's best lr), the GLUE average of a seed that has every one of `glue_tasks` (the table's GLUE
    columns: as in the suite's table, a row that lacks one has no average), the held-out masked-LM perplexity and
    accuracy at the masking all cells share, the parameter count and the pretraining minutes. A left-to-right
    model's perplexity and accuracy are its own next-token ones, and its scores hold "own_reading"."""
    from bertkit.tasks.suite import TASKS, summarize

    scores: dict[str, list[float]] = {}
    for cell in cells.values():
        if cell.get("variant") != variant:
            continue
        held_out = cell.get("held_out")
        if held_out:
            scores.setdefault("mlm_ppl", []).append(held_out["masked_lm_perplexity"])
            scores.setdefault("mlm_acc", []).append(100 * held_out["masked_lm_accuracy"])
            scores.setdefault("params", []).append(held_out["parameters"] / 1e6)
        elif held_out == {} and "masked_lm_loss" in cell["pretrain"]:  # scored and found left-to-right
            scores.setdefault("mlm_ppl", []).append(math.exp(cell["pretrain"]["masked_lm_loss"]))
            scores.setdefault("mlm_acc", []).append(100 * cell["pretrain"]["masked_lm_accuracy"])
            scores["own_reading"] = [1.0]
        if "pretrain_seconds" in cell:
            scores.setdefault("minutes", []).append(cell["pretrain_seconds"] / 60)
        glue = {}
        for name, task in TASKS.items():
            s = summarize(cell.get("suite", {}).get("cells", {}), name)
            if s is not None:
                scores.setdefault(name, []).append(s["metrics"][task.metric][0])
                if task.glue:
                    glue[name] = s["metrics"][task.metric][0]
        if glue and glue.keys() == glue_tasks:  # a seed whose suite stopped part way has no average
            scores.setdefault("glue", []).append(float(np.mean(list(glue.values()))))
    return scores


def table_scores(cells: dict, variants: list[str]) -> dict[str, dict]:
    """`variant_scores` of each variant, the GLUE average over the columns of their table."""
    glue_tasks = glue_columns(cells, variants)
    return {v: variant_scores(cells, v, glue_tasks) for v in variants}


def results_table(cells: dict, variants: list[str]) -> str:
    """Rows = variants; columns = held-out MLM (loss, accuracy), each task, the GLUE average: mean ± std over
    pretraining seeds (each seed's task score is itself a mean over fine-tuning seeds)."""
    from bertkit.tasks.suite import TASKS

    per_variant = table_scores(cells, variants)
    tasks = [t for t in TASKS.values() if any(t.name in s for s in per_variant.values())]
    sizes = {round(x, 1) for s in per_variant.values() for x in s.get("params", [])}
    # columns only where the model size differs (Table 6): its parameters, and its own pretraining time, which the
    # note's average over cells would hide
    extra = ["params", "minutes"] if len(sizes) > 1 else []
    columns = ["mlm_ppl", "mlm_acc"] + extra + [t.name for t in tasks] + ["glue"]
    head = (["variant", "flags", "seeds", "MLM ppl", "MLM acc"] + ["params (M)", "pretrain min"][:len(extra)]
            + [t.column for t in tasks] + ["GLUE avg"])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for v in variants:
        s = per_variant[v]
        seeds = [c for c in cells.values() if c.get("variant") == v]
        if not seeds:
            continue
        flags = seeds[0]["flags"] or "(recipe defaults)"
        row = [v, f"`{flags}`", str(len(seeds))]
        for column in columns:
            if column not in s:
                row.append("-")
                continue
            mean, std = _mean_std(s[column])
            mark = "†" if column in ("mlm_ppl", "mlm_acc") and "own_reading" in s else ""
            digits = 0 if column == "minutes" else 1
            spread = f" ± {std:.{digits}f}" if len(s[column]) > 1 else ""  # one seed: no std
            row.append(f"{mean:.{digits}f}{spread}{mark}")
        lines.append("| " + " | ".join(row) + " |")
    shown = [c for c in cells.values() if c.get("variant") in variants]
    notes = [""]
    if shown:
        runs: dict[str, float] = {}  # a model shared by two variants (LTR, LTR + BiLSTM) counts once, at its longest
        for c in shown:
            runs[c["checkpoint"]] = max(runs.get(c["checkpoint"], 0.0), c["pretrain_seconds"])
        minutes = np.mean(list(runs.values())) / 60
        scored = [c["held_out"] for c in shown if c.get("held_out")]
        counts = sorted({h["examples"] for h in scored})
        baselines = sorted({round(100 * h["unigram_baseline_accuracy"], 1) for h in scored})
        # a variant may change the budget (--max-steps, --batch-size, --max-length): the range, not the first cell's
        positions = sorted({round(c["token_positions"] / 1e6, 1) for c in shown})
        steps = sorted({c["pretrain"]["step"] for c in shown})
        notes.append(f"Each cell: {'-'.join(f'{p:.1f}' for p in positions[::len(positions) - 1 or 1])}M token "
                     f"positions of pretraining ({'-'.join(map(str, steps[::len(steps) - 1 or 1]))} steps; "
                     f"{minutes:.0f} minutes a cell on average), then the "
                     "suite's columns. Mean ± sample std over pretraining seeds; each seed's task score is the mean "
                     "over its fine-tuning seeds at the task's best lr on dev. MLM ppl and acc: "
                     + (f"all {'-'.join(f'{n:,}' for n in counts[::len(counts) - 1 or 1])} held-out examples "
                        f"with the same masks for every cell ({100 * scored[0]['mask_prob']:.0f}% token masking, "
                        "80/10/10, in each cell's input form: pairs for a sentence task, else one stretch of text; "
                        "always guessing the most frequent token: "
                        f"{'-'.join(f'{b:.1f}' for b in baselines[::len(baselines) - 1 or 1])}%)"
                        if scored else "the held-out examples with the same masks for every cell")
                     + "; † a left-to-right model's own next-token perplexity and accuracy, not comparable.")
    return "\n".join(lines + notes) + "\n"


def plot(cells: dict, variants: list[str], path: Path) -> None:
    """One column per variant: each pretraining seed's GLUE average (or the first task's score where there is none
    yet) as a dot, the mean as a bar with ± std where there are several seeds. Dots, not bars from zero: the axis is
    cut to the data, and every seed stays visible, so a row of one seed does not pass for a row without spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bertkit.tasks.suite import TASKS

    scores = table_scores(cells, variants)
    column = "glue" if any("glue" in s for s in scores.values()) else next(
        (k for s in scores.values() for k in s if k in TASKS), "mlm_acc")
    shown = [v for v in variants if column in scores[v]]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(1.1 * len(shown) + 2.5, 3.5))
    for x, v in enumerate(shown):
        values = scores[v][column]
        ax.scatter([x] * len(values), values, color="#4878a8", s=18, zorder=3)
        mean, std = _mean_std(values)
        ax.errorbar(x + 0.18, mean, yerr=std if len(values) > 1 else None, fmt="_", color="black", markersize=14,
                    capsize=4, zorder=2)
    ax.set_xticks(range(len(shown)), [f"{v}\n(n={len(scores[v][column])})" for v in shown], rotation=30, ha="right")
    label = {"glue": "GLUE average", "mlm_acc": "held-out MLM accuracy (%)"}.get(column, column)
    ax.set_ylabel(label)
    ax.set_title(f"{label} by variant: each pretraining seed (dot), mean ± std (bar)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
