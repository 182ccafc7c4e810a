"""Model checkpoints in the Hugging Face layout: config.json + model.safetensors (+ tokenizer files).

bertkit's parameter names are transformers' names, so the only work here is the differences between checkpoint
flavours: with or without the `bert.` prefix, legacy buffers and TF-era names, tied decoder copies, sharded files.
Weights are read with safetensors or `torch.load(weights_only=True)`: arbitrary pickled objects are never run.

Training checkpoints (`save_checkpoint`) are such a model folder plus `training_state.pt` (optimizer, schedule,
loss scaler, data position, RNG states), written atomically so that resuming never picks up a half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bertkit.config import BertConfig
from bertkit.errors import BertkitError

logger = logging.getLogger("bertkit")

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# Entries of some checkpoints that are not parameters of the model: buffers older transformers saved, and the
# decoder copies that are tied to the token embeddings and to `cls.predictions.bias`.
_DROPPED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids", "cls.predictions.decoder.weight")


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read the weights of a model folder: safetensors first, else a (possibly sharded) pytorch_model.bin."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BertkitError(f"{directory}: not a folder (expected a model folder with config.json and weights)")

    def load_one(path: Path) -> dict[str, torch.Tensor]:
        try:
            if path.suffix == ".safetensors":
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or truncated file, or a pickle holding more than tensors
            raise BertkitError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None

    for single, index in ((WEIGHTS_NAME, WEIGHTS_INDEX_NAME), (PT_WEIGHTS_NAME, PT_WEIGHTS_INDEX_NAME)):
        if (directory / single).exists():
            return load_one(directory / single)
        if (directory / index).exists():
            shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_one(directory / shard))
            return state
    raise BertkitError(f"{directory}: no weights found (expected {WEIGHTS_NAME} or {PT_WEIGHTS_NAME})")


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename TF-era LayerNorm names, drop non-parameters and tied copies (keeping the bias if only the copy has it)."""
    out = {}
    for key, value in state.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key.endswith(_DROPPED_SUFFIXES):
            continue
        if key.endswith("cls.predictions.decoder.bias"):
            key = key.replace("decoder.bias", "bias")
            if key in state:
                continue
        out[key] = value
    return out


def _match_prefix(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
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


def load_state_dict_into(model, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy weights into `model`, naming what is missing, unexpected or mis-shaped.

    Missing weights of the model's own heads are newly initialised and reported; any other missing, unexpected
    or mis-shaped weight is an error, since a silently random encoder would waste a whole fine-tuning run.
    """
    state = _match_prefix(normalize_keys(state), model)
    own = model.state_dict()
    heads = model.head_prefixes
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    missing_encoder = [k for k in missing if not k.startswith(heads)]
    # weights of other heads (the pretraining heads when loading a classifier, say) are not an error
    unexpected_encoder = [k for k in unexpected if _is_encoder(k)]
    foreign_heads = [k for k in unexpected if not _is_encoder(k)]
    problems = []
    if missing_encoder:
        problems.append(f"missing weights: {', '.join(missing_encoder)}")
    if unexpected_encoder:
        problems.append(f"unexpected weights: {', '.join(unexpected_encoder)}")
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched)}")
    if problems:
        raise BertkitError(f"{source}: does not fit {type(model).__name__}: " + " | ".join(problems))
    new_heads = [k for k in missing if k.startswith(heads)]
    if new_heads:
        logger.warning("%s: newly initialised (not in the checkpoint; train them): %s", source, ", ".join(new_heads))
    if foreign_heads:
        logger.info("%s: not used by %s: %s", source, type(model).__name__, ", ".join(foreign_heads))
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.to(own[key].dtype))


def load_pretrained(cls, directory, config: BertConfig | None = None, load_weights: bool = True, **config_overrides):
    """Build `cls` from a model folder's config.json (or the given config) and load its weights (or, without
    `load_weights`, keep the random initialisation: the same network untrained)."""
    directory = Path(directory)
    if config is None:
        config = BertConfig.load(directory)
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise BertkitError(f"unknown config field {key!r}")
        setattr(config, key, value)
    config.__post_init__()
    model = cls(config)
    if load_weights:
        load_state_dict_into(model, read_state_dict(directory), source=str(directory))
    return model


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename, so a crash never leaves a half file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model, directory, tokenizer=None) -> None:
    """config.json (with the transformers class in `architectures`) and model.safetensors, HF names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    _atomic_write(directory / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


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
    _atomic_write(path, lambda p: torch.save(state, p))


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


def checkpoint_step(directory: Path) -> int | None:
    """The step of a complete checkpoint folder (`step-N` holding COMPLETE), else None."""
    m = _STEP_DIR.fullmatch(directory.name)
    return int(m.group(1)) if m and (directory / COMPLETE_NAME).is_file() else None


def save_checkpoint(root: str | Path, step: int, model, tokenizer, training_state: dict) -> Path:
    """Write `root/step-N`: an HF model folder (+ tokenizer) and training_state.pt, atomically.

    Everything goes into a hidden temporary folder, is fsynced, gets a COMPLETE marker, and only then is renamed
    into place: a crash at any point leaves either no `step-N` folder or a whole one.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, tokenizer=tokenizer)
    save_training_state(tmp / TRAINING_STATE_NAME, training_state)
    (tmp / COMPLETE_NAME).write_text(f"step {step}\n")
    for path in tmp.iterdir():
        _fsync(path)
    _fsync(tmp)
    if final.exists():  # a run resumed from an earlier checkpoint is passing this step again
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        shutil.rmtree(old)
    os.rename(tmp, final)
    _fsync(root)
    return final


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
