"""Pretraining: from raw text (or a prepared corpus) to a trained BertForPreTraining, on one CPU or many machines.

The loop at the bottom composes separate pieces: the inputs (vocabulary and prepared data, built on the fly when
not given), the data order (`loader.py`), the step, evaluation, the optimizer and schedule (`optim.py`),
checkpoints (`bertkit.checkpoint`), logs (`logs.py`) and processes (`distributed.py`). Under torchrun every process
runs this same code; only rank 0 writes, and the run folder must be on a filesystem all nodes see.

A run folder holds: pretrain_config.json, train.csv / eval.csv, tensorboard/, loss_curve.png, checkpoints/step-N/
(each a transformers-loadable model folder plus training_state.pt and the checksums of its files), and tokenizer/
and data/ when built here. pretrain_config.json marks the folder as a pretraining run's: a run writes it first
into a new or empty folder, and refuses a folder holding anything else unless --overwrite.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from bertkit.checkpoint import (
    TRAINING_STATE_NAME,
    checkpoint_bytes,
    checkpoint_step,
    list_checkpoints,
    load_state_dict_into,
    load_training_state,
    prune_checkpoints,
    read_state_dict,
    rng_state,
    save_checkpoint,
    set_aside_newer,
    set_rng_state,
    usable_checkpoint,
    verify_checkpoint,
)
from bertkit.config import PRESETS, BertConfig, option, write_json
from bertkit.data.pretraining import OBJECTIVES
from bertkit.errors import BertkitError
from bertkit.model import BertForPreTraining, compile_blocks, set_dropout
from bertkit.train import distributed
from bertkit.train.distributed import Distributed
from bertkit.train.faults import Interrupt, NonFiniteSteps
from bertkit.train.loader import PretrainBatches, eval_loader
from bertkit.train.logs import RunLogger, progress_bar
from bertkit.train.optim import build_optimizer, triangle, warmup_linear, warmup_steps_for
from bertkit.train.precision import Precision, load_scaler, resolve
from bertkit.train.rundir import RunLock, absolute_paths, check_free_space, check_output_path, entries, remove
from bertkit.train.step import CHECKPOINTING_HELP, train_step as shared_step

logger = logging.getLogger("bertkit")

CONFIG_NAME = "pretrain_config.json"
# What a run writes into its folder besides tokenizer/ and data/ (inputs built from --corpus, kept by --overwrite)
OUTPUTS = (CONFIG_NAME, "train.csv", "eval.csv", "tensorboard", "loss_curve.png", "checkpoints")
LOGS = ("train.csv", "eval.csv", "tensorboard", "loss_curve.png")
INPUTS_NAME = "inputs.json"  # what tokenizer/ and data/ were built from, so that other inputs build them again


def default_corpus() -> list[str]:
    """The Python docs of $BERTKIT_DATA (else ../shared/data, a checkout beside the shared data): at 0.7M tokens,
    vocabulary and preparation take seconds, so the no-argument run is a demo of a minute or two."""
    root = Path(os.environ.get("BERTKIT_DATA") or Path("..", "shared", "data"))
    return [str(root / "corpus" / "python-docs-3.11.txt")]


# What --then may set: the data's form, the batch, the optimizer and its schedule. The model, the inputs, the run's
# bookkeeping (logs, checkpoints, seed) are the run's throughout.
THEN_KEYS = ("max_steps", "objective", "max_length", "masking", "mask_prob", "batch_size", "grad_accum", "lr",
             "warmup", "schedule", "optimizer", "weight_decay")


@dataclass
class PretrainConfig:
    """Everything a pretraining run takes; the resolved values are saved as pretrain_config.json in the run folder."""

    model: str = option("tiny", f"model size: a preset ({', '.join(PRESETS)}) or the path of a config.json")
    model_dir: str | None = option(None, "continue pretraining this model folder or Hub model id (its config.json "
                                   "and weights; its tokenizer unless --tokenizer is given), e.g. one from `bertkit "
                                   "extend` at a --max-length up to its positions; --model is then this folder")
    tokenizer: str | None = option(None, "tokenizer folder (vocab.txt / tokenizer.json) or Hub model id; if not "
                                   "given, one is trained on --corpus into OUT_DIR/tokenizer (or, with --model-dir, "
                                   "its own)")
    vocab_size: int = option(8000, "size of the vocabulary trained when no --tokenizer is given")
    data: str | None = option(None, "prepared corpus folder (from `bertkit prepare`); if not given, --corpus is "
                              "prepared into OUT_DIR/data")
    corpus: list[str] = field(default_factory=default_corpus, metadata={
        "help": "raw text files, folders or globs, read when --tokenizer or --data is not given "
                "($BERTKIT_DATA/corpus/python-docs-3.11.txt, else ../shared/data/corpus/python-docs-3.11.txt)"})
    format: Literal["auto", "bert", "docs", "jsonl"] = option("auto", "layout of the --corpus files, as for `bertkit "
                                                              "prepare`; auto guesses per file")
    text_field: str = option("text", "the text field of JSON lines --corpus files")
    max_length: int = option(128, "tokens per example, [CLS] and [SEP] included")
    masking: Literal["token", "wwm", "span"] = option("token", "what is masked: random tokens (BERT), whole words, "
                                                      "or spans of words (SpanBERT)")
    objective: Literal["mlm+nsp", "mlm", "mlm+sop", "ltr"] = option("mlm+nsp", "masked LM plus next-sentence "
                                                                    "prediction (BERT), alone, or plus sentence-order "
                                                                    "prediction (ALBERT); or ltr, a left-to-right LM "
                                                                    "(causal attention, next-token loss, no masking: "
                                                                    "the paper's 'LTR & No NSP')")
    mask_prob: float = option(0.3, "share of tokens chosen for prediction (0.15 in the paper; 0.3 as MosaicBERT won "
                              "the recipe study in docs/findings.md)")
    mask_mix: tuple[int, int, int] = option((80, 10, 10), "what a token chosen for prediction becomes, in percent: "
                                            "[MASK], itself, a random token (the paper's appendix compares 100 0 0, "
                                            "80 0 20, 80 20 0, 0 20 80, 0 0 100)")
    dropout: float | None = option(0.0, "dropout (hidden and attention) while pretraining: 0 as Cramming and "
                                   "MosaicBERT (the recipe study's choice); the saved config keeps the model's own "
                                   "rates for fine-tuning (unset: the model's, 0.1 in every preset, as the paper)")
    batch_size: int = option(32, "examples per process per micro-step; the global batch is this x processes x "
                             "--grad-accum")
    grad_accum: int = option(1, "micro-steps whose gradients are summed into one optimizer step")
    batch_ramp: float = option(0.0, "batch-size ramp (Cramming): the global batch grows linearly from --batch-size x "
                               "processes to its full size (x --grad-accum, above 1) over this share of --max-steps "
                               "(0: none)")
    optimizer: Literal["adamw", "lamb"] = option("adamw", "AdamW (the paper's Adam) or LAMB (for very large batches)")
    lr: float = option(1e-3, "peak learning rate, reached after warm-up, then decayed linearly to 0 at --max-steps "
                       "(1e-3 won the recipe study for mini with dropout off; the paper used 1e-4 for base)")
    betas: tuple[float, float] = option((0.9, 0.999), "Adam/LAMB beta1 beta2")
    weight_decay: float = option(0.01, "decoupled weight decay (not on biases and LayerNorm)")
    warmup: float = option(0.1, "warm-up: a fraction of --max-steps if below 1, else a number of steps")
    schedule: Literal["linear", "triangle"] = option("linear", "learning rate: linear warm-up then linear decay to "
                                                     "0 (BERT), or Cramming's triangle: from a quarter of --lr up to it "
                                                     "at 75%% of --max-steps, then down to 0 (--warmup unused)")
    max_steps: int = option(300, "optimizer steps to train for")
    stop_at: int | None = option(None, "end the run after this step, its learning-rate schedule still the one of "
                                 "--max-steps, so that `--resume auto` without it continues the same run; the first "
                                 "phase of MLM first (README, Pretraining)")
    then: list[str] | None = option(None, "a second phase in the same run folder, after --max-steps (or --stop-at): "
                                    "KEY=VALUE settings that replace the first phase's, max_steps=N its length "
                                    f"(keys: {', '.join(THEN_KEYS)}). It starts from the first phase's weights with "
                                    "a fresh optimizer, warm-up and schedule (no batch ramp), reads the data from "
                                    "the start in its own form, and counts its steps on from the first's. MLM "
                                    "first: --objective mlm --max-steps 6400 --stop-at 3600 --then "
                                    "objective=mlm+nsp max_steps=2800; the paper's long inputs last: --then "
                                    "max_length=512 max_steps=N")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping)",
                                  aliases=("--clip-norm",))
    max_bad_steps: int = option(5, "a step whose loss is nan or inf is skipped (no update; counted in train.csv's "
                                "skipped_steps); this many in a row stop the run with an error")
    precision: Literal["fp32", "bf16", "fp16"] = option("fp32", "autocast precision; bf16 and fp16 only where "
                                                        "the hardware has them (fp16 on CUDA, with loss scaling), else "
                                                        "fp32")
    seed: int = option(0, "seed of the initial weights, the data (plan, masking, order) and dropout")
    log_every: int = option(10, "steps between train.csv / TensorBoard rows")
    eval_every: int = option(100, "steps between held-out evaluations (0: only at the end)")
    eval_batches: int = option(20, "held-out batches per evaluation (the same examples every time)")
    save_every: int = option(100, "steps between checkpoints (0: only at the end)")
    keep_last: int = option(2, "checkpoints kept, newest first (0: keep all)")
    out_dir: str = option("runs/pretrain", "folder of this run: config, logs, plot, checkpoints",
                          aliases=("--run-dir",))
    resume: str | None = option(None, "continue from a checkpoint folder, or 'auto' for the newest whole one in "
                                "OUT_DIR/checkpoints (checked against the checksums written with it; a damaged one is "
                                "set aside for the one before; a fresh start if there is none, an error if none is "
                                "whole)")
    overwrite: bool = option(False, "start over in a OUT_DIR that holds an earlier run (its checkpoints, logs and "
                             "config are deleted; tokenizer/ and data/ built from --corpus are kept if built from the "
                             "same --corpus and --vocab-size) or files that bertkit did not write (left as they are)")
    num_workers: int = option(0, "DataLoader worker processes per training process (0: load in the main process)")
    threads: int | None = option(None, "CPU threads for torch per process; unset: the cores the last minute's load "
                                 "average leaves idle, shared by the processes of this machine, 1 to 16")
    activation_checkpointing: bool = option(False, CHECKPOINTING_HELP)
    compile: bool = option(False, "torch.compile the encoder blocks (dynamic shapes): faster steps once the first step "
                           "has compiled them (tens of seconds; on CPU a C++ compiler is needed)")
    compile_mode: Literal["dynamic", "static"] = option("dynamic", "with --compile: dynamic (one graph for every "
                                                        "token count) or static (a graph per shape, batches kept "
                                                        "padded: give --pad-to-multiple-of; 1.26x eager for base at "
                                                        "length 128 on an H200)")
    pad_to_multiple_of: int = option(1, "length bucketing: pad each batch to a multiple of this many positions (at "
                                     "most --max-length), so that batches come in a few shapes (for compiled graphs "
                                     "on a GPU); the padding is masked: the same results but for dropout's masks, "
                                     "drawn over the padded length")

    def __post_init__(self):
        try:
            self.betas = tuple(float(b) for b in self.betas)
        except (TypeError, ValueError):
            raise BertkitError(f"pretrain config: betas={self.betas} (expected two numbers in [0, 1))") from None
        try:
            self.mask_mix = tuple(int(p) for p in self.mask_mix)
        except (TypeError, ValueError):
            raise BertkitError(f"pretrain config: mask_mix={self.mask_mix} (expected three whole percentages that "
                               "sum to 100, such as 80 10 10)") from None
        self.corpus = [str(c) for c in self.corpus or ()]  # null in a saved config whose run did not read it
        if self.model_dir is not None:
            self.model = self.model_dir  # its config.json is the architecture: the saved config says so, not a preset
            if self.tokenizer is None:
                self.tokenizer = self.model_dir  # a model's weights belong with its own vocabulary

        def finite(value) -> bool:  # nan and inf pass some comparisons (inf > 0) and fail others silently
            return isinstance(value, (int, float)) and math.isfinite(value)

        problems = [
            f"{name}={getattr(self, name)} (expected {want})"
            for name, ok, want in (
                ("batch_size", self.batch_size >= 1, ">= 1"),
                ("grad_accum", self.grad_accum >= 1, ">= 1"),
                ("pad_to_multiple_of", self.pad_to_multiple_of >= 1, ">= 1"),
                ("batch_ramp", 0 <= self.batch_ramp <= 1, "in [0, 1]"),
                ("max_steps", self.max_steps >= 1, ">= 1"),
                ("stop_at", self.stop_at is None or 1 <= self.stop_at <= self.max_steps, "1 to max_steps, or unset"),
                ("lr", finite(self.lr) and self.lr > 0, "a finite number > 0"),
                ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
                ("mask_prob", 0 < self.mask_prob < 1, "in (0, 1)"),
                ("dropout", self.dropout is None or 0 <= self.dropout < 1, "in [0, 1)"),
                ("mask_mix", len(self.mask_mix) == 3 and min(self.mask_mix) >= 0 and sum(self.mask_mix) == 100,
                 "three whole percentages that sum to 100"),
                ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
                ("warmup", finite(self.warmup) and self.warmup >= 0, "a finite number >= 0"),
                ("max_grad_norm", finite(self.max_grad_norm) and self.max_grad_norm >= 0, "a finite number >= 0 (0: no clipping)"),
                ("max_bad_steps", self.max_bad_steps >= 1, ">= 1"),
                ("log_every", self.log_every >= 1, ">= 1"),
                ("eval_every", self.eval_every >= 0, ">= 0"),
                ("eval_batches", self.eval_batches >= 1, ">= 1"),
                ("save_every", self.save_every >= 0, ">= 0"),
                ("keep_last", self.keep_last >= 0, ">= 0"),
                ("num_workers", self.num_workers >= 0, ">= 0"),
                ("threads", self.threads is None or 1 <= self.threads <= distributed.MAX_THREADS,
                 f"1 to {distributed.MAX_THREADS}, or unset"),
            )
            if not ok
        ]
        if self.overwrite and self.resume is not None:
            problems.append(f"overwrite with resume={self.resume} (expected one of them: --overwrite starts over, "
                            "--resume continues)")
        if finite(self.warmup) and self.warmup >= 1 and self.warmup != int(self.warmup):  # 2.5 was cut to 2 steps
            problems.append(f"warmup={self.warmup:g} (expected a whole number of steps, or a fraction of the run "
                            "below 1)")
        if self.schedule != "triangle" and finite(self.warmup) and 1 <= self.max_steps <= self.warmup:
            problems.append(f"warmup={self.warmup:g} steps with max_steps={self.max_steps} (expected a fraction below "
                            "1 or fewer steps than max_steps: the lr would never reach its peak, nor decay)")
        if self.batch_ramp > 0 and self.grad_accum == 1:  # the ramp adds micro-steps: with one, nothing would grow
            problems.append(f"batch_ramp={self.batch_ramp} with grad_accum=1 (expected --grad-accum above 1: the "
                            "ramp grows a step from 1 micro-batch to --grad-accum, from --batch-size x processes to "
                            "the global batch)")
        if self.then is not None:
            try:
                second = self.second_phase()
            except BertkitError as e:
                problems.append(str(e).removeprefix("pretrain config: "))
            else:
                if OBJECTIVES[second.objective].causal != OBJECTIVES[self.objective].causal:
                    problems.append(f"then objective={second.objective} after objective={self.objective} (expected "
                                    "both phases left-to-right or neither: a causal model attends otherwise)")
        if problems:
            raise BertkitError("pretrain config: " + "; ".join(problems))

    def second_phase(self) -> PretrainConfig | None:
        """The settings of --then's phase: this run's, with --then's replacing them (None without --then)."""
        if self.then is None:
            return None
        settings = then_settings(self.then)
        try:
            return dataclasses.replace(self, **settings, then=None, stop_at=None, batch_ramp=0.0)
        except BertkitError as e:
            raise BertkitError(f"then={' '.join(self.then)}: {str(e).removeprefix('pretrain config: ')}") from None


def then_settings(items: list[str]) -> dict:
    """--then's KEY=VALUE items as typed PretrainConfig fields (a key may be written with dashes)."""
    hints = typing.get_type_hints(PretrainConfig)
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in THEN_KEYS:
            raise BertkitError(f"then={item!r} (expected KEY=VALUE, KEY one of {', '.join(THEN_KEYS)})")
        if key in settings:
            raise BertkitError(f"then={item!r} (expected each key once; {key} is given twice)")
        kind = hints[key]
        if typing.get_origin(kind) is Literal:
            if value not in typing.get_args(kind):
                raise BertkitError(f"then={item!r} (expected {key} one of {', '.join(typing.get_args(kind))})")
            settings[key] = value
            continue
        try:
            settings[key] = kind(value)
        except ValueError:
            raise BertkitError(f"then={item!r} (expected {'a whole' if kind is int else 'a'} number)") from None
    if "max_steps" not in settings:
        raise BertkitError(f"then={' '.join(items)} (expected max_steps=N among them: the second phase's steps)")
    return settings


# ---------------------------------------------------------------------------------------------------------------
# Inputs: vocabulary, prepared corpus, model config


def built_from(cfg: PretrainConfig) -> dict:
    """The inputs of the folders a run builds: the corpus files (with their sizes), the vocabulary size when it
    trains the vocabulary, the tokenizer when it is given."""
    from bertkit.data.corpus import expand_inputs

    record = {"corpus": [[str(f.resolve()), f.stat().st_size] for f in expand_inputs(cfg.corpus)]}
    # the reading options only when not the defaults, so that folders recorded before they existed still match
    record |= {key: getattr(cfg, key) for key in ("format", "text_field")
               if getattr(cfg, key) != getattr(PretrainConfig, key)}
    return record | ({"tokenizer": str(Path(cfg.tokenizer).resolve())} if cfg.tokenizer else
                     {"vocab_size": cfg.vocab_size})


_INPUT_FLAGS = {"corpus": "--corpus", "format": "--format", "text_field": "--text-field",
                "vocab_size": "--vocab-size", "tokenizer": "--tokenizer"}


def build_inputs(cfg: PretrainConfig, run_dir: Path, fresh: bool = True,
                 remedy: str = "--overwrite (or another --out-dir) to start over") -> tuple[str, str]:
    """The tokenizer and prepared-data folders: the given ones, or built from --corpus inside the run folder.

    Folders built from other inputs (another --corpus, --vocab-size or --tokenizer, by the record beside them) are
    built again for a `fresh` run and refused otherwise, naming the `remedy` (a resumed run, an ablation grid's
    shared inputs): prepare would have added the new files to the old data, and the old vocabulary would have
    stayed."""
    from bertkit.data.corpus import expand_inputs
    from bertkit.data.prepare import prepare
    from bertkit.tokenizer import Tokenizer, train_vocab

    run_dir.mkdir(parents=True, exist_ok=True)
    built = [name for name, given in (("tokenizer", cfg.tokenizer), ("data", cfg.data)) if not given]
    record = built_from(cfg) if built else None
    present = [name for name in built if (run_dir / name).exists()]
    if record is not None and present:
        try:
            earlier = json.loads((run_dir / INPUTS_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            earlier = None
        if not isinstance(earlier, dict):
            earlier = record  # built before this record existed: taken as they are
        changed = ", ".join(flag for key, flag in _INPUT_FLAGS.items() if earlier.get(key) != record.get(key))
        if changed:
            folders = " and ".join(f"{name}/" for name in present)
            if not fresh:
                raise BertkitError(f"{run_dir}: {folders} were built from other inputs ({changed}); expected the "
                                   f"inputs they were built from, or {remedy}")
            remove(run_dir, present)
            logger.warning("%s: %s built from other inputs (%s): built again", run_dir, folders, changed)
            present = []
    if record is not None and not present:
        write_json(run_dir / INPUTS_NAME, record)
    tokenizer_dir = Path(cfg.tokenizer) if cfg.tokenizer else run_dir / "tokenizer"
    if not cfg.tokenizer and not tokenizer_dir.is_dir():
        files = expand_inputs(cfg.corpus)
        print(f"training a {cfg.vocab_size}-token WordPiece vocabulary on {len(files)} file(s) into {tokenizer_dir}")
        tmp = run_dir / ".tmp-tokenizer"
        train_vocab(files, tmp, vocab_size=cfg.vocab_size, fmt=cfg.format, text_field=cfg.text_field,
                    show_progress=False)
        os.replace(tmp, tokenizer_dir)  # a vocabulary half-written by a killed run is never picked up
    data_dir = Path(cfg.data) if cfg.data else run_dir / "data"
    if not cfg.data:  # resumable: files already in the manifest are skipped
        print(prepare(cfg.corpus, Tokenizer.from_pretrained(tokenizer_dir), data_dir, fmt=cfg.format,
                      text_field=cfg.text_field))
    return str(tokenizer_dir), str(data_dir)


def model_config(cfg: PretrainConfig, tokenizer) -> BertConfig:
    """The preset or config.json, sized to the tokenizer's vocabulary; with --model-dir, that model's config."""
    if cfg.model_dir is not None:
        config = BertConfig.load(cfg.model_dir)
        if config.vocab_size != tokenizer.vocab_size:
            raise BertkitError(f"--model-dir {cfg.model_dir} has vocab_size {config.vocab_size}, the tokenizer "
                               f"{cfg.tokenizer} {tokenizer.vocab_size} tokens; expected the model's own tokenizer")
    elif cfg.model in PRESETS:
        config = BertConfig.from_preset(cfg.model, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
    else:
        config = BertConfig.load(cfg.model)
        if config.vocab_size != tokenizer.vocab_size:
            logger.warning("%s: vocab_size %d replaced by the tokenizer's %d", cfg.model, config.vocab_size,
                           tokenizer.vocab_size)
            config.vocab_size = tokenizer.vocab_size
        config.pad_token_id = tokenizer.pad_id
    config.is_decoder = OBJECTIVES[cfg.objective].causal  # a left-to-right model keeps its causal mask when fine-tuned
    if cfg.max_length > config.max_position_embeddings:
        raise BertkitError(f"max_length={cfg.max_length}; expected at most the model's max_position_embeddings "
                           f"({config.max_position_embeddings})")
    return config


def most_frequent_token(dataset) -> int:
    """The most frequent predictable token of the training split: the unigram baseline's answer to every mask."""
    corpus = dataset.corpus
    counts = np.zeros(corpus.vocab_size, np.int64)
    for shard in range(len(corpus.shards)):
        tokens = corpus.shard_arrays(shard)[0]
        for start in range(0, len(tokens), 1 << 22):  # bounded memory on a big shard
            counts += np.bincount(tokens[start : start + (1 << 22)], minlength=corpus.vocab_size)
    counts[dataset.vocab.special] = 0  # never a masking target
    return int(counts.argmax())


# ---------------------------------------------------------------------------------------------------------------
# The step and evaluation

# Sums a step or an evaluation accumulates; metrics are ratios of them, taken after summing over processes.
SUMS = ("loss", "masked_lm_loss", "mlm_correct", "mlm_total", "sentence_correct", "sentence_total", "tokens",
        "batches", "unigram_correct")


def forward(model, batch: dict[str, torch.Tensor]):
    """The pretraining forward; the vocabulary projection runs on the masked positions only."""
    return model(
        batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
        labels=batch["labels"], next_sentence_label=batch.get("next_sentence_label"),
        masked_positions=batch["labels"] != -100,
    )


def batch_sums(out, batch: dict[str, torch.Tensor], top_token: int) -> torch.Tensor:
    """(len(SUMS),) counts of one batch, kept on the device so a step never waits for the host."""
    targets = batch["labels"][batch["labels"] != -100]  # (N,), in the order of prediction_logits' rows
    zero = out.masked_lm_loss.new_zeros(())
    sentence = batch.get("next_sentence_label")
    sentence_loss = out.next_sentence_loss if out.next_sentence_loss is not None else zero
    mlm_loss = out.masked_lm_loss if targets.numel() else zero  # a mean over no token is nan
    values = [
        (mlm_loss + sentence_loss).detach().float(),  # the model's loss (a step weights its own)
        mlm_loss.detach().float(),
        (out.prediction_logits.argmax(-1) == targets).sum(),
        targets.new_tensor(targets.numel()),
        (out.seq_relationship_logits.argmax(-1) == sentence).sum() if sentence is not None else zero,
        targets.new_tensor(sentence.numel()) if sentence is not None else zero,
        batch["attention_mask"].sum(),
        zero + 1,
        (targets == top_token).sum(),
    ]
    return torch.stack([v.float() for v in values])


def metrics(sums: torch.Tensor, objective: str) -> dict[str, float]:
    """Mean losses and accuracies from summed counts (nan when no batch was counted: every step skipped)."""
    s = dict(zip(SUMS, sums.tolist()))
    nan = float("nan")
    out = {
        "loss": s["loss"] / s["batches"] if s["batches"] else nan,
        "masked_lm_loss": s["masked_lm_loss"] / s["batches"] if s["batches"] else nan,
        "masked_lm_accuracy": s["mlm_correct"] / s["mlm_total"] if s["mlm_total"] else nan,
    }
    if OBJECTIVES[objective].metric:
        out[OBJECTIVES[objective].metric] = s["sentence_correct"] / s["sentence_total"] if s["sentence_total"] else nan
    return out


def train_step(model, micro_batches: list, optimizer, scheduler, precision: Precision, max_grad_norm: float,
               d: Distributed, top_token: int) -> tuple[torch.Tensor, bool]:
    """One optimizer step over this process's micro-batches (the shared `bertkit.train.step.train_step`); returns
    their summed counts and whether the update was made (not when the loss or the gradients are nan or inf).

    The step is the one the union of every process's micro-batches would take as one batch: a micro-batch's
    masked-LM loss (a mean over its masked tokens) counts in proportion to its share of the step's masked tokens,
    which differ from batch to batch, not equally; the sentence loss is a mean over examples, as many in each."""
    sums = torch.zeros(len(SUMS), device=d.device)
    masked = [(batch["labels"] != -100).sum() for batch in micro_batches]
    total = distributed.all_reduce_sum(torch.stack(masked).sum().to(d.device, torch.float32).reshape(1), d)
    # shared_step divides each loss by the micro-batches, DDP averages the gradients over the processes
    total = total.clamp_min(1).reshape(())
    weights = iter([n.to(d.device) * (len(micro_batches) * d.world_size) / total for n in masked])

    def weighted(model, batch):
        out = forward(model, batch)
        sentence = out.next_sentence_loss if out.next_sentence_loss is not None else 0
        # A micro-batch with no masked token (short examples under whole-word or span masking can have none) has
        # weight 0 and a nan mean; 0 x nan would skip the whole step
        weight = next(weights)
        return dataclasses.replace(out, loss=torch.where(weight > 0, out.masked_lm_loss * weight, 0.0) + sentence)

    _, ok = shared_step(model, micro_batches, optimizer, scheduler, precision, max_grad_norm, d.device, d,
                        forward=weighted, on_output=lambda out, batch: sums.add_(batch_sums(out, batch, top_token)))
    return sums, ok


@torch.no_grad()
def evaluate(model, loader, precision: Precision, top_token: int, objective: str, d: Distributed) -> dict[str, float]:
    """Held-out loss, MLM and sentence accuracy, and the unigram baseline on the same masked positions."""
    model.eval()
    sums = torch.zeros(len(SUMS), device=d.device)
    # The masked-LM loss over every held-out masked token, as accuracy is (and `bertkit perplexity`): metrics' mean of
    # batch means gave the last, short batch's few tokens as much weight as a full batch's
    token_loss = torch.zeros(1, device=d.device)
    for batch in loader:
        batch = {k: v.to(d.device) for k, v in batch.items()}
        with precision.autocast():
            out = forward(model, batch)
        sums += batch_sums(out, batch, top_token)
        count = (batch["labels"] != -100).sum()
        token_loss += torch.where(count > 0, out.masked_lm_loss.float() * count, 0.0)  # no token: the mean is nan
    model.train()
    distributed.all_reduce_sum(sums, d)
    distributed.all_reduce_sum(token_loss, d)
    s = dict(zip(SUMS, sums.tolist()))
    masked_lm_loss = token_loss.item() / s["mlm_total"] if s["mlm_total"] else float("nan")
    return {**metrics(sums, objective), "masked_lm_loss": masked_lm_loss,
            "unigram_baseline_accuracy": s["unigram_correct"] / max(s["mlm_total"], 1)}


def score_held_out(model_dir: str | Path, tokenizer_dir: str | Path, data_dir: str | Path, *,
                   objective: str = "mlm+nsp", max_length: int = 128, mask_prob: float = 0.15,
                   batch_size: int = 32) -> dict[str, float]:
    """A pretrained model's masked LM on every held-out example of a prepared corpus, with masking shared by all
    models (token masking at `mask_prob` with the 80/10/10 mix, drawn with seed 0, examples of `max_length` tokens
    in `objective`'s input form: pairs for NSP and SOP, one stretch of text for MLM only). A run's own evaluation
    masks as it was trained (whole words, spans, another rate or mix), so its numbers do not compare across runs
    that differ in masking; these do. Returns the masked-LM loss, its perplexity and accuracy, the unigram baseline
    on the same positions, the sentence task's accuracy where `objective` has one, and the parameter count."""
    from bertkit.checkpoint import list_checkpoints
    from bertkit.data.pretraining import PretrainingDataset
    from bertkit.data.shards import PreparedCorpus
    from bertkit.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    if (model_dir / "checkpoints").is_dir():  # a run folder: its newest checkpoint
        model_dir = list_checkpoints(model_dir / "checkpoints")[-1]
    model = BertForPreTraining.from_pretrained(model_dir)
    if model.config.is_decoder:
        raise BertkitError(f"{model_dir}: a left-to-right model (is_decoder); a masked LM score needs a "
                           "bidirectional one (its own next-token evaluation is in its run's eval.csv)")
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    options = dict(max_length=max_length, objective=objective, mask_prob=mask_prob, seed=0)
    held_out = PretrainingDataset(PreparedCorpus(data_dir, "heldout"), tokenizer, **options)
    top_token = most_frequent_token(PretrainingDataset(PreparedCorpus(data_dir, "train"), tokenizer, **options))
    d = Distributed()
    result = evaluate(model, eval_loader(held_out, batch_size, len(held_out), d), resolve("fp32", d.device),
                      top_token, objective, d)
    result.pop("loss")  # the sum with the sentence task's loss: not comparable across objectives
    return {**result, "masked_lm_perplexity": math.exp(result["masked_lm_loss"]), "examples": len(held_out),
            "parameters": sum(p.numel() for p in model.parameters()), "objective": objective,
            "max_length": max_length, "mask_prob": mask_prob}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: where to resume, what to save


@dataclass
class Position:
    """How far the run is: optimizer steps done, and the epoch and its examples consumed (the data position)."""

    step: int = 0
    epoch: int = 0
    example_in_epoch: int = 0
    train_seconds: float = 0.0  # loading and stepping, summed over every resume (evaluation and saving left out)


@dataclass
class Phase:
    """A stretch of the run with its own settings, optimizer and schedule: the run's flags up to --max-steps (or
    --stop-at), then --then's. Steps are counted over the whole run; a phase's optimizer counts its own."""

    cfg: PretrainConfig
    index: int
    first_step: int  # the run's steps before this phase
    end: int  # the run's step this phase stops after

    def __str__(self) -> str:
        return f"phase {self.index + 1}, steps {self.first_step + 1}-{self.end}"


def phases(cfg: PretrainConfig) -> list[Phase]:
    first = Phase(cfg, 0, 0, cfg.stop_at or cfg.max_steps)
    second = cfg.second_phase()
    return [first] + ([Phase(second, 1, first.end, first.end + second.max_steps)] if second else [])


def find_resume(cfg: PretrainConfig, checkpoints: Path) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start; refuses to overwrite a run by accident.

    --resume auto takes the newest checkpoint that passes its checksums (a damaged one is set aside with a notice
    and the one before it is taken); without --resume a folder holding checkpoints is refused, naming the options.
    """
    if cfg.resume is None:
        found = list_checkpoints(checkpoints)
        if found:
            raise BertkitError(f"{checkpoints}: holds checkpoints of an earlier run (newest {found[-1].name}); "
                               "expected --resume auto to continue it, --overwrite to start over, or another --out-dir")
        return None
    if cfg.resume == "auto":
        return usable_checkpoint(checkpoints)
    path = Path(cfg.resume)
    problem = verify_checkpoint(path) if path.is_dir() else "no such folder"
    if problem:
        raise BertkitError(f"{path}: {problem}; expected a whole training checkpoint (a step-N folder holding "
                           f"{TRAINING_STATE_NAME} and its completion marker)")
    return path


def open_run_dir(cfg: PretrainConfig, run_dir: Path) -> Path | None:
    """Check the run folder and make it ready (run on rank 0, which holds its lock): returns the checkpoint to
    continue from, or None to start from step 0 with the folder cleared of an earlier attempt's logs."""
    checkpoints = run_dir / "checkpoints"
    if cfg.overwrite:
        removed = remove(run_dir, OUTPUTS)
        if removed:
            logger.warning("%s: --overwrite: deleted %s of an earlier run", run_dir, ", ".join(removed))
        return None
    resume_from = find_resume(cfg, checkpoints)
    if resume_from is None:
        logs = remove(run_dir, LOGS)
        if logs:
            logger.warning("%s: an earlier attempt stopped before its first checkpoint; starting over (its %s "
                           "deleted)", run_dir, ", ".join(logs))
    return resume_from


def claim_run_dir(cfg: PretrainConfig, run_dir: Path) -> RunLock:
    """Refuse a run folder that is a file, one of the run's inputs, or a folder holding files no pretraining run
    wrote (unless --overwrite); then lock it."""
    check_output_path(run_dir, "--out-dir", {"--tokenizer": cfg.tokenizer, "--data": cfg.data,
                                             "--model-dir": cfg.model_dir})
    if not (cfg.tokenizer and cfg.data):  # the corpus is read: a run folder inside one of its folders is read with
        for entry in cfg.corpus:  # it, its config, logs and the vocabulary it trained becoming corpus text
            if Path(entry).is_dir():
                check_output_path(run_dir, "--out-dir", {"--corpus": entry})
    found = entries(run_dir)
    if found and CONFIG_NAME not in found and not cfg.overwrite:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise BertkitError(f"{run_dir}: not a pretraining run folder (no {CONFIG_NAME}; holds {shown}); expected a "
                           "new or empty --out-dir, or --overwrite to write into it")
    return RunLock(run_dir).acquire()


def data_signature(cfg: PretrainConfig, batches: PretrainBatches) -> dict:
    """What fixes the example stream; a resumed run must match it to read on where the first run stopped."""
    corpus = batches.dataset.corpus
    # A ramp grows from one micro-batch on every process: its first batches are --batch-size x processes, so the same
    # global batch split otherwise (2 processes instead of 2 micro-steps) ramps otherwise and reads other examples.
    ramp = {"ramp_first_batch": batches.batch_size * batches.d.world_size} if batches.ramp_steps else {}
    return {"corpus": f"{corpus.tokenizer_fingerprint[:16]}/{corpus.num_tokens}", "global_batch": batches.global_batch,
            "ramp_steps": batches.ramp_steps, **ramp,
            "max_length": cfg.max_length, "masking": cfg.masking, "mask_prob": cfg.mask_prob, "objective": cfg.objective,
            "seed": cfg.seed, **({"mask_mix": list(cfg.mask_mix)} if cfg.mask_mix != (80, 10, 10) else {})}


def training_state(pos: Position, optimizer, scheduler, precision: Precision, signature: dict, cfg: PretrainConfig,
                   d: Distributed) -> dict:
    """Everything besides the weights that the next step depends on (every rank's RNG, gathered to rank 0)."""
    return {
        **dataclasses.asdict(pos),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": precision.scaler.state_dict(),
        "rng": distributed.all_gather_object(rng_state(), d),
        "data": signature,
        "config": dataclasses.asdict(cfg),
    }


def log_window(run: Run) -> dict:
    """The part of train.csv's next row that a checkpoint keeps: the sums over every process (a collective: every rank
    calls it), rank 0's seconds, and the skipped-step counts."""
    sums = run.window.clone()
    distributed.all_reduce_sum(sums, run.d)
    b = run.bad_steps
    return {"sums": sums.tolist(), "seconds": run.window_seconds,
            "bad_steps": [b.in_row, b.total, b.window, b.first_in_row]}


def restore_log_window(state: dict, run: Run) -> None:
    """Put back `log_window` of a checkpoint: the sums on rank 0 alone (they are summed over processes at the next
    row, whatever their number now), the skipped-step counts on every rank. A checkpoint written before it was kept
    has none: the next row then covers the steps since the checkpoint."""
    saved = state.get("log_window")
    if not saved:
        return
    if run.d.is_main:
        run.window = torch.tensor(saved["sums"], dtype=torch.float32, device=run.d.device)
    run.window_seconds = saved["seconds"]
    b = run.bad_steps
    b.in_row, b.total, b.window, b.first_in_row = saved["bad_steps"]


def restore(state: dict, source: Path, optimizer, scheduler, precision: Precision, signature: dict,
            d: Distributed) -> Position:
    """Load a checkpoint's training state (weights are loaded before); returns the position to continue from."""
    saved = state["data"]
    if "ramp_first_batch" in signature and "ramp_first_batch" not in saved:  # written before it was recorded
        saved = {**saved, "ramp_first_batch": signature["ramp_first_batch"]}
    if saved != signature:
        diff = {k: (saved.get(k), v) for k, v in signature.items() if saved.get(k) != v}
        raise BertkitError(f"{source / TRAINING_STATE_NAME}: written for other data settings {diff} (checkpoint, "
                           "now); expected the same corpus, global batch and ramp (a ramp starts at --batch-size x "
                           "processes), max_length, masking, mask_prob, objective and seed")
    # The saved states carry the lr, weight decay and betas of the run that saved them; this run's flags (a lower
    # --lr after non-finite losses, as that stop advises) replace them, the moments and the step count stay.
    given = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for group, values in zip(optimizer.param_groups, given):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # the next step's, as LambdaLR computes it
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    load_scaler(precision, state["scaler"], source)
    rngs = state["rng"]
    if len(rngs) != d.world_size:
        logger.warning("%s: saved by %d processes, resumed by %d: data order is kept, dropout streams are not",
                       source, len(rngs), d.world_size)
    set_rng_state(rngs[d.rank % len(rngs)])
    return Position(state["step"], state["epoch"], state["example_in_epoch"], state.get("train_seconds", 0.0))


# ---------------------------------------------------------------------------------------------------------------
# The loop


def pretrain(cfg: PretrainConfig) -> dict:
    """Pretrain as `cfg` says (one process, or each process under torchrun); returns the final held-out metrics."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    from bertkit.tokenizer import tokenizer_threads

    tokenizer_threads(cfg.threads)  # a vocabulary trained and a corpus prepared here keep to --threads too
    with distributed.torch_threads(cfg.threads, processes):
        d = distributed.setup()
        try:
            return _pretrain(cfg, d)
        finally:
            distributed.teardown(d)


def saved_config(cfg: PretrainConfig) -> dict:
    """The fields as pretrain_config.json keeps them: the paths of the inputs absolute, so that whoever reads the run
    folder from another directory (ablate scoring a cell, benchmarks/heldout_curve.py) finds its vocabulary, corpus
    and starting model, not a namesake there. Not --out-dir: the run is wherever its folder is read from. Inputs the
    run did not use are null: with --tokenizer the vocabulary size, with --tokenizer and --data the corpus and how it
    is read (their defaults named the python-docs corpus for a run that read another)."""
    # a glob in --corpus too: its pattern is only joined to the folder it was typed in
    paths = ("model_dir", "tokenizer", "data", "corpus", *(() if cfg.model in PRESETS else ("model",)))
    saved = absolute_paths(dataclasses.asdict(cfg), paths)
    unused = (("vocab_size",) if cfg.tokenizer else ()) + (("corpus", "format", "text_field") if cfg.tokenizer and
                                                           cfg.data else ())
    return saved | dict.fromkeys(unused)


def check_model(cfg: PretrainConfig) -> None:
    """Raise unless --model is a preset or a readable config.json, and --then's length fits its positions: said
    before a vocabulary is trained (or an ablation grid's corpus prepared, or a first phase trained) for a model
    that cannot be built."""
    config = None
    if cfg.model_dir is None and cfg.model not in PRESETS:
        if not Path(cfg.model).exists():
            raise BertkitError(f"--model {cfg.model}: neither a preset nor a file; expected one of "
                               f"{', '.join(PRESETS)} or the path of a config.json")
        config = BertConfig.load(cfg.model)
    second = cfg.second_phase()
    if second is not None and second.max_length > cfg.max_length:
        config = config or (BertConfig.from_preset(cfg.model) if cfg.model_dir is None else BertConfig.load(cfg.model))
        if second.max_length > config.max_position_embeddings:
            raise BertkitError(f"--then max_length={second.max_length}; expected at most the model's "
                               f"max_position_embeddings ({config.max_position_embeddings}), or a longer model from "
                               "`bertkit extend`")


def _pretrain(cfg: PretrainConfig, d: Distributed) -> dict:
    check_model(cfg)
    run_dir = Path(cfg.out_dir)
    held: list[RunLock] = []

    def claim() -> Path | None:
        held.append(claim_run_dir(cfg, run_dir))
        resume_from = open_run_dir(cfg, run_dir)
        if not (run_dir / CONFIG_NAME).is_file():  # new or empty: it is this run's from now on, even if killed early
            write_json(run_dir / CONFIG_NAME, saved_config(cfg))
        return resume_from

    try:
        resume_from = distributed.run_on_main(claim, d)
        return _train(cfg, d, run_dir, resume_from)
    finally:
        for lock in held:
            lock.release()


@dataclass
class Run:
    """Everything the loop needs, built by `set_up`: the model (and its DDP wrapper), optimizer, schedule,
    precision, batches, held-out loader, logger, the position reached, and how to evaluate and save."""

    plan: list[Phase]
    phase: Phase  # the one under way
    d: Distributed
    run_dir: Path
    resumed_from: Path | None
    tokenizer: object
    model: BertForPreTraining
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    precision: Precision
    batches: PretrainBatches
    held_out: object
    top_token: int
    signature: dict
    log: RunLogger
    bad_steps: NonFiniteSteps
    pos: Position
    examples_per_epoch: int
    # train.csv's next row in the making: this process's SUMS, and the seconds, since the last row. A checkpoint keeps
    # them (`log_window`), so that a run resumed between two rows (after Ctrl-C, SIGTERM, a kill) logs the row an
    # uninterrupted run logs, not one of the steps since the checkpoint alone
    window: torch.Tensor = None  # set_up gives it
    window_seconds: float = 0.0
    started_from: Path | None = None  # the checkpoint that ended the phase before, when this phase starts from it

    @property
    def cfg(self) -> PretrainConfig:
        """The settings of the phase under way."""
        return self.phase.cfg

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def evaluate(self) -> dict:
        result = evaluate(self.model, self.held_out, self.precision, self.top_token, self.cfg.objective, self.d)
        self.log.log("eval", self.pos.step, result)
        sentence = [m for m in dict.fromkeys(OBJECTIVES[p.cfg.objective].metric for p in self.plan) if m]
        self.log.plot(keys=("loss", "masked_lm_accuracy", *(sentence or ["masked_lm_loss"])),
                      marks={p.first_step: f"phase {p.index + 1}" for p in self.plan[1:]})
        return result

    def save(self) -> Path:
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):  # a last guard: no NaN model
            raise BertkitError(f"step {self.pos.step}: the weights hold nan or inf; not saved. Expected finite "
                               f"weights: {self.bad_steps.hint}")
        payload = training_state(self.pos, self.optimizer, self.scheduler, self.precision, self.signature, self.cfg,
                                 self.d)
        payload["log_window"] = log_window(self)
        payload["phase"] = self.phase.index

        def write() -> Path:
            path = save_checkpoint(self.checkpoints, self.pos.step, self.model, self.tokenizer, payload)
            prune_checkpoints(self.checkpoints, self.cfg.keep_last)
            return path

        return distributed.run_on_main(write, self.d)  # a failed save (a full disk) stops every rank with its error


def set_up(plan: list[Phase], index: int, d: Distributed, run_dir: Path, resume_from: Path | None,
           start: Path | None = None) -> Run:
    """Phase `index` of the run: the vocabulary and data (built when not given), the model, optimizer, schedule and
    precision, restored from `resume_from` (a checkpoint of this phase) when given, else fresh from the weights of
    `start` (the checkpoint that ended the phase before) or of --model-dir; the logs cut back to the step."""
    from bertkit.data.pretraining import PretrainingDataset
    from bertkit.data.shards import PreparedCorpus
    from bertkit.tokenizer import Tokenizer

    phase = plan[index]
    cfg = phase.cfg

    tokenizer_dir, data_dir = distributed.run_on_main(lambda: build_inputs(cfg, run_dir, resume_from is None), d)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    options = dict(max_length=cfg.max_length, masking=cfg.masking, objective=cfg.objective, mask_prob=cfg.mask_prob,
                   mask_mix=cfg.mask_mix, seed=cfg.seed)
    train_set = PretrainingDataset(PreparedCorpus(data_dir, "train"), tokenizer, **options)
    eval_set = PretrainingDataset(PreparedCorpus(data_dir, "heldout"), tokenizer, **options)
    train_set.pad_to_multiple_of = eval_set.pad_to_multiple_of = cfg.pad_to_multiple_of
    batches = PretrainBatches(train_set, cfg.batch_size, cfg.grad_accum, d, cfg.num_workers,
                              ramp_steps=round(cfg.batch_ramp * cfg.max_steps))
    signature = data_signature(cfg, batches)

    torch.manual_seed(cfg.seed)
    model = BertForPreTraining(model_config(cfg, tokenizer))
    n = model.num_parameters()
    distributed.run_on_main(lambda: check_free_space(run_dir, checkpoint_bytes(n), f"a checkpoint of this "
                                                     f"{n / 1e6:.1f}M-parameter model"), d)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    if not OBJECTIVES[cfg.objective].pairs:  # no sentence labels: frozen, so that DDP waits for no gradient there
        model.bert.pooler.requires_grad_(False)
        model.cls.seq_relationship.requires_grad_(False)
    state = None
    weights = resume_from or start or cfg.model_dir  # a --model-dir lacking a head leaves it new
    if weights is not None:
        load_state_dict_into(model, read_state_dict(weights), source=str(weights))
    if resume_from or start:
        state = load_training_state(Path(resume_from or start) / TRAINING_STATE_NAME)
        saved_phase, want = state.get("phase", 0), index if resume_from else index - 1
        if saved_phase != want:
            raise BertkitError(f"{resume_from or start}: saved in phase {saved_phase + 1} of its run; expected phase "
                               f"{want + 1} at step {state['step']}: the run's own --max-steps, --stop-at and --then")
    model.to(d.device)
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable()
    if cfg.compile:
        compile_blocks(model, cfg.compile_mode)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, betas=cfg.betas)
    if cfg.schedule == "triangle":
        scheduler = triangle(optimizer, cfg.max_steps)
    else:
        scheduler = warmup_linear(optimizer, warmup_steps_for(cfg.max_steps, cfg.warmup), cfg.max_steps)
    precision = resolve(cfg.precision, d.device)
    if resume_from is not None:
        pos = restore(state, resume_from, optimizer, scheduler, precision, signature, d)
    else:  # the phase's data from its start, the run's step and training time where the phase before left them
        pos = Position(phase.first_step, train_seconds=state.get("train_seconds", 0.0) if state else 0.0)
        torch.manual_seed(cfg.seed * 65536 + d.rank + 1)  # dropout: a stream per process
    if d.is_main and (resume_from or start):  # once the run is sure to go on, so a refused resume changes nothing
        newer = set_aside_newer(run_dir / "checkpoints", pos.step)
        if newer:
            logger.warning("%s: resumed from step %d: the later checkpoints %s continue another run and were moved "
                           "aside (renamed .abandoned-...), so that --resume auto continues this one", run_dir,
                           pos.step, ", ".join(newer))
    log = RunLogger(run_dir, enabled=d.is_main, purge_step=pos.step + 1 if pos.step else None)
    reached = log.truncate(pos.step)
    if reached is not None:
        logger.warning("%s: the logs reach step %d, past the checkpoint at step %d: the rows after it are logged "
                       "again by this run", run_dir, reached, pos.step)
    bad_steps = NonFiniteSteps(cfg.max_bad_steps, f"try a lower --lr (now {cfg.lr:g})"
                               + (", clipping (--max-grad-norm 1)" if not cfg.max_grad_norm else "")
                               + (", bf16 or fp32 instead of fp16" if cfg.precision == "fp16" else "")
                               + "; --resume auto continues from the last checkpoint (or starts over if none "
                               "was saved)")
    run = Run(plan, phase, d, run_dir, resume_from, tokenizer, model, distributed.wrap(model, d), optimizer,
              scheduler, precision, batches, eval_loader(eval_set, cfg.batch_size, cfg.eval_batches, d),
              most_frequent_token(train_set), signature, log, bad_steps, pos, len(train_set),
              torch.zeros(len(SUMS), device=d.device), started_from=start)
    if resume_from is not None:
        restore_log_window(state, run)
    return run


def _train(cfg: PretrainConfig, d: Distributed, run_dir: Path, resume_from: Path | None) -> dict:
    plan = phases(cfg)
    reached = checkpoint_step(resume_from) if resume_from is not None else 0
    index = next((p.index for p in plan if reached < p.end), len(plan) - 1)
    # a checkpoint at a phase's first step is the one that ended the phase before: this one starts from its weights
    start = resume_from if index and reached == plan[index].first_step else None
    run = set_up(plan, index, d, run_dir, None if start else resume_from, start)
    if d.is_main:  # written once the run is sure to start, so a refused resume leaves the folder as it was
        write_json(run_dir / CONFIG_NAME, saved_config(cfg))
    while True:
        if d.is_main:
            print(describe(run))
        try:
            final, path, train_row = loop(run)
        finally:
            run.log.close()
        if run.phase is plan[-1]:
            break
        run = set_up(plan, run.phase.index + 1, d, run_dir, None, start=path)
    if d.is_main:
        shown = {k: round(v, 4) for k, v in final.items()}
        print(f"step {run.pos.step}: held-out {shown}; model {path}; loss curve {run_dir / 'loss_curve.png'}")
    return {**final, "step": run.pos.step, "train_loss": train_row.get("loss"), "checkpoint": str(path),
            "out_dir": str(run_dir), "skipped_steps": run.bad_steps.total, "train_seconds": run.pos.train_seconds}


def describe(run: Run) -> str:
    """What the run (or its phase) is about to do, in a line."""
    cfg, phase = run.cfg, run.phase
    n = run.model.num_parameters()
    if len(run.plan) == 1:
        steps = f", {cfg.max_steps} steps" + (f" (stopping after step {cfg.stop_at})" if cfg.stop_at else "")
    else:
        steps = f", {phase} of {run.plan[-1].end} ({cfg.objective}, length {cfg.max_length}, {cfg.max_steps} steps"
        steps += (f", stopping after {cfg.stop_at}" if cfg.stop_at else "") + ")"
    return (f"pretraining {cfg.model} ({n / 1e6:.1f}M parameters) on {run.examples_per_epoch:,} examples an epoch, "
            f"global batch {run.batches.global_batch} ({run.d.world_size} process(es) x {cfg.grad_accum} x "
            f"{cfg.batch_size})" + (f" after a ramp over {run.batches.ramp_steps} steps" if run.batches.ramp_steps
                                    else "")
            + steps + f", {torch.get_num_threads()} torch thread(s); run folder {run.run_dir}"
            + (f"; resuming at step {run.pos.step} from {run.resumed_from}" if run.resumed_from else "")
            + (f"; from the weights of {run.started_from}" if run.started_from else ""))


def loop(run: Run) -> tuple[dict, Path, dict]:
    """Train from `run.pos` to the end of its phase: log every --log-every steps, evaluate every --eval-every,
    save every --save-every and at the end (or on Ctrl-C or SIGTERM). Returns the final held-out metrics, the last checkpoint
    and the last training row."""
    cfg, d, pos = run.cfg, run.d, run.pos
    end = run.phase.end
    window = run.window  # and run.window_seconds: loading and stepping since the last row (evaluation, saving left out)
    steps = run.batches(pos.epoch, pos.step - run.phase.first_step, pos.example_in_epoch)
    last_saved = pos.step if run.resumed_from is not None else None
    train_row: dict = {}
    task = OBJECTIVES[cfg.objective]
    bar = progress_bar(total=end, initial=pos.step, desc="pretrain", unit="step", disable=not d.is_main)
    with bar, Interrupt() as interrupt:
        while pos.step < end:
            started = time.perf_counter()
            epoch, example_in_epoch, micro_batches = next(steps)
            sums, ok = train_step(run.ddp_model, micro_batches, run.optimizer, run.scheduler, run.precision,
                                  cfg.max_grad_norm, d, run.top_token)
            if ok:  # a skipped step's nan would spoil the window's means
                window += sums
            elapsed = time.perf_counter() - started
            run.window_seconds += elapsed
            pos = run.pos = Position(pos.step + 1, epoch, example_in_epoch, pos.train_seconds + elapsed)
            bar.update(1)
            run.bad_steps.record(ok, pos.step)
            if pos.step % cfg.log_every == 0 or pos.step == end:
                distributed.all_reduce_sum(window, d)
                train_row = {**metrics(window, cfg.objective), "lr": run.scheduler.get_last_lr()[0],
                             "tokens_per_s": window[SUMS.index("tokens")].item() / run.window_seconds, "epoch": epoch,
                             "skipped_steps": run.bad_steps.window}
                run.log.log("train", pos.step, train_row)
                sentence = train_row.get(task.metric) if task.metric else None
                bar.set_postfix(loss=f"{train_row['loss']:.3f}", mlm_acc=f"{train_row['masked_lm_accuracy']:.3f}",
                                **({task.short: f"{sentence:.3f}"} if sentence is not None else {}),
                                lr=f"{train_row['lr']:.2e}", tok_s=f"{train_row['tokens_per_s']:,.0f}",
                                **({"skipped": run.bad_steps.total} if run.bad_steps.total else {}),
                                refresh=False)  # the bar redraws on its own schedule (once a minute into a file)
                window.zero_()
                run.window_seconds, run.bad_steps.window = 0.0, 0
            if cfg.eval_every and pos.step % cfg.eval_every == 0 and pos.step < end:
                run.evaluate()
            if cfg.save_every and pos.step % cfg.save_every == 0 and pos.step < end:
                run.save()
                last_saved = pos.step
            if interrupt.requested(d) and pos.step < end:
                path = run.checkpoints / f"step-{pos.step:08d}" if last_saved == pos.step else run.save()
                raise interrupt.stop(f"checkpoint {path} saved at step {pos.step}; --resume auto continues")
    final = run.evaluate()
    path = run.checkpoints / f"step-{pos.step:08d}" if last_saved == pos.step else run.save()
    return final, path, train_row
