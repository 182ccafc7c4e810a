"""Composer checkpoints: MosaicML's training library, which its BERT recipes (the `hf_bert` model) run on.

A Composer run saves one file per checkpoint, `ep1-ba1000-rank0.pt` (and a `latest-rank0.pt` link to the last),
written by torch.save:

    {'state': {'model': {'model.bert.embeddings.word_embeddings.weight': tensor, ...},
               'integrations': {'huggingface': {'model': {'config': {'content': config.json's object,
                                                                     'class': 'transformers...BertForMaskedLM'}},
                                                'tokenizer': {'vocab.txt': {'content': [lines]}, ...}}},
               'optimizers': ..., 'timestamp': ..., 'metadata': ...},
     'rng': [...]}

The model's names are transformers' under the `model.` of Composer's HuggingFaceModel wrapper, and the wrapper
keeps the config and tokenizer files beside them, so one file is a whole model folder. A weights-only checkpoint
(`save_weights_only`) holds `model`, `integrations` and `metadata` alone. Besides tensors a full checkpoint pickles
a few plain values torch.load(weights_only=True) refuses by default (the wall-clock times as datetime.timedelta,
the torch version, numpy's random state as an array); those, and nothing that runs code, are allowed here.

MosaicBERT (the recipe's `mosaic_bert` model: ALiBi in place of position embeddings, a gated feed-forward layer,
fused QKV) is another architecture, not BERT's, and is refused. So are FSDP's sharded checkpoints (a folder of
`.distcp` files): torch.distributed.checkpoint.format_utils.dcp_to_torch_save gathers those into one file first.
"""

from __future__ import annotations

import datetime
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.torch_version import TorchVersion

from bertkit.errors import BertkitError

logger = logging.getLogger("bertkit")

COMPOSER_CHECKPOINT = "composer_checkpoint.pt"
_PREFIX = "model."  # the attribute of Composer's HuggingFaceModel that holds the transformers model
# transformers' module of the BERT classes: Composer imports the class it names to rebuild the model
_TRANSFORMERS_MODULE = "transformers.models.bert.modeling_bert"


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved it; either name is what the pickle refers to
    return core.multiarray._reconstruct


# plain data a Composer checkpoint pickles besides tensors: building any of these runs no code of the file's choosing
PLAIN_GLOBALS = [datetime.timedelta, TorchVersion, _numpy_reconstruct(), np.ndarray, np.dtype,
                 *{type(np.dtype(t)) for t in (np.uint8, np.uint32, np.int32, np.int64, np.float32, np.float64)}]


def is_composer(loaded) -> bool:
    """Whether a loaded .pt file is a Composer checkpoint: {'state': {'model': state dict, ...}, ...}."""
    return isinstance(loaded, dict) and isinstance(loaded.get("state"), dict) \
        and isinstance(loaded["state"].get("model"), dict)


def check_not_sharded(path: Path) -> None:
    """Refuse FSDP's sharded checkpoint (torch.distributed.checkpoint: a folder of `.metadata` and `.distcp` files,
    or one of those files), saying how to gather it into the one file Composer saves without FSDP."""
    folder = path if path.is_dir() else path.parent
    if path.suffix != ".distcp" and not (path.is_dir() and (path / ".metadata").is_file()
                                         and any(path.glob("*.distcp"))):
        return
    raise BertkitError(f"{path}: a sharded checkpoint (FSDP's: torch.distributed.checkpoint's .metadata and .distcp "
                       "files); expected one .pt file: gather it first with `python -c \"from torch.distributed."
                       f"checkpoint.format_utils import dcp_to_torch_save; dcp_to_torch_save('{folder}', "
                       "'checkpoint.pt')\"` and convert checkpoint.pt")


def _model_folder_of(path: Path) -> Path | None:
    """The model folder `path` is one of the files of (config.json or bert_config.json beside it, and its name not
    a Composer checkpoint's), else None."""
    from bertkit.tf_checkpoint import GOOGLE_CONFIG_NAME, NVIDIA_CHECKPOINT

    folder = path.parent
    if path.suffix == ".pt" and path.name != NVIDIA_CHECKPOINT:
        return None
    return folder if (folder / "config.json").is_file() or (folder / GOOGLE_CONFIG_NAME).is_file() else None


def _read(path: Path) -> dict:
    from bertkit.checkpoint import load_pickle

    if not path.exists():
        raise BertkitError(f"{path}: no such file or folder (expected a model folder, or a Composer checkpoint file)")
    check_not_sharded(path)
    folder = _model_folder_of(path)
    if folder is not None:  # `convert my-model/model.safetensors`: the folder is what converts
        raise BertkitError(f"{path}: a file of the model folder {folder}; expected the folder itself (`bertkit "
                           f"convert {folder} --out DIR --to ...`) or a Composer checkpoint file")
    loaded = load_pickle(path, mmap=True)  # the optimizer's state, twice the model's size, is not read
    if not is_composer(loaded):
        raise BertkitError(f"{path}: not a Composer checkpoint; expected torch.save's {{'state': {{'model': state "
                           "dict, 'integrations': ...}}, as Composer's Trainer saves one")
    return loaded


def _entry(tree: dict, keys: tuple[str, ...], path: Path, expected: str):
    node = tree
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            where = "".join(f"[{k!r}]" for k in keys)
            raise BertkitError(f"{path}: no {where}; expected {expected}")
        node = node[key]
    return node


def _weights(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' names: the wrapper's `model.` cut off."""
    from bertkit.checkpoint import refuse_mosaic_bert

    weights = state["model"]
    names = list(weights)
    refuse_mosaic_bert(names, path)
    outside = [name for name in names if not name.startswith(_PREFIX)]
    if outside or not names:
        shown = ", ".join(outside[:3]) or "none"
        raise BertkitError(f"{path}: ['state']['model'] holds {len(names)} entries, {len(outside)} of them not under "
                           f"'model.' ({shown}); expected the state dict of Composer's HuggingFaceModel")
    bad = [name for name in names if not isinstance(weights[name], torch.Tensor)]
    if bad:
        raise BertkitError(f"{path}: ['state']['model'][{bad[0]!r}] is a {type(weights[bad[0]]).__name__}; "
                           "expected a tensor")
    return {name[len(_PREFIX):]: weights[name] for name in names}


def _write_tokenizer_files(files: dict, folder: Path, path: Path) -> bool:
    """Write the tokenizer files the checkpoint holds into `folder` as transformers' save_pretrained wrote them
    (a .txt file was kept as its lines, a .json one as its object); False when it holds none."""
    from bertkit.hub import TOKENIZER_FILES

    wrote = False
    for name in TOKENIZER_FILES:  # known names only: a file name from the checkpoint never becomes a path as is
        entry = files.get(name)
        if entry is None:
            continue
        content = entry.get("content") if isinstance(entry, dict) else None
        if name.endswith(".txt"):
            if not isinstance(content, list) or not all(isinstance(line, str) for line in content):
                raise BertkitError(f"{path}: the tokenizer's {name} is not a list of lines; expected the lines "
                                   "Composer keeps of it")
            text = "\n".join(content)
        else:
            if not isinstance(content, dict):
                raise BertkitError(f"{path}: the tokenizer's {name} is not a JSON object; expected the object "
                                   "Composer keeps of it")
            text = json.dumps(content)
        (folder / name).write_text(text, encoding="utf-8")
        wrote = True
    return wrote


def load(path: str | Path):
    """The model (the class the checkpoint's config names, else the one its heads make) and tokenizer (None when
    it keeps none) of a Composer checkpoint of a transformers BERT."""
    from bertkit.checkpoint import architecture_of, load_state_dict_into
    from bertkit.config import BertConfig
    from bertkit.model import MODEL_CLASSES
    from bertkit.tokenizer import Tokenizer

    path = Path(path)
    state = _read(path)["state"]
    hf = ("integrations", "huggingface", "model", "config")
    expected = "the Hugging Face config Composer's HuggingFaceModel keeps (a checkpoint of MosaicML's hf_bert recipe)"
    weights = _weights(state, path)
    config_entry = _entry(state, hf, path, expected)
    hf_state = state["integrations"]["huggingface"]  # there: the config under it was found
    if "peft_config" in hf_state["model"]:
        # Composer keeps the adapter's weights alone by default (should_save_peft_only), under PEFT's names
        raise BertkitError(f"{path}: a PEFT checkpoint (an adapter such as LoRA on the model); expected a whole "
                           "model's: merge the adapter into it first (peft's merge_and_unload) and save that")
    content = _entry(config_entry, ("content",), path, expected)
    if not isinstance(content, dict):
        raise BertkitError(f"{path}: ['state']['integrations']['huggingface']['model']['config']['content'] is a "
                           f"{type(content).__name__}; expected config.json's object")
    class_name = str(config_entry.get("class", "")).rpartition(".")[2]
    architecture = class_name if class_name in MODEL_CLASSES else architecture_of(weights)
    try:
        config = BertConfig.from_dict({**content, "architectures": [architecture]})
    except BertkitError as e:
        raise BertkitError(f"{path}: ['state']['integrations']['huggingface']['model']['config']: {e}") from None
    model = MODEL_CLASSES[architecture](config)
    load_state_dict_into(model, weights, source=f"{path} ['state']['model']")
    files = hf_state.get("tokenizer") or {}
    if not isinstance(files, dict):
        raise BertkitError(f"{path}: ['state']['integrations']['huggingface']['tokenizer'] is a "
                           f"{type(files).__name__}; expected the tokenizer's files by name")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Tokenizer.from_pretrained(tmp) if _write_tokenizer_files(files, Path(tmp), path) else None
    return model, tokenizer


def _transformers_state(model) -> dict[str, torch.Tensor]:
    """`model`'s state dict as transformers' model of the same class has it: the masked-LM decoder's weight and
    bias, tied to the embeddings and to `cls.predictions.bias`, are entries of their own there."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    if "cls.predictions.bias" in state:
        state.setdefault("cls.predictions.decoder.weight", state[f"{prefix}embeddings.word_embeddings.weight"])
        state.setdefault("cls.predictions.decoder.bias", state["cls.predictions.bias"])
    return state


def _tokenizer_entries(tokenizer) -> dict:
    """The tokenizer files as Composer's HuggingFaceModel keeps them: a .txt as its lines, a .json as its object."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        out = {}
        for file in sorted(Path(tmp).iterdir()):
            text = file.read_text(encoding="utf-8")
            content = text.split("\n") if file.suffix == ".txt" else json.loads(text)
            out[file.name] = {"file_extension": file.suffix, "content": content}
    return out


def save_composer(model, directory: Path, tokenizer=None) -> Path:
    """Write `model` as a weights-only Composer checkpoint, `directory/composer_checkpoint.pt`: what Composer's
    Trainer loads with `load_path` and `load_weights_only=True` into MosaicML's hf_bert model, and what
    `HuggingFaceModel.hf_from_composer_checkpoint` turns back into a transformers model and tokenizer."""
    from bertkit.checkpoint import atomic_write, check_not_int8

    check_not_int8(model)
    name = type(model).__name__
    content = {**model.config.to_dict(), "architectures": [name]}
    huggingface = {"model": {"config": {"file_extension": ".json", "content": content,
                                        "class": f"{_TRANSFORMERS_MODULE}.{name}"}},
                   "tokenizer": _tokenizer_entries(tokenizer) if tokenizer is not None else {}}
    weights = {_PREFIX + k: v for k, v in _transformers_state(model).items()}
    checkpoint = {"state": {"model": weights, "integrations": {"huggingface": huggingface},
                            "metadata": {"written_by": "bertkit convert"}}}
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / COMPOSER_CHECKPOINT
    atomic_write(out, lambda tmp: torch.save(checkpoint, tmp))
    return out
