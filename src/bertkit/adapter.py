"""LoRA adapters in peft's layout: what `finetune --lora-rank` writes beside the merged model, and what `convert`
reads from peft.

A peft LoRA adapter folder holds adapter_config.json (rank, alpha, the adapted modules, the task head's modules)
and adapter_model.safetensors: each adapted Linear's `lora_A.weight` (r, in) and `lora_B.weight` (out, r) and the
head's weights, every name prefixed `base_model.model.` and otherwise transformers' (which are bertkit's). So peft's
`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), folder)` loads bertkit's
adapter, and `merged` folds a peft adapter into its base model: W + (alpha / r) B A for each pair (alpha / sqrt(r)
under peft's use_rslora).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bertkit.checkpoint import atomic_write, atomic_write_text
from bertkit.errors import BertkitError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# peft's task types for bertkit's heads; peft has none for multiple choice, whose adapter is a generic one (null)
TASK_TYPES = {"BertForSequenceClassification": "SEQ_CLS", "BertForQuestionAnswering": "QUESTION_ANS",
              "BertForTokenClassification": "TOKEN_CLS", "BertModel": "FEATURE_EXTRACTION"}


def is_adapter(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def save_adapter(model, directory: str | Path, base: str, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
    """The LoRA matrices and the trained head of `model` (after `bertkit.model.add_lora`) as a peft adapter of
    `base` (the model folder or Hub id it was started from)."""
    state = model.state_dict()
    heads = [k for k in state if k.startswith(model.trained_prefixes)]
    tensors = {PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items() if ".lora_" in k or k in heads}
    # peft finds modules_to_save by the end of their names: "bert.pooler." is the module "pooler"
    modules = sorted({p.rstrip(".").rsplit(".", 1)[-1] for p in model.trained_prefixes
                      if any(k.startswith(p) for k in heads)})
    config = {"peft_type": "LORA", "task_type": TASK_TYPES.get(model.saved_architecture),
              "base_model_name_or_path": base, "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": list(targets), "modules_to_save": modules, "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "inference_mode": True}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the weights, names without peft's prefix, after checking that bertkit can merge it:
    plain LoRA (not DoRA), one alpha for every module, weights stored as (out, in)."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BertkitError(f"{path}: cannot read it ({e}); expected peft's adapter_config.json") from None
    refused = {"peft_type": config.get("peft_type") != "LORA", "use_dora": bool(config.get("use_dora")),
               "alpha_pattern": bool(config.get("alpha_pattern")),
               "fan_in_fan_out": bool(config.get("fan_in_fan_out")), "bias": config.get("bias", "none") != "none"}
    bad = [f"{k} {config.get(k)!r}" for k, no in refused.items() if no]
    if bad:
        raise BertkitError(f"{path}: {', '.join(bad)}; expected a plain LoRA adapter (peft_type LORA, no DoRA, one "
                           "lora_alpha, fan_in_fan_out false, bias none)")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise BertkitError(f"{directory}: no {ADAPTER_WEIGHTS}; expected peft's adapter weights beside {ADAPTER_CONFIG}")
    state = {k.removeprefix(PREFIX): v for k, v in load_file(weights).items()}
    return config, state


def describe_adapter(directory: str | Path) -> dict[str, str]:
    """What `bertkit info` prints about a peft LoRA adapter folder."""
    config, state = read_adapter(directory)
    adapted = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k})
    lora = sum(v.numel() for k, v in state.items() if ".lora_" in k)
    head = sum(v.numel() for k, v in state.items() if ".lora_" not in k)
    ends = sorted({re.sub(r".*\.layer\.\d+\.", "", n) for n in adapted})  # each block's: attention.self.query
    return {
        "adapter folder": str(directory),
        "kind": f"peft LoRA adapter ({config.get('task_type') or 'no task type'})",
        "base model": str(config.get("base_model_name_or_path") or "(not stated)"),
        "rank, alpha": f"{config.get('r')}, {config.get('lora_alpha')}" + (" (rsLoRA)" if config.get("use_rslora")
                                                                          else ""),
        "adapted": f"{len(adapted)} Linear layers ({', '.join(ends)})",
        "parameters": f"{lora + head:,}: {lora:,} LoRA, {head:,} in the head "
                      f"({', '.join(config.get('modules_to_save') or []) or 'none'})",
        "merged by": f"bertkit convert {directory} --out DIR --to hf",
    }


def merged(directory: str | Path, base: str | None = None):
    """The model of a peft LoRA adapter folder with its update folded in (plain Linears), and the tokenizer of the
    adapter folder, else of the base. `base`: the base model folder or Hub id, by default the adapter's
    base_model_name_or_path."""
    from bertkit.checkpoint import load_state_dict_into, model_folder
    from bertkit.model import (BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification,
                               BertModel)
    from bertkit.tokenizer import Tokenizer

    config, state = read_adapter(directory)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise BertkitError(f"{directory}/{ADAPTER_CONFIG}: no base_model_name_or_path; expected --base, the model "
                           "folder the adapter was trained on")
    base_dir = model_folder(base)
    classes = {"SEQ_CLS": BertForSequenceClassification, "QUESTION_ANS": BertForQuestionAnswering,
               "TOKEN_CLS": BertForTokenClassification, "FEATURE_EXTRACTION": BertModel}
    task_type = config.get("task_type")
    if task_type not in classes:
        raise BertkitError(f"{directory}/{ADAPTER_CONFIG}: task_type {task_type!r}; expected one of "
                           f"{', '.join(classes)} (bertkit's multiple-choice runs hold their merged model beside adapter/)")
    cls = classes[task_type]
    overrides = {}
    if cls in (BertForSequenceClassification, BertForTokenClassification) and "classifier.weight" in state:
        overrides["num_labels"] = state["classifier.weight"].shape[0]
    model = cls.from_pretrained(base_dir, **overrides)
    own = model.state_dict()
    pairs = [k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")]
    with torch.no_grad():
        for name in pairs:
            a, b = state.pop(f"{name}.lora_A.weight"), state.pop(f"{name}.lora_B.weight", None)
            if b is None or f"{name}.weight" not in own:
                raise BertkitError(f"{directory}/{ADAPTER_WEIGHTS}: {name}: " + (
                    "lora_A without lora_B" if b is None else f"no such Linear in {base}") + "; expected an adapter "
                    f"of this base model ({cls.__name__})")
            rank = a.shape[0]
            scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
            own[f"{name}.weight"].add_((b.float() @ a.float() * scale).to(own[f"{name}.weight"].dtype))
    load_state_dict_into(model, own | state, source=f"{directory}/{ADAPTER_WEIGHTS}")  # the head's, trained
    tokenizer_dir = directory if (Path(directory) / "vocab.txt").is_file() else base_dir
    return model, Tokenizer.from_pretrained(tokenizer_dir)
