"""Which words a classifier's result rests on: `bertkit explain` gives each token of the input a share of the
probability of one label (a regressor's score), and sums the shares of a word's tokens into the word's.

- integrated-gradients (Sundararajan et al. 2017): the gradient integrated along the straight path from a baseline
  to the input in the space of the word embeddings, times the difference of the two (Captum's
  LayerIntegratedGradients on `word_embeddings`), by Gauss-Legendre quadrature over `steps` points. The baseline is
  the input with every token but [CLS] and [SEP] replaced by [PAD] (or [MASK]), positions and segments as they
  were. The shares add up to the output's change from baseline to input, up to the quadrature's error (`delta`).
- gradient-x-input: the gradient at the input times the word embeddings, summed over the hidden size: one
  backward pass, and no such sum.
- occlusion: a word's share is how far the output falls when its tokens are replaced by the baseline token; one
  forward pass per word, run in batches.

`ExplainConfig` holds the command's arguments; `explain_stream` yields one result per input line, `attribute` is the
method on one encoded input, `write_html` draws the results as shaded words.
"""

from __future__ import annotations

import contextlib
import html
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from bertkit.checkpoint import model_folder
from bertkit.config import BertConfig, option
from bertkit.errors import BertkitError
from bertkit.model import BertForSequenceClassification
from bertkit.tasks.classification import is_blank
from bertkit.tasks.evaluation import (DEVICE_HELP, TEXT_A_HELP, TEXT_B_HELP, THREADS_HELP, architecture_source,
                                      architectures_of, label_names, loaded, read_examples, run_config)
from bertkit.tasks.finetune import resolve_device
from bertkit.tasks.inference import check_segments, check_tokenizer
from bertkit.tokenizer import Tokenizer
from bertkit.train.distributed import torch_threads
from bertkit.train.logs import progress_bar

Method = Literal["integrated-gradients", "gradient-x-input", "occlusion"]
Baseline = Literal["pad", "mask"]
Quantity = Literal["probability", "log-odds"]
METHODS, BASELINES, QUANTITIES = get_args(Method), get_args(Baseline), get_args(Quantity)


@dataclass
class ExplainConfig:
    """`bertkit explain`: the command's arguments; all but input, out and html are `explain_stream`'s keywords."""

    model_dir: str = option("", "a fine-tuned classifier or regressor folder (finetune on a GLUE task or custom "
                            "files), or a Hub model id", positional=True)
    input: str = option("-", "input file: text or text<TAB>pair lines, or a .csv or .jsonl file with named columns "
                        "as finetune's custom files (default: standard input)", positional=True)
    out: str | None = option(None, "write the JSON lines here instead of standard output, the file whole or not at "
                             "all")
    html: str | None = option(None, "also draw the results on one HTML page, each word shaded by its share: green "
                              "toward the explained label, red against it")
    method: Method = option("integrated-gradients", "integrated-gradients (the shares add up to the output's change "
                            "from the baseline), gradient-x-input (one backward pass, fastest, but on SST-2 it ranked "
                            "words barely better than random order: docs/findings.md) or occlusion (the fall of the "
                            "output when a word is replaced by the baseline token; a forward pass per word)")
    steps: int = option(50, "integrated-gradients: points of the Gauss-Legendre quadrature along the path (more: a "
                        "smaller delta, slower)")
    baseline: Baseline = option("pad", "what stands in for the words: the input's tokens but [CLS] and [SEP] "
                                "replaced by [PAD] or by [MASK]")
    quantity: Quantity = option("probability", "what is explained: the label's probability, or its log-odds, "
                                "log(p / (1 - p)), which does not saturate near 0 and 1 (a regressor: its score "
                                "either way)")
    label: str | None = option(None, "the label explained (default: each input's predicted "
                               "label; a multi-label model's most probable; a regressor explains its score)")
    text_a: str | None = option(None, TEXT_A_HELP)
    text_b: str | None = option(None, TEXT_B_HELP)
    max_length: int | None = option(None, "tokens per input; longer ones are cut (default: the run's)")
    eval_batch_size: int | None = option(None, "rows run at a time: points of the path, or occluded words "
                                         "(default: the run's)")
    threads: int | None = option(None, THREADS_HELP)
    device: str | None = option(None, DEVICE_HELP)

    def check(self) -> None:
        if self.method not in METHODS:
            raise BertkitError(f"--method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.baseline not in BASELINES:
            raise BertkitError(f"--baseline {self.baseline!r}; expected one of {', '.join(BASELINES)}")
        if self.quantity not in QUANTITIES:
            raise BertkitError(f"--quantity {self.quantity!r}; expected one of {', '.join(QUANTITIES)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 10_000:
            raise BertkitError(f"--steps {self.steps!r}; expected a whole number of points from 1 to 10,000")


@dataclass
class Attribution:
    """One input's shares: per token, the output at the input and at the baseline, and integrated gradients'
    quadrature error (sum of the shares minus the output's change; None for the other methods)."""

    tokens: torch.Tensor  # (T,) float64
    output: float
    baseline_output: float
    delta: float | None


def scorer(model, target: int, quantity: str = "probability"):
    """The explained number of each row of logits: the target's probability (softmax; a multi-label model's
    sigmoid) or its log-odds, log(p / (1 - p)); a regressor's score."""
    if model.num_labels == 1:
        return lambda logits: logits[:, 0]
    if model.multi_label:
        return (lambda logits: torch.sigmoid(logits[:, target])) if quantity == "probability" else (
            lambda logits: logits[:, target])
    if quantity == "probability":
        return lambda logits: torch.softmax(logits, -1)[:, target]

    def log_odds(logits: torch.Tensor) -> torch.Tensor:
        others = torch.cat([logits[:, :target], logits[:, target + 1:]], 1)
        return logits[:, target] - torch.logsumexp(others, 1)  # log p_t - log(1 - p_t), the softmax's Z cancelled

    return log_odds


@contextlib.contextmanager
def word_embeddings_replaced(model, holder: list):
    """While inside, the model's word embeddings give `holder[0]` (B, T, H) instead of looking the ids up, as Captum
    swaps a layer's output: the path's points go in where the words' vectors would, position and segment
    embeddings are added to them as to the words'."""
    handle = model.bert.embeddings.word_embeddings.register_forward_hook(lambda module, args, output: holder[0])
    try:
        yield
    finally:
        handle.remove()


def attribute(model, input_ids: Sequence[int], token_type_ids: Sequence[int], target: int, method: str, steps: int,
              baseline_ids: Sequence[int], batch_size: int, words: Sequence[Sequence[int]] = (),
              quantity: str = "probability") -> Attribution:
    """One encoded input's token shares of the target's `quantity` (`scorer`) by `method`. `baseline_ids` are the
    ids that stand for the input (same length, [CLS] and [SEP] kept); `words`, the token positions of each word,
    which occlusion replaces together (a word's share is then split evenly over its tokens)."""
    if method not in METHODS:
        raise BertkitError(f"method {method!r}; expected one of {', '.join(METHODS)}")
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    types = torch.tensor([token_type_ids], device=device)
    reference = torch.tensor([baseline_ids], device=device)
    score = scorer(model, target, quantity)
    table = model.bert.embeddings.word_embeddings
    with torch.no_grad():
        x, x0 = table(ids)[0], table(reference)[0]  # (T, H)

    def run(points: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scores of (n, T, H) points of the embedding space, and with `grad` their gradients."""
        holder = [points.requires_grad_(grad)]
        with word_embeddings_replaced(model, holder), torch.set_grad_enabled(grad):
            out = score(model(ids.expand(len(points), -1), types.expand(len(points), -1)).logits.float())
            gradient = torch.autograd.grad(out.sum(), points)[0] if grad else None
        return out.detach(), gradient

    ends = run(torch.stack([x, x0]), grad=False)[0].double()
    output, baseline_output = ends.tolist()
    delta = None
    if method == "integrated-gradients":
        nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]; the path's alpha is in [0, 1]
        alphas, weights = (nodes + 1) / 2, weights / 2
        total = torch.zeros_like(x, dtype=torch.float64)
        for start in range(0, steps, batch_size):
            a = torch.tensor(alphas[start:start + batch_size], dtype=x.dtype, device=device)[:, None, None]
            gradient = run(x0 + a * (x - x0), grad=True)[1]
            w = torch.tensor(weights[start:start + batch_size], dtype=torch.float64, device=device)[:, None, None]
            total += (gradient.double() * w).sum(0)
        shares = ((x - x0).double() * total).sum(-1)
        delta = shares.sum().item() - (output - baseline_output)
    elif method == "gradient-x-input":
        shares = (run(x[None], grad=True)[1][0].double() * x.double()).sum(-1)
    else:  # occlusion
        shares = torch.zeros(len(input_ids), dtype=torch.float64, device=device)
        for start in range(0, len(words), batch_size):
            chunk = words[start:start + batch_size]
            points = x.expand(len(chunk), -1, -1).clone()
            for row, positions in enumerate(chunk):
                points[row, list(positions)] = x0[list(positions)]
            fall = output - run(points, grad=False)[0].double()
            for positions, value in zip(chunk, fall):
                shares[list(positions)] = value / len(positions)
    return Attribution(shares.cpu(), output, baseline_output, delta)


def word_shares(encoded: dict, shares: torch.Tensor, texts: Sequence[str]) -> list[dict]:
    """The shares of a word's tokens summed into the word's: each word of each text (a pair's second: segment 1)
    with its characters, its span in its text and its share, in order."""
    values, words = shares.tolist(), []
    for positions in word_positions(encoded):
        segment = encoded["token_type_ids"][positions[0]]
        start, end = encoded["offsets"][positions[0]][0], encoded["offsets"][positions[-1]][1]
        words.append({"word": texts[segment][start:end], "segment": segment, "start": start, "end": end,
                      "attribution": sum(values[p] for p in positions)})
    return words


def word_positions(encoded: dict) -> list[list[int]]:
    """The token positions of each word, in order (what occlusion replaces together)."""
    positions: dict[tuple[int, int], list[int]] = {}
    for i, (segment, word) in enumerate(zip(encoded["token_type_ids"], encoded["word_ids"])):
        if word is not None:
            positions.setdefault((segment, word), []).append(i)
    return list(positions.values())


def explain_stream(model_dir, inputs, source: str = "<stdin>", method: str = "integrated-gradients", steps: int = 50,
                   baseline: str = "pad", quantity: str = "probability", label: str | None = None, **overrides
                   ) -> Iterator[dict]:
    """Explain a classifier's (or regressor's) result on each input line (`text` or `text<TAB>pair`; a .csv or
    .jsonl path read by columns as `predict` reads it): one dict per line, in order, with the prediction, the label
    explained, the output and the baseline's, and the shares of every word (`words`: word, segment, start, end,
    attribution) and token (`tokens`); a blank line's has an "error". `overrides` are `predict`'s (max_length,
    eval_batch_size, text_a, text_b, threads, device). The input, settings and model are checked and loaded before
    this returns."""
    ExplainConfig(model_dir=str(model_dir), method=method, steps=steps, baseline=baseline, quantity=quantity).check()
    model_config = BertConfig.load(model_folder(model_dir))
    if isinstance(inputs, (str, Path)):
        source = str(inputs)
    architectures = architectures_of(model_dir, model_config)
    if "BertForSequenceClassification" not in architectures:
        raise BertkitError(f"{architecture_source(model_dir, model_config)} {', '.join(architectures)}; expected a "
                           "fine-tuned BertForSequenceClassification: `explain` attributes a classifier's or "
                           "regressor's output to its input's words")
    names = label_names(model_config) if model_config.num_labels > 1 else []
    if label is not None and label not in names:
        raise BertkitError(f"--label {label!r}: {model_dir} has " + (f"labels {', '.join(names)}; expected one of them"
                           if names else "one output, a regressor's score; expected no --label"))
    config = run_config(model_dir, overrides)
    examples, count, _, table = read_examples(inputs, source, "classification", config)
    device = resolve_device(config.device)
    with torch_threads(config.threads):
        tokenizer = Tokenizer.from_pretrained(model_dir)
        check_tokenizer(tokenizer, model_config, model_dir)
        model = loaded(BertForSequenceClassification, model_dir, device, int8=False).eval().requires_grad_(False)
    stand_in = tokenizer.pad_id if baseline == "pad" else tokenizer.mask_id
    specials = {tokenizer.cls_id, tokenizer.sep_id}

    def explained(example) -> dict:
        text = {"text": example.text_a} | ({"pair": example.text_b} if example.text_b is not None else {})
        if is_blank(example):
            return text | {"error": "blank line: no text to explain"}
        encoded = tokenizer.encode_words(example.text_a, example.text_b, config.max_length)
        check_segments(model_config, [encoded])
        with torch.no_grad():
            logits = model(torch.tensor([encoded["input_ids"]], device=device),
                           torch.tensor([encoded["token_type_ids"]], device=device)).logits[0].float().cpu()
        if not names:
            prediction, target = {"score": logits[0].item()}, 0
        else:
            probabilities = torch.sigmoid(logits) if model.multi_label else torch.softmax(logits, -1)
            best = int(probabilities.argmax())
            target = names.index(label) if label is not None else best
            chosen = ({"labels": [n for n, p in zip(names, probabilities) if p >= config.label_threshold]}
                      if model.multi_label else {"label": names[best]})
            prediction = chosen | {"probability": probabilities[best].item()}
        baseline_ids = [i if i in specials else stand_in for i in encoded["input_ids"]]
        result = attribute(model, encoded["input_ids"], encoded["token_type_ids"], target, method, steps, baseline_ids,
                           config.eval_batch_size, word_positions(encoded), quantity)
        what = {"explained": names[target] if names else "score", "quantity": quantity if names else "score",
                "method": method, "output": result.output, "baseline_output": result.baseline_output}
        error = {"delta": result.delta} if result.delta is not None else {}
        shares = {"words": word_shares(encoded, result.tokens, (example.text_a, example.text_b or "")),
                  "tokens": [{"token": t, "attribution": a} for t, a in zip(encoded["tokens"], result.tokens.tolist())]}
        return text | prediction | what | error | shares

    def results() -> Iterator[dict]:
        with progress_bar(total=count, desc="explain", unit="line", disable=count < 16) as bar, \
                torch_threads(config.threads):
            for example in itertools.islice(examples(), count):
                result = explained(example)
                yield {"line": example.line} | result if table else result
                bar.update(1)

    return results()


def explain(model_dir, inputs, source: str = "<stdin>", **options) -> list[dict]:
    """`explain_stream`'s results as a list."""
    return list(explain_stream(model_dir, inputs, source, **options))


def _shaded(text: str, words: list[dict]) -> str:
    """The text as HTML, each word on a background whose colour is its share's sign and whose strength is its share
    against the largest in the input."""
    largest = max((abs(w["attribution"]) for w in words), default=0.0) or 1.0
    pieces, at = [], 0
    for w in words:
        pieces.append(html.escape(text[at:w["start"]]))
        strength = min(abs(w["attribution"]) / largest, 1.0)
        colour = "22, 140, 60" if w["attribution"] >= 0 else "200, 40, 40"
        pieces.append(f'<span style="background: rgba({colour}, {0.08 + 0.72 * strength:.2f})" '
                      f'title="{w["attribution"]:+.4f}">{html.escape(text[w["start"]:w["end"]])}</span>')
        at = w["end"]
    pieces.append(html.escape(text[at:]))
    return "".join(pieces)


def write_html(results: Sequence[dict], path, model_dir, method: str) -> None:
    """One page: per input its prediction, the label explained and its words shaded by their shares."""
    from bertkit.checkpoint import atomic_write

    rows = []
    for number, r in enumerate(results, 1):
        if "error" in r:
            rows.append(f"<tr><td>{number}</td><td colspan=3>{html.escape(r['error'])}</td></tr>")
            continue
        segments = [(r["text"], 0)] + ([(r["pair"], 1)] if "pair" in r else [])
        body = "<br>".join(_shaded(text, [w for w in r["words"] if w["segment"] == s]) for text, s in segments)
        predicted = (f"{r['score']:.3f}" if "score" in r else
                     f"{html.escape(', '.join(r['labels']) if 'labels' in r else r['label'])} ({r['probability']:.3f})")
        change = r["output"] - r["baseline_output"]
        rows.append(f"<tr><td>{number}</td><td>{predicted}</td><td>{html.escape(r['explained'])} {r['quantity']}: "
                    f"{r['baseline_output']:.3f} &rarr; {r['output']:.3f} ({change:+.3f})</td><td>{body}</td></tr>")
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>bertkit explain: "
            f"{html.escape(str(model_dir))}</title>\n<style>body {{ font: 15px/1.8 system-ui, sans-serif; "
            "margin: 2em; }"
            " table { border-collapse: collapse; } td { border-top: 1px solid #ddd; padding: 4px 10px; "
            "vertical-align: top; } span { padding: 1px 2px; border-radius: 3px; }</style></head><body>\n"
            f"<h2>{html.escape(str(model_dir))}: {html.escape(method)}</h2>\n<p>Each word is shaded by its share of "
            "the explained output: <span style=\"background: rgba(22, 140, 60, 0.6)\">toward</span> the label, "
            "<span style=\"background: rgba(200, 40, 40, 0.6)\">against</span> it, the strongest in each input "
            "darkest; hover a word for its share. The output column gives what is explained (a label's probability or "
            "log-odds, a regressor's score) at the baseline and at the input.</p>\n<table><tr><th>#</th>"
            "<th>prediction</th><th>output</th><th>words</th></tr>\n" + "\n".join(rows) + "\n</table></body></html>\n")

    def write(tmp: str) -> None:
        Path(tmp).write_text(page, encoding="utf-8")

    try:
        atomic_write(Path(path), write)
    except OSError as e:
        raise BertkitError(f"{path}: cannot write ({e.strerror or e}); expected a file path for --html") from None

