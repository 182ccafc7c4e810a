"""Model checkpoints in the Hugging Face layout: config.json + model.safetensors (+ tokenizer files).

bertkit's parameter names are transformers' names, so the only work here is the differences between checkpoint
flavours: with or without the `bert.` prefix, legacy buffers and TF-era names, tied decoder copies, sharded files.
Weights are read with safetensors or `torch.load(weights_only=True)`: arbitrary pickled objects are never run.

Training checkpoints (`save_checkpoint`) are such a model folder plus `training_state.pt` (optimizer, schedule,
loss scaler, data position, RNG states), written atomically so that resuming never picks up a half-written one.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bertkit.composer_checkpoint import PLAIN_GLOBALS, is_composer
from bertkit.config import CONFIG_NAME, BertConfig, read_json, save_folder
from bertkit.errors import BertkitError, free_space

logger = logging.getLogger("bertkit")

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# Entries of some checkpoints that are not parameters of the model: buffers older transformers saved, and the
# decoder copies that are tied to the token embeddings (unless the config unties them) and to `cls.predictions.bias`.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_TIED_DECODER = "cls.predictions.decoder.weight"


def model_folder(directory: str | Path) -> Path:
    """`directory` as a Path (a Hub model id: the local folder it is fetched into), or a BertkitError saying that it
    is missing or a file rather than a folder."""
    from bertkit import hub

    directory = Path(hub.resolve(directory))
    if directory.is_dir():
        return directory
    what = "a file, not a folder" if directory.exists() else "no such folder"
    hint = ""
    if directory.is_file() and directory.suffix == ".pt":  # a Composer checkpoint, most likely: one file is the model
        hint = f"; a Composer checkpoint (MosaicML) is made one with `bertkit convert {directory} --out DIR --to hf`"
    raise BertkitError(f"{directory}: {what} (expected a model folder with config.json and weights){hint}")


def _shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names, each checked to be a file beside the index."""
    expected = "a sharded-weights index: a JSON object whose weight_map maps weight names to shard files"
    data = read_json(index, expected)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BertkitError(f"{index}: weight_map is missing, empty or not an object; expected {expected}")
    for name, shard in weight_map.items():
        # a plain file name: an index must not make bertkit read files outside the model folder
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise BertkitError(f"{index}: weight_map[{name!r}] is {shard!r}; expected a shard file name in the same folder")
    shards = [index.parent / shard for shard in sorted(set(weight_map.values()))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise BertkitError(f"{index}: weight_map names {_some(missing)}, not found in {index.parent}; expected every shard")
    return shards


def config_file(directory: Path) -> Path:
    """The file a model folder's config is read from: config.json, or Google's bert_config.json."""
    from bertkit.tf_checkpoint import GOOGLE_CONFIG_NAME, is_google_folder

    return directory / (GOOGLE_CONFIG_NAME if is_google_folder(directory) else CONFIG_NAME)


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a model folder: model.safetensors, else the shards of its index, else the same for
    pytorch_model.bin, else the .index of Google's TensorFlow checkpoint (which names its data files)."""
    directory = model_folder(directory)
    for single, index in ((WEIGHTS_NAME, WEIGHTS_INDEX_NAME), (PT_WEIGHTS_NAME, PT_WEIGHTS_INDEX_NAME)):
        if (directory / single).exists():
            if not (directory / single).is_file():
                raise BertkitError(f"{directory / single}: a folder, not a file (expected the model's weights)")
            return [directory / single]
        if (directory / index).exists():
            return _shards(directory / index)
    from bertkit.tf_checkpoint import CHECKPOINT_PREFIX, checkpoint_prefix

    prefix = checkpoint_prefix(directory)  # Google's TensorFlow checkpoint: its .index names the data files
    if prefix is not None:
        return [prefix.parent / f"{prefix.name}.index"]
    found = sorted(p for p in directory.glob("*.pt") if p.is_file())  # NVIDIA's: ckpt_8601.pt, bert_large_qa.pt
    if len(found) == 1:
        return found
    if found:
        raise BertkitError(f"{directory}: several checkpoints ({_some([p.name for p in found])}); expected one .pt "
                           "file in a model folder (move the others away)")
    raise BertkitError(f"{directory}: no weights found (expected {WEIGHTS_NAME}, {PT_WEIGHTS_NAME}, Google's "
                       f"{CHECKPOINT_PREFIX}.index or NVIDIA's one .pt file)")


def _is_tf(files: list[Path]) -> bool:
    return files[0].suffix == ".index"


def weights_source(directory: Path) -> str:
    """The file to name in an error about a folder's weights: the single file, or the index of the shards."""
    files = weight_files(directory)
    if len(files) == 1:
        return str(files[0])
    index = WEIGHTS_INDEX_NAME if files[0].suffix == ".safetensors" else PT_WEIGHTS_INDEX_NAME
    return str(directory / index)


def load_pickle(path: Path, mmap: bool = False):
    """What a torch.save file holds, read with torch.load(weights_only=True): tensors and plain data only (besides
    torch's own, the few plain values a Composer checkpoint pickles), never a pickled object that runs code.
    `mmap` maps the storages instead of reading them (a file of the old, non-zip format is read)."""
    if path.is_file() and path.stat().st_size == 0:  # torch says "EOFError: " and nothing else
        raise BertkitError(f"{path}: an empty file; expected weights written by torch.save")
    try:
        with torch.serialization.safe_globals(PLAIN_GLOBALS):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated file, or a pickle holding more than tensors
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # torch's own message is a page long
        if unsafe is None:
            raise BertkitError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
        # NVIDIA's pretraining checkpoints, for one, pickle their data loader beside the weights
        raise BertkitError(f"{path}: cannot read weights: it pickles {unsafe.group(1)}, which torch.load("
                           "weights_only=True) does not run; "
                           "expected a state dict, or {'model': state dict} as NVIDIA's checkpoints hold it (where "
                           "this file comes from a source you trust, save torch.load(path, weights_only=False)"
                           "['model'] alone)") from None


def _load_file(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one weight file; `mmap` maps a pickle's storages instead of reading them (for names and
    shapes)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # corrupt or truncated file
            raise BertkitError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    loaded = load_pickle(path, mmap)
    if is_composer(loaded):  # one file holding the config and tokenizer too: made a folder by `bertkit convert`
        raise BertkitError(f"{path}: a Composer checkpoint (MosaicML); expected a model folder: write one with "
                           f"`bertkit convert {path} --out DIR --to hf` and give DIR")
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):  # NVIDIA's: the optimizer state beside it
        return loaded["model"]
    return loaded


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read the weights of a model folder: safetensors first, else a (possibly sharded) pytorch_model.bin, else
    Google's TensorFlow checkpoint (under bertkit's names)."""
    state: dict[str, torch.Tensor] = {}
    files = weight_files(directory)
    if _is_tf(files):
        from bertkit import tf_checkpoint

        return tf_checkpoint.read_state_dict(Path(directory))
    for path in files:
        tensors = _load_file(path)
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise BertkitError(f"{path}: not a state dict; expected a mapping of weight names to tensors")
        state.update(tensors)
    return state


def read_weight_shapes(directory: str | Path) -> dict[str, tuple[int, ...]] | None:
    """Weight names and shapes from the safetensors headers (or a TensorFlow checkpoint's index) alone, no tensor
    read; None for pytorch_model.bin, whose shapes are known only once it is loaded."""
    files = weight_files(directory)
    if _is_tf(files):
        from bertkit import tf_checkpoint

        return tf_checkpoint.read_shapes(Path(directory))
    if any(path.suffix != ".safetensors" for path in files):
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except Exception as e:  # not safetensors, truncated, or a header that lies about the file's size
            raise BertkitError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    return shapes


def weight_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Weight names and shapes of any layout, for a check that reads no tensor: the headers where there are some,
    else a pickle's storages mapped, not read (an old, non-zip pickle is read whole)."""
    shapes = read_weight_shapes(directory)
    if shapes is None:
        shapes = {k: tuple(v.shape) for f in weight_files(directory) for k, v in _load_file(f, mmap=True).items()}
    return shapes


def normalize_keys(state: dict, config: BertConfig) -> dict:
    """Rename TF-era LayerNorm names and NVIDIA's `dense_act`, cut NVIDIA's vocabulary padding, drop non-parameters
    and tied copies (keeping the bias if only the copy has it; the decoder's weight only when `config` ties it to
    the embeddings). The values are tensors or, for a check before loading, shapes."""
    dropped = _BUFFERS + ((_TIED_DECODER,) if config.tied_decoder else ())
    out = {}
    for key, value in state.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        key = key.replace(".dense_act.", ".dense.")  # NVIDIA's fused Linear + activation: the same parameters
        if key.endswith(_VOCAB_ROWS):
            value = _unpadded_vocab(key, value, config)
        if key.endswith(dropped):
            continue
        if key.endswith("cls.predictions.decoder.bias"):
            key = key.replace("decoder.bias", "bias")
            if key in state and config.tied_decoder:  # the same values; untied, transformers 5 uses the decoder's
                continue
        elif key.endswith("cls.predictions.bias") and not config.tied_decoder:
            if key.replace("predictions.bias", "predictions.decoder.bias") in state:
                continue
        out[key] = value
    return out


def architecture_of(names) -> str:
    """The model class whose heads weights of these names hold: in the order a Google folder's is read, QA,
    classifier, pretraining, masked LM, else the bare encoder."""
    def has(prefix: str) -> bool:
        return any(k.startswith((prefix, "bert." + prefix)) for k in names)

    if has("qa_outputs."):
        return "BertForQuestionAnswering"
    if has("classifier."):
        return "BertForSequenceClassification"
    if has("cls.seq_relationship."):
        return "BertForPreTraining"
    if has("cls.predictions."):
        return "BertForMaskedLM"
    return "BertModel"


def heads_of(directory: str | Path) -> dict:
    """The architecture (and a classifier's number of labels) that a folder's weights hold, for a config that names
    none (NVIDIA's bert_config.json, an old config.json): read as a bare encoder, a pretraining, QA or classifier
    folder lost its head or had a random one put on it. Nothing when there are no weights (a config alone)."""
    try:
        shapes = weight_shapes(directory)
    except BertkitError:
        return {}  # no weights, or unreadable ones: said when the weights are loaded
    found = {"architectures": [architecture_of(shapes)]}
    rows = next((shape for key, shape in shapes.items() if key.endswith("classifier.weight")), None)
    if found["architectures"] == ["BertForSequenceClassification"] and rows and len(rows) == 2:
        found["num_labels"] = rows[0]
    return found


_VOCAB_ROWS = ("word_embeddings.weight", "predictions.bias", "predictions.decoder.weight", "predictions.decoder.bias")


def _unpadded_vocab(key: str, value, config: BertConfig):
    """A vocabulary-sized weight (tensor or shape) cut to config.vocab_size when it has up to 7 rows more that make
    it a multiple of 8: NVIDIA's recipes pad the vocabulary so (30,522 to 30,528) for the tensor cores, and their
    bert_config.json keeps the true size, the one vocab.txt has."""
    rows = value[0] if isinstance(value, tuple) else value.shape[0]
    if rows % 8 or not 0 < rows - config.vocab_size < 8:
        return value
    logger.info("%s: %d rows, padded to a multiple of 8; the first %d (vocab_size) kept", key, rows, config.vocab_size)
    return (config.vocab_size, *value[1:]) if isinstance(value, tuple) else value[: config.vocab_size]


def _match_prefix(state: dict, model: torch.nn.Module) -> dict:
    """Add or strip `bert.` so that a bare-encoder checkpoint loads into a head model and the other way round."""
    expected = model.state_dict().keys()
    has_prefix = any(k.startswith("bert.") for k in state)
    wants_prefix = any(k.startswith("bert.") for k in expected)
    if wants_prefix and not has_prefix:
        return {f"bert.{k}": v for k, v in state.items()}
    if has_prefix and not wants_prefix:
        return {(k[len("bert."):] if k.startswith("bert.") else k): v for k, v in state.items()}
    return state


def _is_encoder(key: str) -> bool:
    key = key[len("bert."):] if key.startswith("bert.") else key
    return key.startswith(("embeddings.", "encoder."))


def _some(names: list[str], shown: int = 5) -> str:
    """The first few names, and how many more: a checkpoint of the wrong size can differ in hundreds."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# The config fields that set each dimension of a weight, by the end of its name (first match wins); any other
# weight is hidden_size in every dimension.
_SHAPE_FIELDS = (
    ("word_embeddings.weight", ("vocab_size", "hidden_size")),
    ("predictions.decoder.weight", ("vocab_size", "hidden_size")),  # an untied decoder
    ("position_embeddings.weight", ("max_position_embeddings", "hidden_size")),
    ("token_type_embeddings.weight", ("type_vocab_size", "hidden_size")),
    ("intermediate.dense.weight", ("intermediate_size", "hidden_size")),
    ("intermediate.dense.bias", ("intermediate_size",)),
    ("attention.output.dense.weight", ("hidden_size", "hidden_size")),
    ("output.dense.weight", ("hidden_size", "intermediate_size")),
    ("predictions.bias", ("vocab_size",)),
    ("classifier.weight", ("num_labels", "hidden_size")),
    ("classifier.bias", ("num_labels",)),
)
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


def _field(name: str, config, stated: dict | None) -> str:
    """`config.json's vocab_size is 30000`, or, for a value the caller set over the folder's (a task's num_labels),
    `num_labels is 2 as asked for; config.json's is 3`: the folder's config.json does not say 2."""
    value = getattr(config, name)
    if stated is not None and name in stated and stated[name] != value:
        return f"{name} is {value} as asked for; config.json's is {stated[name]}"
    return f"config.json's {name} is {value}"


def _config_fields(key: str, got: tuple, want: tuple, config, stated: dict | None = None) -> str:
    """`(config.json's vocab_size is 30000)` for the fields behind the dimensions where `got` and `want` differ."""
    fields = next((f for suffix, f in _SHAPE_FIELDS if key.endswith(suffix)), ("hidden_size",) * len(want))
    if len(got) != len(want) or len(fields) != len(want):
        return ""
    names = dict.fromkeys(f for f, a, b in zip(fields, got, want) if a != b)
    return "".join(f" ({_field(name, config, stated)})" for name in names)


_MOSAIC_BERT = (".attention.self.Wqkv.", ".mlp.gated_layers.", ".mlp.wo.")  # names only MosaicBERT's layers have


def refuse_mosaic_bert(names, source) -> None:
    """MosaicBERT (MosaicML's own model: ALiBi in place of position embeddings, a gated feed-forward layer, fused
    QKV) shares BERT's config and class names but not its layers: said as such, not as a page of missing weights."""
    if any(marker in name for name in names for marker in _MOSAIC_BERT):
        raise BertkitError(f"{source}: MosaicBERT's weights (fused Wqkv, gated feed-forward layers, ALiBi in place of "
                           "position embeddings), another architecture than BERT's; expected BERT's (MosaicML's "
                           "hf_bert model is one)")


def _check_fit(model, shapes: dict[str, tuple], source: str, stated: dict | None = None) -> tuple[list[str], list[str]]:
    """Raise naming the missing, unexpected and mis-shaped weights; return (new heads, foreign heads).

    `shapes` are the checkpoint's, after normalize_keys and _match_prefix. Missing weights of the model's own heads
    are not an error (they are newly initialised); any other missing, unexpected or mis-shaped weight is, since a
    silently random encoder would waste a whole fine-tuning run. `stated` holds config.json's values where the
    model's config overrides some of them.
    """
    refuse_mosaic_bert(shapes, source)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    config = model.config
    heads = model.head_prefixes
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    mismatched = [f"{k}: checkpoint {shapes[k]} vs model {own[k]}"
                  f"{_config_fields(k, shapes[k], own[k], config, stated)}"
                  for k in own if k in shapes and tuple(shapes[k]) != own[k]]
    missing_encoder = [k for k in missing if not k.startswith(heads)]
    # weights of other heads (the pretraining heads when loading a classifier, say) are not an error
    unexpected_encoder = [k for k in unexpected if _is_encoder(k)]
    foreign_heads = [k for k in unexpected if not _is_encoder(k)]
    problems = []
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER.search(k))}
    if layers and max(layers) + 1 != config.num_hidden_layers:
        problems.append(f"the weights have {max(layers) + 1} layers ({_field('num_hidden_layers', config, stated)})")
    if missing_encoder:
        problems.append(f"missing weights: {_some(missing_encoder)}")
    if unexpected_encoder:
        problems.append(f"unexpected weights: {_some(unexpected_encoder)}")
    if mismatched:
        problems.append(f"shape mismatch: {_some(mismatched, 3)}")
    if problems:
        raise BertkitError(f"{source}: does not fit {type(model).__name__}: " + " | ".join(problems))
    return [k for k in missing if k.startswith(heads)], foreign_heads


def meta_model(cls, config: BertConfig):
    """`cls(config)` on the meta device: every parameter's shape, no memory. Built without the BERT initialisation
    (of the model and of the encoder inside it), whose normal_ calls run through Python there at ~1 ms each."""
    from bertkit.model import BertPreTrainedModel

    with torch.device("meta"), mock.patch.object(BertPreTrainedModel, "init_weights", lambda self: None):
        return cls(config)


def _skeleton(cls, config: BertConfig, config_path: Path | None):
    """`meta_model`, with the model's own refusals of a config (a problem_type it cannot train) naming the
    config.json it was read from, as every other bad value of it is named."""
    try:
        return meta_model(cls, config)
    except BertkitError as e:
        if config_path is None:
            raise
        raise BertkitError(f"{config_path}: {e}") from None


def check_weights_fit(cls, config: BertConfig, shapes: dict[str, tuple], source: str,
                      config_path: Path | None = None) -> None:
    """Raise unless weights of these shapes load into `cls(config)`; the model is built on the meta device, so
    nothing of its size is allocated."""
    skeleton = _skeleton(cls, config, config_path)
    _check_fit(skeleton, _match_prefix(normalize_keys(shapes, config), skeleton), source)


def describe_model(directory: str | Path) -> dict[str, str]:
    """What `bertkit info` prints about a model folder, checked against its weights' shapes (read from the
    safetensors headers, so a folder of any size is described without loading its weights)."""
    import math

    from bertkit import model as models

    directory = model_folder(directory)
    config = BertConfig.load(directory)
    shapes = weight_shapes(directory)
    architectures = config.extra.get("architectures") or []
    cls = getattr(models, architectures[0], None) if architectures else None
    if not (isinstance(cls, type) and issubclass(cls, models.BertPreTrainedModel)) or cls is models.BertPreTrainedModel:
        cls = models.BertModel  # an unknown architecture: the encoder's weights are checked, whatever the heads
    check_weights_fit(cls, config, shapes, weights_source(directory), config_file(directory))
    params = sum(math.prod(v) for v in normalize_keys(shapes, config).values())  # tied copies once
    heads = sorted({k.split(".")[0] for k in shapes if not k.startswith(("bert.", "embeddings.", "encoder.", "pooler."))})
    info = {
        "model folder": str(directory),
        "architecture": ", ".join(architectures or ["(not stated)"]),
        "layers L": str(config.num_hidden_layers),
        "hidden H": str(config.hidden_size),
        "heads A": str(config.num_attention_heads),
        "feed-forward": str(config.intermediate_size),
        "vocabulary": str(config.vocab_size),
        "max positions": str(config.max_position_embeddings),
        "parameters": f"{params:,} ({params / 1e6:.1f}M)",
        "heads in weights": ", ".join(heads) if heads else "none (bare encoder)",
    }
    if config.id2label:
        info["labels"] = ", ".join(config.id2label[i] for i in sorted(config.id2label))
    if "problem_type" in config.extra:
        info["problem type"] = str(config.extra["problem_type"])
    if (directory / "vocab.txt").exists() or (directory / "tokenizer.json").exists():
        from bertkit.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(directory)
        info["tokenizer"] = f"WordPiece, {tok.vocab_size} tokens, {'uncased' if tok.lowercase else 'cased'}"
    else:
        info["tokenizer"] = "none in this folder"
    return info


def load_state_dict_into(model, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy weights into `model`, naming what is missing, unexpected or mis-shaped.

    Missing weights of the model's own heads are newly initialised and reported; any other missing, unexpected
    or mis-shaped weight is an error, since a silently random encoder would waste a whole fine-tuning run.
    """
    state = _match_prefix(normalize_keys(state, model.config), model)
    new_heads, foreign_heads = _check_fit(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    if new_heads:
        logger.warning("%s: newly initialised (not in the checkpoint; train them): %s", source, ", ".join(new_heads))
    if foreign_heads:
        logger.info("%s: not used by %s: %s", source, type(model).__name__, ", ".join(foreign_heads))
    own = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.to(own[key].dtype))


# transformers' names for what a sequence classifier's head does (its config refuses any other)
PROBLEM_TYPES = ("single_label_classification", "regression", "multi_label_classification")


def _transformers_label_overrides(overrides: dict) -> dict:
    """transformers' way of naming a new head's labels, `num_labels=3, id2label=..., label2id=...`, as bertkit's
    overrides: label2id is id2label's inverse (config.json's is written from id2label), so it is checked against
    id2label, or gives it when id2label is not passed."""
    if "label2id" not in overrides:
        return overrides
    overrides = dict(overrides)
    label2id = overrides.pop("label2id")
    if not isinstance(label2id, dict) or not all(isinstance(k, str) for k in label2id):
        raise BertkitError(f"label2id is {label2id!r}; expected an object of label name -> class index")
    inverse = {index: name for name, index in label2id.items()}
    if len(inverse) != len(label2id):
        raise BertkitError(f"label2id is {label2id!r}; expected each class index once")
    if "id2label" not in overrides:
        overrides["id2label"] = inverse
    else:
        id2label = overrides["id2label"]
        given = {str(k): v for k, v in id2label.items()} if isinstance(id2label, dict) else None  # 0 or "0"
        if given != {str(index): name for index, name in inverse.items()}:
            raise BertkitError(f"label2id {label2id!r} is not the inverse of id2label {id2label!r}; expected the "
                               "same labels both ways (or id2label alone)")
    return overrides


def load_pretrained(cls, directory, config: BertConfig | None = None, load_weights: bool = True, **config_overrides):
    """Build `cls` from a model folder's config.json (or the given config) and load its weights (or, without
    `load_weights`, keep the random initialisation: the same network untrained).

    Every check comes before the large allocations: config values when the config is read, weight names and
    shapes against the config from the safetensors headers (a pytorch_model.bin must be loaded to be checked).
    """
    directory = model_folder(directory)
    stated = None
    if config is None:
        config = BertConfig.load(directory)
        stated = dict(vars(config))  # before the overrides: an error must not put a task's num_labels on config.json
    else:
        config = copy.deepcopy(config)  # the overrides are this model's: the caller's config stays as it was
    config_overrides = _transformers_label_overrides(config_overrides)
    for key, value in config_overrides.items():
        if key == "problem_type":  # kept in `extra` as config.json's is; the model class checks it against num_labels
            if value not in PROBLEM_TYPES:
                raise BertkitError(f"problem_type is {value!r}; expected one of {', '.join(PROBLEM_TYPES)}")
            config.extra = {**config.extra, key: value}
            continue
        if not hasattr(config, key):
            raise BertkitError(f"unknown config field {key!r}")
        setattr(config, key, value)
    if "num_labels" in config_overrides and "id2label" not in config_overrides and config.id2label is not None \
            and len(config.id2label) != config.num_labels:
        config.id2label = None  # the folder's label names are for another number of labels (transformers does so)
    config.__post_init__()
    if {"num_labels", "id2label"} & config_overrides.keys() and "problem_type" not in config_overrides:
        # a new head: the folder's problem_type was another's
        problem = "regression" if config.num_labels == 1 else "single_label_classification"
        if config.extra.get("problem_type", problem) != problem:
            config.extra = {k: v for k, v in config.extra.items() if k != "problem_type"}
    # a problem_type asked for is not config.json's to be blamed for
    blamed = config_file(directory) if stated is not None and "problem_type" not in config_overrides else None
    skeleton = _skeleton(cls, config, blamed)
    state = None
    if load_weights:
        source = weights_source(directory)
        shapes = read_weight_shapes(directory)
        if shapes is None:
            state = read_state_dict(directory)
            shapes = {k: tuple(v.shape) for k, v in state.items()}
        _check_fit(skeleton, _match_prefix(normalize_keys(shapes, config), skeleton), source, stated)
    model = cls(config)
    if load_weights:
        load_state_dict_into(model, read_state_dict(directory) if state is None else state, source=source)
    return model


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class WriteFailed(BertkitError):
    """A file that could not be written for want of space (a full disk, a quota, a file size limit)."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


def out_of_space(e: Exception) -> bool:
    """Whether a writer's error is the disk's: safetensors, torch.save, numpy and open() each say it their way."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(e)
    return (any(s in text for s in ("No space left", "os error 28", "Disk quota", "File too large", "file write failed",
                                    "unexpected pos"))  # the last two: torch.save's writer, cut short
            or re.fullmatch(r"\d+ requested and \d+ written", text) is not None)  # numpy's tofile, cut short


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename, so a crash never leaves a half file; a full
    disk is a WriteFailed naming the file and the free space."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, BertkitError) or not out_of_space(e):
            raise
        cause = f"{type(e).__name__}: {e}"
        raise WriteFailed(f"{path}: cannot write it ({cause}); {free_space(path.parent)}; expected room for it",
                          cause) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` of a UTF-8 text: the file whole or not at all."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def check_not_int8(model) -> None:
    """Refuse to save a model quantized by `to_int8`: its packed weights are not in the state dict, which would be
    written without any of its linear layers."""
    from bertkit.quantize import Int8Linear

    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise BertkitError("an int8 model cannot be saved: its weights are packed for this CPU's kernels; expected "
                           "the float32 model, which `to_int8` (or --int8) quantizes again when loaded")


def save_pretrained(model, directory, tokenizer=None) -> None:
    """config.json (with the transformers class in `architectures`) and model.safetensors, HF names."""
    from bertkit.model import BertForQuestionAnswering

    check_not_int8(model)
    directory = save_folder(directory)
    config = model.config.to_dict()
    config["architectures"] = [model.saved_architecture]
    if isinstance(model, BertForQuestionAnswering):
        # transformers sizes qa_outputs by num_labels: a start and an end logit, whatever the labels of the folder the
        # model was started from (a 3-label MNLI classifier, a regression) said
        for key in ("id2label", "label2id", "problem_type"):
            config.pop(key, None)
        config["num_labels"] = 2
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for key in ("dtype", "torch_dtype"):  # a source folder's, which transformers would load these weights in
        if key in config:
            config[key] = str(next(v.dtype for v in state.values() if v.is_floating_point())).removeprefix("torch.")
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not model.config.tied_decoder:  # transformers 5 reads an untied decoder's bias from decoder.bias
        for key in [k for k in state if k.endswith("cls.predictions.bias")]:
            state[key.replace("predictions.bias", "predictions.decoder.bias")] = state[key].clone()
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory, model_max_length=model.config.max_position_embeddings)


# sentence-transformers' files for a folder whose model it reads as mean-pooled vectors (`BertForSentenceEmbedding`),
# in the layout every version of it reads (all-MiniLM-L6-v2's on the Hub)
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling")


def save_sentence_transformers_files(directory, hidden_size: int, max_length: int) -> None:
    """modules.json (the encoder, then mean pooling), sentence_bert_config.json (texts cut at `max_length` tokens)
    and 1_Pooling/config.json, so that `SentenceTransformer(directory)` gives the vectors bertkit gives."""
    directory = Path(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    pooling = {"word_embedding_dimension": hidden_size, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}
    (directory / "1_Pooling").mkdir(exist_ok=True)
    for path, value in ((directory / "modules.json", modules),
                        (directory / "sentence_bert_config.json", {"max_seq_length": max_length,
                                                                   "do_lower_case": False}),
                        (directory / "1_Pooling" / "config.json", pooling)):
        atomic_write_text(path, json.dumps(value, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints: a model folder plus the state a run needs to continue exactly where it stopped

TRAINING_STATE_NAME = "training_state.pt"
COMPLETE_NAME = "COMPLETE"
_STEP_DIR = re.compile(r"step-(\d+)")


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states, in types `torch.load(weights_only=True)` reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | Path, state: dict) -> None:
    """torch.save a dict of tensors, numbers, strings, lists and dicts (optimizer, scheduler, step, RNG...)."""
    path = Path(path)
    atomic_write(path, lambda p: torch.save(state, p))


def load_training_state(path: str | Path) -> dict:
    """Read `save_training_state`'s file; weights_only, so a tampered file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise BertkitError(f"{path}: no such file (expected the {TRAINING_STATE_NAME} of a training checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise BertkitError(f"{path}: cannot read training state ({type(e).__name__}: {e})") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_step(directory: Path) -> int | None:
    """The step of a complete checkpoint folder (`step-N` holding COMPLETE), else None."""
    m = _STEP_DIR.fullmatch(directory.name)
    return int(m.group(1)) if m and (directory / COMPLETE_NAME).is_file() else None


def save_checkpoint(root: str | Path, step: int, model, tokenizer, training_state: dict) -> Path:
    """Write `root/step-N`: an HF model folder (+ tokenizer) and training_state.pt, atomically.

    Everything goes into a hidden temporary folder, is fsynced, gets a COMPLETE marker holding the sha256 of every
    file, and only then is renamed into place: a crash at any point leaves either no `step-N` folder or a whole one,
    and a file damaged later (a full disk, a copy cut short, a flipped bit) is caught by `verify_checkpoint`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp, tokenizer=tokenizer)
        save_training_state(tmp / TRAINING_STATE_NAME, training_state)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / COMPLETE_NAME).write_text(json.dumps({"step": step, "sha256": files}, indent=1) + "\n")
        for path in tmp.iterdir():
            _fsync(path)
        _fsync(tmp)
    except Exception as e:  # a full disk or a failing one: safetensors, torch.save and open() each say it their way
        shutil.rmtree(tmp, ignore_errors=True)  # the half folder would only take more of the space that ran out
        if isinstance(e, BertkitError) and not isinstance(e, WriteFailed):
            raise
        cause = e.cause if isinstance(e, WriteFailed) else f"{type(e).__name__}: {e}"
        raise BertkitError(f"{final}: cannot write the checkpoint ({cause}); {free_space(root)}; expected room "
                           "for a checkpoint (the ones before it are kept: free some space, then --resume auto "
                           "continues from the newest)") from None
    old = None
    if final.exists():  # a run resumed from an earlier checkpoint is passing this step again
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(root)
    if old is not None:  # deleted only once the new one is in place: it may be the run's only whole checkpoint
        shutil.rmtree(old)
    return final


def verify_checkpoint(directory: str | Path) -> str | None:
    """What is wrong with a training checkpoint folder (no marker, a missing file, a checksum that differs from the
    one written at save time), or None when it is whole. Markers of older versions ("step N") hold no checksums:
    only the files' presence is checked then."""
    directory = Path(directory)
    marker = directory / COMPLETE_NAME
    if not marker.is_file():
        return f"no {COMPLETE_NAME} marker (cut short while saving)"
    if not (directory / TRAINING_STATE_NAME).is_file():
        return f"no {TRAINING_STATE_NAME}"
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        recorded = None
    if not isinstance(recorded, dict):
        if marker.read_bytes().startswith(b"step "):  # an older marker, before checksums
            return None
        return f"{COMPLETE_NAME} is not a checkpoint marker"
    checksums = recorded.get("sha256") or {}
    if not isinstance(checksums, dict):  # an AttributeError, a traceback, before
        return f"{COMPLETE_NAME}'s sha256 is not a table of file checksums"
    for name, digest in checksums.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} does not match the checksum written when it was saved (truncated or corrupted)"
    return None


def usable_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under `root` that `verify_checkpoint` passes. Each newer step folder that fails is
    moved aside to `.corrupt-step-N` (so that pruning, which counts checkpoints, never keeps it over a good one) with
    a one-line warning naming what was wrong and where the run goes back to. None when there is no step folder;
    step folders none of which is whole are an error, and left where they are: a fresh start would silently throw
    the run away (and, with them set aside, the next attempt would start over without a word). A step folder that a
    save cut short had moved aside to replace it (`.old-step-N`) is put back first."""
    root = Path(root)
    if not root.is_dir():
        return None
    for old in root.glob(".old-step-*"):  # a crash between save_checkpoint's two renames: the step has no folder
        m = re.fullmatch(r"\.old-(step-\d+)-\d+", old.name)
        if m and not (root / m.group(1)).exists():
            logger.warning("%s: put back as %s (a save that replaced it was cut short)", old, m.group(1))
            os.rename(old, root / m.group(1))
    candidates = sorted((int(m.group(1)), p) for p in root.iterdir()
                        if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name)))
    damaged = []
    for _, path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            break
        damaged.append((path, problem))
    else:
        if damaged:
            found = "; ".join(f"{path.name}: {problem}" for path, problem in damaged)
            raise BertkitError(f"{root}: no whole checkpoint to resume from ({found}); expected a whole checkpoint "
                               "(put back a good copy of one), or --overwrite to start over")
        return None
    for damaged_path, problem in damaged:
        aside = root / f".corrupt-{damaged_path.name}-{os.getpid()}"
        os.rename(damaged_path, aside)
        logger.warning("%s: %s; falling back to the checkpoint before it (this one moved to %s)", damaged_path,
                       problem, aside.name)
    return path


def set_aside_newer(root: str | Path, step: int) -> list[str]:
    """Move the checkpoints under `root` newer than `step` aside to `.abandoned-step-N`, for a run resumed from an
    older checkpoint: they continue another run that this one replaces (its logs past `step` are rewritten), so
    `--resume auto` must not go back to them and pruning must not keep them over this run's own. Returns their names."""
    root = Path(root)
    moved = []
    for path in list_checkpoints(root):
        if checkpoint_step(path) > step:
            os.rename(path, root / f".abandoned-{path.name}-{os.getpid()}")
            moved.append(path.name)
    return moved


def checkpoint_bytes(num_parameters: int, optimizer_tensors: int = 2) -> int:
    """About the size of one training checkpoint in float32: the weights plus the optimizer's per-parameter
    tensors (AdamW and LAMB keep two), with a margin for the tokenizer and the rest."""
    return int(num_parameters * 4 * (1 + optimizer_tensors) * 1.05) + (16 << 20)


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoint folders under `root`, oldest step first; temporary and partial folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep 0 keeps all), and leftover temporary folders."""
    root = Path(root)
    complete = list_checkpoints(root)
    for path in complete[: max(0, len(complete) - keep)] if keep > 0 else []:
        shutil.rmtree(path)
    for path in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:  # left by a crash mid-save
        shutil.rmtree(path, ignore_errors=True)
