"""`bertkit serve`: a fine-tuned model folder (or an encoder's vectors) behind an HTTP JSON API, with requests run in
dynamic batches.

    POST /predict   {"inputs": ...}  ->  {"predictions": [...]}, one per input, in order
    GET  /health    status, inputs waiting, batches and inputs run so far
    GET  /metadata  the model (kind, labels, lengths, int8) and the server's limits

Requests are queued; one worker takes what is waiting, up to --max-batch-size inputs, waiting at most
--max-wait-ms after the first for more, and runs them as one forward pass on a thread of its own, so that the event
loop keeps answering (health, refusals) while the model runs. The queue holds at most --max-queue inputs: past that
a request is answered 503 at once rather than left to wait. Bodies, input counts and text lengths are bounded
(413), and malformed requests are answered 400 or 422 with one line saying what was expected. On SIGTERM or
Ctrl-C the server stops accepting connections, finishes the requests in flight (up to --shutdown-timeout seconds)
and exits.

Needs the serve extra (`pip install 'bertkit[serve]'`: starlette and uvicorn).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import math
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from bertkit import hub
from bertkit.checkpoint import model_folder
from bertkit.config import BertConfig, option
from bertkit.data.corpus import replace_lone_surrogates
from bertkit.data.glue import TextExample
from bertkit.data.squad import SquadExample
from bertkit.errors import BertkitError

logger = logging.getLogger("bertkit")

QA, CLASSIFIER, TAGGER = "BertForQuestionAnswering", "BertForSequenceClassification", "BertForTokenClassification"
CHOICE, PRETRAINING, MASKED_LM = "BertForMultipleChoice", "BertForPreTraining", "BertForMaskedLM"
KINDS = {QA: "question-answering", TAGGER: "tagging", CHOICE: "multiple-choice", PRETRAINING: "fill-mask",
         MASKED_LM: "fill-mask"}  # else by its labels



@dataclass
class ServeConfig:
    """`bertkit serve`: the CLI's flags are these fields."""

    model_dir: str = option("", "a fine-tuned model folder (or Hub model id): a classifier, a regressor, a tagger, "
                            "a QA or a multiple-choice model; a pretraining one, to fill in [MASK]; or any encoder, "
                            "for its vectors")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "port to listen on (0: any free port, printed at start)")
    int8: bool = option(False, "run the model in int8 (dynamic quantization of its linear layers, CPU only)")
    max_batch_size: int = option(32, "most inputs run in one forward pass")
    max_wait_ms: float = option(5.0, "how long a batch waits for more inputs after its first one")
    max_queue: int = option(1024, "most inputs waiting to run; a request past that is answered 503 (retry later)")
    max_inputs: int = option(256, "most inputs in one request (413 past that)")
    max_text_chars: int = option(20_000, "longest text, pair, question or context in characters (413 past that)")
    max_body_bytes: int = option(2_000_000, "largest request body in bytes (413 past that)")
    body_timeout: float = option(10.0, "seconds a client may take to send its body (408 past that)")
    max_length: int | None = option(None, "tokens per input or window (default: the run's; longer texts are cut)")
    threads: int | None = option(None, "CPU threads for torch (default: torch's own choice)")
    device: str = option("cpu", "cpu, cuda, cuda:N, mps or auto (int8 runs on the CPU only)")
    shutdown_timeout: float = option(30.0, "on SIGTERM or Ctrl-C, seconds to finish the requests in flight "
                                     "(those still running then are answered 503)")
    embed: bool = option(False, "answer each input with its vector ({\"embedding\": [...]}, as `bertkit embed` "
                         "computes it) instead of the model's head (a pretraining folder's: filling in [MASK]); a "
                         "folder without a head (an encoder such as all-MiniLM-L6-v2) is always served so")
    pool: Literal["mean", "cls"] = option("mean", "vectors: the mean of the last layer over the input's tokens, or "
                                          "[CLS]'s")
    normalize: bool = option(False, "vectors: scaled to length 1, so that a dot product is the cosine similarity")
    top_k: int = option(5, "a pretraining or masked-LM folder: the tokens given for each [MASK]")

    def check(self) -> None:
        """Raise on values no server can use, and on a model folder that is not there, before anything is loaded."""
        model_folder(self.model_dir)
        for name in ("max_batch_size", "max_queue", "max_inputs", "max_text_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise BertkitError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected a positive number")
        for name in ("max_wait_ms", "body_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise BertkitError(f"--{name.replace('_', '-')} is {value}; expected zero or a positive number")
        if self.body_timeout == 0:  # no body arrives in no time: every request would be answered 408
            raise BertkitError("--body-timeout is 0; expected a positive number of seconds for a client to send its "
                               "body")
        if self.max_inputs > self.max_queue:
            raise BertkitError(f"--max-inputs {self.max_inputs} is more than --max-queue {self.max_queue}; expected "
                               "a request to fit in the queue")
        if not 0 <= self.port <= 65535:
            raise BertkitError(f"--port is {self.port}; expected 0 to 65535")
        if self.max_length is not None and self.max_length < 8:
            raise BertkitError(f"--max-length is {self.max_length}; expected at least 8 tokens")
        if self.threads is not None and not 1 <= self.threads <= 256:
            raise BertkitError(f"--threads is {self.threads}; expected 1 to 256")
        if self.top_k < 1:
            raise BertkitError(f"--top-k is {self.top_k}; expected a positive number of tokens")


class RequestError(Exception):
    """A request the server refuses: an HTTP status and one line saying what was expected."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------------------------------------------------------
# The model: inputs checked one by one, run in batches


class Predictor:
    """A fine-tuned model folder loaded once: turns request inputs into examples and runs batches of them.

    Classifiers take a text or {"text": ..., "pair": ...}; regressors the same; taggers a text or {"text": ...};
    QA models take {"question": ..., "context": ...} (and an optional "id", echoed back); multiple-choice models
    {"context": ..., "endings": [...], "lead"?: ...}. Results are the ones `bertkit predict` prints: {"label",
    "probability"}, {"score"}, {"words", "tags", "entities"}, {"answer"} (v2.0: with "null_odds"), {"choice",
    "ending", "probabilities"}. An encoder without a fine-tuned head (or any folder, with `embed`) takes texts and
    pairs and gives {"embedding"}, as `bertkit embed` (its last layer, `pool`ed, `normalize`d).
    """

    def __init__(self, model_dir, int8: bool = False, max_length: int | None = None, batch_size: int = 32,
                 device: str = "cpu", max_text_chars: int = 20_000, embed: bool = False, pool: str = "mean",
                 normalize: bool = False, top_k: int = 5):
        from bertkit.model import BertForMaskedLM, BertModel
        from bertkit.tasks.choice import ChoiceTask
        from bertkit.tasks.classification import TextTask, is_multi_label
        from bertkit.tasks.evaluation import _tuned_threshold
        from bertkit.tasks.finetune import FinetuneConfig, check_max_length, resolve_device
        from bertkit.tasks.inference import check_tokenizer
        from bertkit.tasks.squad import SquadTask
        from bertkit.tasks.tagging import TaggingTask
        from bertkit.tokenizer import Tokenizer

        directory = model_folder(model_dir)
        model_config = BertConfig.load(directory)
        architectures = model_config.extra.get("architectures") or [CLASSIFIER]
        self.directory, self.int8, self.max_text_chars = directory, int8, max_text_chars
        self.pool, self.normalize, self.top_k = pool, normalize, top_k
        if embed or not {CLASSIFIER, *KINDS} & set(architectures):  # no head to serve: its vectors
            self.kind = "embedding"
        else:
            single = "regression" if model_config.num_labels == 1 else "classification"
            self.kind = next((kind for name, kind in KINDS.items() if name in architectures),
                             "multi-label" if is_multi_label(model_config) else single)
        self.pairs = model_config.type_vocab_size > 1  # one segment embedding: no sentence B
        if self.kind == "fill-mask":
            from bertkit.tasks.fill_mask import check_fill_mask

            check_fill_mask(model_config, directory, top_k, model_config.vocab_size)
        if self.kind in ("question-answering", "multiple-choice") and not self.pairs:
            what = "the question and its context" if self.kind == "question-answering" else "a sentence and an ending"
            raise BertkitError(f"{directory}/config.json: type_vocab_size 1 for {self.kind.replace('-', ' ')}; "
                               f"expected 2 ({what} are two segments)")
        saved = FinetuneConfig.load(directory)
        task = saved.task if saved else ("squad1" if self.kind == "question-answering" else "")
        self.config = FinetuneConfig(
            task=task, model_dir=str(directory), eval_batch_size=batch_size,
            max_length=max_length or (saved.max_length if saved else None),
            **({k: getattr(saved, k) for k in ("doc_stride", "max_query_length", "null_threshold", "label_threshold")}
               if saved else {}),
        )
        if max_length is not None:  # asked for: refused past the positions, as evaluate and predict refuse it
            check_max_length(self.config, model_config.max_position_embeddings)
        elif self.kind == "embedding":  # an encoder's vectors read the whole text it can (as `bertkit embed`)
            self.config.max_length = model_config.max_position_embeddings
        self.config.max_length = min(self.config.max_length, model_config.max_position_embeddings)  # a default
        if self.kind in ("classification", "multi-label", "tagging"):
            id2label = model_config.id2label or {i: f"LABEL_{i}" for i in range(model_config.num_labels)}
            self.labels = [id2label[i] for i in sorted(id2label)]
        else:
            self.labels = []
        self.device = resolve_device(device)  # auto, or a clear error for a device this machine lacks
        self.tokenizer = Tokenizer.from_pretrained(directory)
        check_tokenizer(self.tokenizer, model_config, directory)
        if self.kind == "question-answering":
            self.task = SquadTask(task if task in ("squad1", "squad2") else "squad1")
            self.threshold = _tuned_threshold(directory, self.config)
        elif self.kind == "tagging":
            self.task = TaggingTask(self.labels, "")
        elif self.kind == "multiple-choice":
            self.task = ChoiceTask()
        elif self.kind in ("embedding", "fill-mask"):
            self.task = None  # run by embed_rows and fill_masks
        else:
            self.task = TextTask("serve", self.labels, (), multi_label=self.kind == "multi-label")
        model_class = {"embedding": BertModel, "fill-mask": BertForMaskedLM}.get(self.kind) or self.task.model_class
        model = model_class.from_pretrained(directory).to(self.device).eval()
        if int8:
            from bertkit.quantize import to_int8

            model = to_int8(model)
        self.model = model

    def metadata(self) -> dict:
        accepts = {"question-answering": '{"question": str, "context": str, "id"?: str}',
                   "tagging": 'str, or {"text": str}',
                   "multiple-choice": '{"context": str, "endings": [str, ...], "lead"?: str}',
                   "fill-mask": 'str with [MASK], or {"text": str, "pair"?: str}'}.get(
                       self.kind, 'str, or {"text": str, "pair"?: str}')
        vectors = {"dimension": self.model.config.hidden_size, "pool": self.pool, "normalize": self.normalize}
        return {"model": hub.model_name(self.directory), "kind": self.kind, "labels": self.labels,
                **(vectors if self.kind == "embedding" else {}), "task": self.config.task,
                "max_length": self.config.max_length, "int8": self.int8, "device": str(self.device),
                "input": accepts}

    def example(self, item, where: str):
        """One request input as an example, or a RequestError naming it (`where`, e.g. inputs[3])."""
        if self.kind == "question-answering":
            if not isinstance(item, dict):
                raise RequestError(422, f"{where} is {_json_type(item)}; expected an object "
                                        '{"question": ..., "context": ...}')
            _only_fields(item, ("question", "context", "id"), where)
            question = self._text(item, "question", where)
            context = self._text(item, "context", where)
            # refused here, not in the batch, where it would fail every other client's input with it (500)
            query = min(len(self.tokenizer.tokenize(question)), self.config.max_query_length)
            if query + 3 >= self.config.max_length:  # [CLS] question [SEP] context [SEP]
                raise RequestError(422, f"{where}.question has {query} tokens (at most {self.config.max_query_length} "
                                        f"are read); max_length {self.config.max_length} leaves no room for the "
                                        "context after it; expected a shorter question")
            qid = item.get("id")
            if qid is not None and not isinstance(qid, (str, int)) or isinstance(qid, bool):
                raise RequestError(422, f"{where}.id is {_json_type(qid)}; expected a string or an integer")
            # echoed back: a JSON-escaped lone surrogate as itself could not be encoded into the response (500)
            qid = "" if qid is None else replace_lone_surrogates(str(qid))
            return SquadExample(qid, "", 0, question, context, [])
        if self.kind == "multiple-choice":
            return self._choice(item, where)
        if isinstance(item, str):
            example = TextExample("", self._checked(item, where), None, None)
        else:
            fields = ("text",) if self.kind == "tagging" else ("text", "pair")
            if not isinstance(item, dict):
                raise RequestError(422, f"{where} is {_json_type(item)}; expected a string or an object "
                                        + ('{"text": ...}' if self.kind == "tagging" else '{"text": ..., "pair": ...}'))
            _only_fields(item, fields, where)
            text = self._text(item, "text", where)
            pair = self._text(item, "pair", where) if "pair" in item else None
            if pair is not None and not self.pairs:
                raise RequestError(422, f'{where} has a "pair"; expected single texts (the model has one segment '
                                        "embedding, type_vocab_size 1)")
            example = TextExample("", text, pair, None)
        return self._masked(example, where) if self.kind == "fill-mask" else example

    def _masked(self, example: TextExample, where: str) -> TextExample:
        """A fill-mask input, refused here when it has no [MASK] (one past --max-length gets an error result)."""
        mask = self.tokenizer.backend.id_to_token(self.tokenizer.mask_id)  # matched as written, as special tokens are
        if mask not in example.text_a and mask not in (example.text_b or ""):
            raise RequestError(422, f"{where} has no [MASK]; expected a text with [MASK] where a token is to be "
                                    "predicted")
        return example

    def _choice(self, item, where: str):
        from bertkit.tasks.choice import CHOICE_LINE, ChoiceExample

        if not isinstance(item, dict):
            raise RequestError(422, f"{where} is {_json_type(item)}; expected an object {CHOICE_LINE}")
        _only_fields(item, ("context", "endings", "lead"), where)
        endings = item.get("endings")
        if not isinstance(endings, list) or len(endings) < 2:
            raise RequestError(422, f"{where}.endings is {_json_type(endings)}"
                                    f"{f' of {len(endings)}' if isinstance(endings, list) else ''}; expected an array "
                                    "of two or more strings")
        checked = []
        for i, ending in enumerate(endings):
            if not isinstance(ending, str):
                raise RequestError(422, f"{where}.endings[{i}] is {_json_type(ending)}; expected a string")
            checked.append(self._checked(ending, f"{where}.endings[{i}]"))
        lead = self._text(item, "lead", where) if "lead" in item else ""
        return ChoiceExample("", self._text(item, "context", where), lead, checked, None)

    def _text(self, item: dict, name: str, where: str) -> str:
        if name not in item:
            raise RequestError(422, f'{where} has no "{name}"; expected a string there')
        if not isinstance(item[name], str):
            raise RequestError(422, f"{where}.{name} is {_json_type(item[name])}; expected a string")
        return self._checked(item[name], f"{where}.{name}")

    def _checked(self, text: str, where: str) -> str:
        if len(text) > self.max_text_chars:
            raise RequestError(413, f"{where} has {len(text):,} characters; expected at most {self.max_text_chars:,} "
                                    "(--max-text-chars)")
        if not text.strip():
            raise RequestError(422, f"{where} is blank; expected text")
        return replace_lone_surrogates(text)

    def run(self, examples: list) -> list[dict]:
        """Results for a batch of examples (any mix of single texts and pairs), in order."""
        if self.kind == "question-answering":
            return self._answer(examples)
        if self.kind == "multiple-choice":
            from bertkit.tasks.choice import choose

            return choose(self.model, self.tokenizer, examples, self.config, self.device)
        if self.kind == "fill-mask":
            from bertkit.tasks.fill_mask import fill_masks

            results = fill_masks(self.model, self.tokenizer, examples, self.config.max_length,
                                 self.config.eval_batch_size, self.device, self.top_k)
            return [{k: v for k, v in r.items() if k not in ("text", "pair")} for r in results]
        if self.kind == "tagging":
            from bertkit.tasks.tagging import tag_texts

            texts = [e.text_a for e in examples]  # each result's offsets index its own text, so it is not echoed
            return [{k: v for k, v in r.items() if k != "text"}
                    for r in tag_texts(self.model, self.tokenizer, texts, self.labels, self.config, self.device)]
        results: list[dict | None] = [None] * len(examples)
        for pairs in (False, True):  # the tokenizer encodes a list of singles or a list of pairs
            indices = [i for i, e in enumerate(examples) if (e.text_b is not None) == pairs]
            if not indices:
                continue
            group = [examples[i] for i in indices]
            if self.kind == "embedding":
                for i, vector in zip(indices, self._embed(group)):
                    results[i] = {"embedding": vector.tolist()}
                continue
            predictions, probabilities = self.task.predict(self.model, self.tokenizer, group, self.config, self.device)
            for i, p, probs in zip(indices, predictions, probabilities):
                results[i] = self.task.result(p, probs)
        return results

    def _embed(self, examples: list[TextExample]) -> list[torch.Tensor]:
        from bertkit.tasks.classification import encode
        from bertkit.tasks.embed import embed_rows

        rows = encode(examples, self.tokenizer, self.config.max_length, with_labels=False)  # cut at max_length
        return embed_rows(self.model, rows, [-1], self.pool, normalize=self.normalize,
                          batch_size=self.config.eval_batch_size, pad_id=self.tokenizer.pad_id)

    def _answer(self, examples: list[SquadExample]) -> list[dict]:
        # ids unique within the batch: requests' own ids may repeat, across requests and inside one
        asked = [dataclasses.replace(e, id=str(i)) for i, e in enumerate(examples)]
        answers, odds = self.task.answer(self.model, self.tokenizer, asked, self.config, self.device, self.threshold)
        results = []
        for original, e in zip(examples, asked):
            result = ({"id": original.id} if original.id else {}) | {"answer": answers[e.id]}
            if self.task.version2:
                result["null_odds"] = float(odds[e.id])
            results.append(result)
        return results


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _only_fields(item: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in item if k not in allowed]
    if unknown:
        raise RequestError(422, f"{where} has field {json.dumps(unknown[0])[:80]}; expected only "
                                f"{', '.join(json.dumps(a) for a in allowed)}")


def parse_request(body: bytes, predictor: Predictor, max_inputs: int) -> list:
    """The examples of a /predict body, or a RequestError saying what is wrong with it."""
    try:
        request = json.loads(body)
    except RecursionError:
        raise RequestError(400, "the body is JSON nested too deeply; expected {\"inputs\": ...}") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError, as are 4,300-digit integers
        reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e).split("\n")[0][:120]
        raise RequestError(400, f"the body is not valid JSON ({reason}); expected {{\"inputs\": ...}}") from None
    if not isinstance(request, dict):
        raise RequestError(422, f"the body is {_json_type(request)}; expected an object {{\"inputs\": ...}}")
    _only_fields(request, ("inputs",), "the body")
    if "inputs" not in request:
        raise RequestError(422, 'the body has no "inputs"; expected {"inputs": an input or an array of inputs}')
    inputs = request["inputs"]
    if not isinstance(inputs, list):
        inputs, names = [inputs], ["inputs"]
    else:
        names = [f"inputs[{i}]" for i in range(len(inputs))]
    if not inputs:
        raise RequestError(422, '"inputs" is an empty array; expected at least one input')
    if len(inputs) > max_inputs:
        raise RequestError(413, f'"inputs" has {len(inputs):,} inputs; expected at most {max_inputs:,} (--max-inputs)')
    return [predictor.example(item, where) for item, where in zip(inputs, names)]


# ---------------------------------------------------------------------------------------------------------------
# Dynamic batching


class Batcher:
    """The queue of requests and the one worker that runs them in batches (see the module docstring)."""

    def __init__(self, run, max_batch_size: int, max_wait: float, max_queue: int):
        self.run, self.max_batch_size, self.max_wait, self.max_queue = run, max_batch_size, max_wait, max_queue
        self.waiting: collections.deque = collections.deque()  # (examples, future) per request
        self.queued = 0  # inputs waiting, not yet taken into a batch
        self.batches = self.inputs = 0  # run so far
        self.closing = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task | None = None
        # one thread: the model runs one batch at a time, and torch's own threads work inside it
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bertkit-model")

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def submit(self, examples: list) -> list[dict]:
        """The results of a request's examples, once a batch has run them; 503 when the queue is full."""
        if self.closing:
            raise RequestError(503, "the server is shutting down; expected no new requests")
        if self.queued + len(examples) > self.max_queue:
            raise RequestError(503, f"the queue is full ({self.queued:,} inputs waiting, at most {self.max_queue:,}); "
                                    "retry later")
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((examples, future))
        self.queued += len(examples)
        self._idle.clear()
        self._wake.set()
        return await future

    async def _next_batch(self) -> list:
        """Requests waiting (at least one) up to max_batch_size inputs, after waiting at most max_wait for more."""
        loop = asyncio.get_running_loop()
        batch, count, deadline = [], 0, None
        while True:
            while self.waiting and self.waiting[0][1].done():  # a client that went away
                self.queued -= len(self.waiting.popleft()[0])
            if self.waiting:
                size = len(self.waiting[0][0])
                if batch and count + size > self.max_batch_size:
                    return batch
                batch.append(self.waiting.popleft())
                self.queued -= size
                count += size
                deadline = deadline or loop.time() + self.max_wait
                if count >= self.max_batch_size:
                    return batch
                continue
            if batch and (self.closing or loop.time() >= deadline):
                return batch
            if not batch and not self.waiting:
                self._idle.set()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), None if not batch else deadline - loop.time())
            except asyncio.TimeoutError:
                return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            examples = [e for request, _ in batch for e in request]
            try:
                results = await loop.run_in_executor(self._executor, self.run, examples)
            except Exception as e:  # a bug, not bad input (inputs are checked on arrival): answer 500, keep serving
                logger.exception("a batch of %d inputs failed", len(examples))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(RequestError(500, f"the model failed on this batch ({type(e).__name__})"))
            else:
                start = 0
                for request, future in batch:
                    if not future.done():
                        future.set_result(results[start:start + len(request)])
                    start += len(request)
            self.batches += 1
            self.inputs += len(examples)
            if not self.waiting:
                self._idle.set()

    async def close(self) -> None:
        """Refuse new requests, run every one already queued, then stop the worker."""
        self.closing = True
        self._wake.set()
        await self._idle.wait()
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------------------------
# HTTP


async def read_body(request, max_bytes: int, timeout: float) -> bytes:
    """The request's body, refused with 413 past max_bytes (before reading it when Content-Length says so) and
    408 when the client takes longer than `timeout` seconds to send it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"Content-Length is {declared[:40]!r}; expected a number of bytes")
        if int(declared) > max_bytes:
            raise RequestError(413, f"the body has {int(declared):,} bytes; expected at most {max_bytes:,} "
                                    "(--max-body-bytes)")

    from starlette.requests import ClientDisconnect

    async def read() -> bytes:
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise RequestError(413, f"the body is over {max_bytes:,} bytes; expected at most that "
                                            "(--max-body-bytes)")
                chunks.append(chunk)
        except ClientDisconnect:  # uncaught, a client that went away logged "Exception in ASGI application"
            raise RequestError(400, f"the client closed the connection after {size:,} bytes of the body; expected "
                                    "the whole body") from None
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the body took over {timeout:g} s to arrive; expected it sooner") from None


def create_app(config: ServeConfig, predictor: Predictor | None = None):
    """The ASGI app: the model is loaded here (or `predictor` used), the batcher starts with the app's lifespan."""
    try:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route
    except ImportError as e:
        raise BertkitError(f"bertkit serve needs the serve extra ({e.name} is not installed); expected "
                           "`pip install 'bertkit[serve]'` (starlette and uvicorn)") from None
    config.check()
    if predictor is None:
        predictor = Predictor(config.model_dir, int8=config.int8, max_length=config.max_length,
                              batch_size=config.max_batch_size, device=config.device,
                              max_text_chars=config.max_text_chars, embed=config.embed, pool=config.pool,
                              normalize=config.normalize, top_k=config.top_k)
    batcher = Batcher(predictor.run, config.max_batch_size, config.max_wait_ms / 1000, config.max_queue)

    async def predict(request):
        try:
            body = await read_body(request, config.max_body_bytes, config.body_timeout)
            examples = parse_request(body, predictor, config.max_inputs)
            try:
                return JSONResponse({"predictions": await batcher.submit(examples)})
            except asyncio.CancelledError:
                if not (app.state.server and app.state.server.should_exit):  # not the shutdown's
                    raise
                # uvicorn cancels what is still running --shutdown-timeout seconds after SIGTERM or Ctrl-C; uncaught,
                # the client got a plain-text 500 and the log a traceback for a request the server chose to drop
                raise RequestError(503, f"the server is shutting down and this request did not finish within "
                                        f"--shutdown-timeout {config.shutdown_timeout:g} s; retry later") from None
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)

    async def health(request):
        return JSONResponse({"status": "shutting down" if batcher.closing else "ok", "queued": batcher.queued,
                             "batches": batcher.batches, "inputs": batcher.inputs})

    async def metadata(request):
        limits = {name: getattr(config, name) for name in ("max_batch_size", "max_wait_ms", "max_queue", "max_inputs",
                                                           "max_text_chars", "max_body_bytes")}
        return JSONResponse(predictor.metadata() | {"limits": limits})

    async def not_here(request, exc):  # 404 and 405 in the same JSON shape as every other refusal
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}; expected POST /predict, "
                                      "GET /health or GET /metadata"}, status_code=exc.status_code)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.close()

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health, methods=["GET"]),
                            Route("/metadata", metadata, methods=["GET"])],
                    exception_handlers={404: not_here, 405: not_here}, lifespan=lifespan)
    app.state.predictor, app.state.batcher = predictor, batcher
    app.state.server = None  # the uvicorn server, once `run` serves the app
    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or a BertkitError saying why not (taken, not an address of this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise BertkitError(f"--host {host}: not an address ({e.strerror}); expected e.g. 127.0.0.1") from None
    family, _, proto, _, address = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on the accepted connections only when the socket says TCP,
    # and without it every answer on a kept-alive connection waited ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise BertkitError(f"{host}:{port}: cannot listen ({e.strerror or e}); expected a free port (--port)") from None
    # listening from here on: a client that connects once the address is printed, before uvicorn has started,
    # waits in the backlog instead of being refused
    sock.listen(2048)
    return sock


def run(app, sock: socket.socket, config: ServeConfig) -> None:
    """Serve `app` on the bound socket until SIGTERM or Ctrl-C, then finish the requests in flight and return.

    uvicorn handles both signals for the graceful shutdown and then raises the one it caught again: Ctrl-C then
    ends as a KeyboardInterrupt, and SIGTERM meets the handler set here, which does nothing, so that a stop asked
    for by a service manager returns normally (exit status 0) instead of killing the process after the fact.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=config.shutdown_timeout,
                                           lifespan="on"))
    app.state.server = server
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None) if main_thread else None
    try:
        server.run(sockets=[sock])
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


__all__ = ["ServeConfig", "Predictor", "Batcher", "create_app", "listen", "run", "address", "RequestError"]
