"""Hugging Face Hub model ids where a model folder goes: read from the Hub cache (a hand-built one, offline: the
tests never reach the network; conftest sets HF_HUB_OFFLINE), what is fetched, and what a failure says."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bertkit import hub
from bertkit.cli import main

MINILM_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")


@pytest.fixture(autouse=True)
def _fresh_resolutions():
    """hub.download keeps what it fetched for the process: each test's own (fake) Hub is asked afresh."""
    hub.download.cache_clear()
    yield
    hub.download.cache_clear()


def _hub_cache(root: Path, repo_id: str, source: Path, files=MINILM_FILES) -> Path:
    """The Hub cache's layout as huggingface_hub writes it: models--owner--name/refs/main names the snapshot."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in files:
        shutil.copy(source / name, snapshot / name)
    return snapshot


@pytest.mark.parametrize("name,expected", [
    ("bert-base-uncased", True), ("google-bert/bert-base-uncased", True), ("owner/name.v2", True),
    ("runs/a/b", False), ("config.json", False), ("../model", False), ("/abs/model", False), ("owner/", False),
    ("ep0-ba2-rank0.pt", False), ("", False), ("has space/x", False),
])
def test_what_reads_as_a_hub_id(name, expected):
    assert hub.is_hub_id(name) is expected


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(tmp_path, monkeypatch):
    (tmp_path / "bert-base-uncased").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: pytest.fail("reached for the Hub"))
    assert hub.resolve("bert-base-uncased") == "bert-base-uncased"
    assert hub.resolve(None) is None


def test_a_model_in_the_hub_cache_is_read_offline_by_name_by_every_loader_and_the_cli(minilm_dir, tmp_path):
    snapshot = _hub_cache(tmp_path / "cache", "sentence-transformers/all-MiniLM-L6-v2", minilm_dir)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    code = ("from bertkit import BertConfig, BertModel, Tokenizer; name = 'sentence-transformers/all-MiniLM-L6-v2'; "
            "model = BertModel.from_pretrained(name); tok = Tokenizer.from_pretrained(name); "
            "print(BertConfig.load(name).num_hidden_layers, tok.encode('hello world')['input_ids'], "
            "float(model.embeddings.word_embeddings.weight[7592, 0]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from safetensors.torch import load_file

    weight = float(load_file(str(minilm_dir / "model.safetensors"))["embeddings.word_embeddings.weight"][7592, 0])
    assert out.stdout.split() == ["6", "[101,", "7592,", "2088,", "102]", str(weight)]
    out = subprocess.run([sys.executable, "-m", "bertkit.cli", "info", "sentence-transformers/all-MiniLM-L6-v2"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"model folder     {snapshot}" in out.stdout and "layers L         6" in out.stdout


def test_only_what_bertkit_reads_is_fetched_safetensors_first(minilm_dir, tmp_path, monkeypatch):
    """The repository's files are fetched by pattern: config and tokenizer with the safetensors weights, and
    pytorch_model.bin only where there is no safetensors file (old repositories hold both, and TF's and Flax's)."""
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append(allow_patterns)
        folder = tmp_path / repo_id.replace("/", "--")
        folder.mkdir(exist_ok=True)
        for name in ("config.json", "vocab.txt"):
            shutil.copy(minilm_dir / name, folder / name)
        if "pytorch_model.bin" in allow_patterns:
            torch.save({}, folder / "pytorch_model.bin")
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    folder = hub.download("old/bert")
    assert (folder / "pytorch_model.bin").is_file()
    assert len(calls) == 2 and "model.safetensors" in calls[0] and "pytorch_model.bin" not in calls[0]
    assert "pytorch_model.bin" in calls[1] and "config.json" in calls[1] and "vocab.txt" in calls[1]
    calls.clear()
    hub.download("old/bert", weights=False)  # a tokenizer or a config alone: no weights asked for
    assert len(calls) == 1 and not any("model" in pattern for pattern in calls[0])


def test_a_hub_id_that_cannot_be_fetched_says_why_in_one_line(tmp_path, monkeypatch, capsys):
    from huggingface_hub import errors

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "bertkit.cli", "finetune", "--model-dir", "owner/not-cached",
                          "--task", "SST-2"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "bertkit: error: owner/not-cached: no such folder here, and the Hugging Face Hub model of that name is not in "
        "the Hub cache and the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1); expected a model folder, or "
        "a Hub model id with a network")

    def missing(*args, **kwargs):  # built without its __init__, whose arguments differ across huggingface_hub versions
        error = errors.RepositoryNotFoundError.__new__(errors.RepositoryNotFoundError)
        error.args = ("404 Client Error: Repository Not Found for url: https://huggingface.co/api/models/my-modle",)
        raise error

    monkeypatch.setattr("huggingface_hub.snapshot_download", missing)
    assert main(["info", "my-modle"]) == 2  # a mistyped local folder reads as a Hub id too: both are said
    assert "my-modle: no such folder here, and the Hugging Face Hub model of that name does not exist (or is " \
        "private" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["a--b", "owner/a--b", "modèle", "owner/x.git", "a" * 97, "a./b"],
                         ids=["dashes", "owner-dashes", "accent", "git", "97-chars", "owner-dot"])
def test_a_name_the_hub_refuses_is_a_mistyped_folder_said_in_one_line(name, tmp_path, monkeypatch, capsys):
    """The Hub's own rules (ASCII, at most 96 characters, no "--", not ".git") decide what is an id: a folder name
    they refuse is never looked up, and says "no such folder" rather than huggingface_hub's HFValidationError."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: pytest.fail("reached for the Hub"))
    assert not hub.is_hub_id(name)
    assert main(["info", name]) == 2
    assert capsys.readouterr().err == f"bertkit: error: {name}: no such folder (expected a model folder with " \
        "config.json and weights)\n"


def _network_errors():
    from huggingface_hub import errors

    yield errors.HTTPError("peer closed connection without sending complete message body")  # httpx's: no OSError
    yield OSError()  # no message at all
    if hasattr(errors, "XetDownloadError"):
        yield errors.XetDownloadError("download from Xet storage failed")


@pytest.mark.parametrize("error", list(_network_errors()), ids=lambda e: type(e).__name__)
def test_a_download_that_fails_on_the_way_says_so_in_one_line(error, monkeypatch, capsys):
    def snapshot_download(*args, **kwargs):
        raise error

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    assert main(["info", "owner/flaky"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bertkit: error: owner/flaky: no such folder here, and the Hugging Face Hub model of that "
                          f"name could not be fetched ({type(error).__name__}: ") and err.count("\n") == 1


def test_a_run_names_a_hub_model_by_its_id_not_by_the_commit_of_its_snapshot(minilm_dir, tmp_path):
    from types import SimpleNamespace

    from bertkit.tasks.finetune import FinetuneConfig, results_table
    from bertkit.tasks.suite import SuiteConfig

    snapshot = _hub_cache(tmp_path / "cache", "sentence-transformers/all-MiniLM-L6-v2", minilm_dir, files=())
    assert hub.model_name(snapshot) == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub.model_name(_hub_cache(tmp_path / "cache", "minilm", minilm_dir, files=())) == "minilm"
    assert hub.model_name(tmp_path / "runs" / "my-model") == "my-model"  # a folder of one's own: its name
    assert SuiteConfig(model_dir=str(snapshot)).row == "sentence-transformers/all-MiniLM-L6-v2"
    record = {"best": {}, "epochs": [], "best_epoch": None, "train_examples": 8, "eval_examples": 8}
    table = results_table(FinetuneConfig(model_dir=str(snapshot), task="SST-2"),
                          SimpleNamespace(name="SST-2", table_metrics=[]), record)
    assert table.startswith("# Fine-tuning SST-2 from sentence-transformers/all-MiniLM-L6-v2\n")


def test_the_tests_never_reach_the_hub_nor_read_the_users_hub_cache():
    """conftest makes huggingface_hub offline, whatever the shell exported (HF_HUB_OFFLINE=0 too), with an empty
    cache of the test run's own: `--model-dir m` in a test is looked up there, not on huggingface.co."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is True
    cache = Path(constants.HF_HUB_CACHE)
    assert cache.name.startswith("bertkit-tests-hub-cache-") and not any(cache.glob("models--*"))
