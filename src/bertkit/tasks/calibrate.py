"""Temperature scaling of a classifier (`bertkit evaluate RUN --calibrate`): fine-tuned BERTs are overconfident, and
one number T, fitted on labelled data the model did not train on, makes softmax(logits / T)'s probabilities mean
what they say (Guo et al. 2017; Desai & Durrett 2020 for BERT). The predicted classes do not change.

T is folded into the folder's classifier (its weight and bias divided by T), so the calibrated folder is a plain
model folder: `predict`, `serve`, ONNX export and transformers give the calibrated probabilities with nothing to
configure. calibration.json in the folder records each fit and the temperature in all.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from scipy.special import softmax
from safetensors.torch import save_file

from bertkit.checkpoint import WEIGHTS_NAME, atomic_write, atomic_write_text, weight_files
from bertkit.errors import BertkitError

CALIBRATION_FILE = "calibration.json"
CLASSIFIER = ("classifier.weight", "classifier.bias")


def check_calibratable(model_dir, int8: bool) -> None:
    """Refuse what cannot be calibrated in place: calibration rewrites the folder's one model.safetensors (checked
    before any data is read)."""
    folder = Path(model_dir)
    if int8:
        raise BertkitError("--calibrate with --int8; expected the float model: the temperature is fitted to its "
                           "logits and written into its weights")
    if not folder.is_dir():
        raise BertkitError(f"{model_dir}: not a local folder; expected the model folder to calibrate in place (a Hub "
                           "model is fetched with `bertkit convert ID --out DIR --to hf` first)")
    files = weight_files(folder)
    if [p.name for p in files] != [WEIGHTS_NAME]:
        raise BertkitError(f"{folder}: weights in {', '.join(p.name for p in files)}; expected one {WEIGHTS_NAME} to "
                           f"rewrite (`bertkit convert {folder} --out DIR --to hf` writes one)")


def calibrate_folder(model_dir, task, logits: torch.Tensor, gold, split: str) -> dict:
    """Fit T on `logits` of the task's `split` (a single-label classifier's), divide the folder's classifier by it,
    and record the fit; returns the temperature and the calibrated ECE and NLL on that split."""
    from bertkit.tasks.metrics import calibration_scores, fit_temperature

    if not task.labels or task.multi_label:
        kind = "multi-label" if task.multi_label else "regression"
        raise BertkitError(f"--calibrate on a {kind} model ({task.name}); expected a classifier with one label per "
                           "example (temperature scaling of its softmax)")
    path = Path(model_dir) / WEIGHTS_NAME
    z = logits.double().numpy()
    temperature = fit_temperature(z, gold)
    before = calibration_scores(softmax(z, axis=1), gold)
    after = calibration_scores(softmax(z / temperature, axis=1), gold)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    keys = [k for k in tensors if k.endswith(CLASSIFIER)]
    if len(keys) != 2:
        raise BertkitError(f"{path}: classifier weights {', '.join(keys) or 'none'}; expected classifier.weight and "
                           "classifier.bias (a sequence classifier's head)")
    for key in keys:
        tensors[key] = (tensors[key].double() / temperature).to(tensors[key].dtype)
    record_path = Path(model_dir) / CALIBRATION_FILE
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {"fits": []}
    record["fits"].append({"temperature": temperature, "split": split, "examples": len(gold), "before": before,
                           "after": after})
    record["temperature"] = float(np.prod([fit["temperature"] for fit in record["fits"]]))
    atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata))
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    return {"temperature": temperature, "calibrated_ece": after["ece"], "calibrated_nll": after["nll"]}
