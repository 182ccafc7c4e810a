"""Using a fine-tuned model folder: `evaluate` re-scores it on its task's data (or other data), `predict` labels
texts or answers questions with it. The task, data and lengths default to those of the run that made the folder
(its finetune_config.json); `bertkit evaluate` and `bertkit predict` take their arguments from EvaluateConfig and
PredictConfig.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from bertkit.checkpoint import config_file, heads_of, model_folder, weights_source
from bertkit.config import BertConfig, option, read_json, write_json
from bertkit.data.glue import get_task, read_custom
from bertkit.errors import BertkitError
from bertkit.tasks.choice import CHOICE_LINE, ChoiceTask, choose, parse_choice
from bertkit.tasks.classification import (MULTI_LABEL, TextTask, checked_lines, input_lines, is_blank,
                                         is_multi_label, parse_line)
from bertkit.tasks.calibrate import calibrate_folder, check_calibratable
from bertkit.tasks.finetune import (CONFIG_FILE, NON_TEXT_TASKS, SQUAD_TASKS, FinetuneConfig, check_max_length,
                                    load_task, resolve_device)
from bertkit.tasks.inference import check_tokenizer
from bertkit.tasks.similarity import SimilarityTask
from bertkit.tasks.squad import QUESTION_LINE, SquadTask, parse_question
from bertkit.tasks.tagging import TaggingTask, tag_texts
from bertkit.tokenizer import Tokenizer
from bertkit.train.distributed import torch_threads
from bertkit.train.logs import bars_hidden, progress_bar
from bertkit.train.rundir import check_output_path

logger = logging.getLogger("bertkit")

# Lines `predict` runs at a time. Larger than embed's: each chunk is sorted by length anew, and batches of new token
# counts fill oneDNN's cache of compiled kernels, so that all-MiniLM-L6-v2 on 60,000 lines peaked at 1,421 MB in
# chunks of 4,096 against 930 MB in chunks of 32,768 (968 MB holding the whole input; benchmarks/RESULTS.md).
CHUNK = 32_768


def run_config(model_dir, overrides: dict, default_task: str = "") -> FinetuneConfig:
    """The config of the run that made the folder, with the given overrides."""
    saved = FinetuneConfig.load(model_dir)
    values = dataclasses.asdict(saved) if saved else {"task": default_task}
    if overrides.get("eval_file") or overrides.get("data_dir"):
        values["train_articles"] = None  # new eval data replaces the run's by-article split
        # and the rows it held out of its training file
        values |= {"eval_split": 0.0, "folds": 0, "fold": 1, "group": None}
    if overrides.get("data_dir"):
        values["eval_file"] = None  # and the run's --eval-file, which would be read instead of the folder's dev file
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["model_dir"] = str(model_dir)
    values["predict"] = False  # a --predict run's test files: neither command writes a leaderboard file from them
    config = FinetuneConfig(**values)
    config.check(training=False)
    positions = BertConfig.load(model_dir).max_position_embeddings
    if overrides.get("max_length") is None:  # a default (no run config in the folder) fits the model
        config.max_length = min(config.max_length, positions)
    check_max_length(config, positions)
    return config


def label_names(model_config: BertConfig) -> list[str]:
    if model_config.id2label:
        return [model_config.id2label[i] for i in sorted(model_config.id2label)]
    return [f"LABEL_{i}" for i in range(model_config.num_labels)]


INT8_HELP = ("run the model in int8 on the CPU: every linear layer dynamically quantized; at batch 32 about 2x "
             "faster for MiniLM, 2.9x for a BERT-Base shape, for a fraction of a point of accuracy "
             "(benchmarks/RESULTS.md)")
THREADS_HELP = ("CPU threads for torch (default: the cores that the last minute's load average leaves idle, 1 to 16, "
                "so that a busy machine slows a run down instead of stalling it)")
DEVICE_HELP = "cpu, cuda, cuda:N, mps (default: the run's, auto)"
TEXT_A_HELP = ".csv/.jsonl input: the column of the (first) text (default: the run's, else sentence)"
TEXT_B_HELP = ".csv/.jsonl input: the column of the second text of a pair (default: the run's)"
LABEL_THRESHOLD_HELP = ("a multi-label model: a label is predicted when its probability is at least this (default: "
                        "the run's, 0.5)")


@dataclass
class EvaluateConfig:
    """`bertkit evaluate`: the command's arguments are these fields, `evaluate`'s keywords. None: the run's."""

    model_dir: str = option("", "a fine-tuned model folder (what `bertkit finetune` wrote), or a Hub model id "
                            "(with --task and its data)", positional=True)
    task: str | None = option(None, "GLUE task, squad1, squad2, ner, swag, embedding (any encoder's mean-pooled "
                              "vectors, scored on pairs: an STS-B folder, or --eval-file) or custom (default: the "
                              "run's)")
    data_dir: str | None = option(None, "the task's data folder (default: the run's)")
    eval_file: str | None = option(None, "a labelled file to score on instead (default: the run's)")
    text_a: str | None = option(None, "custom files: the column of the (first) text (default: the run's, else "
                                "sentence)")
    text_b: str | None = option(None, "custom files: the column of the second text of a pair (default: the run's)")
    label: str | None = option(None, "custom files: the label column (default: the run's, else label)")
    regression: bool | None = option(None, "custom files: the label is a number to regress (default: the run's)")
    multi_label: bool | None = option(None, "custom files: any number of labels per example, separated by "
                                      "--label-sep (default: the run's)")
    label_sep: str | None = option(None, "--multi-label: what separates the labels in a field (default: the run's, "
                                   "else ,)")
    label_threshold: float | None = option(None, LABEL_THRESHOLD_HELP)
    max_length: int | None = option(None, "tokens per example or window (default: the run's)")
    eval_batch_size: int | None = option(None, "evaluation batch size (default: the run's)")
    null_threshold: float | None = option(None, "SQuAD v2.0: answer '' when null score - best span score exceeds "
                                          "this (default: the run's); the official script's --na-prob-thresh is exp "
                                          "of it, as null_odds.json holds exp of the difference")
    out_dir: str | None = option(None, "folder for eval_metrics.json (a classifier's classes.md: per class scores, "
                                 "confusion matrix; SQuAD's predictions.json, v2.0 also "
                                 "null_odds.json and predictions_spans.json, the official script's input; a "
                                 "tagger's tags.md and predictions.conll, conlleval's input) "
                                 "(default: none written)", flag="--out")
    threads: int | None = option(None, THREADS_HELP)
    device: str | None = option(None, DEVICE_HELP)
    int8: bool = option(False, INT8_HELP)
    calibrate: bool = option(False, "a classifier (one label per example): fit a temperature T to the eval data's "
                             "logits (temperature scaling, Guo et al. 2017) and divide the folder's classifier by it, "
                             "in place, so that its probabilities match its accuracy (the predicted classes do not "
                             "change); calibration.json records it. Fit it on labelled data the model did not train "
                             "on, not on the data you will report")


@dataclass
class PredictConfig:
    """`bertkit predict`: the command's arguments; all but input and out are `predict`'s keywords."""

    model_dir: str = option("", "a fine-tuned model folder (or a pretraining one, to fill in [MASK]), or a Hub model "
                            "id", positional=True)
    input: str = option("-", "input file: text or text<TAB>pair lines (QA: JSON lines; a tagger: a text per line, "
                        "split into words as BERT splits it; multiple choice: JSON lines with context and endings), "
                        "or a classifier's .csv or .jsonl file with named columns, as finetune's custom files "
                        "(default: standard input)", positional=True)
    out: str | None = option(None, "write the JSON lines here instead of standard output, the file whole or not at "
                             "all (default: standard output, a chunk of 32,768 lines at a time as they are run)")
    text_a: str | None = option(None, TEXT_A_HELP)
    text_b: str | None = option(None, TEXT_B_HELP)
    max_length: int | None = option(None, "tokens per example or window (default: the run's)")
    eval_batch_size: int | None = option(None, "batch size (default: the run's)")
    label_threshold: float | None = option(None, LABEL_THRESHOLD_HELP)
    threads: int | None = option(None, THREADS_HELP)
    device: str | None = option(None, DEVICE_HELP)
    int8: bool = option(False, INT8_HELP)
    top_k: int = option(5, "a pretraining or masked-LM folder ([MASK] in the text): the tokens given for each mask")


def evaluate(model_dir, task: str | None = None, out_dir=None, int8: bool = False, calibrate: bool = False,
             **overrides) -> dict:
    """Re-score a fine-tuned model on its task's eval data (or the data given); returns the metrics (a classifier's
    also its calibration: `ece`, `nll`).

    The task, data and lengths default to those of the run that made the folder (its finetune_config.json).
    int8: run the model dynamically quantized on the CPU (`bertkit.quantize.to_int8`).
    calibrate: fit a temperature on the (first) eval split and fold it into the folder's classifier
    (`bertkit.tasks.calibrate`); the metrics gain `temperature`, `calibrated_ece` and `calibrated_nll`.
    """
    model_config = BertConfig.load(model_folder(model_dir))
    config = run_config(model_dir, {"task": task, **overrides})
    if not config.task and not config.eval_file:
        raise BertkitError(f"{model_dir}: no {CONFIG_FILE}; expected --task and the data to score on")
    if calibrate:
        check_calibratable(model_dir, int8)
        if config.task in NON_TEXT_TASKS:
            raise BertkitError(f"--calibrate on a {config.task} model; expected a classifier (a GLUE task or custom "
                               "files, one label per example)")
    if out_dir is not None:
        check_output_path(Path(out_dir), "--out", {})
    _check_multi_label(config, model_config, model_dir)
    device = resolve_device(config.device)
    with torch_threads(config.threads):
        data = load_task(config, need_train=False, labels=label_names(model_config))
        check_head(data, model_config, model_dir)
        tokenizer = Tokenizer.from_pretrained(model_dir)
        check_tokenizer(tokenizer, model_config, model_dir)
        model = loaded(data.model_class, model_dir, device, int8, label_order(data, model_config, model_dir))
        # calibrating (a TextTask), the scoring pass hands back the logits: the data is run through once
        logits: dict = {}
        extra = {"logits_out": logits} if calibrate else {}
        metrics, write_outputs = data.evaluate(model, tokenizer, config, device, **extra)
        if calibrate:
            split, examples = next(iter(data.evals.items()))
            metrics |= calibrate_folder(model_dir, data, logits[split], data.gold(examples), split)
    if out_dir is not None:
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BertkitError(f"{out_dir}: cannot create the folder ({e.strerror or e}); expected a writable "
                               "folder for --out") from None
        write_outputs(out_dir)
        write_json(Path(out_dir) / "eval_metrics.json", metrics)
    return metrics


def architectures_of(model_dir, model_config: BertConfig) -> list[str]:
    """config.json's architectures or, where it names none (NVIDIA's bert_config.json), the one the weights' heads
    make: taken for a classifier, a pretraining or QA folder was scored with a newly initialised, random head."""
    stated = model_config.extra.get("architectures")
    if stated:
        return stated
    return heads_of(model_folder(model_dir)).get("architectures", [])


def architecture_source(model_dir, model_config: BertConfig) -> str:
    """What an error about the architecture names: the config that states it, or the weights it was read from."""
    directory = model_folder(model_dir)
    if model_config.extra.get("architectures"):
        return f"{config_file(directory)}: architecture"
    return f"{weights_source(directory)}: the weights of"


def check_head(task, model_config, model_dir) -> None:
    """Raise when the folder's model cannot do the task (wrong head or number of labels)."""
    if isinstance(task, SimilarityTask):  # any encoder gives vectors to score (as `bertkit embed` reads any folder)
        return
    architectures = architectures_of(model_dir, model_config)
    if task.model_class.__name__ not in architectures:
        raise BertkitError(f"{architecture_source(model_dir, model_config)} {', '.join(architectures)}; expected "
                           f"{task.model_class.__name__} for {task.name} (fine-tune it first)")
    if isinstance(task, TextTask) and model_config.num_labels != max(1, len(task.labels)):
        raise BertkitError(f"{model_dir}/config.json: {model_config.num_labels} labels; {task.name} has "
                           f"{max(1, len(task.labels))}")


def _check_multi_label(config: FinetuneConfig, model_config: BertConfig, model_dir) -> None:
    """Raise when a multi-label model is to be scored as single-label data or the other way round (before the data
    is read: its label fields would be read the wrong way)."""
    if is_multi_label(model_config) == config.multi_label:
        return
    if config.multi_label:
        raise BertkitError(f"{model_dir}/config.json: no problem_type {MULTI_LABEL}; --multi-label expects a "
                           "classifier fine-tuned with --multi-label (a sigmoid per label)")
    raise BertkitError(f"{model_dir}/config.json: problem_type {MULTI_LABEL} (a sigmoid per label); expected "
                       "--task custom --multi-label (and --label-sep) to score it on a file of its labels")


def predict(model_dir, inputs, source: str = "<stdin>", int8: bool = False, **overrides) -> list[dict]:
    """`predict_stream`'s results as a list."""
    return list(predict_stream(model_dir, inputs, source, int8, **overrides))


def predict_stream(model_dir, inputs, source: str = "<stdin>", int8: bool = False, top_k: int = 5,
                   **overrides) -> Iterator[dict]:
    """Label texts (`text` or `text<TAB>pair` lines), tag their words, answer questions (JSON lines with question
    and context), choose endings (JSON lines with context and endings) or fill in a text's [MASK]s (a pretraining
    or masked-LM folder: each mask's `top_k` tokens, `bertkit.tasks.fill_mask`): what the model folder's head is
    decides which.

    `inputs` is a file path, a binary stream or an iterable of lines. One result per line, in order: a blank line's
    has label (or score, tags, answer, choice) None and an "error" saying so. Labels are the names the training
    data had (the folder's id2label). A classifier also reads a .csv or .jsonl path as a custom file (columns
    `text_a`, `text_b`: the run's by default): one result per row, in order, with the row's line. int8: as
    `evaluate`'s.

    The input is read once to check every line (a bad one stops it before any result is made), then again
    `CHUNK` lines at a time as they are run, so that neither the input nor the results are held whole (a table is
    read whole: a quoted field may span lines). The input, the settings and the model are checked, and the model
    loaded, before this returns.
    """
    model_config = BertConfig.load(model_folder(model_dir))  # before any input is read: stdin may be a terminal
    table = is_table(inputs)
    if isinstance(inputs, (str, Path)):
        source = str(inputs)
    architectures = architectures_of(model_dir, model_config)
    kind = next((k for name, k in _HEADS.items() if name in architectures), "classification")
    if kind in ("tagging", "choice", "fill-mask") and table:
        does, expected = {"tagging": ("tags words", "text, one per line"), "choice": ("chooses endings", "JSON lines"),
                          "fill-mask": ("fills in [MASK]", "text (or text<TAB>pair) lines")}[kind]
        raise BertkitError(f"{source}: a table; {model_dir} {does}: expected {expected}")
    if kind == "fill-mask":
        from bertkit.tasks.fill_mask import check_fill_mask

        check_fill_mask(model_config, model_dir, top_k, model_config.vocab_size)
    config = run_config(model_dir, overrides, default_task="squad1" if kind == "question-answering" else "")
    examples, count, first, table = read_examples(inputs, source, kind, config)
    if kind == "classification" and "BertForSequenceClassification" not in architectures:
        raise BertkitError(f"{architecture_source(model_dir, model_config)} {', '.join(architectures)}; expected a "
                           "fine-tuned BertForSequenceClassification, BertForQuestionAnswering, "
                           "BertForTokenClassification or BertForMultipleChoice (an encoder's vectors: `bertkit "
                           "embed`)")
    device = resolve_device(config.device)
    with torch_threads(config.threads):
        tokenizer = Tokenizer.from_pretrained(model_dir)
        check_tokenizer(tokenizer, model_config, model_dir)
        if kind == "question-answering":
            run = _answerer(model_dir, config, tokenizer, device, int8)
        elif kind == "tagging":
            run = _tagger(model_dir, model_config, config, tokenizer, device, int8)
        elif kind == "choice":
            run = _chooser(model_dir, config, tokenizer, device, int8)
        elif kind == "fill-mask":
            run = _filler(model_dir, config, tokenizer, device, int8, top_k)
        else:
            run = _labeller(model_dir, model_config, config, tokenizer, first, source, device, int8)

    def results() -> Iterator[dict]:
        remaining = itertools.islice(examples(), count)  # the lines that were checked, should the file have grown
        # one bar over the lines, not one per chunk
        bar = progress_bar(total=count, desc="predict", unit="line", disable=count <= CHUNK)
        with bar, torch_threads(config.threads), bars_hidden() if count > CHUNK else nullcontext():
            while chunk := list(itertools.islice(remaining, CHUNK)):
                for example, result in zip(chunk, run(chunk)):
                    yield {"line": example.line} | result if table else result
                bar.update(len(chunk))

    return results()


# the architecture that decides what `predict` does; a folder with none of them is taken for a classifier
_HEADS = {"BertForQuestionAnswering": "question-answering", "BertForTokenClassification": "tagging",
          "BertForMultipleChoice": "choice", "BertForMaskedLM": "fill-mask", "BertForPreTraining": "fill-mask"}
# per kind of model: how `predict` reads an input line, whether its example is blank, what input without any says
_LINES = {
    "question-answering": (parse_question, lambda e: e is None, f"no questions; expected one {QUESTION_LINE} per line"),
    "tagging": (lambda number, line, source: line.rstrip("\r\n"), lambda text: not text.strip(),
                "no text to tag; expected a text per line"),
    "choice": (parse_choice, lambda e: e is None, f"no examples; expected one {CHOICE_LINE} per line"),
    "classification": (parse_line, is_blank, "no text to label; expected one text (or text<TAB>pair) per line"),
    "fill-mask": (parse_line, is_blank, "no text to fill; expected one text with [MASK] (or text<TAB>pair) per line"),
}


def is_table(inputs) -> bool:
    """Whether the input is a .csv or .jsonl file, which a classifier reads by column names."""
    return isinstance(inputs, (str, Path)) and Path(inputs).suffix.lower() in (".csv", ".jsonl")


def read_examples(inputs, source: str, kind: str, config: FinetuneConfig) -> tuple[Callable[[], Iterator], int, object,
                                                                                  bool]:
    """The examples of a `kind` of model's input (a function that reads them anew from the start), their number,
    the first that is not blank, and whether the input was read as a table (a classifier's .csv or .jsonl, columns
    `config.text_a` and `text_b`, whose results give each row's line). Every example is read once here, so that a
    bad line stops the command before anything is run."""
    table = is_table(inputs) and kind == "classification"
    if table:
        rows = read_custom(inputs, config.text_a, None, config.text_b)[0]
        count, first = _checked_input(iter(rows), is_blank, f"{source}: no text to label; expected a text in some row")
        return lambda: iter(rows), count, first, table
    parse, blank, empty = _LINES[kind]  # a QA model reads a .jsonl as its lines
    lines = input_lines(inputs, source)
    examples = lambda: (parse(number, line, source) for number, line in lines())  # noqa: E731
    checked = checked_lines(examples(), source) if kind in ("classification", "fill-mask") else examples()
    count, first = _checked_input(checked, blank, f"{source}: {empty}")
    return examples, count, first, table


def _checked_input(examples: Iterator, blank, empty: str) -> tuple[int, object]:
    """The number of examples and the first that is not blank: every example read (the parse checks each), and
    `empty` raised when all are blank."""
    count, first = 0, None
    for example in examples:
        count += 1
        if first is None and not blank(example):
            first = example
    if first is None:
        raise BertkitError(empty)
    return count, first


def label_order(task, model_config: BertConfig, model_dir) -> list[int] | None:
    """The classifier's rows in the task's label order, when the folder names the task's labels in another order
    (a transformers MNLI model with contradiction first): scored by index, its classes would be swapped."""
    if not isinstance(task, TextTask) or not task.labels or not model_config.id2label:
        return None
    names = [str(name).lower() for name in label_names(model_config)]
    labels = [label.lower() for label in task.labels]
    if names == labels or sorted(names) != sorted(labels):
        return None
    logger.warning("%s/config.json: id2label orders the labels %s; %s's order is %s: its classifier's rows are "
                   "read in that order", model_dir, ", ".join(names), task.name, ", ".join(labels))
    return [names.index(label) for label in labels]


def loaded(model_class, model_dir, device, int8: bool, order: list[int] | None = None):
    """The folder's model on `device`, its classifier's rows taken in `order` (`label_order`) if given; with int8,
    dynamically quantized for the CPU."""
    import torch

    model = model_class.from_pretrained(model_dir).to(device)
    if order is not None:
        with torch.no_grad():
            model.classifier.weight.copy_(model.classifier.weight[order])
            model.classifier.bias.copy_(model.classifier.bias[order])
    if int8:
        from bertkit.quantize import to_int8

        model = to_int8(model)
    return model


def _answerer(model_dir, config: FinetuneConfig, tokenizer, device, int8: bool = False):
    """predict's question-answering branch, the model loaded: a function giving one result per example of a chunk,
    a blank line's (None) with answer None."""
    task = SquadTask(config.task if config.task in SQUAD_TASKS else "squad1")
    threshold = _tuned_threshold(model_dir, config)
    model = loaded(task.model_class, model_dir, device, int8)

    def answer(examples: list) -> list[dict]:
        # answered by place in the chunk: the lines' own ids may repeat (several questions on one document), or
        # clash with the number a line without one gets
        asked = [dataclasses.replace(e, id=str(i)) for i, e in enumerate(examples) if e is not None]
        answers, null_odds = task.answer(model, tokenizer, asked, config, device, threshold) if asked else ({}, {})
        results = []
        for i, e in enumerate(examples):
            if e is None:
                results.append({"question": None, "answer": None, "error": "blank line: no question to answer"})
            else:
                results.append({"id": e.id, "question": e.question, "answer": answers[str(i)]}
                               | ({"null_odds": null_odds[str(i)]} if task.version2 else {}))
        return results

    return answer


def _tagger(model_dir, model_config, config, tokenizer, device, int8: bool = False):
    """predict's tagging branch (`tag_texts`), the model loaded: a function giving one result per text of a chunk,
    a text without a word with words, tags (and entities) None and an "error" saying so."""
    labels = label_names(model_config)
    model = loaded(TaggingTask.model_class, model_dir, device, int8)

    def tag(texts: list[str]) -> list[dict]:
        results = tag_texts(model, tokenizer, texts, labels, config, device)
        return [r if r["words"] else {k: None if k != "text" else v for k, v in r.items()}
                | {"error": "blank line: no word to tag"} for r in results]

    return tag


def _chooser(model_dir, config, tokenizer, device, int8: bool = False):
    """predict's multiple-choice branch, the model loaded: a function giving per example of a chunk the chosen
    ending, its number and every ending's probability (examples with as many endings are run together); a blank
    line's are None."""
    model = loaded(ChoiceTask.model_class, model_dir, device, int8)

    def choose_endings(examples: list) -> list[dict]:
        results = choose(model, tokenizer, examples, config, device)
        return [{"context": e.context} | r if r else {"context": None, "choice": None, "ending": None,
                                                      "probabilities": None, "error": "blank line: no example"}
                for e, r in zip(examples, results)]

    return choose_endings


def _filler(model_dir, config, tokenizer, device, int8: bool = False, top_k: int = 5):
    """predict's masked-LM branch (`fill_masks`), the model loaded: a function giving per example of a chunk each
    [MASK]'s first `top_k` tokens and the text filled in (a pretraining folder's NSP head is not read)."""
    from bertkit.model import BertForMaskedLM
    from bertkit.tasks.fill_mask import fill_masks

    model = loaded(BertForMaskedLM, model_dir, device, int8)
    return lambda examples: fill_masks(model, tokenizer, examples, config.max_length, config.eval_batch_size, device,
                                       top_k)


def _labeller(model_dir, model_config, config, tokenizer, first, source, device, int8: bool = False):
    """predict's classification branch, the model loaded: a function giving one result per example of a chunk;
    `first`, the input's first example with a text, says whether it holds pairs."""
    pairs, trained = first.text_b is not None, _trained_on_pairs(config)
    if trained is not None and pairs != trained:  # a GLUE dev.tsv given whole: its label read as segment B
        logger.warning("%s: %s, but %s was fine-tuned on %s; expected %s per line", source,
                       "text<TAB>pair lines" if pairs else "single texts", model_dir,
                       "pairs" if trained else "single texts", "text<TAB>pair" if trained else "one text")
    labels = label_names(model_config) if model_config.num_labels > 1 else []
    task = TextTask("predict", labels, (), multi_label=is_multi_label(model_config))
    model = loaded(task.model_class, model_dir, device, int8)

    def label(examples: list) -> list[dict]:
        texts = [e for e in examples if not is_blank(e)]
        labelled = zip(*task.predict(model, tokenizer, texts, config, device)) if texts else iter(())
        results = []
        for example in examples:
            text = {"text": example.text_a} | ({"pair": example.text_b} if example.text_b is not None else {})
            if is_blank(example):
                results.append(text | dict.fromkeys(task.result_keys) | {"error": "blank line: no text to label"})
                continue
            results.append(text | task.result(*next(labelled)))
        return results

    return label


def _trained_on_pairs(config: FinetuneConfig) -> bool | None:
    """Whether the run fine-tuned on text pairs (None: no run config to tell)."""
    if not config.task or config.task.lower() == "custom":
        return config.text_b is not None if config.task else None
    return get_task(config.task).text_b is not None


def _tuned_threshold(model_dir, config: FinetuneConfig) -> float:
    """SQuAD v2.0: the null-odds threshold that scored best on the run's eval data (best_f1_thresh, which gives
    best_f1 there, all null at 0.0), else exp(--null-threshold); questions whose null odds exceed it get ""."""
    from bertkit.data.squad import null_odds

    path = Path(model_dir) / "metrics.json"
    if config.task == "squad2" and path.is_file():
        # the run rewrites it after every epoch: one cut short by a kill, or edited, is an error naming it
        what = 'the run\'s record, {"best": {"best_f1_thresh": null odds above or at 0, ...}, ...}'
        record = read_json(path, what)
        best = record.get("best", {}) if isinstance(record, dict) else None
        if not isinstance(best, dict):
            raise BertkitError(f"{path}: {'its best' if isinstance(record, dict) else 'it'} is not a JSON object; "
                               f"expected {what}")
        if "best_f1_thresh" in best:
            threshold = best["best_f1_thresh"]
            if (not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold)
                    or threshold < 0):
                raise BertkitError(f"{path}: best_f1_thresh is {threshold!r}; expected {what}")
            return float(threshold)
    return null_odds(config.null_threshold)
