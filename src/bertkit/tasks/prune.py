"""Structured pruning (`bertkit prune`): a fine-tuned model (a classifier or regressor, a tagger, a SQuAD or
multiple-choice model) made smaller and faster by removing whole encoder blocks and feed-forward units, into a model
folder of the standard shape (fewer layers, a narrower intermediate_size) that transformers loads as any BERT.

What goes is chosen by the loss's first-order estimate of what removing it costs (Molchanov et al. 2017's Taylor
criterion; Michel et al. 2019 scored attention heads the same way): on --batches batches of the run's training rows,
a gate g multiplying a unit's output is 1 and dL/dg is the sum over tokens of the output times the loss's gradient
there; the absolute value of each batch's sum, summed over batches, is the unit's importance. A block's gate scales
what it adds to its input (its output minus its input), a feed-forward unit's its GELU activation. Every kept block
keeps its --intermediate-size most important units (one width for all blocks: config.json holds one), and
--drop-layers top removes the top blocks instead of the least important ones (Sajjad et al. 2023 found the top
blocks the ones to drop before fine-tuning). All is measured once, on the full model: removing the blocks one at a
time, measuring again after each, scored better before fine-tuning again and worse after it (docs/findings.md).

Pruning removes what the model had learnt to use; fine-tuning the pruned folder again (`bertkit finetune
--model-dir OUT`, its classifier kept), or distilling it from the run (`--teacher RUN`), recovers most of it
(docs/findings.md measures each). Attention heads are not pruned: a narrower attention (heads x head size below
the hidden size) is no BERT config.json that transformers 5 reads.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from bertkit.checkpoint import atomic_write_text, model_folder
from bertkit.config import BertConfig, option, write_json
from bertkit.data.batching import collate
from bertkit.errors import BertkitError
from bertkit.tasks.similarity import SimilarityTask
from bertkit.tasks.evaluation import DEVICE_HELP, THREADS_HELP, check_head, label_names, run_config
from bertkit.tasks.finetune import CONFIG_FILE, load_task, plural, resolve_device
from bertkit.tasks.inference import check_tokenizer
from bertkit.tokenizer import Tokenizer
from bertkit.train.distributed import torch_threads
from bertkit.train.logs import progress_bar
from bertkit.train.rundir import make_dir, new_model_folder

BLOCK_KEY = re.compile(r"^(.*\bencoder\.layer\.)(\d+)\.(.*)$")
SPEED_BATCHES = 4  # batches of --eval-batch-size training rows timed on each model, before and after


@dataclass
class PruneConfig:
    """`bertkit prune`: the command's arguments."""

    run: str = option("", "a run folder `bertkit finetune` wrote: a classifier or regressor (a GLUE task or your "
                      "files), a tagger, a SQuAD or SWAG model (its finetune_config.json names the data)",
                      positional=True)
    out: str = option("", "folder for the pruned model: a run folder as the input's (`evaluate`, `predict`, `serve`, "
                      "`finetune --model-dir` and transformers load it), with prune.md and prune.json", required=True)
    layers: int | None = option(None, "encoder blocks to keep (default: all)")
    intermediate_size: int | None = option(None, "feed-forward units to keep in every block, the most important "
                                           "(default: all; BERT-Base has 3,072)")
    drop_layers: Literal["importance", "top"] = option("importance", "which blocks go: the least important by the "
                                                       "loss's gradient, or the top ones")
    batches: int = option(32, "training batches of --batch-size the importance is measured on (the run's training "
                          "rows, shuffled with seed 0)")
    batch_size: int | None = option(None, "rows per batch (default: the run's)")
    data_dir: str | None = option(None, "the task's data folder (default: the run's)")
    train_file: str | None = option(None, "custom tasks: the training file (default: the run's)")
    eval_file: str | None = option(None, "a labelled file to score on instead (default: the run's)")
    eval_batch_size: int | None = option(None, "evaluation batch size (default: the run's)")
    threads: int | None = option(None, THREADS_HELP)
    device: str | None = option(None, DEVICE_HELP)
    overwrite: bool = option(False, "replace what --out holds")


def prune(config: PruneConfig) -> dict:
    """Measure every block's and feed-forward unit's importance on the run's training rows, keep the most important,
    and write the smaller model (a run folder) with prune.json and prune.md into `config.out`; returns the summary
    with prune.md's text under "table"."""
    run = str(model_folder(config.run)) if config.run else ""
    if not run:
        raise BertkitError("no run folder; expected the folder `bertkit finetune` wrote (bertkit prune RUN --out DIR)")
    for name in ("layers", "intermediate_size", "batches", "batch_size", "eval_batch_size"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise BertkitError(f"--{name.replace('_', '-')} {value}; expected a positive number")
    model_config = BertConfig.load(run)
    layers = config.layers or model_config.num_hidden_layers
    width = config.intermediate_size or model_config.intermediate_size
    if layers > model_config.num_hidden_layers or width > model_config.intermediate_size:
        raise BertkitError(f"--layers {layers} --intermediate-size {width}; {run} has "
                           f"{model_config.num_hidden_layers} blocks of {model_config.intermediate_size} units: "
                           "expected at most those")
    if (layers, width) == (model_config.num_hidden_layers, model_config.intermediate_size):
        raise BertkitError("nothing to prune; expected --layers below the run's "
                           f"{model_config.num_hidden_layers} blocks or --intermediate-size below its "
                           f"{model_config.intermediate_size} units")
    out = new_model_folder(config.out, run, config.overwrite, "pruned model")
    overrides = {"data_dir": config.data_dir, "train_file": config.train_file, "eval_file": config.eval_file,
                 "batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size,
                 "threads": config.threads, "device": config.device}
    run_cfg = run_config(run, overrides)
    if not run_cfg.task:
        raise BertkitError(f"{run}: no {CONFIG_FILE}; expected a run folder `bertkit finetune` wrote (its training "
                           "rows measure the importance)")
    task = load_task(run_cfg, labels=label_names(model_config))
    if isinstance(task, SimilarityTask):
        raise BertkitError(f"{run}: a sentence-embedding run; expected a model with a task head (a classifier, "
                           "regressor, tagger, SQuAD or SWAG model): an embedding model's loss is not one row's")
    check_head(task, model_config, run)
    tokenizer = Tokenizer.from_pretrained(run)
    check_tokenizer(tokenizer, model_config, run)
    device = resolve_device(run_cfg.device)
    with torch_threads(run_cfg.threads):
        model = task.model_class.from_pretrained(run).to(device).eval()
        before = _scored(task, model, tokenizer, run_cfg, device)
        rows = task.train_rows(tokenizer, run_cfg)
        order = np.random.default_rng(0).permutation(len(rows))[: config.batches * run_cfg.batch_size]
        batches = [collate([rows[i] for i in order[s: s + run_cfg.batch_size]], tokenizer.pad_id)
                   for s in range(0, len(order), run_cfg.batch_size)]
        block_scores, unit_scores = importance(model, batches, device)
        kept = (list(range(layers)) if config.drop_layers == "top"
                else sorted(torch.topk(block_scores, layers).indices.tolist()))
        units = [sorted(torch.topk(unit_scores[b], width).indices.tolist()) for b in kept]
        small = pruned(model, kept, units)
        after = _scored(task, small, tokenizer, run_cfg, device)
        inputs = [{k: row[k] for k in ("input_ids", "token_type_ids")}  # labels left out
                  for row in rows[: SPEED_BATCHES * run_cfg.eval_batch_size]]
        timed = [collate(inputs[s: s + run_cfg.eval_batch_size], tokenizer.pad_id)
                 for s in range(0, len(inputs), run_cfg.eval_batch_size)]
        seconds = batch_seconds([model, small], timed, device)
        threads = torch.get_num_threads()
    make_dir(out, "--out")
    small.save_pretrained(out, tokenizer=tokenizer)
    saved = dataclasses.replace(run_cfg, out_dir=str(out), model_dir=run)
    saved.save(out)
    write_json(out / "metrics.json", {"task": task.name, "best": after, "pruned_from": run})
    summary = {"run": run, "task": task.name, "layers": layers, "intermediate_size": width,
               "drop_layers": config.drop_layers, "batches": len(batches),
               "rows": int(len(order)), "kept_layers": kept,
               "block_importance": [round(float(s), 6) for s in block_scores],
               "parameters": {"before": model.num_parameters(), "after": small.num_parameters()},
               "encoder_parameters": {"before": _encoder_parameters(model), "after": _encoder_parameters(small)},
               "seconds_per_batch": {"before": seconds[0], "after": seconds[1]},
               "timed": {"batches": len(timed), "batch_size": run_cfg.eval_batch_size, "threads": threads,
                         "device": str(device)},
               "before": before, "after": after}
    write_json(out / "prune.json", summary)
    table = prune_table(summary, task)
    atomic_write_text(out / "prune.md", table)
    return summary | {"table": table}


def importance(model, batches: list[dict], device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each encoder block's importance (L,) and each block's feed-forward units' (L, I): the absolute first-order
    change of the loss if the unit's output were gated off, per batch, summed over the batches."""
    blocks = model.bert.encoder.layer
    block_scores = torch.zeros(len(blocks), dtype=torch.float64)
    unit_scores = torch.zeros(len(blocks), blocks[0].intermediate.dense.out_features, dtype=torch.float64)
    seen: list[tuple[str, int, torch.Tensor, torch.Tensor | None]] = []

    def on_block(index):
        return lambda module, args, output: seen.append(("block", index, output, args[0]))

    def on_units(index):
        return lambda module, args, output: seen.append(("units", index, output, None))

    hooks = [h for i, b in enumerate(blocks) for h in (b.register_forward_hook(on_block(i)),
                                                       b.intermediate.register_forward_hook(on_units(i)))]
    try:
        for batch in progress_bar(iterable=batches, desc="importance", unit="batch", leave=False,
                                  disable=len(batches) < 8):
            seen.clear()
            loss = model(**{k: v.to(device) for k, v in batch.items()})["loss"]
            grads = torch.autograd.grad(loss, [output for _, _, output, _ in seen])
            with torch.no_grad():
                for (kind, index, output, given), grad in zip(seen, grads):
                    if kind == "block":
                        block_scores[index] += float(((output - given) * grad).sum().abs())
                    else:
                        flat = (output * grad).reshape(-1, output.shape[-1])
                        unit_scores[index] += flat.sum(0).abs().double().cpu()
    finally:
        for h in hooks:
            h.remove()
        seen.clear()
    return block_scores, list(unit_scores)


def pruned(model, kept: list[int], units: list[list[int]]):
    """A new model of `model`'s class with only the blocks `kept` (in order), each with its feed-forward `units`."""
    width = len(units[0])
    config = dataclasses.replace(model.config, num_hidden_layers=len(kept), intermediate_size=width)
    position = {old: new for new, old in enumerate(kept)}
    state = {}
    for name, value in model.state_dict().items():
        match = BLOCK_KEY.match(name)
        if match is None:
            state[name] = value
            continue
        prefix, old, rest = match.group(1), int(match.group(2)), match.group(3)
        if old not in position:
            continue
        index = torch.tensor(units[position[old]], device=value.device)
        if rest in ("intermediate.dense.weight", "intermediate.dense.bias"):
            value = value.index_select(0, index)
        elif rest == "output.dense.weight":
            value = value.index_select(1, index)
        state[f"{prefix}{position[old]}.{rest}"] = value
    small = type(model)(config).to(next(model.parameters()).device)
    small.load_state_dict(state)
    return small.eval()


def _scored(task, model, tokenizer, config, device) -> dict:
    with torch.no_grad():
        return task.evaluate(model, tokenizer, config, device)[0]


def batch_seconds(models: list, batches: list[dict], device, rounds: int = 3) -> list[float]:
    """Each model's seconds per batch over the same `batches`: one pass to warm up, then the fastest of `rounds`
    passes, the models taking turns (so that a machine busy for a while slows both)."""
    best = [math.inf] * len(models)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    with torch.no_grad():
        for attempt in range(rounds + 1):
            for i, model in enumerate(models):
                _synchronize(device)
                start = time.perf_counter()
                for batch in batches:
                    model(**batch)
                _synchronize(device)
                if attempt:
                    best[i] = min(best[i], (time.perf_counter() - start) / len(batches))
    return [float(f"{b:.4g}") for b in best]


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _encoder_parameters(model) -> int:
    return sum(p.numel() for p in model.bert.encoder.parameters())


def prune_table(summary: dict, task) -> str:
    """prune.md: what was kept, the parameters, and the eval scores and time before and after."""
    p, e, s, t = (summary["parameters"], summary["encoder_parameters"], summary["seconds_per_batch"],
                  summary["timed"])
    lines = [f"# Pruned: {summary['run']} ({summary['task']})", "",
             f"{plural(summary['layers'], 'block')} of {len(summary['block_importance'])} kept "
             f"({'the bottom ones' if summary['drop_layers'] == 'top' else 'by importance'}: "
             f"{', '.join(str(b) for b in summary['kept_layers'])}), {summary['intermediate_size']:,} feed-forward "
             f"units each; importance measured on {summary['rows']:,} training rows ({summary['batches']} batches).",
             "", "| | before | after | ratio |", "|---|---:|---:|---:|",
             f"| parameters | {p['before'] / 1e6:.2f}M | {p['after'] / 1e6:.2f}M | {p['after'] / p['before']:.3f} |",
             f"| encoder parameters | {e['before'] / 1e6:.2f}M | {e['after'] / 1e6:.2f}M | "
             f"{e['after'] / e['before']:.3f} |",
             f"| seconds per batch of {t['batch_size']} training rows ({plural(t['threads'], 'thread')}, "
             f"{t['device']}) | "
             f"{s['before']:.3g} | {s['after']:.3g} | {s['before'] / s['after']:.2f}x faster |"]
    for metric in task.table_metrics:
        before, after = summary["before"][metric], summary["after"][metric]
        lines.append(f"| {metric} | {before:.2f} | {after:.2f} | {after - before:+.2f} |")
    lines += ["", "Block importance (the loss's first-order change with the block gated off, summed over batches): "
              + ", ".join(f"{i}: {v:.3g}" for i, v in enumerate(summary["block_importance"])) + ".",
              "", "Fine-tune the pruned model again to recover what it lost: `bertkit finetune --model-dir OUT ...` "
              "(its classifier is kept), or distil it from the run: `--teacher RUN`.", ""]
    return "\n".join(lines)

