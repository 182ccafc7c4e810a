"""Model soups (`bertkit soup`): one model whose weights are the average of several fine-tuned from the same
pretrained model on the same task (Wortsman et al. 2022), at the cost of one model at inference; or of several
checkpoints along one pretraining run (Kaddour 2022's latest weight averaging), scored by held-out masked-LM loss.

The runs of an lr or seed search all start from the same weights and usually end in one basin, where their average
scores like the best of them or better. Two recipes: the uniform soup averages every run; the greedy soup (the
default) takes the runs best first by their score on the eval data and keeps each only if the average with it does
not score lower there. Every run, both soups and, for a classifier or regressor, the runs' ensemble (their logits
averaged: as many models at inference as runs) are scored on every eval split, and soup.md shows them side by side.

The greedy soup is chosen on the (first) eval split: on rows held out of the training file (`finetune
--eval-split`), the dev data scored after them reports it without the choice seeing it; chosen on dev and reported
on dev, its score is optimistic, as the best lr's is. Checkpoints are chosen and scored on the same held-out
examples of a prepared corpus, with the same masks for every one (`bertkit perplexity`'s).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from bertkit import hub
from bertkit.checkpoint import (atomic_write_text, checkpoint_step, load_state_dict_into, model_folder, normalize_keys,
                                read_state_dict, weight_shapes)
from bertkit.config import BertConfig, option, write_json
from bertkit.errors import BertkitError
from bertkit.tasks.classification import HELD_OUT, TextTask
from bertkit.tasks.evaluation import DEVICE_HELP, THREADS_HELP, check_head, label_names, run_config
from bertkit.tasks.finetune import CONFIG_FILE, FinetuneConfig, load_task, plural, resolve_device
from bertkit.tasks.inference import check_tokenizer
from bertkit.tokenizer import Tokenizer
from bertkit.train.distributed import torch_threads
from bertkit.train.rundir import make_dir, new_model_folder

logger = logging.getLogger("bertkit")

# What the runs of one soup must share: the fields that say which data each scores on (and the rows it held out of
# its training file), and the architecture. The rest (lr, seed, epochs, LoRA, ...) is what a soup averages over.
DATA_FIELDS = ("task", "data_dir", "train_file", "eval_file", "text_a", "text_b", "text_neg", "label", "regression",
               "multi_label", "label_sep", "train_articles", "eval_split", "folds", "fold", "split_seed", "group")
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "num_labels", "id2label", "bilstm",
                "attention_window")


@dataclass
class SoupConfig:
    """`bertkit soup`: the command's arguments."""

    runs: list[str] = option([], "the run folders to average (what `bertkit finetune` wrote), two or more, "
                             "fine-tuned from the same pretrained model on the same task and data; or, with --data, "
                             "checkpoints of one pretraining run (RUN/checkpoints/step-N)", positional=True)
    out: str = option("", "folder for the soup: a model folder as a run's or a checkpoint's (`evaluate`, `predict`, "
                      "`serve`, `finetune --model-dir` and transformers load it), with soup.md and soup.json",
                      required=True)
    recipe: Literal["greedy", "uniform"] = option("greedy", "the soup written to --out: greedy (runs added best "
                                                  "first, each kept only if the eval score does not drop) or "
                                                  "uniform (every run averaged); both are scored")
    ensemble: bool = option(True, "also score the runs' ensemble (their logits averaged) for comparison: "
                            "classifiers and regressors (default: on)")
    task: str | None = option(None, "the task, for run folders without a finetune_config.json (default: the runs')")
    data_dir: str | None = option(None, "the task's data folder to choose and score on (default: the runs')")
    eval_file: str | None = option(None, "a labelled file to choose and score on instead (default: the runs')")
    data: str = option("", "pretraining checkpoints: a prepared corpus (`bertkit prepare`, their vocabulary) whose "
                       "held-out split scores them by masked-LM loss, as `bertkit perplexity` does: the same "
                       "examples and masks (15%%, seed 0) for every checkpoint and soup")
    max_length: int | None = option(None, "tokens per example (default: the runs'; --data: 128)")
    batches: int | None = option(None, "--data: held-out batches of --eval-batch-size scored (default: 20)")
    eval_batch_size: int | None = option(None, "evaluation batch size (default: the runs'; --data: 32)")
    threads: int | None = option(None, THREADS_HELP)
    device: str | None = option(None, DEVICE_HELP)
    overwrite: bool = option(False, "replace what --out holds")


def soup(config: SoupConfig) -> dict:
    """Average `config.runs` into `config.out` by `config.recipe`; writes the model, soup.json and soup.md and returns
    the summary with soup.md's text under "table"."""
    runs = [str(model_folder(r)) for r in config.runs]
    if len(runs) < 2:
        raise BertkitError(f"{plural(len(runs), 'run folder')}; expected two or more to average")
    if len(set(map(_resolved, runs))) < len(runs):
        raise BertkitError("a run folder given twice; expected each run once (a soup's runs weigh alike)")
    out = new_model_folder(config.out, {f"run {i + 1}": r for i, r in enumerate(runs)}, config.overwrite, "soup")
    model_configs = [BertConfig.load(r) for r in runs]
    check_same_shape(runs, model_configs)
    tokenizer = Tokenizer.from_pretrained(runs[0])
    check_tokenizer(tokenizer, model_configs[0], runs[0])
    scorer = (CheckpointScorer(config, runs, model_configs, tokenizer) if config.data
              else TaskScorer(config, runs, model_configs, tokenizer))
    with torch_threads(scorer.threads):
        model = scorer.model_class.from_pretrained(runs[0]).to(scorer.device).eval()
        result = _cook(config, runs, scorer, model)
        _load(model, result.pop("_weights")[config.recipe])  # the soup asked for, written as a model folder
    make_dir(out, "--out")
    model.save_pretrained(out, tokenizer=tokenizer)
    summary = {"recipe": config.recipe, **scorer.describe(), **result}
    summary["runs"] = [{"run": r, **scorer.describe_run(i), "metrics": m}
                       for i, (r, m) in enumerate(zip(runs, summary.pop("run_metrics")))]
    scorer.write_run_files(out, summary)
    write_json(out / "soup.json", summary)
    table = soup_table(summary, runs, scorer)
    atomic_write_text(out / "soup.md", table)
    return summary | {"table": table}


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


def check_same_shape(runs: list[str], model_configs: list[BertConfig]) -> None:
    """Refuse runs whose weights do not average into one model: another architecture, label set or vocabulary."""
    first = runs[0]
    for r, m in zip(runs[1:], model_configs[1:]):
        for name in SHAPE_FIELDS:
            if getattr(m, name) != getattr(model_configs[0], name):
                raise BertkitError(f"{r}/config.json: {name} {getattr(m, name)!r}, {first}/config.json: "
                                   f"{getattr(model_configs[0], name)!r}; expected one architecture and one label "
                                   "set in every run")
    vocab = _vocab(first)
    for r in runs[1:]:
        if _vocab(r) != vocab:
            raise BertkitError(f"{r}: another vocabulary than {first}'s; expected runs fine-tuned from one "
                               "pretrained model")


def _vocab(run: str) -> tuple[dict, bool]:
    tokenizer = Tokenizer.from_pretrained(run)
    return tokenizer.backend.get_vocab(with_added_tokens=True), tokenizer.lowercase


class TaskScorer:
    """Fine-tuned runs, scored on every eval split of their task's data as `bertkit evaluate` scores them."""

    def __init__(self, config: SoupConfig, runs: list[str], model_configs: list[BertConfig], tokenizer):
        overrides = {"task": config.task, "data_dir": config.data_dir, "eval_file": config.eval_file,
                     "max_length": config.max_length, "eval_batch_size": config.eval_batch_size,
                     "threads": config.threads, "device": config.device}
        self.run_configs = [run_config(r, overrides) for r in runs]
        self.saved = [FinetuneConfig.load(r) for r in runs]  # as trained (None: a folder bertkit did not fine-tune)
        if config.batches is not None:
            raise BertkitError(f"--batches {config.batches} without --data; expected --data (a prepared corpus whose "
                               "held-out batches score pretraining checkpoints): fine-tuned runs are scored on all "
                               "of their task's eval data")
        for r, c in zip(runs, self.run_configs):
            if not c.task and not c.eval_file:
                raise BertkitError(f"{r}: no {CONFIG_FILE}; expected --task and the data to score on (pretraining "
                                   "checkpoints: --data, a prepared corpus)")
        self.runs = runs
        check_same_data(runs, self.run_configs, self.saved)
        self.config = self.run_configs[0]  # every run is scored with the first's settings (lengths, batch size)
        self.threads, self.device = self.config.threads, resolve_device(self.config.device)
        self.data = load_task(self.config, need_train=False, labels=label_names(model_configs[0]))
        for r, m in zip(runs, model_configs):
            check_head(self.data, m, r)
        self.model_class, self.tokenizer = self.data.model_class, tokenizer
        self.split = next(iter(self.data.evals)) if isinstance(self.data.evals, dict) else "dev"
        self.columns = self.data.table_metrics
        self.ensembles = config.ensemble and isinstance(self.data, TextTask)

    def score(self, model, logits: dict | None = None) -> dict:
        """The model's metrics on every eval split; each split's logits into `logits`, when given."""
        model.eval()
        extra = {"logits_out": logits} if logits is not None else {}
        return self.data.evaluate(model, self.tokenizer, self.config, self.device, **extra)[0]

    def headline(self, metrics: dict) -> float:
        """What the greedy soup and the ranking go by: what `finetune` keeps its best epoch by (a task's metrics
        averaged) on the first split."""
        return self.data.headline(metrics)

    def ensemble(self, logits: list[dict]) -> dict:
        averaged = {s: torch.stack([run_logits[s] for run_logits in logits]).mean(0) for s in self.data.evals}
        return self.data.scores(averaged, self.config)[0]

    def describe(self) -> dict:
        saved = self.saved[0]
        return {"task": self.data.name, "model_dir": saved.model_dir if saved else self.runs[0],
                "selected_on": self.split}

    def describe_run(self, i: int) -> dict:
        saved = self.saved[i]  # a folder without a run config: its lr and seed are not known
        return {"lr": saved.lr, "seed": saved.seed} if saved else {}

    def write_run_files(self, out: Path, summary: dict) -> None:
        """The best run's finetune_config.json with the data the soup was chosen on (`evaluate OUT` scores it there
        again) and a metrics.json as a run's (a SQuAD v2.0 soup's null threshold, tuned on its eval data, is read
        from it)."""
        saved = self.saved[summary["ranking"][0]] or self.config
        saved = dataclasses.replace(saved, out_dir=str(out), **{f: getattr(self.config, f) for f in DATA_FIELDS})
        saved.save(out)
        write_json(out / "metrics.json", {"task": self.data.name, "best": summary[summary["recipe"]]["metrics"],
                                          "soup": True})


def check_same_data(runs: list[str], run_configs: list[FinetuneConfig], saved: list[FinetuneConfig | None]) -> None:
    """Refuse runs on other data (another task, other rows held out of the training file) or from another
    pretrained start."""
    first = runs[0]
    scored_on = [_scored_on(c) for c in run_configs]
    for r, fields in zip(runs[1:], scored_on[1:]):
        for name, value in fields.items():
            if value != scored_on[0].get(name):
                raise BertkitError(
                    f"{r}: {name} {value!r}, {first}: {scored_on[0].get(name)!r}; expected runs "
                    "on the same task and data, holding out the same rows (or --data-dir / --eval-file: data to "
                    "score every run on)")
    known = [(r, _start(c)) for r, c in zip(runs, saved) if c is not None]
    starts = {s for _, s in known}
    if len(starts) > 1:
        listed = "; ".join(f"{r} from {s}" for r, s in known)
        raise BertkitError(f"runs fine-tuned from {len(starts)} pretrained models ({listed}); expected one: weights "
                           "fine-tuned from different starts do not average into a working model")
    if len(known) < len(runs):
        logger.warning("%d of the %d runs have no %s: that they start from one pretrained model is not checked",
                       len(runs) - len(known), len(runs), CONFIG_FILE)


def _scored_on(config: FinetuneConfig) -> dict:
    """The fields that say what a run is scored on: its training file only where rows of it are held out."""
    split = config.eval_split or config.folds
    return {name: getattr(config, name) for name in DATA_FIELDS if split or name not in ("train_file", "group")}


def _start(config: FinetuneConfig) -> str:
    """The pretrained model a run started from, as one string however it was spelt."""
    path = Path(config.model_dir)
    return str(path.resolve()) if path.exists() else config.model_dir


class CheckpointScorer:
    """Pretraining checkpoints, scored by masked-LM loss on the held-out split of a prepared corpus."""

    columns = ("masked_lm_loss", "perplexity", "accuracy")
    split = HELD_OUT
    ensembles = False

    def __init__(self, config: SoupConfig, runs: list[str], model_configs: list[BertConfig], tokenizer):
        from bertkit.model import BertForMaskedLM, BertForPreTraining
        from bertkit.tasks.perplexity import check_masked_lm, held_out_examples

        given = [f"--{name.replace('_', '-')}" for name in ("task", "data_dir", "eval_file") if getattr(config, name)]
        if given:
            raise BertkitError(f"--data with {', '.join(given)}; expected one: --data scores pretraining checkpoints "
                               "on a prepared corpus, the others fine-tuned runs on a task's data")
        for r, m in zip(runs, model_configs):
            check_masked_lm(r, m)
        self.runs, self.corpus = runs, config.data
        names = set(normalize_keys(weight_shapes(runs[0]), model_configs[0]))
        self.model_class = BertForPreTraining if "cls.seq_relationship.weight" in names else BertForMaskedLM
        self.max_length = config.max_length or 128
        self.batch_size = config.eval_batch_size or 32
        self.batches = 20 if config.batches is None else config.batches
        for name, value in (("max_length", self.max_length), ("batches", self.batches),
                            ("eval_batch_size", self.batch_size)):
            if value < 1:
                raise BertkitError(f"--{name.replace('_', '-')} {value}; expected a positive number")
        if self.max_length > model_configs[0].max_position_embeddings:
            raise BertkitError(f"--max-length {self.max_length}; expected at most the checkpoints' "
                               f"{model_configs[0].max_position_embeddings} positions")
        self.threads, self.device = config.threads, resolve_device(config.device or "auto")
        self.examples = held_out_examples(config.data, tokenizer, self.max_length, self.batches * self.batch_size)
        parents = {Path(r).resolve().parent for r in runs}
        if len(parents) > 1:
            logger.warning("checkpoints of %d run folders: weights average into a working model along one run, not "
                           "across runs from different initial weights", len(parents))

    def score(self, model, logits: dict | None = None) -> dict:
        from bertkit.tasks.perplexity import masked_lm_scores

        model.eval()
        return masked_lm_scores(model, self.examples, self.batch_size, self.corpus)

    def headline(self, metrics: dict) -> float:
        return -metrics["masked_lm_loss"]

    def describe(self) -> dict:
        return {"task": "masked LM", "model_dir": str(Path(self.runs[0]).resolve().parent.parent),
                "selected_on": self.split, "data": self.corpus, "max_length": self.max_length,
                "sequences": len(self.examples["input_ids"])}

    def describe_run(self, i: int) -> dict:
        return {"step": checkpoint_step(Path(self.runs[i]))}

    def write_run_files(self, out: Path, summary: dict) -> None:
        pass  # a pretraining checkpoint's folder holds the model and its tokenizer alone


def _cook(config: SoupConfig, runs: list[str], scorer, model) -> dict:
    """Score every run, the uniform and greedy soups and the ensemble; the soups' weights under "_weights"."""
    ensemble = config.ensemble and scorer.ensembles
    run_metrics, logits, total = [], [], None
    for i, r in enumerate(runs):
        print(f"scoring run {i + 1}/{len(runs)}: {r}", flush=True)
        total = _add(total, _weights(model, r), r)
        logits.append({} if ensemble else None)
        run_metrics.append(scorer.score(model, logits[-1]))
    headline = [_headline(scorer, m) for m in run_metrics]
    ranking = sorted(range(len(runs)), key=lambda i: -headline[i])  # ties keep the order given
    # greedy: the best run, then each next best that does not lower the score of the average on the first split
    best = ranking[0]
    # its weights read again: holding every run's until the ranking is known would take a model's memory per run
    chosen, greedy_metrics = [best], run_metrics[best]
    greedy_total = _add(None, _weights(model, runs[best]), runs[best])
    steps = [{"run": best, "score": headline[best], "kept": True}]
    for i in ranking[1:]:
        weights = _weights(model, runs[i])
        _load(model, _mean(_add(greedy_total, weights, runs[i]), len(chosen) + 1))
        metrics = scorer.score(model)
        score, before = _headline(scorer, metrics), _headline(scorer, greedy_metrics)
        kept = score >= before
        steps.append({"run": i, "score": score, "kept": kept, "metrics": metrics})
        print(f"greedy soup + {runs[i]}: {scorer.split} {abs(score):.4g} against {abs(before):.4g}, "
              f"{'kept' if kept else 'left out'}", flush=True)
        if kept:
            greedy_total, greedy_metrics = _add(greedy_total, weights, runs[i]), metrics
            chosen.append(i)
    uniform = _mean(total, len(runs))
    if len(chosen) == len(runs):  # every run kept: the same average
        uniform_metrics = greedy_metrics
    else:
        _load(model, uniform)
        uniform_metrics = scorer.score(model)
    result = {"ranking": ranking, "run_metrics": run_metrics,
              "greedy": {"runs": sorted(chosen), "metrics": greedy_metrics, "steps": steps},
              "uniform": {"runs": list(range(len(runs))), "metrics": uniform_metrics},
              "_weights": {"greedy": _mean(greedy_total, len(chosen)), "uniform": uniform}}
    if ensemble:
        result["ensemble"] = {"runs": list(range(len(runs))), "metrics": scorer.ensemble(logits)}
    return result


def _weights(model, run: str) -> dict[str, torch.Tensor]:
    """A run's weights under the model's own names (whatever names its file uses), on the CPU."""
    load_state_dict_into(model, read_state_dict(run), source=run)
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _add(total: dict | None, weights: dict[str, torch.Tensor], run: str) -> dict[str, torch.Tensor]:
    """The running sum of runs' weights, in float64 (integer buffers are not summed: they must be equal)."""
    if total is None:
        return {k: v.double() if v.is_floating_point() else v for k, v in weights.items()}
    out = {}
    for k, v in weights.items():
        if v.is_floating_point():
            out[k] = total[k] + v.double()
        elif torch.equal(total[k], v):
            out[k] = v
        else:
            raise BertkitError(f"{run}: {k} differs from the other runs'; expected the same (it is not a weight "
                               "to average)")
    return out


def _mean(total: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The average of `n` runs from their sum, as float32 (the dtype every bertkit run folder holds)."""
    return {k: (v / n).float() if v.is_floating_point() else v for k, v in total.items()}


def _load(model, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(weights[k])


def _headline(scorer, metrics: dict) -> float:
    """The scorer's headline, nan as the least."""
    value = scorer.headline(metrics)
    return value if not math.isnan(value) else float("-inf")


def soup_table(summary: dict, runs: list[str], scorer) -> str:
    """soup.md: every run, both soups and the ensemble on every eval split, then the greedy soup's steps."""
    columns = [m for m in scorer.columns if m in summary["uniform"]["metrics"]]
    greedy, n, split = summary["greedy"], len(runs), summary["selected_on"]
    checkpoints = isinstance(scorer, CheckpointScorer)
    rows = [(f"run {i + 1}: {runs[i]}", 1, summary["runs"][i]["metrics"]) for i in summary["ranking"]]
    rows += [("**uniform soup**", n, summary["uniform"]["metrics"]),
             ("**greedy soup**", len(greedy["runs"]), greedy["metrics"])]
    if "ensemble" in summary:
        rows.append(("ensemble (logits averaged)", n, summary["ensemble"]["metrics"]))
    kept = "; ".join(f"run {i + 1}" for i in greedy["runs"])
    noun, source = ("checkpoint", "latest weight averaging, Kaddour 2022") if checkpoints else (
        "run", "Wortsman et al. 2022")
    if checkpoints:
        title = f"# Checkpoint soup: {plural(n, 'checkpoint')} of {summary['model_dir']}"
        scored = (f"Scored by masked-LM loss on {summary['sequences']:,} held-out sequences of {summary['data']} "
                  f"({summary['max_length']} tokens, 15% masked with seed 0: the same masks for every model), lower "
                  "is better; the greedy soup is chosen on them too.")
        by = "held-out masked-LM loss (lower is better)"
    else:
        title = (f"# Model soup: {summary['task']}, {plural(n, 'run')} fine-tuned from "
                 f"{hub.model_name(summary['model_dir'])}")
        several = isinstance(scorer.data.evals, dict) and len(scorer.data.evals) > 1
        scored = f"Columns without a split's name: the {split} rows." if several else ""
        by = f"{split} score (what `finetune` keeps its best epoch by: a task's metrics averaged)"
    lines = [title, "",
             f"Weights averaged ({source}). The uniform soup averages every {noun}; the greedy soup adds the "
             f"{noun}s best first by their {split} score, keeping each that does not make it worse: {kept}. Written "
             f"to this folder: the {summary['recipe']} soup. Best first; a soup is one model at inference"
             + (f", the ensemble {n}. " if "ensemble" in summary else ". ") + scored, "",
             "| model | models averaged | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, count, metrics in rows:
        lines.append(f"| {name} | {count} | " + " | ".join(_cell(metrics.get(m)) for m in columns) + " |")
    lines += ["", f"Greedy soup, step by step: the average with the run, by its {by}.", "",
              "| step | run | score | |", "|---|---|---|---|"]
    for k, step in enumerate(greedy["steps"], start=1):
        lines.append(f"| {k} | run {step['run'] + 1} | {_cell(abs(step['score']) if checkpoints else step['score'])} | "
                     f"{'kept' if step['kept'] else 'left out'} |")
    if split != HELD_OUT:
        lines += ["", f"The greedy soup was chosen on {split}, the data it is scored on: its score "
                  "there is optimistic. `finetune --eval-split` holds rows out of the training file to choose on."]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4g}"
