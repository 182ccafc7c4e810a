"""Linear probes (`bertkit probe`): what each layer of a model holds about a task, read without fine-tuning it.

The encoder is frozen. Every training and eval example is run through it once and pooled at every layer's output (0
the embeddings, then each block: `embed_rows`), or, for a tagging task, each word read at its first piece; one linear
model per layer learns the task's labels from those vectors alone, as in Tenney et al. 2019 and Liu et al. 2019:
logistic regression for classes and tags (a sigmoid per label for multi-label files), ridge regression for scores.
The features are standardized with the training rows' mean and spread, and the L2 strength is chosen per layer by
the loss on a tenth of the training rows held out (stratified by label, or a tenth of the sentences; --split-seed),
then the probe is fit again on all of them and scored on the task's eval data with its official metrics.

A probe's score alone says little: a random encoder's features already carry word identity, and a linear model reads
a lot from them (Zhang & Bowman 2018; Hewitt & Liang 2019). So the first model's architecture with random weights is
probed too (--control), and the table shows it beside the majority class. Several models (pretraining checkpoints,
a model before and after fine-tuning, two vocabularies) are probed on the same data and compared in one table and
one plot; each is recorded in probe.json as it finishes, and a rerun with the same settings keeps those.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from bertkit.checkpoint import atomic_write_text, model_folder
from bertkit.config import BertConfig, option, read_json, write_json
from bertkit.errors import BertkitError
from bertkit.tasks.classification import TextTask, encode, stratified_order
from bertkit.tasks.evaluation import THREADS_HELP
from bertkit.tasks.finetune import NON_TEXT_TASKS, TAGGING_TASK, FinetuneConfig, load_task, resolve_device
from bertkit.tasks.inference import check_tokenizer
from bertkit.tasks.tagging import TaggingTask
from bertkit.tokenizer import Tokenizer
from bertkit.train.distributed import torch_threads
from bertkit.train.logs import progress_bar
from bertkit.train.rundir import check_output_path, make_dir

logger = logging.getLogger("bertkit")

# The options of `finetune` that say which data a probe reads; the rest of FinetuneConfig is about training.
DATA_OPTIONS = ("task", "data_dir", "train_file", "eval_file", "text_a", "text_b", "label", "regression", "multi_label",
                "label_sep", "label_threshold", "group", "eval_split", "split_seed", "max_length",
                "limit_train_examples")
CONTROL = "random control"  # the column of the first model's architecture with random weights
CONTROL_SEED = 0
SELECT_SHARE = 0.1  # of the training rows, held out to choose the L2 strength on
CHUNK = 2048  # examples run through the encoder at a time (their features are kept, the activations are not)
# `finetune`'s help for these names tasks and files a probe does not read
DATA_HELP = {"task": "a GLUE task (CoLA, SST-2, MRPC, STS-B, QNLI, RTE, ...), ner (a tag per word, from CoNLL "
                     "files: named entities, chunks, parts of speech), or custom for your own files",
             "data_dir": "the task's data folder (GLUE: train.tsv and dev.tsv; MRPC may hold Microsoft's "
                         "msr_paraphrase_*.txt; ner: train.txt and dev.txt or valid.txt, or CoNLL-2003's eng.train "
                         "and eng.testa)",
             "train_file": "training file, instead of the one in --data-dir (custom: .csv/.tsv/.jsonl; ner: a word "
                           "and its tag per line, the tag in the last column, a blank line between sentences)",
             "limit_train_examples": "train the probes on the first N training examples only"}


@dataclass
class ProbeConfig:
    """`bertkit probe`: the command's own arguments (the data's are `finetune`'s, in a FinetuneConfig)."""

    models: list[str] = option([], "model folders or Hub ids to probe (pretrained, fine-tuned, checkpoints of a "
                               "pretraining run: their encoders, frozen), each at every layer", positional=True)
    out: str = option("runs/probe", "folder for probe.md, probe.json and probe.png; a rerun with the same settings "
                      "keeps the models already probed there")
    pool: Literal["mean", "cls"] = option("mean", "an example's vector at a layer: the mean over its tokens ([CLS] "
                                          "and [SEP] included) or [CLS]'s (a tagging task reads each word at its "
                                          "first piece)")
    control: bool = option(True, "also probe the first model's architecture with random weights (seed 0): the "
                           "score a layer reaches without pretraining (default: on)")
    l2: list[float] = option([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], "L2 strengths tried per layer (on the mean loss "
                             "over standardized features); the one of least loss on a tenth of the training rows is "
                             "refit on all")
    batch_size: int = option(32, "examples per forward pass")
    threads: int | None = option(None, THREADS_HELP)
    device: str = option("auto", "cpu, cuda, cuda:N, mps or auto (the encoder's; the probes fit on the CPU)")
    overwrite: bool = option(False, "probe every model again, and replace a probe.json of other settings")

    def __post_init__(self):
        try:
            l2 = [float(v) for v in self.l2]
        except (TypeError, ValueError):
            l2 = []
        if not l2 or not all(math.isfinite(v) and v > 0 for v in l2):
            raise BertkitError(f"--l2 {' '.join(map(str, self.l2))}; expected one or more positive numbers, such as "
                               "1e-3 1e-2 1e-1")
        self.l2 = l2

    def check(self) -> None:
        if not self.models:
            raise BertkitError("no model; expected one or more model folders (or Hub ids) to probe")
        if len({str(m) for m in self.models}) < len(self.models):
            raise BertkitError("a model given twice; expected each model once")
        if self.batch_size < 1:
            raise BertkitError(f"--batch-size is {self.batch_size}; expected a positive number")


def probe(config: ProbeConfig, data: FinetuneConfig) -> dict:
    """Probe every layer of each of `config.models` on the task `data` names; writes probe.json, probe.md and
    probe.png into `config.out` and returns the summary with probe.md's text under "table"."""
    config.check()
    data.check(training=False)
    out = Path(config.out)
    models = [str(model_folder(m)) for m in config.models]
    check_output_path(out, "--out", {f"model {i + 1}": m for i, m in enumerate(models)})
    if data.task in NON_TEXT_TASKS and data.task != TAGGING_TASK:
        raise BertkitError(f"--task {data.task}: probes are for a GLUE task, custom files (a label or score per text "
                           f"or pair) or {TAGGING_TASK} (a tag per word)")
    task = load_task(data)
    if data.limit_train_examples:
        task.train = task.train[: data.limit_train_examples]
    units = (WordUnits if isinstance(task, TaggingTask) else TextUnits)(task, data)
    settings = _settings(config, data, units)
    summary = _previous(out / "probe.json", settings, config.overwrite)
    make_dir(out, "--out")
    device = resolve_device(config.device)
    columns = [*[(m, m) for m in models], *([(CONTROL, models[0])] if config.control else [])]
    with torch_threads(config.threads):
        for name, folder in columns:
            if name in summary["models"]:
                logger.info("%s: probed before with these settings, kept", name)
                continue
            model, tokenizer = _encoder(folder, control=name == CONTROL, device=device)
            layers = probe_layers(model, tokenizer, units, config, column_name(name))
            summary["models"][name] = {"folder": folder, "layers": layers,
                                       "num_hidden_layers": model.config.num_hidden_layers}
            write_json(out / "probe.json", summary)  # each model kept as it finishes
    summary["models"] = {name: summary["models"][name] for name, _ in columns}
    summary["majority"] = units.majority()
    write_json(out / "probe.json", summary)
    table = probe_table(summary)
    atomic_write_text(out / "probe.md", table)
    plot(summary, out / "probe.png")
    return summary | {"table": table}


def _settings(config: ProbeConfig, data: FinetuneConfig, units: Units) -> dict:
    """What a probe.json's results depend on: the data, the pooling, the L2 grid (the models are its rows)."""
    task = units.task
    return {"data": {name: getattr(data, name) for name in DATA_OPTIONS}, "pool": config.pool,
            "l2": [float(v) for v in config.l2], "task": task.name, "metrics": list(units.headline_metrics),
            "probe": "ridge regression" if units.kind == "regression" else "logistic regression",
            "unit": units.unit, "train_examples": len(task.train),
            "eval_examples": {s: len(e) for s, e in task.evals.items()}}


def _previous(path: Path, settings: dict, overwrite: bool) -> dict:
    """The summary to extend: probe.json's models when it was written with these settings, else a new one."""
    if path.is_file() and not overwrite:
        saved = read_json(path, "the probes of an earlier `bertkit probe`")
        if saved.get("settings") == settings:
            return saved
        changed = sorted(k for k in settings if saved.get("settings", {}).get(k) != settings[k])
        raise BertkitError(f"{path}: probes of other settings ({', '.join(changed) or 'unreadable'}); expected the "
                           "same data and options to extend it, another --out, or --overwrite to replace it")
    return {"settings": settings, "models": {}}


def _encoder(folder: str, control: bool, device: torch.device):
    """A model folder's encoder (BertModel: a fine-tuned or pretraining model's heads are left out) and tokenizer;
    `control`: its architecture with random weights drawn from CONTROL_SEED."""
    from bertkit.model import BertModel

    tokenizer = Tokenizer.from_pretrained(folder)
    if control:
        torch.manual_seed(CONTROL_SEED)
        model = BertModel(BertConfig.load(folder))
    else:
        model = BertModel.from_pretrained(folder)
    check_tokenizer(tokenizer, model.config, folder)
    return model.to(device).eval(), tokenizer


def layer_features(model, rows: list[dict], pool: str, batch_size: int, pad_id: int, desc: str) -> np.ndarray:
    """(L + 1, N, H) float32: every example's pooled vector at every layer's output, the embeddings first."""
    from bertkit.tasks.embed import embed_rows

    num_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    features = np.empty((num_layers + 1, len(rows), hidden), dtype=np.float32)
    with progress_bar(total=len(rows), desc=desc, unit="ex", disable=len(rows) <= CHUNK) as bar:
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start:start + CHUNK]
            vectors = embed_rows(model, chunk, range(num_layers + 1), pool, "concat", batch_size=batch_size,
                                 pad_id=pad_id)
            features[:, start:start + len(chunk)] = torch.stack(vectors).view(len(chunk), num_layers + 1,
                                                                              hidden).transpose(0, 1).numpy()
            bar.update(len(chunk))
    return features


def word_features(model, rows: list[dict], firsts: list[list[int]], batch_size: int, pad_id: int,
                  desc: str) -> np.ndarray:
    """(L + 1, W, H) float32: the vector of every word at every layer's output, its first piece's, the words in the
    order of `rows` and of each row's `firsts` (its words' first positions)."""
    from bertkit.tasks.embed import embed_rows

    num_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    features = np.empty((num_layers + 1, sum(map(len, firsts)), hidden), dtype=np.float32)
    step, at = CHUNK // 4, 0  # a vector per token of a chunk's rows at once: a quarter as many rows
    with progress_bar(total=len(rows), desc=desc, unit="ex", disable=len(rows) <= step) as bar:
        for start in range(0, len(rows), step):
            states = embed_rows(model, rows[start:start + step], range(num_layers + 1), "tokens", "concat",
                                batch_size=batch_size, pad_id=pad_id)
            for tokens, positions in zip(states, firsts[start:start + step]):
                chosen = tokens[positions].view(len(positions), num_layers + 1, hidden).transpose(0, 1)
                features[:, at:at + len(positions)] = chosen.numpy()
                at += len(positions)
            bar.update(len(states))
    return features


class Units:
    """What a probe reads and predicts of a task's examples: a vector per unit at every layer (`features`), the
    training units' targets, which of them choose the L2 strength, and the task's metrics from a probe's logits."""

    def __init__(self, task, data: FinetuneConfig):
        self.task, self.data = task, data

    @property
    def outputs(self) -> int:
        """Classes, tags or labels (0 for regression: one score)."""
        return len(self.task.labels)


class TextUnits(Units):
    """A text task: a vector per text (or pair), pooled; its label, score or labels."""

    unit = "example"

    def __init__(self, task: TextTask, data: FinetuneConfig):
        super().__init__(task, data)
        self.kind = "regression" if task.is_regression else "multi_label" if task.multi_label else "classes"
        self.headline_metrics = task.metrics

    def features(self, model, tokenizer, examples, config: ProbeConfig, desc: str) -> np.ndarray:
        rows = encode(examples, tokenizer, self.data.max_length, with_labels=False)
        return layer_features(model, rows, config.pool, config.batch_size, tokenizer.pad_id, desc)

    def targets(self) -> torch.Tensor:
        gold = self.task.gold(self.task.train)
        return torch.tensor(gold, dtype=torch.long if self.kind == "classes" else torch.float64)

    def selection(self) -> torch.Tensor:
        """Which training units choose the L2 strength: a tenth of the examples, stratified by label."""
        order = stratified_order([e.label for e in self.task.train], self.data.split_seed, self.task.is_regression)
        chosen = torch.zeros(len(order), dtype=torch.bool)
        chosen[order[:max(1, round(SELECT_SHARE * len(order)))]] = True
        return chosen

    def scores(self, logits: dict[str, torch.Tensor]) -> dict:
        return self.task.scores({split: v.float() for split, v in logits.items()}, self.data)[0]

    def majority(self) -> dict | None:
        """The metrics of always answering the training rows' most common class (multi-label: each label's most
        common value); None for regression, where a constant has no correlation."""
        task = self.task
        if task.is_regression:
            return None
        if task.multi_label:
            share = torch.tensor(task.gold(task.train), dtype=torch.float64).mean(0)
            constant = torch.where(share >= 0.5, 1.0, -1.0)
        else:
            common = Counter(e.label for e in task.train).most_common(1)[0][0]
            constant = torch.nn.functional.one_hot(torch.tensor(common), len(task.labels)).double()
        return self.scores({split: constant.expand(len(examples), -1) for split, examples in task.evals.items()})


class WordUnits(Units):
    """A tagging task: a vector per word (its first piece's, as a token classifier reads it) and its tag; scored as
    `evaluate` scores a tagger (entity F1 for chunk tags, else word accuracy)."""

    unit = "word"
    kind = "classes"

    def __init__(self, task: TaggingTask, data: FinetuneConfig):
        super().__init__(task, data)
        self.headline_metrics = task.metrics[:1]
        self.index = {tag: i for i, tag in enumerate(task.labels)}

    def features(self, model, tokenizer, sentences, config: ProbeConfig, desc: str) -> np.ndarray:
        from bertkit.tasks.tagging import encode as encode_words, sentence_pieces

        rows, places = encode_words(tokenizer, sentence_pieces(tokenizer, sentences), self.data.max_length)
        return word_features(model, rows, [firsts for _, _, firsts in places], config.batch_size, tokenizer.pad_id,
                             desc)

    def targets(self) -> torch.Tensor:
        return torch.tensor([self.index[tag] for s in self.task.train for tag in s.tags])

    def selection(self) -> torch.Tensor:
        """Which training units choose the L2 strength: the words of a tenth of the sentences, drawn by
        --split-seed."""
        sentences = self.task.train
        order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(self.data.split_seed))
        held = set(order[:max(1, round(SELECT_SHARE * len(sentences)))].tolist())
        return torch.tensor([i in held for i, s in enumerate(sentences) for _ in s.tags])

    def scores(self, logits: dict[str, torch.Tensor]) -> dict:
        predicted = {}
        for split, sentences in self.task.evals.items():
            best = iter(logits[split].argmax(-1).tolist())
            predicted[split] = [[self.task.labels[next(best)] for _ in s.words] for s in sentences]
        return self.task.scores(predicted)[0]

    def majority(self) -> dict:
        """The metrics of tagging every word with the training words' most common tag."""
        common = self.index[Counter(tag for s in self.task.train for tag in s.tags).most_common(1)[0][0]]
        constant = torch.nn.functional.one_hot(torch.tensor(common), len(self.task.labels)).double()
        return self.scores({split: constant.expand(sum(len(s.words) for s in sentences), -1)
                            for split, sentences in self.task.evals.items()})


def probe_layers(model, tokenizer, units: Units, config: ProbeConfig,
                 name: str = "model") -> list[dict]:
    """Per layer: the L2 strength chosen, the held-out loss of each, and the metrics on every eval split (`name`
    labels the progress bars)."""
    train = units.features(model, tokenizer, units.task.train, config, f"{name}: train")
    evals = {split: units.features(model, tokenizer, examples, config, f"{name}: {split}")
             for split, examples in units.task.evals.items()}
    y, held, kind = units.targets(), units.selection(), units.kind
    results = []
    for layer in progress_bar(iterable=range(len(train)), desc=f"{name}: probes", unit="layer", disable=len(train) < 4):
        x = torch.from_numpy(train[layer]).double()
        x_fit, y_fit, x_held, y_held = x[~held], y[~held], x[held], y[held]  # copies: made once for the whole grid
        chosen, fits, start = {}, {}, None
        for l2 in sorted(config.l2, reverse=True):  # each fit starts from the last, less penalized one's optimum
            start = fits[l2] = LinearProbe.fit(x_fit, y_fit, kind, l2, units.outputs, start)
            chosen[l2] = probe_loss(start.logits(x_held), y_held, kind)
        best = min(config.l2, key=lambda v: (chosen[v], -v))  # a tie: the stronger penalty
        fitted = LinearProbe.fit(x, y, kind, best, units.outputs, fits[best])
        metrics = units.scores({split: fitted.logits(torch.from_numpy(f[layer]).double())
                                for split, f in evals.items()})
        results.append({"layer": layer, "l2": best, "selection_loss": {str(k): v for k, v in chosen.items()},
                        "metrics": metrics})
    return results


def probe_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> float:
    """The mean loss a probe minimizes (before its penalty): cross-entropy, binary cross-entropy summed over labels,
    or squared error."""
    if kind == "regression":
        return float((logits[:, 0] - y).pow(2).mean())
    target = torch.nn.functional.one_hot(y, logits.shape[1]) if kind == "classes" else y
    return _loss_and_residual(logits.double().numpy(), target.double().numpy(), kind == "classes")[0]


def _loss_and_residual(logits: np.ndarray, target: np.ndarray, softmax: bool) -> tuple[float, np.ndarray]:
    """Softmax cross-entropy (`target` one-hot) or binary cross-entropy per output, summed over outputs and averaged
    over rows, and its gradient with respect to the logits."""
    from scipy.special import expit, log_softmax

    if softmax:
        log_p = log_softmax(logits, axis=1)
        return float(-(target * log_p).sum() / len(logits)), (np.exp(log_p) - target) / len(logits)
    loss = (np.logaddexp(0, logits) - target * logits).sum() / len(logits)
    return float(loss), (expit(logits) - target) / len(logits)


@dataclass
class LinearProbe:
    """A linear model on standardized features: logits = ((x - mean) / std) @ weight.T + bias."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (outputs, H)
    bias: torch.Tensor  # (outputs,)

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, kind: str, l2: float, classes: int,
            start: LinearProbe | None = None) -> LinearProbe:
        """Minimize the mean loss + l2 / 2 x |weight|^2 (the bias free): softmax cross-entropy over `classes`
        ("classes", y class indices; two classes: one logistic output, class 0's logit held at 0), binary
        cross-entropy per label ("multi_label", y 0/1 rows), or squared error ("regression", y scores; ridge in closed
        form, the penalty then l2 x |weight|^2 as scikit-learn's Ridge with alpha = l2 x N). Logistic probes by
        L-BFGS (SciPy's, on the loss's own gradient in float64), as scikit-learn's LogisticRegression with C = 1 /
        (l2 x N) and tol 1e-6, from `start`'s weights (another fit's on these features: the same optimum, sooner) or
        zeros."""
        from scipy.optimize import minimize

        mean = x.mean(0)
        std = x.std(0, correction=0).clamp(min=1e-6)  # a constant feature (a padding dimension) stays 0
        z = (x - mean) / std
        if kind == "regression":
            centered = y - y.mean()
            gram = z.T @ z / len(z) + l2 * torch.eye(z.shape[1], dtype=z.dtype)
            weight = torch.linalg.solve(gram, z.T @ centered / len(z))
            return cls(mean, std, weight[None], y.mean()[None])
        binary = kind == "classes" and classes == 2
        softmax = kind == "classes" and not binary
        target = (torch.nn.functional.one_hot(y, classes) if softmax else y[:, None] if binary else y).double().numpy()
        outputs, size = target.shape[1], z.shape[1]
        if start is None:
            weight, bias = torch.zeros(outputs, size, dtype=z.dtype), torch.zeros(outputs, dtype=z.dtype)
        else:  # its weights on these standardized features: the same function of x
            weight = start.weight[-outputs:] * (std / start.std)
            bias = start.bias[-outputs:] + ((mean - start.mean) / start.std) @ start.weight[-outputs:].T
        features = z.double().numpy()

        def loss_and_gradient(flat: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = flat[:-outputs].reshape(outputs, size), flat[-outputs:]
            loss, residual = _loss_and_residual(features @ w.T + b, target, softmax)
            return loss + l2 / 2 * (w * w).sum(), np.concatenate([(residual.T @ features + l2 * w).ravel(),
                                                                   residual.sum(0)])

        options = {"maxiter": 1000, "gtol": 1e-6, "ftol": 64 * np.finfo(float).eps, "maxcor": 20}  # ftol: sklearn's
        flat = minimize(loss_and_gradient, torch.cat([weight.flatten(), bias]).double().numpy(), jac=True,
                        method="L-BFGS-B", options=options).x
        weight = torch.from_numpy(flat[:-outputs].reshape(outputs, size)).to(z.dtype)
        bias = torch.from_numpy(flat[-outputs:]).to(z.dtype)
        if binary:  # as two classes' logits: 0 and the output's
            weight, bias = torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros_like(bias), bias])
        return cls(mean, std, weight, bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias


def headline(summary: dict, metrics: dict) -> float:
    """The first eval split's score (the mean of the task's metrics, as `finetune` keeps its best epoch by)."""
    from bertkit.tasks.metrics import headline_score

    return headline_score({m: metrics[m] for m in summary["settings"]["metrics"]})


def column_name(model: str) -> str:
    return model if model == CONTROL else Path(model).name


def column_names(summary: dict) -> dict[str, str]:
    """A short name per model: its folder's name, with the folder above it where two would read alike."""
    names = {m: column_name(m) for m in summary["models"]}
    seen = Counter(names.values())
    return {m: (f"{Path(m).parent.name}/{n}" if seen[n] > 1 else n) for m, n in names.items()}


def probe_table(summary: dict) -> str:
    settings = summary["settings"]
    split, size = next(iter(settings["eval_examples"].items()))
    metric = " and ".join(settings["metrics"])
    names = column_names(summary)
    depth = max(len(m["layers"]) for m in summary["models"].values())
    words = settings["unit"] == "word"
    what = "each word's vector (its first piece's)" if words else f"the {settings['pool']}-pooled output"
    unit = "sentences" if words else "examples"
    lines = [f"# Linear probes: {settings['task']}, {split} ({size:,} {unit})", "",
             f"A {settings['probe']} probe per layer on {what}, trained on {settings['train_examples']:,} {unit}; "
             f"{metric} on {split}.", "",
             "| layer | " + " | ".join(names.values()) + " |", "|---|" + "---|" * len(names)]
    for layer in range(depth):
        cells = []
        for model in summary["models"].values():
            cell = model["layers"][layer] if layer < len(model["layers"]) else None
            cells.append(f"{headline(summary, cell['metrics']):.2f}" if cell else "")
        lines.append(f"| {layer}{' (embeddings)' if layer == 0 else ''} | " + " | ".join(cells) + " |")
    best = []
    for model in summary["models"].values():
        scores = [headline(summary, cell["metrics"]) for cell in model["layers"]]
        best.append(f"layer {int(np.argmax(scores))}: {max(scores):.2f}")
    lines.append("| best | " + " | ".join(best) + " |")
    if summary.get("majority"):
        lines += ["", f"The majority {'tag' if words else 'class'} scores "
                      f"{headline(summary, summary['majority']):.2f}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Each model's score by layer, the random control dashed, the majority class dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = summary["settings"]
    names = column_names(summary)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for model, record in summary["models"].items():
        scores = [headline(summary, cell["metrics"]) for cell in record["layers"]]
        style = {"linestyle": "--", "color": "gray"} if model == CONTROL else {}
        ax.plot(range(len(scores)), scores, marker="o", markersize=3, label=names[model], **style)
    if summary.get("majority"):
        ax.axhline(headline(summary, summary["majority"]), linestyle=":", color="black", label="majority class")
    ax.set_xlabel("layer (0: embeddings)")
    ax.set_ylabel(" / ".join(settings["metrics"]))
    ax.set_title(f"Linear probes by layer: {settings['task']}, {next(iter(settings['eval_examples']))}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
