"""Fine-tuning as in the paper: a pretrained encoder plus a task head, AdamW with linear warm-up and decay,
scored on dev after every epoch, the best epoch's model kept (`evaluate` and `predict` on the result: evaluation.py).

A run folder is a model folder (HF layout: config.json, model.safetensors, tokenizer files, id2label) plus the
run's record: finetune_config.json, metrics.json, results.md, train.csv/eval.csv, a classifier's classes.md (per
class scores and confusion matrix) and SQuAD's predictions.json.
While the run lasts it also holds checkpoints/step-N (model, optimizer, schedule, data position, RNG states), at the
end of every epoch and every --save-every steps, for `--resume auto`; they are deleted when the run finishes.

Each optimizer step is the step pretraining takes (`bertkit.train.step`: --grad-accum, --precision, clipping, the
skipped non-finite step); under torchrun the processes share each step's micro-batches and rank 0 alone scores
and writes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from bertkit import hub
from bertkit.checkpoint import (
    SENTENCE_TRANSFORMERS_FILES,
    TRAINING_STATE_NAME,
    atomic_write_text,
    checkpoint_bytes,
    list_checkpoints,
    load_state_dict_into,
    load_training_state,
    model_folder,
    prune_checkpoints,
    read_state_dict,
    rng_state,
    save_checkpoint,
    set_rng_state,
    usable_checkpoint,
    verify_checkpoint,
)
from bertkit.config import BertConfig, option, write_json
from bertkit.data.batching import collate, length_grouped_batches, row_length
from bertkit.data.glue import get_task
from bertkit.errors import BertkitError
from bertkit.adapter import save_adapter
from bertkit.model import LORA_TARGETS, add_lora, compile_blocks, merge_lora, reinit_top_layers
from bertkit.tasks.choice import ChoiceTask, load_choice_task
from bertkit.tasks.classification import CLASSES_FILE, TextTask, load_text_task, splits
from bertkit.tasks.distill import check_distillation, check_teacher_data, distillation_forward, distillation_rows
from bertkit.tasks.inference import check_segments, check_tokenizer
from bertkit.tasks.similarity import EMBEDDING_TASK, SimilarityTask, load_similarity_task
from bertkit.tasks.squad import SquadTask, load_squad_task
from bertkit.tasks.tagging import PREDICTIONS_FILE, TAGS_FILE, TaggingTask, load_tagging_task
from bertkit.tokenizer import Tokenizer
from bertkit.train import distributed
from bertkit.train.distributed import MAX_THREADS, Distributed
from bertkit.train.faults import Interrupt, NonFiniteSteps
from bertkit.train.logs import RunLogger, progress_bar
from bertkit.train.optim import build_optimizer, warmup_linear, warmup_steps_for
from bertkit.train.precision import load_scaler, resolve as resolve_precision
from bertkit.train.rundir import (RunLock, absolute_paths, check_free_space, check_not_in_use, check_output_path,
                                  entries, remove)
from bertkit.train.step import CHECKPOINTING_HELP, train_step as shared_step

logger = logging.getLogger("bertkit")

CONFIG_FILE = "finetune_config.json"
SQUAD_TASKS = ("squad1", "squad2")
TAGGING_TASK = "ner"
CHOICE_TASK = "swag"
# the tasks that are not TextTask's (GLUE, custom)
NON_TEXT_TASKS = (*SQUAD_TASKS, TAGGING_TASK, CHOICE_TASK, EMBEDDING_TASK)
EVAL_DATA_FILE = "eval_data.json"
ADAPTER_DIR = "adapter"  # --lora-rank: the LoRA update and the head alone, in peft's layout
# What a run writes into --out-dir: a folder holding any of these without finetune_config.json is someone else's
WRITTEN = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", CONFIG_FILE, "metrics.json", "results.md", "train.csv", "eval.csv",
           "predictions.json", "predictions_spans.json", "null_odds.json", EVAL_DATA_FILE, CLASSES_FILE, TAGS_FILE,
           PREDICTIONS_FILE, ADAPTER_DIR, *SENTENCE_TRANSFORMERS_FILES, "checkpoints")
RECORDS = ("metrics.json", "results.md", "train.csv", "eval.csv", "checkpoints")
KEEP_CHECKPOINTS = 2  # the newest, and the one before it in case the newest is found damaged
# Fields that change how a run goes, not what it computes: a run resumed or redone may change them
RUNTIME_FIELDS = ("threads", "device", "compile", "compile_mode", "pad_to_multiple_of", "eval_batch_size", "predict",
                  "save_every", "max_bad_steps", "resume", "overwrite")
PATH_FIELDS = ("model_dir", "data_dir", "train_file", "eval_file", "test_file")



@dataclass
class FinetuneConfig:
    """A fine-tuning run; the CLI's `finetune` flags are these fields, and the run folder keeps them as JSON."""

    model_dir: str = option("", "pretrained model folder (HF layout), or a Hugging Face Hub model id, to start "
                            "from")
    from_scratch: bool = option(False, "use only the folder's architecture and tokenizer, with random weights (the "
                                "'no pretraining' baseline)")
    bilstm: bool = option(False, "a randomly initialised BiLSTM between the encoder and the task head (the paper's "
                          "'+ BiLSTM' row of Table 5; saved in config.json, so evaluate and predict use it too)")
    task: str = option("", "a GLUE task (SST-2, MRPC, STS-B, MNLI, ...), squad1, squad2, ner (tagging every word: "
                       "named entities, chunks or parts of speech, from CoNLL files), swag (multiple choice: the "
                       "continuation of a sentence among several, from SWAG's .csv files), embedding (sentence "
                       "vectors, sentence-transformers' bi-encoder, trained on pairs: scored pairs by CoSENT, pairs by "
                       "in-batch negatives, single texts by SimCSE), or custom for your own files")
    out_dir: str = option("runs/finetune", "run folder: the best checkpoint, metrics.json, results.md (a new or "
                          "empty folder, or this same run's; never --model-dir or a folder inside it)")
    data_dir: str | None = option(None, "the task's data folder (GLUE: train.tsv, dev.tsv, test.tsv; MRPC may hold "
                                      "Microsoft's msr_paraphrase_*.txt; SQuAD: train-v*.json, dev-v*.json; ner: "
                                      "train.txt, dev.txt or valid.txt, test.txt, or CoNLL-2003's eng.train, "
                                      "eng.testa, eng.testb; swag: train.csv, val.csv)")
    train_file: str | None = option(None, "training file, instead of the one in --data-dir (custom: .csv/.tsv/.jsonl; "
                                    "ner: a word and its tag per line, the tag in the last column, a blank line "
                                    "between sentences)")
    eval_file: str | None = option(None, "labelled evaluation file, instead of the dev file in --data-dir")
    test_file: str | None = option(None, "GLUE test file for --predict, instead of the one in --data-dir")
    text_a: str = option("sentence", "custom files: the column of the (first) text")
    text_b: str | None = option(None, "custom files: the column of the second text of a pair")
    text_neg: str | None = option(None, "embedding: the column of a hard negative for each pair (a text less like "
                                  "--text-a's than --text-b's is)")
    label: str = option("label", "custom files: the label column (embedding: a pair's gold similarity, where the "
                        "file has the column)")
    regression: bool = option(False, "custom files: the label is a number to regress (one output, MSE)")
    multi_label: bool = option(False, "custom files: each example has any number of the labels (none too), named in "
                               "its label field separated by --label-sep (a .jsonl may hold a list); a sigmoid and "
                               "binary cross-entropy per label, transformers' multi_label_classification; scored by "
                               "micro F1, macro F1 and subset accuracy")
    label_sep: str = option(",", "--multi-label: what separates the labels in a label field")
    label_threshold: float = option(0.5, "--multi-label: a label is predicted when its probability is at least this")
    pos_weight: Literal["none", "balanced"] = option("none", "--multi-label: balanced weighs each label's positive "
                                                     "examples in the loss by its negatives / positives in the "
                                                     "training file (torch's pos_weight), so that a rare label counts "
                                                     "as much as a common one")
    class_weight: Literal["none", "balanced"] = option("none", "classification (a GLUE task or custom, one label "
                                                       "each): balanced weighs each class's examples in the loss by "
                                                       "examples / (classes x that class's examples) in the training "
                                                       "file (sklearn's balanced), so that a rare class counts as "
                                                       "much as a common one")
    teacher: str | None = option(None, "knowledge distillation: a classifier fine-tuned on the same task (its labels; "
                                 "any size or vocabulary) whose outputs become this run's targets: its softmax "
                                 "(multi-label: sigmoids; regression: its score) on every training row, computed "
                                 "once before training; how Google's small BERTs are meant to be fine-tuned")
    distill_temperature: float = option(1.0, "--teacher: both models' logits are divided by this before the "
                                        "softmax, and the loss multiplied by its square (Hinton et al.)")
    distill_alpha: float = option(1.0, "--teacher: its share of the loss; the rest is the usual loss on the labels")
    transfer_file: str | None = option(None, "--teacher: unlabelled texts (.csv/.tsv/.jsonl, the --text-a and "
                                       "--text-b columns) that the teacher labels for the student, shuffled "
                                       "in with the training file's rows (needs --distill-alpha 1)")
    label_all_tokens: bool = option(False, "ner: train on every WordPiece of a word, its tag on its first piece and "
                                    "the others (B-X continued as I-X), as transformers' run_ner.py "
                                    "--label_all_tokens; words are still tagged and scored by their first piece")
    lora_rank: int = option(0, "LoRA (Hu et al. 2021): train a rank-R update of the --lora-targets weights of every "
                            "encoder block and the task head, the rest frozen (0: every weight trains). The run "
                            "folder's model has the update merged in, as any run's; adapter/ holds the update "
                            "alone, in peft's layout (a few MB per task)")
    lora_alpha: float = option(8.0, "--lora-rank: the update is scaled by alpha / rank (peft's lora_alpha)")
    lora_targets: str = option("query,value", "--lora-rank: the block's Linear layers to adapt, by the end of their "
                               f"names, comma-separated, from {', '.join(LORA_TARGETS)}; or all (the paper's "
                               "choice, and the default, is query,value)")
    train_articles: int | None = option(None, "SQuAD: split one file by article, the first N to train, the rest to "
                                        f"score (written to OUT_DIR/{EVAL_DATA_FILE}, the official scripts' dev file)")
    lr: float = option(3e-5, "peak learning rate (the paper searches 5e-5, 4e-5, 3e-5, 2e-5)")
    batch_size: int = option(32, "training batch size")
    epochs: int = option(3, "passes over the training data")
    early_stopping_patience: int = option(0, "stop when this many epochs in a row have not beaten the best epoch's "
                                          "score on dev (the schedule is not shortened; the best epoch is kept as "
                                          "always); 0: run every epoch")
    keep: Literal["best", "last"] = option("best", "the epoch whose model the run folder keeps: the best on the "
                                           "(first) eval data, or the last (no choice made on the eval data, whose "
                                           "score then stays an estimate for unseen data; what `crossval` reports)")
    eval_split: float = option(0.0, "score on this fraction of the training file, held out of training (stratified "
                               "by label, drawn by --split-seed): for a GLUE task or custom files without dev data; "
                               "the held-out rows are the first eval split, any dev file is scored after them")
    folds: int = option(0, "k-fold cross-validation: cut the training file into this many folds, stratified by "
                        "label (drawn by --split-seed), and hold out fold --fold as --eval-split holds out its rows "
                        "(`bertkit crossval` runs every fold)")
    fold: int = option(1, "--folds: the fold held out, 1 to --folds")
    split_seed: int = option(0, "--eval-split, --folds: the seed of the split (not --seed's: runs over several "
                             "seeds hold out the same rows)")
    group: str | None = option(None, "--eval-split, --folds on custom files: a column naming each row's group (its "
                               "document, speaker, patient): whole groups are held out, so that no group is both "
                               "trained on and scored, as related rows would make the score optimistic (with "
                               "--eval-split F: 1 / round(1 / F) of the rows)")
    warmup: float = option(0.1, "linear warm-up: a fraction of all steps (<1) or a step count")
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    layer_lr_decay: float = option(1.0, "layer-wise learning-rate decay (ELECTRA's fine-tuning recipe): the task head "
                                   "and pooler train at --lr, the top encoder block at --lr x this, each block below "
                                   "at this times the lr of the one above it, the embeddings last (1: every layer at "
                                   "--lr; ELECTRA uses 0.8)")
    reinit_layers: int = option(0, "re-initialise the top N encoder blocks (and the pooler) before fine-tuning, as "
                                "Zhang et al. 2021 do for small training sets: the top blocks' pretraining-specific "
                                "weights are drawn afresh instead of unlearned")
    grad_accum: int = option(1, "micro-batches of --batch-size whose gradients are summed into one optimizer step: "
                             "an effective batch of batch-size x grad-accum in the memory of one micro-batch")
    precision: Literal["fp32", "bf16", "fp16"] = option("fp32", "autocast precision of training; bf16 and fp16 only "
                                                        "where the hardware has them (fp16 on CUDA, with loss "
                                                        "scaling), else fp32 with a warning")
    max_length: int | None = option(None, "tokens per example or window (default: 128, SQuAD 384)")
    doc_stride: int = option(128, "SQuAD: step between the starts of a long context's windows")
    max_query_length: int = option(64, "SQuAD: question tokens kept")
    whole_articles: bool = option(False, "SQuAD: each question's context is its whole article, all its paragraphs "
                                  "(dev-v1.1: 2,900 to 17,500 WordPiece tokens, median 6,700): the long-document task, read in windows of --max-length "
                                  "every --doc-stride (the paper's method) or whole by a model from `bertkit extend`")
    null_threshold: float = option(0.0, "SQuAD v2.0: answer '' when null score - best span score exceeds this. "
                                   "null_odds.json holds exp of that difference, the scale of the official "
                                   "evaluate-v2.0.py, whose --na-prob-thresh is exp(this); run it on the run folder "
                                   f"as: evaluate-v2.0.py DEV predictions_spans.json --na-prob-file null_odds.json "
                                   f"(DEV: {EVAL_DATA_FILE} under --train-articles)")
    embedding_scale: float = option(20.0, "embedding: the cosines are multiplied by this in the loss (SimCSE's "
                                    "temperature 0.05 is 20)")
    seed: int = option(42, "seed for the head's initialisation, dropout and the batch order")
    eval_batch_size: int = option(128, "evaluation batch size")
    limit_train_examples: int | None = option(None, "train on the first N examples only (for quick runs)")
    threads: int | None = option(None, "CPU threads for torch (default: the cores that the last minute's load "
                                 "average leaves idle, 1 to 16)")
    device: str = option("auto", "cpu, cuda, cuda:1, mps (auto: cuda when available)")
    activation_checkpointing: bool = option(False, CHECKPOINTING_HELP)
    compile: bool = option(False, "torch.compile the encoder blocks (dynamic shapes): faster steps after a first, "
                           "compiling one (tens of seconds; on CPU a C++ compiler is needed)")
    compile_mode: Literal["dynamic", "static"] = option("dynamic", "with --compile: dynamic (one graph for every "
                                                        "token count) or static (a graph per shape, batches kept "
                                                        "padded: give --pad-to-multiple-of; 1.26x eager for base at "
                                                        "length 128 on an H200)")
    pad_to_multiple_of: int = option(1, "length bucketing: pad each training batch to a multiple of this many "
                                     "positions (at most --max-length), so that batches come in a few shapes (for "
                                     "compiled graphs on a GPU); the padding is masked: evaluation is the same, "
                                     "training the same but for its dropout masks, drawn over the padded length")
    predict: bool = option(False, "GLUE: after training, write the leaderboard file for test.tsv with the best model")
    save_every: int = option(500, "steps between checkpoints for --resume, besides the one at the end of every "
                             "epoch (0: only those)")
    max_bad_steps: int = option(5, "a step whose loss is nan or inf is skipped (no update; counted in train.csv's "
                                "skipped_steps); this many in a row stop the run with an error")
    resume: str | None = option(None, "'auto': continue the run in --out-dir from its newest whole checkpoint "
                                "(mid-epoch: the same batches, RNG states and schedule), return a finished one's "
                                "record, or start if there is nothing to continue; or a checkpoint folder")
    overwrite: bool = option(False, "replace what --out-dir holds of another run or model (the files a run writes "
                             "are deleted first; others are left)")

    def __post_init__(self):
        self.task = self.task.strip()
        # one spelling, so that a run typed SQuAD1 (or NER) resumes as saved
        if self.task.lower() in NON_TEXT_TASKS:
            self.task = self.task.lower()
        if self.max_length is None:
            self.max_length = 384 if self.task in SQUAD_TASKS else 128

    def check(self, training: bool = True) -> None:
        """Raise on values no run can use, before any data or model is read."""
        if training and not self.model_dir:
            raise BertkitError("no model: expected --model-dir, a pretrained model folder (config.json + weights)")
        positive = ["batch_size", "eval_batch_size", "max_length", "doc_stride", "max_query_length", "pad_to_multiple_of"]
        positive += ["epochs", "max_bad_steps", "grad_accum"] if training else []
        for name in positive:
            if getattr(self, name) < 1:
                raise BertkitError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected a positive number")
        for name in ("lr", "warmup", "weight_decay", "max_grad_norm", "null_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):  # nan passes `< 0` unnoticed
                raise BertkitError(f"--{name.replace('_', '-')} is {value}; expected a finite number")
            if value < 0 and name != "null_threshold":
                raise BertkitError(f"--{name.replace('_', '-')} is {value}; expected zero or more")
        if self.warmup >= 1 and self.warmup != int(self.warmup):  # 2.5 warmed up for 2 steps without a word
            raise BertkitError(f"--warmup is {self.warmup:g}; expected a whole number of steps, or a fraction of the "
                               "run below 1")
        if self.limit_train_examples is not None and self.limit_train_examples < 1:
            raise BertkitError(f"--limit-train-examples is {self.limit_train_examples}; expected at least 1")
        if self.train_articles is not None and self.train_articles < 1:  # 0 would read as not given
            raise BertkitError(f"--train-articles is {self.train_articles}; expected at least 1 (the first N articles "
                               "train, the rest are scored)")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise BertkitError(f"--threads is {self.threads}; expected a whole number from 1 to {MAX_THREADS} "
                               "(unset: chosen from the idle cores)")
        if self.early_stopping_patience < 0:
            raise BertkitError(f"--early-stopping-patience is {self.early_stopping_patience}; expected zero (off) or "
                               "more epochs")
        if self.save_every < 0:
            raise BertkitError(f"--save-every is {self.save_every}; expected zero or more")
        if not 0 <= self.seed < 2**32:  # numpy's seeding takes no other: a traceback once the data was read
            raise BertkitError(f"--seed is {self.seed}; expected a whole number from 0 to {2**32 - 1}")
        if not 0 < self.label_threshold < 1:
            raise BertkitError(f"--label-threshold is {self.label_threshold}; expected a probability between 0 and 1")
        if self.pos_weight != "none" and not self.multi_label:
            raise BertkitError(f"--pos-weight {self.pos_weight} without --multi-label; expected it with --multi-label "
                               "(a weight per label)")
        if self.class_weight != "none":
            glue = self.task.lower() not in ("", "custom", *NON_TEXT_TASKS)
            other = ("--multi-label (its weights are --pos-weight)" if self.multi_label else
                     "--regression" if self.regression else
                     f"--task {self.task}" if self.task in NON_TEXT_TASKS or glue and not get_task(self.task).labels
                     else None)
            if other:
                raise BertkitError(f"--class-weight {self.class_weight} with {other}; expected a classification task "
                                   "with one label per example (a GLUE task but STS-B, or custom files)")
        check_distillation(self, text_task=self.task not in NON_TEXT_TASKS)
        self.check_lora()
        self.check_split()
        if self.keep == "last" and self.early_stopping_patience:
            raise BertkitError(f"--keep last with --early-stopping-patience {self.early_stopping_patience}; expected "
                               "one of them (early stopping keeps the best epoch)")
        if not (math.isfinite(self.layer_lr_decay) and 0 < self.layer_lr_decay <= 1):
            raise BertkitError(f"--layer-lr-decay is {self.layer_lr_decay}; expected a factor above 0 and at most 1 "
                               "(1: the same lr in every layer)")
        if self.reinit_layers < 0:
            raise BertkitError(f"--reinit-layers is {self.reinit_layers}; expected zero (none) or more blocks")
        if self.reinit_layers and (self.from_scratch or self.lora_rank):
            raise BertkitError(f"--reinit-layers {self.reinit_layers} with "
                               f"{'--from-scratch' if self.from_scratch else '--lora-rank'}; expected pretrained "
                               "weights that train (from scratch every layer is new; LoRA would freeze the "
                               "re-drawn blocks)")
        if self.multi_label and self.regression:
            raise BertkitError("--multi-label with --regression; expected one of them (labels, or a score)")
        if self.multi_label and not self.label_sep:
            raise BertkitError("--label-sep is empty; expected what separates labels in a field, such as ,")
        if self.multi_label and self.task.lower() not in ("", "custom"):
            raise BertkitError(f"--multi-label with --task {self.task}; expected --task custom (your own files)")
        if self.label_all_tokens and self.task != TAGGING_TASK:
            raise BertkitError(f"--label-all-tokens with --task {self.task or 'custom'}; expected --task "
                               f"{TAGGING_TASK} (tags of words)")
        self.check_embedding()
        if self.overwrite and self.resume:
            raise BertkitError(f"--overwrite with --resume {self.resume}; expected one of them (--overwrite starts "
                               "over, --resume continues)")

    def check_split(self) -> None:
        if not (math.isfinite(self.eval_split) and 0 <= self.eval_split < 1):
            raise BertkitError(f"--eval-split is {self.eval_split}; expected a fraction of the training file from 0 "
                               "(none held out) to below 1, such as 0.1")
        if self.folds < 0 or self.folds == 1:
            raise BertkitError(f"--folds is {self.folds}; expected 2 or more folds (or 0: no cross-validation)")
        if self.folds and not 1 <= self.fold <= self.folds:
            raise BertkitError(f"--fold is {self.fold}; expected a fold from 1 to --folds {self.folds}")
        if not self.folds and self.fold != 1:
            raise BertkitError(f"--fold {self.fold} without --folds; expected --folds K (the number of folds)")
        if self.folds and self.eval_split:
            raise BertkitError(f"--eval-split {self.eval_split:g} with --folds {self.folds}; expected one of them")
        if (self.folds or self.eval_split) and self.task in NON_TEXT_TASKS:
            raise BertkitError(f"--{'folds' if self.folds else 'eval-split'} with --task {self.task}; expected a GLUE "
                               "task or custom files (texts with labels to stratify by)")
        if self.group is not None and not (self.folds or self.eval_split):
            raise BertkitError(f"--group {self.group} without --eval-split or --folds; expected one of them (the "
                               "group column decides which rows are held out together)")
        if self.group is not None and self.task.lower() not in ("", "custom"):
            raise BertkitError(f"--group with --task {self.task}; expected --task custom (a file with a group column)")
        if not 0 <= self.split_seed < 2**32:
            raise BertkitError(f"--split-seed is {self.split_seed}; expected a whole number from 0 to {2**32 - 1}")

    def check_embedding(self) -> None:
        if self.task != EMBEDDING_TASK:
            for flag, value, default in (("--text-neg", self.text_neg, None),
                                         ("--embedding-scale", self.embedding_scale, 20.0)):
                if value != default:
                    raise BertkitError(f"{flag} {value} with --task {self.task or 'custom'}; expected --task "
                                       f"{EMBEDDING_TASK} (sentence vectors trained on pairs)")
            return
        if not (math.isfinite(self.embedding_scale) and self.embedding_scale > 0):
            raise BertkitError(f"--embedding-scale is {self.embedding_scale}; expected a number above 0 (20 in "
                               "SimCSE and sentence-transformers)")
        if self.text_neg and not self.text_b:
            raise BertkitError(f"--text-neg {self.text_neg} without --text-b; expected the column of each text's "
                               "positive (--text-b) beside its hard negative")
        for flag, on in (("--bilstm", self.bilstm), ("--regression", self.regression)):
            if on:
                raise BertkitError(f"{flag} with --task {EMBEDDING_TASK}; expected it without (the vectors are the "
                                   "encoder's, trained by the pairs' cosines; gold similarities come from --label)")

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        if self.lora_targets.strip() == "all":
            return LORA_TARGETS
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def check_lora(self) -> None:
        if not self.lora_rank:
            for flag, value, default in (("--lora-alpha", self.lora_alpha, 8.0),
                                         ("--lora-targets", self.lora_targets, "query,value")):
                if value != default:
                    raise BertkitError(f"{flag} {value} without --lora-rank; expected --lora-rank R (LoRA's rank) "
                                       "to train a low-rank update")
            return
        if self.lora_rank < 0:
            raise BertkitError(f"--lora-rank is {self.lora_rank}; expected a positive rank (8 in the LoRA paper), or 0 "
                               "to train every weight")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise BertkitError(f"--lora-alpha is {self.lora_alpha}; expected a number above 0")
        unknown = [t for t in self.lora_target_names if t not in LORA_TARGETS]
        if unknown or not self.lora_target_names:
            raise BertkitError(f"--lora-targets {self.lora_targets!r}: {', '.join(unknown) or 'none named'}; expected "
                               f"some of {', '.join(LORA_TARGETS)} separated by commas, or all")
        if self.from_scratch:
            raise BertkitError("--lora-rank with --from-scratch; expected pretrained weights to adapt (LoRA freezes "
                               "them: random ones would stay random)")

    def resolved(self) -> dict:
        """The fields, paths made absolute: `evaluate RUN` from another folder reads the run's data, not a namesake
        there, and one run's paths compare equal however they were spelled."""
        return absolute_paths(dataclasses.asdict(self), PATH_FIELDS)

    def save(self, directory: Path) -> None:
        write_json(directory / CONFIG_FILE, self.resolved())

    @classmethod
    def load(cls, directory: str | Path) -> FinetuneConfig | None:
        """The config a run folder was trained with, or None for a model folder that bertkit did not fine-tune."""
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            return cls(**values)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise BertkitError(f"{path}: not a fine-tuning config ({e}); expected the JSON `finetune` writes") from None


def check_max_length(config: FinetuneConfig, positions: int) -> None:
    """Refuse a --max-length past the model's positions before any data is read (it failed mid-epoch)."""
    if config.max_length > positions:
        raise BertkitError(f"--max-length {config.max_length} is more than the {positions} positions of "
                           f"{config.model_dir} (max_position_embeddings); expected at most {positions}, or a model "
                           "given more positions by `bertkit extend`")


def check_reinit_layers(config: FinetuneConfig, model_config: BertConfig) -> None:
    if config.reinit_layers > model_config.num_hidden_layers:
        raise BertkitError(f"--reinit-layers {config.reinit_layers}: {config.model_dir} has "
                           f"{model_config.num_hidden_layers} encoder blocks; expected at most that many")


def load_task(config: FinetuneConfig, need_train: bool = True,
              labels=None) -> TextTask | SquadTask | TaggingTask | ChoiceTask | SimilarityTask:
    """The task's data, read as the config names it."""
    if config.task in SQUAD_TASKS:
        return load_squad_task(config, need_train)
    if config.task == CHOICE_TASK:
        return load_choice_task(config, need_train)
    if config.task == TAGGING_TASK:
        return load_tagging_task(config, need_train, labels)
    if config.task == EMBEDDING_TASK:
        return load_similarity_task(config, need_train)
    return load_text_task(config, need_train, labels)


DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """A device this machine has: cpu, cuda[:N] or mps (auto: cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise BertkitError(f"--device {name!r} is not a device to run on; expected cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BertkitError(f"--device {name}: no CUDA device here; expected cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BertkitError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                               f"expected cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BertkitError(f"--device {name}: no MPS device here; expected cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class BestCheckpoint:
    """The best headline score so far; a later epoch replaces the kept checkpoint only by beating it (with `last`,
    every epoch replaces it: --keep last)."""

    def __init__(self, last: bool = False):
        self.score = -math.inf
        self.epoch: int | None = None
        self.last = last

    def update(self, score: float, epoch: int) -> bool:
        """True when this epoch is the new best (so its model should be saved)."""
        if not self.last and (math.isnan(score) or score <= self.score):
            return False
        self.score, self.epoch = score, epoch
        return True


# ---------------------------------------------------------------------------------------------------------------
# The run folder: whose it is, and where a run starts from


def _run_values(config: FinetuneConfig) -> dict:
    """The fields that decide what a run computes, paths resolved: equal for the same run. Not --out-dir: the
    folder the config or checkpoint is read from is the run's, however it is spelled (rel, ./rel/, /abs/rel)."""
    return {k: v for k, v in config.resolved().items() if k not in RUNTIME_FIELDS and k != "out_dir"}


def _differences(saved: dict, config: FinetuneConfig) -> str:
    """`lr 0.001 -> 0.002, task SST-2 -> MRPC` for the run fields that differ ('' when none)."""
    old, new = _run_values(FinetuneConfig(**saved)), _run_values(config)
    return ", ".join(f"{k} {old.get(k)} -> {new[k]}" for k in new if old.get(k) != new[k])


def _finished(out: Path, config: FinetuneConfig) -> dict | None:
    """The record of a finished run of this config in `out` (metrics.json with every epoch), else None."""
    path = out / "metrics.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    if len(record.get("epochs") or []) != config.epochs and not record.get("stopped_early"):
        return None
    return record


def stopped_early(config: FinetuneConfig, record: dict) -> str:
    """Why the run stopped before its last epoch, for the log and results.md."""
    epochs = plural(config.early_stopping_patience, "epoch")
    if record["best_epoch"] is None:  # every score was nan
        return f"no epoch had a dev score in the first {epochs} (--early-stopping-patience)"
    return (f"no epoch beat epoch {record['best_epoch']}'s dev score in the {epochs} after it "
            "(--early-stopping-patience)")


def patience_spent(config: FinetuneConfig, best: BestCheckpoint, epochs_done: int) -> bool:
    """Whether --early-stopping-patience epochs have passed since the best one (none counts from the start)."""
    patience = config.early_stopping_patience
    return bool(patience) and epochs_done - (best.epoch or 0) >= patience


def check_out_dir(config: FinetuneConfig, out: Path) -> None:
    """Refuse, before anything is read or written, an --out-dir that is a file, --model-dir or inside it, or a
    folder holding another run or model (unless --overwrite), or an interrupted run's checkpoints without
    --resume."""
    check_output_path(out, "--out-dir", {"--model-dir": config.model_dir})
    for flag, name in (("--train-file", config.train_file), ("--eval-file", config.eval_file),
                       ("--test-file", config.test_file)):
        # a custom train.csv or eval.csv beside the run is the name of the run's own log: deleted and rewritten
        if name and Path(name).name in WRITTEN and Path(name).resolve().parent == out.resolve():
            raise BertkitError(f"{flag} {name} is in --out-dir {out} under a name the run writes there: the run would "
                               "delete its own input; expected an --out-dir apart from the data")
    if config.overwrite:
        return
    found = entries(out)
    saved = FinetuneConfig.load(out) if CONFIG_FILE in found else None
    if saved is not None:
        diff = _differences(dataclasses.asdict(saved), config)
        if diff:
            raise BertkitError(f"{out}: holds another fine-tuning run ({saved.task}; {diff}); expected --overwrite "
                               "to replace it, or another --out-dir")
    elif any(name in WRITTEN for name in found):
        clash = [name for name in found if name in WRITTEN]
        raise BertkitError(f"{out}: holds {', '.join(clash[:4])} but no {CONFIG_FILE}: not a fine-tuning run of "
                           "bertkit; expected a new or empty --out-dir, or --overwrite to replace those files")
    if not config.resume and list_checkpoints(out / "checkpoints"):
        raise BertkitError(f"{out}: holds the checkpoints of an interrupted run of this config; expected --resume "
                           "auto to continue it, --overwrite to start over, or another --out-dir")


def open_out_dir(config: FinetuneConfig, out: Path) -> Path | dict | None:
    """Under the folder's lock: the checkpoint to continue from, a finished run's record (--resume auto), or None
    for a start from scratch, with the folder cleared of what an earlier attempt wrote."""
    check_out_dir(config, out)
    shutil.rmtree(out / ".checkpoints-done", ignore_errors=True)  # a finished run killed while deleting them
    if config.overwrite:
        removed = remove(out, WRITTEN)
        if removed:
            logger.warning("%s: --overwrite: deleted %s", out, ", ".join(removed))
        return None
    if config.resume and config.resume != "auto":
        path = Path(config.resume)
        problem = verify_checkpoint(path) if path.is_dir() else "no such folder"
        if problem:
            raise BertkitError(f"{path}: {problem}; expected a whole fine-tuning checkpoint (a step-N folder "
                               f"holding {TRAINING_STATE_NAME} and its completion marker)")
        if path.resolve().parent != (out / "checkpoints").resolve():  # the best epoch's model is in its own run
            raise BertkitError(f"--resume {path}: not a checkpoint of --out-dir {out}; expected one of "
                               f"{out / 'checkpoints'}, or --out-dir {path.resolve().parent.parent}")
        return path
    if config.resume == "auto":
        path = usable_checkpoint(out / "checkpoints")
        if path is not None:
            return path
        record = _finished(out, config) if (out / CONFIG_FILE).is_file() else None
        if record is not None:
            logger.warning("%s: this run has finished already (metrics.json holds all %d epochs); nothing to train",
                        out, config.epochs)
            return record
    stale = remove(out, RECORDS)
    if stale:
        logger.warning("%s: starting the run over (an earlier attempt's %s deleted)", out, ", ".join(stale))
    return None


def finetune(config: FinetuneConfig) -> dict:
    """Fine-tune `config.model_dir` on the task, keep the best epoch's model in `config.out_dir`; returns metrics.

    Every check comes before the folder is touched: the values, --model-dir, --out-dir (see `check_out_dir`), the
    data, the tokenizer and the model; a run that fails there leaves an earlier run's folder as it was.

    Under torchrun each process trains on its share of every step's batches (DDP: two processes step as one
    process accumulating two micro-batches); rank 0 alone evaluates and writes the run folder.
    """
    config.check()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    with distributed.torch_threads(config.threads, processes):
        d = distributed.setup()
        try:
            return _finetune(config, d)
        finally:
            distributed.teardown(d)


def _finetune(config: FinetuneConfig, d: Distributed) -> dict:
    if d.enabled and config.device not in ("auto", d.device.type):
        raise BertkitError(f"--device {config.device} with {d.world_size} processes: each process trains on its "
                           f"own device ({d.device.type}, by torchrun's LOCAL_RANK); expected --device auto")
    device = d.device if d.enabled else resolve_device(config.device)
    model_folder(config.model_dir)  # a mistyped --model-dir says so, before any data is read
    model_config = BertConfig.load(config.model_dir)
    check_max_length(config, model_config.max_position_embeddings)
    check_reinit_layers(config, model_config)
    out = Path(config.out_dir)

    def check_out() -> None:
        check_not_in_use(out)  # first: a live run's checkpoints are not an interrupted run's
        check_out_dir(config, out)

    distributed.run_on_main(check_out, d)  # rank 0's verdict for every rank, before rank 0 may lock the folder
    task = load_task(config)  # bad data fails before the model is loaded
    if config.teacher:
        check_teacher_data(config)
    if config.limit_train_examples:
        task.train = task.train[: config.limit_train_examples]
    seed_everything(config.seed)
    tokenizer = Tokenizer.from_pretrained(config.model_dir)
    check_tokenizer(tokenizer, model_config, config.model_dir)
    model = task.model_class.from_pretrained(config.model_dir, load_weights=not config.from_scratch,
                                             **task.model_overrides(), **({"bilstm": True} if config.bilstm else {}))
    if config.reinit_layers:
        reinit_top_layers(model, config.reinit_layers)
    if config.lora_rank:
        add_lora(model, config.lora_rank, config.lora_alpha, config.lora_target_names)
    n = model.num_parameters()
    check_free_space(out, checkpoint_bytes(n) + 4 * n, f"a checkpoint and the best model of this "
                     f"{n / 1e6:.1f}M-parameter model")
    held: list[RunLock] = []

    def claim() -> Path | dict | None:
        """On rank 0: the folder's lock, what `open_out_dir` finds, and a new run's config written."""
        held.append(RunLock(out).acquire())
        start = open_out_dir(config, out)
        if start is None:
            config.save(out)
            if isinstance(task, SquadTask) and config.train_articles:
                _write_eval_data(config, out)
        return start

    try:
        start = distributed.run_on_main(claim, d)
        if isinstance(start, dict):
            if d.is_main and config.predict:  # asked for now: the kept model writes them
                _write_submissions(config, task, tokenizer, out, device, start)
            # also when missing: a run killed after its last epoch's metrics.json, before its last checkpoint, has
            # nothing to resume from and is finished, but its table was never written
            if d.is_main and (config.predict or not (out / "results.md").is_file()):
                atomic_write_text(out / "results.md", results_table(config, task, start))
            if d.is_main and (out / "results.md").is_file():
                print((out / "results.md").read_text(encoding="utf-8"), end="")
            return start
        return _fit(config, task, tokenizer, model.to(device), out, device, start, d)
    finally:
        for lock in held:
            lock.release()


def _write_eval_data(config: FinetuneConfig, out: Path) -> None:
    """The articles a --train-articles run scores, as a SQuAD file: the official evaluate script's DEV input."""
    from bertkit.data.squad import _load_json
    from bertkit.tasks.squad import FILES

    folder = Path(config.data_dir) if config.data_dir else None
    train_name, dev_name = FILES[config.task]
    source = (config.train_file or (folder / train_name if folder else None) or config.eval_file
              or (folder / dev_name if folder else None))
    articles = _load_json(Path(source))[config.train_articles:]
    version = "v2.0" if config.task == "squad2" else "1.1"
    write_json(out / EVAL_DATA_FILE, {"version": version, "data": articles})


# ---------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class Position:
    """How far a fine-tuning run is: optimizer steps done, the epoch under way (1-based) and its batches done (a
    step takes --grad-accum of them), and what that epoch has summed so far: the losses of its updating steps (so
    that a run resumed mid-epoch reports the same epoch loss)."""

    step: int = 0
    epoch: int = 1
    batch: int = 0
    loss_sum: float = 0.0
    good_steps: int = 0
    running: list = field(default_factory=list)  # losses since the last train.csv row
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def train_step(model, group: list[dict], optimizer, scheduler, precision, max_grad_norm: float, device,
               d: Distributed = Distributed(), forward=None) -> tuple[float, bool]:
    """One optimizer step over a group of --grad-accum x processes micro-batches (the shared
    `bertkit.train.step.train_step`), this process taking every world_size-th: their loss over all processes (a
    mean over the group's rows), and whether the update was made (not when the loss or the gradients are nan or inf).

    The gradient is the one of the whole group as one batch, as one process accumulating it would take: a
    micro-batch's loss is a mean over its rows, so it counts by its share of the group's rows (times the processes,
    as DDP then averages over them), not equally, or the epoch's short last batch would weigh as much as a full one;
    a process left without a micro-batch at an epoch's end runs the group's first with weight 0, so that every
    process joins the all-reduce. `forward` as the shared step's (distillation's loss)."""
    rows = [len(batch["input_ids"]) for batch in group]
    mine = range(d.rank, len(group), d.world_size)
    weights = [rows[i] * d.world_size / sum(rows) for i in mine]
    losses = []
    _, ok = shared_step(model, [group[i] for i in mine] or group[:1], optimizer, scheduler, precision, max_grad_norm,
                        device, d, forward, on_output=lambda out, batch: losses.append(out.loss.detach().float()),
                        weights=weights or [0.0])
    loss = sum((l * w for l, w in zip(losses, weights)), torch.zeros(1, device=device)) / d.world_size
    return distributed.all_reduce_sum(loss, d).item(), ok


def _finite_weights(model, what: str, hint: str) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise BertkitError(f"{what}: the weights hold nan or inf; not saved. Expected finite weights: {hint}")


def _fit(config: FinetuneConfig, task, tokenizer, model, out: Path, device, resume_from: Path | None,
         d: Distributed = Distributed()) -> dict:
    if config.activation_checkpointing:
        model.activation_checkpointing_enable()
    if config.pos_weight == "balanced":
        model.pos_weight = task.balanced_pos_weight().to(device)
    if config.class_weight == "balanced":
        model.class_weight = task.balanced_class_weight().to(device)
    if isinstance(task, SimilarityTask):  # what trains it depends on the data: said before it starts
        model.scale = config.embedding_scale
        if d.is_main:
            print(task.describe())
    if config.compile:
        compile_blocks(model, config.compile_mode)
    rows = task.train_rows(tokenizer, config)
    if config.teacher:
        rows = distillation_rows(config, task, tokenizer, rows, device)
    check_segments(model.config, rows)
    lengths = [row_length(r) for r in rows]
    per_step = config.grad_accum * d.world_size  # batches of --batch-size in one optimizer step
    steps = config.epochs * math.ceil(math.ceil(len(rows) / config.batch_size) / per_step)
    if config.warmup >= 1 and config.warmup >= steps:  # the lr would only rise, never decaying (pretrain's check)
        raise BertkitError(f"--warmup {config.warmup:g} steps, as long as the run's {steps} steps or longer "
                           f"({len(rows)} training rows, {plural(config.epochs, 'epoch')}); expected fewer warm-up "
                           "steps, or a fraction of the run below 1")
    precision = resolve_precision(config.precision, device)
    optimizer = build_optimizer(model, "adamw", config.lr, config.weight_decay, layer_lr_decay=config.layer_lr_decay)
    scheduler = warmup_linear(optimizer, warmup_steps_for(steps, config.warmup), steps)
    best = BestCheckpoint(last=config.keep == "last")
    record = {"task": task.name, "model_dir": str(config.model_dir), "train_examples": len(task.train),
              "train_rows": len(rows), "eval_examples": _eval_size(task), "best_epoch": None, "best": {},
              "epochs": [], "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(precision.dtype, "fp32"),
              "processes": d.world_size, "trained_parameters": sum(p.numel() for p in model.parameters()
                                                                  if p.requires_grad)}
    forward = None  # the model's own loss
    if config.teacher:
        forward = distillation_forward(task, config.distill_temperature, config.distill_alpha)
        record |= {"teacher": config.teacher, "transfer_examples": len(rows) - len(task.train)}
    pos = Position()
    hint = f"try a lower --lr (now {config.lr:g})" + ("" if config.max_grad_norm else ", --max-grad-norm 1")
    # not "--resume auto": a resumed run must have the same hyper-parameters (another --lr is refused as another
    # run's), and with them it would take the same non-finite steps again
    bad_steps = NonFiniteSteps(config.max_bad_steps, hint + " with --overwrite, which starts the run over")
    checkpoints = out / "checkpoints"
    state = None
    if resume_from is not None:
        state = load_training_state(resume_from / TRAINING_STATE_NAME)
        diff = _differences(state["config"], config)
        if diff:
            raise BertkitError(f"{resume_from / TRAINING_STATE_NAME}: written for another run ({diff}); expected "
                               "the same task, data, model and hyper-parameters")
        saved_by = len(state["rng"]) if isinstance(state["rng"], list) else 1  # one RNG state per process
        if saved_by != d.world_size:  # a step is --grad-accum x processes batches: schedule and batches would change
            raise BertkitError(f"{resume_from}: saved by {saved_by} process(es), resumed by {d.world_size}; expected "
                               f"{saved_by} (a step is --grad-accum x processes batches, and the schedule counts steps)")
        load_state_dict_into(model, read_state_dict(resume_from), source=str(resume_from))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        load_scaler(precision, state["scaler"], resume_from)
        pos = Position(**state["position"])
        record, (best.score, best.epoch) = state["record"], state["best"]
        bad_steps.in_row, bad_steps.total, bad_steps.window, bad_steps.first_in_row = state["bad_steps"]
        if d.is_main:
            print(f"resuming {task.name} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch}) from "
                  f"{resume_from}")
    ddp_model = distributed.wrap(model, d)
    if d.enabled and state is None:
        torch.manual_seed(config.seed * 65536 + d.rank + 1)  # dropout: a stream per process
    run_log = RunLogger(out, tensorboard=False, enabled=d.is_main)
    reached = run_log.truncate(pos.step)
    if reached is not None:
        logger.warning("%s: the logs reach step %d, past the checkpoint at step %d: the rows after it are logged again",
                    out, reached, pos.step)
    if state is not None:  # last: nothing after this may draw from the generators before training
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        set_rng_state(rngs[d.rank])

    def save() -> Path:
        _finite_weights(model, f"step {pos.step}", hint)
        rngs = distributed.all_gather_object(rng_state(), d)
        path = checkpoints / f"step-{pos.step:08d}"

        def write() -> None:  # on rank 0; its error (a full disk) stops every rank
            payload = {"position": dataclasses.asdict(pos), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "scaler": precision.scaler.state_dict(),
                       "rng": rngs if d.enabled else rngs[0],
                       "record": json.loads(json.dumps(record)),  # plain types: torch.load(weights_only) reads them
                       "best": [best.score, best.epoch],
                       "bad_steps": [bad_steps.in_row, bad_steps.total, bad_steps.window, bad_steps.first_in_row],
                       "config": dataclasses.asdict(config)}
            save_checkpoint(checkpoints, pos.step, model, tokenizer, payload)
            prune_checkpoints(checkpoints, KEEP_CHECKPOINTS)

        distributed.run_on_main(write, d)
        return path

    def log_train_row() -> float:
        """train.csv's row for the steps since the last one; returns their mean loss."""
        mean = float(np.mean(pos.running)) if pos.running else float("nan")
        run_log.log("train", pos.step, {"loss": mean, "lr": scheduler.get_last_lr()[0],
                                        "skipped_steps": bad_steps.window})
        pos.running, bad_steps.window = [], 0
        return mean

    with Interrupt() as interrupt:
        for epoch in range(pos.epoch, config.epochs + 1):
            # rank 0's verdict, which alone scores; checked before an epoch, so that a resumed run stops here too
            if distributed.run_on_main(lambda: patience_spent(config, best, epoch - 1), d):
                if d.is_main:
                    record["stopped_early"] = epoch - 1
                    write_json(out / "metrics.json", record)
                    logger.warning("stopped after epoch %d of %d: %s", epoch - 1, config.epochs,
                                   stopped_early(config, record))
                break
            batches = length_grouped_batches(lengths, config.batch_size, seed=config.seed, epoch=epoch)
            model.train()
            with progress_bar(total=len(rows), initial=sum(len(b) for b in batches[: pos.batch]),
                              desc=f"{task.name} epoch {epoch}/{config.epochs}", unit="ex", mininterval=1.0,
                              dynamic_ncols=True, disable=not d.is_main) as bar:
                # CPU time too: on a shared machine it shows the work done, which wall time blurs with waiting
                start, start_cpu = time.perf_counter(), time.process_time()
                for i in range(pos.batch, len(batches), per_step):
                    group = batches[i:i + per_step]
                    micro_batches = [collate([rows[j] for j in b], tokenizer.pad_id, config.pad_to_multiple_of,
                                             limit=config.max_length) for b in group]
                    loss, ok = train_step(ddp_model, micro_batches, optimizer, scheduler, precision,
                                          config.max_grad_norm, device, d, forward)
                    pos.step, pos.batch = pos.step + 1, i + len(group)
                    if ok:
                        pos.loss_sum, pos.good_steps = pos.loss_sum + loss, pos.good_steps + 1
                        pos.running.append(loss)
                    bar.update(sum(len(b) for b in group))
                    bad_steps.record(ok, pos.step)
                    if pos.step % 50 == 0:
                        mean = log_train_row()
                        bar.set_postfix(loss=f"{mean:.4f}", **({"skipped": bad_steps.total} if bad_steps.total else {}),
                                        refresh=False)  # the bar redraws on its own schedule
                    stop = interrupt.requested(d)
                    if stop or (config.save_every and pos.step % config.save_every == 0 and pos.batch < len(batches)):
                        now, now_cpu = time.perf_counter(), time.process_time()
                        pos.seconds, pos.cpu_seconds = pos.seconds + now - start, pos.cpu_seconds + now_cpu - start_cpu
                        path = save()
                        start, start_cpu = time.perf_counter(), time.process_time()  # saving is not training
                        if stop:
                            run_log.close()
                            raise interrupt.stop(f"checkpoint {path} saved at step {pos.step} (epoch {epoch}, "
                                                 f"batch {pos.batch}); --resume auto continues")
                train_seconds = pos.seconds + time.perf_counter() - start
                train_cpu_seconds = pos.cpu_seconds + time.process_time() - start_cpu
            if pos.running:  # the epoch's steps since the last row: a row of their own, not dropped with the epoch
                log_train_row()
            loss = pos.loss_sum / pos.good_steps if pos.good_steps else float("nan")
            if d.is_main:  # scored on rank 0 alone; the others wait for it at the next all-reduce
                start = time.perf_counter()
                metrics, write_outputs = task.evaluate(model, tokenizer, config, device)
                eval_seconds = time.perf_counter() - start
                run_log.log("eval", pos.step, metrics)
                row = {"epoch": epoch, "train_loss": loss, "train_seconds": train_seconds,
                       "train_cpu_seconds": train_cpu_seconds, "train_examples_per_second": len(rows) / train_seconds,
                       "eval_seconds": eval_seconds, **metrics}
                record["epochs"].append(row)
                if best.update(task.headline(metrics), epoch):
                    _finite_weights(model, f"epoch {epoch}", hint)
                    save_model(config, model, out, tokenizer)
                    write_outputs(out)
                    record["best_epoch"], record["best"] = epoch, metrics
                logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
                write_json(out / "metrics.json", record)  # after every epoch, so a long run shows its progress
            pos = Position(step=pos.step, epoch=epoch + 1)
            save()
            if interrupt.requested(d) and epoch < config.epochs:
                run_log.close()
                raise interrupt.stop(f"checkpoint saved at the end of epoch {epoch}; --resume auto continues")
    run_log.close()
    if not d.is_main:
        return record
    _write_submissions(config, task, tokenizer, out, device, record)
    table = results_table(config, task, record)
    atomic_write_text(out / "results.md", table)
    # the run is whole without them; renamed first, so a kill while deleting leaves no checkpoint to resume from
    os.rename(checkpoints, out / ".checkpoints-done")
    shutil.rmtree(out / ".checkpoints-done")
    print(table)
    return record


def save_model(config: FinetuneConfig, model, out: Path, tokenizer) -> None:
    """The run's model into `out`; under LoRA, with the update merged into a copy (the folder every command and
    transformers load) and the update alone in adapter/ (peft's layout)."""
    if not config.lora_rank:
        model.save_pretrained(out, tokenizer=tokenizer)
        return
    merge_lora(copy.deepcopy(model)).save_pretrained(out, tokenizer=tokenizer)
    save_adapter(model, out / ADAPTER_DIR, config.resolved()["model_dir"], config.lora_rank, config.lora_alpha,
                 config.lora_target_names)


def _write_submissions(config: FinetuneConfig, task, tokenizer, out: Path, device, record: dict) -> None:
    """--predict: GLUE's leaderboard files for the test splits, by the kept (best) model; named in the record."""
    if config.predict and isinstance(task, TextTask) and task.tests:
        model = task.model_class.from_pretrained(out).to(device)
        record["submissions"] = [str(p) for p in task.write_test_predictions(model, tokenizer, config, device, out)]
        write_json(out / "metrics.json", record)


def _eval_size(task) -> int:
    return len(task.evals) if isinstance(task, SquadTask) else len(next(iter(task.evals.values())))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def held_out_what(config: FinetuneConfig) -> str:
    """`fold 2 of 5` or `a tenth`: which rows of the training file a run scores on."""
    return f"fold {config.fold} of {config.folds}" if config.folds else f"{config.eval_split:g}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m {seconds:02d}s"


def _score(metric: str, value: float) -> str:
    # SQuAD v2.0's thresholds are null odds, as small as 1e-5: in significant digits, not 2 decimals
    return f"{value:.4g}" if metric.endswith("_thresh") else f"{value:.2f}"


def results_table(config: FinetuneConfig, task, record: dict) -> str:
    """The run in markdown: hyper-parameters, one row per epoch (best marked), the best scores."""
    columns = [m for m in task.table_metrics if m in record["best"]]
    unit = "sentences" if isinstance(task, TaggingTask) else "examples"
    lines = [
        f"# Fine-tuning {task.name} from {hub.model_name(config.model_dir)}",
        "",
        f"lr {config.lr:g}, batch {config.batch_size}"
        # under torchrun a step is --batch-size x processes x --grad-accum rows: --batch-size alone understates it
        + (f" x {record['processes']} processes" if record.get("processes", 1) > 1 else "")
        + (f" x {config.grad_accum} accumulated" if config.grad_accum > 1 else "")
        + (f", {record['precision']}" if record.get("precision", "fp32") != "fp32" else "")
        + f", {plural(config.epochs, 'epoch')}, warm-up {config.warmup:g}, "
        f"weight decay {config.weight_decay:g}, max length {config.max_length}, seed {config.seed}; "
        f"{record['train_examples']:,} training {unit}"
        # a tagger's sentence over --max-length is read in windows too
        + (f" ({record['train_rows']:,} windows)" if record.get("train_rows", record["train_examples"])
           - record.get("transfer_examples", 0) != record["train_examples"] else "")
        + f", {record['eval_examples']:,} scored."
        + (f" Distilled from {record['teacher']} (temperature {config.distill_temperature:g}, its share of the loss "
           f"{config.distill_alpha:g}; {record['transfer_examples']:,} unlabelled transfer examples)."
           if record.get("teacher") else "")
        + (f" LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g} on {', '.join(config.lora_target_names)}: "
           f"{record['trained_parameters']:,} trained parameters, the update alone in {ADAPTER_DIR}/."
           if config.lora_rank else "")
        + (f" Top {plural(config.reinit_layers, 'block')} re-initialised." if config.reinit_layers else "")
        + (f" Layer-wise lr decay {config.layer_lr_decay:g}." if config.layer_lr_decay != 1 else "")
        + (f" Scored on {held_out_what(config)} of the training file, held out (split seed {config.split_seed})"
           + (", then on the dev data." if len(task.evals) > 1 else ".") if splits(config) else ""),
        "",
        "| epoch | train loss | " + " | ".join(columns) + " | train time | train ex/s | eval time |",
        "|---" * (len(columns) + 5) + "|",
    ]
    for row in record["epochs"]:
        mark = f" ({'kept' if config.keep == 'last' else 'best'})" if row["epoch"] == record["best_epoch"] else ""
        lines.append(
            f"| {row['epoch']}{mark} | {row['train_loss']:.4f} | "
            # "-": an epoch recorded before its task had the metric (a custom run resumed across macro_f1's arrival)
            + " | ".join(_score(m, row[m]) if m in row else "-" for m in columns)
            + f" | {_duration(row['train_seconds'])} | {row['train_examples_per_second']:.1f} | "
            f"{_duration(row['eval_seconds'])} |"
        )
    if record["best_epoch"] is not None:
        best = ", ".join(f"{m} {_score(m, record['best'][m])}" for m in columns)
        lines += ["", f"{'Last' if config.keep == 'last' else 'Best'}: epoch {record['best_epoch']} ({best}), kept in "
                  f"{config.out_dir}."]
        if isinstance(task, TextTask) and task.multi_label:
            lines.append(f"Per label scores of that epoch: {CLASSES_FILE}.")
        elif isinstance(task, TextTask) and not task.is_regression:
            lines.append(f"Per class scores and the confusion matrix of that epoch: {CLASSES_FILE}.")
        if isinstance(task, TaggingTask):
            lines.append(f"Scores per {'type' if task.scheme == 'chunks' else 'tag'} of that epoch: {TAGS_FILE}; its "
                         f"tags, conlleval's input: {PREDICTIONS_FILE}.")
    if record.get("stopped_early"):
        lines.append(f"Stopped after epoch {record['stopped_early']} of {config.epochs}: "
                     f"{stopped_early(config, record)}.")
    for path in record.get("submissions", []):
        lines.append(f"Submission file: {path}")
    return "\n".join(lines) + "\n"
