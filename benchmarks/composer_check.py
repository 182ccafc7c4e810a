"""Composer checkpoints both ways, against MosaicML's Composer itself: a run of its Trainer read by bertkit, and
bertkit's `convert --to composer` loaded by Composer.

Composer pins an older torch (mosaicml 0.32.1: torch < 2.7.1) and transformers (< 4.54), so it runs in a venv of
its own, beside bertkit installed there without its dependencies:

    python -m venv /tmp/cvenv && . /tmp/cvenv/bin/activate
    pip install torch==2.13.0 && pip install --no-deps mosaicml==0.32.1 mosaicml-cli==0.7.5 peft==0.14.0 \
        accelerate==1.7.0
    pip install transformers==4.53.3 torchmetrics==1.7.4 torch_optimizer coolname tabulate==0.9.0 py-cpuinfo \
        psutil backoff gql websockets ruamel.yaml argcomplete questionary validators arrow importlib-metadata rich pillow
    pip install --no-deps -e .
    python benchmarks/composer_check.py --model $BERTKIT_DATA/checkpoints/all-MiniLM-L6-v2 --stub-torchvision

Composer imports torchvision at start-up for its vision code; no torchvision build here matches torch 2.13's CPU
wheel, so `--stub-torchvision` puts an empty stand-in on the path first (none of that code runs for a BERT).

Three checks, each on the outputs of the same sentences (largest absolute difference reported):
1. Composer's Trainer trains a small transformers BertForMaskedLM two steps and saves a full checkpoint (optimizer
   state, RNG states, timestamps); `bertkit convert CKPT --to hf` must give the weights it saved, bit for bit, and
   bertkit's model the same masked-LM logits as Composer's.
2. `bertkit convert MODEL --to composer` of a real checkpoint (as a masked LM and as a fresh 3-label classifier),
   loaded by Composer's Trainer (`load_path`, `load_weights_only`, strict) into the transformers model Composer's
   hf_bert recipe builds: the same outputs as bertkit's.
3. The same file the way Composer's documentation goes back to transformers from the file alone:
   `HuggingFaceModel.hf_from_composer_checkpoint` rebuilds the model (random) and tokenizer from what the file
   keeps, the Trainer loads the weights into it; and `write_huggingface_pretrained_from_composer_checkpoint` writes
   a transformers folder, read by transformers' from_pretrained. The same outputs and the same token ids as
   bertkit's.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import sys
import tempfile
import types
from pathlib import Path

SENTENCES = ["The cat sat on the mat.", "A much longer sentence, with commas, numbers like 42 and more words.",
             "Short one"]


def stub_torchvision() -> None:
    """An empty `torchvision` (every submodule and name a do-nothing class), for Composer's imports alone."""
    class Anything:
        def __init__(self, *args, **kwargs):
            pass

    def getattr_(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (Anything,), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = types.ModuleType(spec.name)
            module.__getattr__ = getattr_
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def bertkit_convert(source: Path, out: Path, to: str) -> None:
    from bertkit.cli import main

    if main(["convert", str(source), "--out", str(out), "--to", to]) != 0:
        raise SystemExit(f"bertkit convert {source} --to {to} failed")


def largest_difference(a, b, batch) -> float:
    """Over the real tokens (a padding position's output is whatever each implementation leaves there)."""
    if a.dim() == 3:
        keep = batch["attention_mask"].bool()
        a, b = a[keep], b[keep]
    return float((a.float() - b.float()).abs().max())


def batch_of(tokenizer):
    return tokenizer.encode_batch(SENTENCES, return_tensors="pt")


def composer_run(work: Path, vocab_model: Path):
    """Composer's Trainer, two steps of masked LM on a small transformers BERT; the checkpoint it saved."""
    import transformers
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from torch.utils.data import DataLoader

    tokenizer = transformers.AutoTokenizer.from_pretrained(vocab_model)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128)
    model = HuggingFaceModel(transformers.BertForMaskedLM(config), tokenizer=tokenizer, use_logits=True)
    collate = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    rows = [tokenizer(text, truncation=True, max_length=32) for text in SENTENCES * 4]
    trainer = Trainer(model=model, train_dataloader=DataLoader(rows, batch_size=4, collate_fn=collate),
                      max_duration="2ba", save_folder=str(work / "composer-run"), save_interval="2ba",
                      device="cpu", progress_bar=False, seed=0)
    trainer.fit()
    trainer.close()
    return work / "composer-run" / "ep0-ba2-rank0.pt", model.model.eval()


def read_check(work: Path, vocab_model: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from bertkit.model import BertForMaskedLM
    from bertkit.tokenizer import Tokenizer

    checkpoint, composer_model = composer_run(work, vocab_model)
    out = work / "from-composer"
    bertkit_convert(checkpoint, out, "hf")
    saved = torch.load(checkpoint, weights_only=False)["state"]["model"]
    written = load_file(str(out / "model.safetensors"))
    same_weights = all(torch.equal(written[k], saved["model." + k]) for k in written)
    missing = sorted(k[len("model."):] for k in saved if k[len("model."):] not in written
                     and not k.endswith(("decoder.weight", "decoder.bias")))  # tied copies, written once
    tokenizer = Tokenizer.from_pretrained(out)
    batch = batch_of(tokenizer)
    model = BertForMaskedLM.from_pretrained(out).eval()
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = composer_model(**batch).logits
    return {"checkpoint": "Composer Trainer, 2 steps, full (optimizer, rng, timestamps)",
            "weights_bitwise": same_weights, "weights_missing": missing,
            "mlm_logits_max_abs_diff": largest_difference(ours, theirs, batch)}


def write_check(work: Path, model_dir: Path, head: str) -> dict:
    import torch
    import transformers
    from composer import Trainer
    from composer.models import HuggingFaceModel, write_huggingface_pretrained_from_composer_checkpoint

    from bertkit.model import BertForMaskedLM, BertForSequenceClassification
    from bertkit.tokenizer import Tokenizer

    source = model_dir
    if head == "classifier":  # a fresh 3-label head on the checkpoint, saved as a bertkit folder first
        source = work / "classifier"
        torch.manual_seed(0)
        BertForSequenceClassification.from_pretrained(model_dir, num_labels=3).save_pretrained(source)
        Tokenizer.from_pretrained(model_dir).save_pretrained(source)
    ours_cls = BertForSequenceClassification if head == "classifier" else BertForMaskedLM
    hf_cls = transformers.BertForSequenceClassification if head == "classifier" else transformers.BertForMaskedLM
    if head == "mlm":  # all-MiniLM-L6-v2 is a bare encoder: a masked-LM folder of it, the head newly initialised
        source = work / "mlm"
        torch.manual_seed(0)
        BertForMaskedLM.from_pretrained(model_dir).save_pretrained(source)
        Tokenizer.from_pretrained(model_dir).save_pretrained(source)
    out = work / f"to-composer-{head}"
    bertkit_convert(source, out, "composer")
    path = out / "composer_checkpoint.pt"
    tokenizer = Tokenizer.from_pretrained(source)
    batch = batch_of(tokenizer)
    ours = ours_cls.from_pretrained(source).eval()
    with torch.no_grad():
        expected = ours(**batch).logits

    # the model MosaicML's hf_bert recipe builds (a transformers BERT from a config), weights from the file
    config = transformers.AutoConfig.from_pretrained(source)
    fresh = HuggingFaceModel(hf_cls(config), use_logits=True)
    Trainer(model=fresh, load_path=str(path), load_weights_only=True, load_strict_model_weights=True,
            device="cpu", progress_bar=False)
    with torch.no_grad():
        trainer_logits = fresh.model.eval()(**batch).logits

    # Composer's documented way back from the file alone: model (random) and tokenizer rebuilt from what it keeps,
    # then the weights loaded by the Trainer
    rebuilt, hf_tokenizer = HuggingFaceModel.hf_from_composer_checkpoint(str(path))
    Trainer(model=HuggingFaceModel(rebuilt, tokenizer=hf_tokenizer, use_logits=True), load_path=str(path),
            load_weights_only=True, load_strict_model_weights=True, device="cpu", progress_bar=False)
    with torch.no_grad():
        rebuilt_logits = rebuilt.eval()(**batch).logits
    ids = hf_tokenizer(SENTENCES, padding=True, return_tensors="pt")["input_ids"]

    # and Composer's converter to a transformers folder, read by transformers
    hf_folder = work / f"hf-from-composer-{head}"
    write_huggingface_pretrained_from_composer_checkpoint(str(path), str(hf_folder))
    with torch.no_grad():
        converted_logits = hf_cls.from_pretrained(hf_folder).eval()(**batch).logits
    return {"source": f"{model_dir.name} as {ours_cls.__name__}",
            "trainer_load_weights_only_strict_max_abs_diff": largest_difference(trainer_logits, expected, batch),
            "hf_from_composer_checkpoint_class": type(rebuilt).__name__,
            "hf_from_composer_checkpoint_then_trainer_max_abs_diff": largest_difference(rebuilt_logits, expected,
                                                                                        batch),
            "tokenizer_ids_equal": bool(torch.equal(ids, batch["input_ids"])),
            "write_huggingface_pretrained_max_abs_diff": largest_difference(converted_logits, expected, batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder (the shared all-MiniLM-L6-v2)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/composer_check.json"))
    parser.add_argument("--stub-torchvision", action="store_true", help="an empty torchvision for Composer's imports")
    args = parser.parse_args()
    if args.stub_torchvision:
        stub_torchvision()
    import composer
    import torch
    import transformers

    torch.manual_seed(0)
    out, model_dir, start = args.out.resolve(), args.model.resolve(), Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chdir(work)  # Composer leaves a tokenizer-save-dir-* folder in the working directory per tokenizer it reads
        result = {"composer": composer.__version__, "transformers": transformers.__version__,
                  "torch": torch.__version__, "read": read_check(work, model_dir),
                  "write": [write_check(work, model_dir, head) for head in ("mlm", "classifier")]}
        os.chdir(start)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
