"""Knowledge distillation in fine-tuning (`finetune --teacher`): a fine-tuned model's outputs become the targets of
another, usually smaller, model on the training examples and on unlabelled ones (`--transfer-file`). This is how
Google's small BERTs were meant to be fine-tuned (Turc et al. 2019, "Well-Read Students Learn Better"), with the
temperature of Hinton et al. 2015.

The teacher runs once, before training, over every training row with its own tokenizer (so it may have another
vocabulary than the student's): its logits are stored in the rows, and each step's loss compares them with the
student's. The student is trained and saved as by any fine-tuning run; the teacher is not needed after."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bertkit.checkpoint import model_folder
from bertkit.config import BertConfig
from bertkit.data.glue import read_custom
from bertkit.errors import BertkitError
from bertkit.model import ModelOutput
from bertkit.tasks.classification import TextTask, encode, is_multi_label
from bertkit.tasks.inference import check_tokenizer, infer
from bertkit.tokenizer import Tokenizer

logger = logging.getLogger("bertkit")

TEACHER_KEY = "teacher_logits"  # a training row's field: the teacher's logits for it


def load_teacher(teacher_dir: str, task: TextTask, device: torch.device):
    """The teacher's model (its classifier's rows in the task's label order) and tokenizer, after checking that it
    was fine-tuned for the task: a classifier with the same labels, the same kind (classes, labels or a score)."""
    from bertkit.tasks.evaluation import check_head, label_names, label_order, loaded  # evaluation imports finetune

    model_config = BertConfig.load(model_folder(teacher_dir))
    check_head(task, model_config, teacher_dir)
    if is_multi_label(model_config) != task.multi_label:
        raise BertkitError(f"{teacher_dir}/config.json: a {'multi' if is_multi_label(model_config) else 'single'}-label "
                           f"classifier; expected a {'multi' if task.multi_label else 'single'}-label teacher for "
                           f"{task.name}")
    if task.labels and sorted(n.lower() for n in label_names(model_config)) != sorted(n.lower() for n in task.labels):
        raise BertkitError(f"{teacher_dir}/config.json: labels {', '.join(label_names(model_config))}; expected "
                           f"the task's, {', '.join(task.labels)} (a teacher fine-tuned on the same labels)")
    tokenizer = Tokenizer.from_pretrained(teacher_dir)
    check_tokenizer(tokenizer, model_config, teacher_dir)
    model = loaded(task.model_class, teacher_dir, device, False, label_order(task, model_config, teacher_dir))
    return model, tokenizer


SPLIT_FIELDS = ("eval_split", "folds", "fold", "split_seed", "group")  # which rows a run holds out of its file


def check_teacher_data(config) -> None:
    """Refuse a teacher fine-tuned on the rows this run holds out of its training file (--eval-split, --folds): its
    outputs carry those rows' labels into the student, and their score would be optimistic. A teacher that held out
    the same rows, trained on other data, or not fine-tuned by bertkit (nothing to tell) passes."""
    from bertkit.tasks.finetune import FinetuneConfig  # finetune imports this module

    if not (config.eval_split or config.folds):
        return
    saved = FinetuneConfig.load(model_folder(config.teacher))
    if saved is None or _training_data(saved) != _training_data(config):
        return
    if all(getattr(saved, name) == getattr(config, name) for name in SPLIT_FIELDS):
        return
    held = f"fold {config.fold} of {config.folds}" if config.folds else f"--eval-split {config.eval_split:g}"
    raise BertkitError(f"--teacher {config.teacher} was fine-tuned on {_training_data(config)[1]}, the rows this run "
                       f"holds out ({held}) included: the student would learn their labels from it and their score "
                       "would be optimistic; expected a teacher that held out the same rows (the same --eval-split or "
                       "--folds and --fold, --split-seed, --group) or one trained on other data")


def _training_data(config) -> tuple[str, str]:
    """The task and the file (or a GLUE task's data folder) a run trains on, resolved."""
    source = config.train_file or config.data_dir or ""
    return (config.task or "").lower(), str(Path(source).resolve()) if source else ""


def read_transfer(config) -> list:
    """--transfer-file's texts (its --text-a and --text-b columns; labels, if any, are not read)."""
    examples, _ = read_custom(config.transfer_file, config.text_a, None, config.text_b)
    if not examples:
        raise BertkitError(f"{config.transfer_file}: no rows; expected texts for the teacher to label")
    return examples


def distillation_rows(config, task: TextTask, tokenizer, rows: list[dict], device) -> list[dict]:
    """The training rows with the teacher's logits, and the transfer file's rows after them (teacher logits only).
    With the teacher alone in the loss (--distill-alpha 1), the rows keep no labels."""
    transfer = read_transfer(config) if config.transfer_file else []
    teacher, teacher_tokenizer = load_teacher(config.teacher, task, device)
    examples = task.train + transfer
    teacher_rows = encode(examples, teacher_tokenizer, min(config.max_length, teacher.config.max_position_embeddings),
                          with_labels=False)
    logger.info("teacher %s: labelling %d training and %d transfer examples", config.teacher, len(task.train),
                len(transfer))
    logits = infer(teacher, teacher_rows, config.eval_batch_size, teacher_tokenizer.pad_id, device, ("logits",))["logits"]
    rows = rows + encode(transfer, tokenizer, config.max_length, with_labels=False)
    for row, values in zip(rows, logits.tolist()):
        row[TEACHER_KEY] = tuple(values)
        if config.distill_alpha == 1:
            row.pop("labels", None)
    return rows


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, task: TextTask, temperature: float) -> torch.Tensor:
    """How far the student's logits are from the teacher's: cross-entropy against the teacher's softmax at
    `temperature` (both divided by it), times its square so that the gradients keep their size (Hinton et al.);
    multi-label, the same per label with sigmoids; regression, the squared error to the teacher's score."""
    logits, teacher = logits.float(), teacher.float()
    if task.is_regression:
        return F.mse_loss(logits, teacher)
    if task.multi_label:
        soft = F.binary_cross_entropy_with_logits(logits / temperature, torch.sigmoid(teacher / temperature))
    else:
        soft = F.cross_entropy(logits / temperature, torch.softmax(teacher / temperature, -1))
    return soft * temperature**2


def distillation_forward(task: TextTask, temperature: float, alpha: float) -> Callable:
    """The training step's forward: the student's output with its loss alpha x the distillation loss + (1 - alpha)
    x its own loss on the labels."""
    def forward(model, batch: dict) -> ModelOutput:
        teacher = batch.pop(TEACHER_KEY)
        out = model(**batch)
        loss = distillation_loss(out.logits, teacher, task, temperature)
        if alpha < 1:
            loss = alpha * loss + (1 - alpha) * out.loss
        return ModelOutput(loss=loss, logits=out.logits)

    return forward


def check_distillation(config, text_task: bool) -> None:
    """Refuse distillation settings that cannot work, before anything is read; `text_task`: the task is
    classification or regression (GLUE or custom)."""
    if not config.teacher:
        for flag, value, default in (("--transfer-file", config.transfer_file, None),
                                     ("--distill-alpha", config.distill_alpha, 1.0),
                                     ("--distill-temperature", config.distill_temperature, 1.0)):
            if value != default:
                raise BertkitError(f"{flag} {value} without --teacher; expected a teacher model folder to distill")
        return
    if not text_task:
        raise BertkitError(f"--teacher with --task {config.task}; expected a classification or regression task "
                           "(a GLUE task or custom files)")
    if not config.distill_temperature > 0:
        raise BertkitError(f"--distill-temperature is {config.distill_temperature}; expected a number above 0")
    if not 0 < config.distill_alpha <= 1:
        raise BertkitError(f"--distill-alpha is {config.distill_alpha}; expected the teacher's share of the loss, "
                           "above 0 and at most 1")
    if config.transfer_file and config.distill_alpha < 1:
        raise BertkitError(f"--transfer-file with --distill-alpha {config.distill_alpha}; expected --distill-alpha 1: "
                           "the transfer file's rows have no labels, only the teacher's targets")
    if config.distill_alpha == 1 and (config.class_weight != "none" or config.pos_weight != "none"):
        flag = "--class-weight" if config.class_weight != "none" else "--pos-weight"
        raise BertkitError(f"{flag} with --teacher and --distill-alpha 1; expected --distill-alpha below 1: the "
                           "weights apply to the loss on the labels, which the teacher's targets replace")
    if Path(config.teacher).resolve() == Path(config.out_dir).resolve():
        raise BertkitError(f"--teacher {config.teacher} is --out-dir; expected another folder (the run writes here)")
