"""ONNX export of a model folder: a float32 graph with dynamic batch and length, its int8 variant (ONNX Runtime's
dynamic quantization), the tokenizer files beside them, and a check that ONNX Runtime computes what bertkit does.

Needs the `onnx` extra (`pip install 'bertkit[onnx]'`: onnx and onnxruntime); bertkit itself does not.

The graph is bertkit's own forward, unpadded encoder included: tracing records the packing of the real tokens
(NonZero, Gather, ScatterElements) and attention over the padded view, so padding costs ONNX Runtime as little as
it costs bertkit. The trace is taken on a batch with padding, as a batch without any would record the branch that
skips the packing, and with it no attention mask.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bertkit.checkpoint import model_folder, weights_source
from bertkit.config import BertConfig, option, write_json
from bertkit.errors import BertkitError
from bertkit.model import BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification, BertModel

FP32_FILE, INT8_FILE, REPORT_FILE = "model.onnx", "model.int8.onnx", "export.json"
STAGING_DIR = ".export-partial"  # inside --out, so that its files move into place with os.replace
INPUTS = ("input_ids", "token_type_ids", "attention_mask")
# what each exportable architecture returns, by transformers' output names
OUTPUTS = {
    BertForSequenceClassification: ("logits",),
    BertForTokenClassification: ("logits",),
    BertForQuestionAnswering: ("start_logits", "end_logits"),
    BertModel: ("last_hidden_state", "pooler_output"),
}
# The check's texts: short and long, single and paired, so that its batches have padding, segment ids 1 and
# windows up to 128 tokens.
CHECK_TEXTS = [
    "A gripping, beautifully shot film.",
    "The plot never quite comes together, and the second half drags on far too long for its own good.",
    "Fine.",
    "Where was the treaty signed, and by whom?",
]
CHECK_PAIRS = [
    ("The company said profits rose 5% in the third quarter.", "Third-quarter profit was up five percent."),
    ("He left early.", "The meeting ran until midnight, and everyone stayed to the very end of it."),
]



@dataclass
class ExportConfig:
    """`bertkit export`: the CLI's flags are these fields."""

    model_dir: str = option("", "the model folder to export (a fine-tuned classifier, regressor or QA model, or a "
                            "bare encoder)")
    out: str = option("", "folder to write model.onnx, model.int8.onnx, export.json and the tokenizer files to")
    int8: bool = option(True, "also write model.int8.onnx, ONNX Runtime's dynamic int8 quantization of the graph "
                        "(default: on; --no-int8 skips it)")
    opset: int = option(17, "ONNX opset version")
    tolerance: float = option(1e-4, "the float32 check: every ONNX Runtime output within tolerance * (1 + |bertkit's|) "
                              "of bertkit's, on the check batches")
    int8_tolerance: float = option(0.25, "the int8 check, which catches a broken graph rather than measuring "
                                   "accuracy (RESULTS.md does): outputs within int8_tolerance * (1 + max |bertkit's "
                                   "float32 output|) of it")


def export(config: ExportConfig) -> dict:
    """Write the ONNX files of `config.model_dir` to `config.out`, check them against bertkit, and return (and
    write to export.json) what was written and how closely it matched. Raises BertkitError when a check fails."""
    onnxruntime = _require_onnx()
    source = model_folder(config.model_dir)
    if not config.out:
        raise BertkitError("no output folder; expected --out DIR for the ONNX files")
    highest = _highest_opset()
    if config.opset < 14 or (highest is not None and config.opset > highest):
        raise BertkitError(f"--opset is {config.opset}; expected 14 or more (LayerNormalization, Trilu)"
                           + (f" and at most {highest}, the newest this torch {torch.__version__} exports" if highest
                              else ""))
    for name in ("tolerance", "int8_tolerance"):
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise BertkitError(f"--{name.replace('_', '-')} is {value}; expected a positive number")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise BertkitError(f"{out}: a file, not a folder; expected a folder for --out")
    weights = _held_weights(out)
    if weights and out.resolve() != source.resolve():  # its config.json and tokenizer would be this model's
        raise BertkitError(f"--out {out} holds another model ({weights}), whose config.json and tokenizer files "
                           f"the export would replace; expected {source} itself, or a folder without a model")
    model, outputs = load_exportable(source)
    from bertkit.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(source)
    batches = check_batches(tokenizer, model.config)
    created = not out.exists()
    staging = out / STAGING_DIR  # this export's files, moved over an earlier export's only once all are checked
    try:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a killed export's
        staging.mkdir()
    except OSError as e:
        raise BertkitError(f"{out}: cannot create the folder ({e.strerror or e}); expected a writable --out") from None

    start = time.perf_counter()
    report = {
        "source": str(source),
        "architecture": type(model).__name__,
        "inputs": {name: ["batch", "length"] for name in INPUTS},
        "outputs": outputs,
        "max_length": model.config.max_position_embeddings,
        "opset": config.opset,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "files": {"float32": FP32_FILE},
        "check": {},
    }
    try:
        trace(model, outputs, batches[0], staging / FP32_FILE, config.opset)
        expected = [_run_bertkit(model, outputs, batch) for batch in batches]
        fp32 = _compare(session(staging / FP32_FILE), batches, expected)
        report["check"]["float32"] = fp32 | {"tolerance": f"{config.tolerance:g} * (1 + |bertkit|), elementwise"}
        if fp32["worst"] > config.tolerance:
            raise BertkitError(f"{out / FP32_FILE}: ONNX Runtime's {fp32['worst_output']} differs from bertkit's by "
                               f"{fp32['max_abs_diff']:.3g} (more than {config.tolerance:g} * (1 + |value|)); expected "
                               "the same outputs")
        if config.int8:
            quantize_int8(staging / FP32_FILE, staging / INT8_FILE)
            report["files"]["int8"] = INT8_FILE
            int8 = _compare(session(staging / INT8_FILE), batches, expected, relative_to_max=True)
            report["check"]["int8"] = int8 | {"tolerance": f"{config.int8_tolerance:g} * (1 + max |bertkit float32|)"}
            if int8["worst"] > config.int8_tolerance:
                raise BertkitError(f"{out / INT8_FILE}: ONNX Runtime's int8 {int8['worst_output']} differs from "
                                   f"bertkit's float32 by {int8['max_abs_diff']:.3g}, more than --int8-tolerance "
                                   f"{config.int8_tolerance:g} of its scale; expected a working int8 graph")
        report["seconds"] = round(time.perf_counter() - start, 1)
        tokenizer.save_pretrained(staging, model_max_length=model.config.max_position_embeddings)
        if (source / "config.json").is_file():  # id2label, for whoever reads the outputs
            (staging / "config.json").write_bytes((source / "config.json").read_bytes())
        else:  # Google's folder (bert_config.json): the config as bertkit read it
            write_json(staging / "config.json", {**model.config.to_dict(), "architectures": [type(model).__name__]},
                       sort_keys=True)
        write_json(staging / REPORT_FILE, report)
    except BaseException as e:  # a graph that failed its check, or was not checked (Ctrl-C): --out stays as it was
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):  # nor an empty --out that only this export made
            out.rmdir()
        if isinstance(e, BertkitError):
            raise BertkitError(f"{e} (nothing written: --out is as it was)") from None
        raise
    # an earlier export's report goes first, so that a kill while the files move leaves no export.json beside a
    # mix of two exports' files; and its int8 graph, which --no-int8 would otherwise leave beside this float32 one
    for name in (REPORT_FILE, INT8_FILE):
        (out / name).unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda path: path.name == REPORT_FILE):
        os.replace(path, out / path.name)
    staging.rmdir()
    return report


def _held_weights(folder: Path) -> str | None:
    """The name of the weights of a model in `folder`, in any layout bertkit loads (sharded, Google's, NVIDIA's as
    well as a single model.safetensors or pytorch_model.bin), or None: a config.json beside shards, or beside Google's
    bert_config.json, would be read as that model's."""
    if not folder.is_dir():
        return None
    try:
        return Path(weights_source(folder)).name
    except BertkitError:  # no weights there
        return None


def _require_onnx():
    try:
        import onnx  # noqa: F401  (onnxruntime's quantizer reads and writes graphs through it)
        import onnxruntime
    except ImportError as e:
        raise BertkitError(f"ONNX export needs the onnx extra ({e.name} is not installed); expected "
                           "`pip install 'bertkit[onnx]'` (onnx and onnxruntime)") from None
    return onnxruntime


def _highest_opset() -> int | None:
    """The newest opset torch.onnx can write (torch.onnx.export fails on a later one with a RuntimeError)."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:  # a private module: if a torch release moves it, the exporter's own error stands
        return None
    return ONNX_MAX_OPSET


def load_exportable(directory: Path):
    """The folder's model in eval mode and the names of the outputs its graph will have."""
    config = BertConfig.load(directory)
    if config.attention_window:  # its masks depend on the batch's global tokens in ways a trace would freeze
        raise BertkitError(f"{directory}/config.json: attention_window {config.attention_window}; expected a model "
                           "with full attention to export (windowed attention runs in bertkit only)")
    if config.bilstm:  # the exporter cannot trace the packed sequences of an LSTM (a RuntimeError deep in torch.onnx)
        raise BertkitError(f"{directory}/config.json: bilstm true (a BiLSTM between the encoder and the head); "
                           "expected a model without one to export (the BiLSTM runs in bertkit only)")
    names = config.extra.get("architectures") or ["BertModel"]
    classes = {cls.__name__: cls for cls in OUTPUTS}
    cls = next((classes[n] for n in names if n in classes), None)
    if cls is None:
        raise BertkitError(f"{directory}/config.json: architecture {', '.join(names)}; expected one of "
                           f"{', '.join(classes)} to export")
    return cls.from_pretrained(directory).eval(), list(OUTPUTS[cls])


def check_batches(tokenizer, config: BertConfig) -> list[dict[str, torch.Tensor]]:
    """The check's inputs: padded singles, padded pairs, one row without padding, one long row with a short one.
    The first has padding, which the trace needs."""
    longest = min(128, config.max_position_embeddings)
    long_text = " ".join(CHECK_TEXTS * 8)

    def batch(texts, pairs=None, max_length=longest):
        enc = tokenizer.encode_batch(texts, pairs, max_length=max_length, return_tensors="pt")
        return {name: enc[name] for name in INPUTS}

    pairs = batch([a for a, _ in CHECK_PAIRS], [b for _, b in CHECK_PAIRS])
    batches = [
        batch(CHECK_TEXTS),
        *([pairs] if config.type_vocab_size > 1 else []),  # one segment embedding: the model reads single texts
        batch(CHECK_TEXTS[1:2]),
        batch([long_text, CHECK_TEXTS[2]]),
    ]
    for b in batches:  # a vocabulary smaller than the tokenizer's would index out of the embedding table
        if int(b["input_ids"].max()) >= config.vocab_size:
            raise BertkitError(f"the tokenizer gives id {int(b['input_ids'].max())}, past the model's vocab_size "
                               f"{config.vocab_size}; expected the model's own tokenizer in its folder")
    return batches


class _Outputs(torch.nn.Module):
    """The model with its named outputs as a tuple, which is what the exporter takes."""

    def __init__(self, model, outputs):
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, input_ids, token_type_ids, attention_mask):
        out = self.model(input_ids, token_type_ids, attention_mask)
        return tuple(out[name] for name in self.outputs)


def trace(model, outputs: list[str], example: dict[str, torch.Tensor], path: Path, opset: int) -> None:
    """Write the model's ONNX graph, dynamic in batch and length."""
    if bool(example["attention_mask"].all()):
        raise ValueError("the example batch must have padding, or the trace skips the attention mask")
    wrapper = _Outputs(model, outputs).eval()  # the exporter restores the wrapper's mode, and with it the model's
    dynamic = {name: {0: "batch", 1: "length"} for name in INPUTS}
    with torch.no_grad():
        shapes = [v.shape for v in wrapper(*(example[name] for name in INPUTS))]
    for name, shape in zip(outputs, shapes):
        dynamic[name] = {0: "batch", 1: "length"} if _per_token(name, shape) else {0: "batch"}
    with warnings.catch_warnings():
        # TorchScript tracing (dynamo=False): torch.export cannot follow the data-dependent unpadding (which tokens
        # are real), and the tracer's warnings about the branches it fixed are the ones the module docstring explains
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(wrapper, tuple(example[name] for name in INPUTS), str(path), dynamo=False,
                              input_names=list(INPUTS), output_names=outputs, dynamic_axes=dynamic,
                              opset_version=opset, do_constant_folding=True)


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """ONNX Runtime's dynamic quantization, set as bertkit's --int8 is (bertkit.quantize): int8 weights with one
    scale per output column, activations quantized per call to 8 bits where the CPU has VNNI, else 7. Its default,
    one scale per matrix, gave all-MiniLM-L6-v2 embeddings a worst cosine of 0.938 to float32's (32 SST-2
    sentences); per column, 0.989."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from bertkit.quantize import has_vnni

    logger = logging.getLogger()  # the quantizer logs through the root logger
    level = logger.level
    logger.setLevel(logging.ERROR)  # advice to pre-process, and a note per tensor it leaves in float (NonZero's)
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=not has_vnni())
    finally:
        logger.setLevel(level)


def session(path: Path, threads: int = 1):
    """An ONNX Runtime CPU session on `path` with `threads` threads for each operator."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings name graph internals no user can act on
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _per_token(name: str, shape) -> bool:
    """Whether an output has one row per token, (B, T, ...): span logits and every 3-d output."""
    return len(shape) == 3 or name in ("start_logits", "end_logits")


@torch.no_grad()
def _run_bertkit(model, outputs, batch) -> list[np.ndarray]:
    out = model(**batch)
    return [out[name].float().numpy() for name in outputs]


def _compare(sess, batches, expected, relative_to_max: bool = False) -> dict:
    """Largest difference from bertkit's outputs over the check batches, raw and in units of the tolerance."""
    worst, max_abs, worst_output = 0.0, 0.0, None
    names = [o.name for o in sess.get_outputs()]
    for batch, want in zip(batches, expected):
        got = sess.run(None, {name: batch[name].numpy() for name in INPUTS})
        mask = batch["attention_mask"].bool().numpy()
        for name, g, w in zip(names, got, want):
            if g.shape != w.shape:
                raise BertkitError(f"ONNX Runtime's {name} has shape {g.shape}; expected bertkit's {w.shape}")
            if _per_token(name, g.shape):
                g, w = g[mask], w[mask]  # per-token outputs: padding holds nothing to compare (QA: the dtype's min)
            if not np.isfinite(g).all():
                raise BertkitError(f"ONNX Runtime's {name} is not finite; expected finite outputs")
            diff = np.abs(g.astype(np.float64) - w)
            scale = (1 + np.abs(w).max()) if relative_to_max else (1 + np.abs(w))
            units = float((diff / scale).max())
            if units >= worst:
                worst, worst_output = units, name
            max_abs = max(max_abs, float(diff.max()))
    return {"max_abs_diff": max_abs, "worst": worst, "worst_output": worst_output}
