"""Vectors from a model's layers (`bertkit embed`): the features of the paper's feature-based approach (section 5.3,
Table 7; Google's extract_features.py) and sentence embeddings (the mean of the last layer, as sentence-transformers
reads all-MiniLM-L6-v2).

Any BERT folder works (pretrained, fine-tuned, converted, a Hub id): its encoder runs, its heads are not used. Each
text (or text<TAB>pair) line gives one vector, [CLS]'s or the mean over its tokens ([CLS] and [SEP] included), or a
vector per token; from one layer or several, concatenated or summed.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from bertkit.config import option
from bertkit.data.glue import TextExample
from bertkit.errors import BertkitError

logger = logging.getLogger("bertkit")


@dataclass
class EmbedConfig:
    """`bertkit embed`: the command's arguments."""

    model_dir: str = option("", "a model folder (pretrained, fine-tuned or converted: its encoder is used, its heads "
                            "are not) or a Hub model id", positional=True)
    input: str = option("-", "text or text<TAB>pair lines, UTF-8 (default: standard input)", positional=True)
    out: str | None = option(None, "a .npy file (an N x D float32 array, row i for line i) or a .jsonl file; unset: "
                             "JSON lines on standard output")
    pool: Literal["mean", "cls", "tokens"] = option("mean", "a vector per line, the mean over its tokens ([CLS] and "
                                                    "[SEP] included, as sentence-transformers) or [CLS]'s, or a vector "
                                                    "per token (JSON lines only)")
    layers: list[int] = option([-1], "which layers' outputs: 0 is the embeddings, 1 the first block, -1 the last "
                               "(the paper's best features: -1 -2 -3 -4)")
    combine: Literal["concat", "sum"] = option("concat", "several --layers: concatenated (D = layers x hidden) or "
                                               "summed, as Table 7's rows")
    normalize: bool = option(False, "scale each vector to length 1, so a dot product is the cosine similarity")
    max_length: int | None = option(None, "tokens per line, [CLS] and [SEP] included (default: the model's "
                                    "positions, 512 for BERT); longer lines are cut (a pair longest first) and "
                                    "counted in a warning")
    batch_size: int = option(32, "lines per forward pass")
    threads: int | None = option(None, "CPU threads for torch (default: the cores the load average leaves idle)")
    device: str = option("auto", "cpu, cuda, cuda:N, mps or auto")
    int8: bool = option(False, "run the encoder in int8 on the CPU (its linear layers dynamically quantized, as "
                        "predict --int8): faster, the vectors a little off float32's (all-MiniLM-L6-v2 on SST-2 dev: "
                        "cosine 0.992 on average, 0.969 at worst)")

    def __post_init__(self):
        try:
            self.layers = [int(layer) for layer in self.layers]
        except (TypeError, ValueError):
            raise BertkitError(f"--layers {' '.join(map(str, self.layers))}: expected whole numbers such as -1 -2 "
                               "-3 -4") from None
        sizes = {"max_length": self.max_length, "batch_size": self.batch_size}
        problems = [f"--{name.replace('_', '-')} {value} (expected a positive number)"
                    for name, value in sizes.items() if value is not None and value < 1]
        if not self.layers:
            problems.append("--layers: none given (expected one or more, such as -1)")
        if self.pool == "tokens" and self.out and Path(self.out).suffix.lower() == ".npy":
            problems.append(f"--out {self.out} with --pool tokens (a vector per token: expected a .jsonl file)")
        if problems:
            raise BertkitError("embed: " + "; ".join(problems))


def layer_indices(layers: Sequence[int], num_layers: int) -> list[int]:
    """--layers as indices into the L + 1 outputs (embeddings first), checked against the model's L blocks."""
    wrong = [layer for layer in layers if not -num_layers - 1 <= layer <= num_layers]
    if wrong:
        raise BertkitError(f"--layers {' '.join(map(str, wrong))}: the model has {num_layers} blocks; expected "
                           f"{-num_layers - 1} to {num_layers} (0: the embeddings; -1 or {num_layers}: the last block)")
    return [layer % (num_layers + 1) for layer in layers]


@torch.no_grad()
def embed_rows(model, rows: list[dict], layers: Sequence[int], pool: str = "mean", combine: str = "concat",
               normalize: bool = False, batch_size: int = 32, pad_id: int = 0) -> list[torch.Tensor]:
    """One float32 CPU tensor per row ({"input_ids", "token_type_ids"}, unpadded): (D,) pooled, or (T, D) for
    pool="tokens"; `layers` index the L + 1 outputs, embeddings first. The model is a BertModel."""
    from bertkit.data.batching import collate, sorted_batches
    from bertkit.model import mean_pool
    from bertkit.tasks.inference import to_device

    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(rows)
    lengths = [len(row["input_ids"]) for row in rows]
    for indices in sorted_batches(lengths, batch_size):
        batch = to_device(collate([rows[i] for i in indices], pad_id), device)
        mask = batch["attention_mask"]
        states: list[torch.Tensor] = []
        _, layout = model.encode(batch["input_ids"], batch["token_type_ids"], mask, states=states)
        chosen = [layout.pad(states[i]).float() for i in layers]  # (B, T, H) each, zeros at padding
        hidden = torch.cat(chosen, -1) if combine == "concat" else torch.stack(chosen).sum(0)
        if pool == "mean":
            vectors = mean_pool(hidden, mask)
        elif pool == "cls":
            vectors = model.summary(hidden, mask)  # [CLS]; a left-to-right model's last token
        else:
            vectors = hidden
        if normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        for j, i in enumerate(indices):
            out[i] = vectors[j, : lengths[i]].cpu() if pool == "tokens" else vectors[j].cpu()
    return out


def encode_lines(tokenizer, examples, max_length: int) -> tuple[list[dict], list[int]]:
    """Token ids per example, and the indices of those longer than `max_length`, cut to it (a pair longest first)."""
    from bertkit.tasks.classification import encode

    rows = encode(examples, tokenizer, None, with_labels=False)
    long = [i for i, row in enumerate(rows) if len(row["input_ids"]) > max_length]
    if long:
        for i, row in zip(long, encode([examples[i] for i in long], tokenizer, max_length, with_labels=False)):
            rows[i] = row
    return rows, long


# Lines tokenized and embedded at a time: their vectors are written before the next are made, so that memory does
# not grow with the input.
CHUNK = 4096


def input_examples(inputs, source: str) -> Callable[[], Iterator[TextExample]]:
    """A function giving the examples of `inputs` (`input_lines`) from the first line on each time it is called."""
    from bertkit.tasks.classification import input_lines, parse_line

    lines = input_lines(inputs, source)
    return lambda: (parse_line(number, line, source) for number, line in lines())


def count_lines(examples: Iterable[TextExample], source: str) -> int:
    """The number of examples, each checked (`checked_lines`); a blank line is an error naming the first."""
    from bertkit.tasks.classification import checked_lines, is_blank

    count, blank, first = 0, 0, None
    for example in checked_lines(examples, source):
        count += 1
        if is_blank(example):
            blank, first = blank + 1, first or example.line
    if blank:
        raise BertkitError(f"{source}:{first}: a blank line ({blank} in all); expected a text on every line (row i "
                           "of the output is line i's vector)")
    return count


def embed_stream(config: EmbedConfig, inputs=None) -> tuple[int, Iterator[dict]]:
    """The number of lines of `inputs` (a path, a binary stream or lines; default config.input) and an iterator of
    one record per line, in order, made chunk by chunk: the line number, the text (and pair), and "embedding", or
    "tokens" and "vectors" for pool="tokens". The input (read once to check it, and again a chunk at a time: its
    text is not held in memory), the model and the settings are checked before this returns; lines longer than
    --max-length are counted in one warning at the end."""
    from bertkit.checkpoint import model_folder
    from bertkit.model import BertModel
    from bertkit.tasks.finetune import resolve_device
    from bertkit.tasks.inference import check_tokenizer
    from bertkit.tokenizer import Tokenizer
    from bertkit.train.distributed import torch_threads
    from bertkit.train.logs import progress_bar

    directory = model_folder(config.model_dir)
    if inputs is None:
        inputs = getattr(sys.stdin, "buffer", sys.stdin) if config.input == "-" else config.input
        source = "<stdin>" if config.input == "-" else str(config.input)
    else:
        source = str(inputs) if isinstance(inputs, (str, Path)) else "<input>"
    examples = input_examples(inputs, source)
    count = count_lines(examples(), source)
    device = resolve_device(config.device)
    with torch_threads(config.threads):
        tokenizer = Tokenizer.from_pretrained(directory)
        model = BertModel.from_pretrained(directory).to(device)
        if config.int8:
            from bertkit.quantize import to_int8

            model = to_int8(model)
        check_tokenizer(tokenizer, model.config, directory)
        layers = layer_indices(config.layers, model.config.num_hidden_layers)
        max_length = config.max_length or model.config.max_position_embeddings
        if max_length > model.config.max_position_embeddings:
            raise BertkitError(f"--max-length {max_length}; expected at most the model's "
                               f"{model.config.max_position_embeddings} positions")
    vocab = tokenizer.vocab() if config.pool == "tokens" else None

    def records() -> Iterator[dict]:
        cut = []
        bar = progress_bar(total=count, desc="embed", unit="line", disable=count <= CHUNK)
        lines = itertools.islice(examples(), count)  # the lines that were checked, should the file have grown
        with bar, torch_threads(config.threads):
            while chunk := list(itertools.islice(lines, CHUNK)):
                rows, long = encode_lines(tokenizer, chunk, max_length)
                cut += [chunk[i].line for i in long]
                vectors = embed_rows(model, rows, layers, config.pool, config.combine, config.normalize,
                                     config.batch_size, tokenizer.pad_id)
                for example, row, vector in zip(chunk, rows, vectors):
                    record = {"line": example.line, "text": example.text_a}
                    record |= {"pair": example.text_b} if example.text_b is not None else {}
                    if vocab is not None:
                        record |= {"tokens": [vocab[i] for i in row["input_ids"]], "vectors": vector}
                    else:
                        record["embedding"] = vector
                    yield record
                bar.update(len(chunk))
        if cut:
            logger.warning("%s: %d of %d lines are longer than --max-length %d tokens and were cut to it (the first: "
                           "line %s)", source, len(cut), count, max_length, cut[0])

    return count, records()


def embed(config: EmbedConfig, inputs=None) -> list[dict]:
    """`embed_stream`'s records as a list (to write them as they come, `write` the stream)."""
    return list(embed_stream(config, inputs)[1])


def json_line(record: dict) -> str:
    """A record as a JSON line, its vectors' floats to 6 decimals (as extract_features.py writes them)."""
    def rounded(v):
        return [rounded(x) for x in v] if isinstance(v, list) else round(v, 6)

    return json.dumps({k: rounded(v.tolist()) if isinstance(v, torch.Tensor) else v for k, v in record.items()},
                      ensure_ascii=False) + "\n"


def write(records: Iterable[dict], out: Path, count: int) -> None:
    """The `count` records to `out` as they come, the file whole or not at all: .npy, the vectors as an N x D
    float32 array, row i for line i; else JSON lines (`json_line`)."""
    from bertkit.checkpoint import atomic_write

    def npy(tmp: str) -> None:
        array = None
        for i, record in enumerate(records):
            if array is None:  # the width is known from the first vector
                array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                  shape=(count, record["embedding"].numel()))
            array[i] = record["embedding"].numpy()
        array.flush()
        del array  # the memory map closed before the file is renamed

    def lines(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json_line(r) for r in records)

    try:
        atomic_write(out, npy if out.suffix.lower() == ".npy" else lines)
    except OSError as e:
        raise BertkitError(f"{out}: cannot write ({e.strerror or e}); expected a file path for --out") from None
