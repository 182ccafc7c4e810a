"""Model soups (`bertkit soup`): one model whose weights are the average of several fine-tuned from the same
pretrained model on the same task (Wortsman et al. 2022), at the cost of one model at inference.

The runs of an lr or seed search all start from the same weights and usually end in one basin, where their average
scores like the best of them or better. Two recipes: the uniform soup averages every run; the greedy soup (the
default) takes the runs best first by their score on the eval data and keeps each only if the average with it does
not score lower there. Every run, both soups and, for a classifier or regressor, the runs' ensemble (their logits
averaged: as many models at inference as runs) are scored on every eval split, and soup.md shows them side by side.

The greedy soup is chosen on the (first) eval split: on rows held out of the training file (`finetune
--eval-split`), the dev data scored after them reports it without the choice seeing it; chosen on dev and reported
on dev, its score is optimistic, as the best lr's is.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from bertkit import hub
from bertkit.checkpoint import atomic_write_text, load_state_dict_into, model_folder, read_state_dict
from bertkit.config import BertConfig, option, write_json
from bertkit.errors import BertkitError
from bertkit.tasks.classification import HELD_OUT, TextTask
from bertkit.tasks.evaluation import DEVICE_HELP, THREADS_HELP, check_head, label_names, run_config
from bertkit.tasks.finetune import CONFIG_FILE, FinetuneConfig, load_task, plural, resolve_device
from bertkit.tasks.inference import check_tokenizer
from bertkit.tokenizer import Tokenizer
from bertkit.train.distributed import torch_threads
from bertkit.train.rundir import check_output_path, make_dir

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

    runs: list[str] = option([], "the fine-tuned run folders to average (what `bertkit finetune` wrote): two or "
                             "more, fine-tuned from the same pretrained model on the same task and data",
                             positional=True)
    out: str = option("", "folder for the soup: a model folder as a run's (`evaluate`, `predict`, `serve` and "
                      "transformers load it), with soup.md and soup.json", required=True)
    recipe: Literal["greedy", "uniform"] = option("greedy", "the soup written to --out: greedy (runs added best "
                                                  "first, each kept only if the eval score does not drop) or "
                                                  "uniform (every run averaged); both are scored")
    ensemble: bool = option(True, "also score the runs' ensemble (their logits averaged) for comparison: "
                            "classifiers and regressors")
    task: str | None = option(None, "the task, for run folders without a finetune_config.json (default: the runs')")
    data_dir: str | None = option(None, "the task's data folder to choose and score on (default: the runs')")
    eval_file: str | None = option(None, "a labelled file to choose and score on instead (default: the runs')")
    eval_batch_size: int | None = option(None, "evaluation batch size (default: the runs')")
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
    if not config.out:
        raise BertkitError("no output folder; expected --out DIR for the soup")
    out = Path(config.out)
    check_output_path(out, "--out", {f"run {i + 1}": r for i, r in enumerate(runs)})
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise BertkitError(f"--out {out} holds files; expected an empty or new folder (or --overwrite)")
    overrides = {"task": config.task, "data_dir": config.data_dir, "eval_file": config.eval_file,
                 "eval_batch_size": config.eval_batch_size, "threads": config.threads, "device": config.device}
    run_configs = [run_config(r, overrides) for r in runs]
    for r, c in zip(runs, run_configs):
        if not c.task and not c.eval_file:
            raise BertkitError(f"{r}: no {CONFIG_FILE}; expected --task and the data to score on")
    model_configs = [BertConfig.load(r) for r in runs]
    check_compatible(runs, run_configs, model_configs)
    scoring = run_configs[0]  # every run is scored with the first's settings (lengths, batch size)
    device = resolve_device(scoring.device)
    with torch_threads(scoring.threads):
        data = load_task(scoring, need_train=False, labels=label_names(model_configs[0]))
        for r, m in zip(runs, model_configs):
            check_head(data, m, r)
        tokenizer = Tokenizer.from_pretrained(runs[0])
        check_tokenizer(tokenizer, model_configs[0], runs[0])
        model = data.model_class.from_pretrained(runs[0]).to(device).eval()
        result = _cook(config, runs, data, model, tokenizer, scoring, device)
        _load(model, result.pop("_weights")[config.recipe])  # the soup asked for, written as a run folder
    make_dir(out, "--out")
    model.save_pretrained(out, tokenizer=tokenizer)
    # the best run's config with the data the soup was chosen on, so that `evaluate OUT` scores it there again
    saved = FinetuneConfig.load(runs[result["ranking"][0]]) or scoring
    saved = dataclasses.replace(saved, out_dir=str(out), **{f: getattr(scoring, f) for f in DATA_FIELDS})
    saved.save(out)
    summary = {"recipe": config.recipe, "task": data.name, "model_dir": saved.model_dir, **result}
    summary["runs"] = [{"run": r, "lr": c.lr, "seed": c.seed, "metrics": m}
                       for r, c, m in zip(runs, run_configs, summary.pop("run_metrics"))]
    write_json(out / "soup.json", summary)
    # metrics.json, as a run's: a SQuAD v2.0 soup's null threshold tuned on its eval data, as `predict` reads it
    write_json(out / "metrics.json", {"task": data.name, "best": summary[config.recipe]["metrics"], "soup": True})
    table = soup_table(summary, runs, data)
    atomic_write_text(out / "soup.md", table)
    return summary | {"table": table}


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


def check_compatible(runs: list[str], run_configs: list[FinetuneConfig], model_configs: list[BertConfig]) -> None:
    """Refuse runs whose weights do not average into one model: another architecture, label set or vocabulary,
    another pretrained start, or other data (another task, or other rows held out of the training file)."""
    first = runs[0]
    scored_on = [_scored_on(c) for c in run_configs]
    for r, fields in zip(runs[1:], scored_on[1:]):
        for name, value in fields.items():
            if value != scored_on[0].get(name):
                raise BertkitError(
                    f"{r}: {name} {value!r}, {first}: {scored_on[0].get(name)!r}; expected runs "
                    "on the same task and data, holding out the same rows (or --data-dir / --eval-file: data to "
                    "score every run on)")
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
    known = [(r, _start(saved)) for r in runs if (saved := FinetuneConfig.load(r)) is not None]
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


def _vocab(run: str) -> tuple[dict, bool]:
    tokenizer = Tokenizer.from_pretrained(run)
    return tokenizer.backend.get_vocab(with_added_tokens=True), tokenizer.lowercase


def _cook(config: SoupConfig, runs: list[str], data, model, tokenizer, run: FinetuneConfig, device) -> dict:
    """Score every run, the uniform and greedy soups and the ensemble; the soups' weights under "_weights"."""
    ensemble = config.ensemble and isinstance(data, TextTask)
    run_metrics, logits, total = [], [], None
    for i, r in enumerate(runs):
        print(f"scoring run {i + 1}/{len(runs)}: {r}", flush=True)
        weights = _weights(model, r)
        total = _add(total, weights, r)
        metrics, split_logits = _score(model, data, tokenizer, run, device, ensemble)
        run_metrics.append(metrics)
        logits.append(split_logits)
    split = _first_split(data)
    headline = [_headline(data, m) for m in run_metrics]
    ranking = sorted(range(len(runs)), key=lambda i: -headline[i])  # ties keep the order given
    # greedy: the best run, then each next best that does not lower the score of the average on the first split
    best = ranking[0]
    chosen, greedy_total, greedy_metrics = [best], _add(None, _weights(model, runs[best]), runs[best]), run_metrics[best]
    steps = [{"run": best, "score": headline[best], "kept": True}]
    for i in ranking[1:]:
        weights = _weights(model, runs[i])
        _load(model, _mean(_add(greedy_total, weights, runs[i]), len(chosen) + 1))
        metrics, _ = _score(model, data, tokenizer, run, device, False)
        kept = _headline(data, metrics) >= _headline(data, greedy_metrics)
        steps.append({"run": i, "score": _headline(data, metrics), "kept": kept, "metrics": metrics})
        print(f"greedy soup + {runs[i]}: {split} {_headline(data, metrics):.2f} "
              f"{'>=' if kept else '<'} {_headline(data, greedy_metrics):.2f}, {'kept' if kept else 'left out'}",
              flush=True)
        if kept:
            greedy_total, greedy_metrics = _add(greedy_total, weights, runs[i]), metrics
            chosen.append(i)
    uniform = _mean(total, len(runs))
    if len(chosen) == len(runs):  # every run kept: the same average
        uniform_metrics = greedy_metrics
    else:
        _load(model, uniform)
        uniform_metrics, _ = _score(model, data, tokenizer, run, device, False)
    result = {"selected_on": split, "ranking": ranking, "run_metrics": run_metrics,
              "greedy": {"runs": sorted(chosen), "metrics": greedy_metrics, "steps": steps},
              "uniform": {"runs": list(range(len(runs))), "metrics": uniform_metrics},
              "_weights": {"greedy": _mean(greedy_total, len(chosen)), "uniform": uniform}}
    if ensemble:
        averaged = {s: torch.stack([split_logits[s] for split_logits in logits]).mean(0) for s in data.evals}
        result["ensemble"] = {"runs": list(range(len(runs))), "metrics": data.scores(averaged, run)[0]}
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


def _score(model, data, tokenizer, run: FinetuneConfig, device, want_logits: bool) -> tuple[dict, dict]:
    """The model's metrics on every eval split and, when wanted, each split's logits."""
    model.eval()
    logits: dict = {}
    metrics, _ = data.evaluate(model, tokenizer, run, device, **({"logits_out": logits} if want_logits else {}))
    return metrics, logits


def _headline(data, metrics: dict) -> float:
    """The number the greedy soup and the ranking go by: the task's headline on the first split, nan as the least."""
    value = data.headline(metrics)
    return value if value == value else float("-inf")


def _first_split(data) -> str:
    return next(iter(data.evals)) if isinstance(data.evals, dict) else "dev"


def soup_table(summary: dict, runs: list[str], data) -> str:
    """soup.md: every run, both soups and the ensemble on every eval split, then the greedy soup's steps."""
    columns = [m for m in data.table_metrics if m in summary["uniform"]["metrics"]]
    greedy, n = summary["greedy"], len(runs)
    rows = [(f"run {i + 1}: {runs[i]}", 1, summary["runs"][i]["metrics"]) for i in summary["ranking"]]
    rows += [("**uniform soup**", n, summary["uniform"]["metrics"]),
             ("**greedy soup**", len(greedy["runs"]), greedy["metrics"])]
    if "ensemble" in summary:
        rows.append(("ensemble (logits averaged)", n, summary["ensemble"]["metrics"]))
    kept = "; ".join(f"run {i + 1}" for i in greedy["runs"])
    lines = [f"# Model soup: {summary['task']}, {plural(n, 'run')} fine-tuned from "
             f"{hub.model_name(summary['model_dir'])}", "",
             f"Weights averaged (Wortsman et al. 2022). The uniform soup averages every run; the greedy soup adds the "
             f"runs best first by their {summary['selected_on']} score, keeping each that does not lower it: "
             f"{kept}. Written to this folder: the {summary['recipe']} soup. Runs best first; a soup is one model "
             f"at inference, the ensemble {n}."
             + (f" Columns without a split's name: the {summary['selected_on']} rows."
                if isinstance(data.evals, dict) and len(data.evals) > 1 else ""), "",
             "| model | models averaged | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, count, metrics in rows:
        lines.append(f"| {name} | {count} | " + " | ".join(_cell(metrics.get(m)) for m in columns) + " |")
    lines += ["", f"Greedy soup, step by step: the {summary['selected_on']} score of the average with the run (the "
              "score `finetune` picks its best epoch by: a task's metrics averaged).", "",
              "| step | run | score | |", "|---|---|---|---|"]
    for k, step in enumerate(greedy["steps"], start=1):
        lines.append(f"| {k} | run {step['run'] + 1} | {_cell(step['score'])} | "
                     f"{'kept' if step['kept'] else 'left out'} |")
    if summary["selected_on"] != HELD_OUT:
        lines += ["", f"The greedy soup was chosen on {summary['selected_on']}, the data it is scored on: its score "
                  "there is optimistic. `finetune --eval-split` holds rows out of the training file to choose on."]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4g}" if abs(value) < 1e-2 and value else f"{value:.2f}"
