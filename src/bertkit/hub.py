"""Models and tokenizers on the Hugging Face Hub, by name: `bertkit finetune --model-dir google-bert/bert-base-uncased`.

A model folder that is not on disk but reads as a Hub repository id (`name` or `owner/name`) is fetched with
huggingface_hub's `snapshot_download` into its usual cache (the one transformers shares, `HF_HUB_CACHE`), so a model
transformers already fetched is read from there, offline too (`HF_HUB_OFFLINE=1`). Only what bertkit reads comes
down: config.json, the tokenizer files and the weights, safetensors where the repository has them, else
pytorch_model.bin (old repositories hold both, beside TensorFlow's, Flax's and others' copies: gigabytes never read).
A local folder always wins over a Hub id of the same name. Nothing here runs unless such a name is given: tests and
the embedded defaults never reach the network.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from bertkit.errors import BertkitError, cause

_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
_FILE_SUFFIXES = (".json", ".txt", ".pt", ".bin", ".safetensors", ".csv", ".tsv", ".jsonl", ".index")
TOKENIZER_FILES = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json"]
_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
_PICKLES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]


def is_hub_id(name: str | Path) -> bool:
    """Whether `name`, not a path on disk, reads as a Hub repository id rather than a mistyped file or folder."""
    text = str(name)
    if (Path(text).exists() or _REPO_ID.fullmatch(text) is None or ".." in text
            or text.endswith((*_FILE_SUFFIXES, ".", "-"))):
        return False
    from huggingface_hub.utils import validate_repo_id

    try:  # the Hub's own rules besides: ASCII, at most 96 characters, no "--", not ".git"; a folder name they
        validate_repo_id(text)  # refuse (`modèle`, `a--b`) is a mistyped folder, said as one
    except ValueError:
        return False
    return True


def repo_id_of(folder: str | Path) -> str | None:
    """The Hub id whose snapshot `folder` is (HF_HUB_CACHE/models--owner--name/snapshots/<commit>), else None: a run
    names its model by it, not by the commit hash that names the folder."""
    folder = Path(folder)
    repo = folder.parent.parent.name
    if folder.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo.removeprefix("models--").replace("--", "/")  # "--" is not allowed in an id: the mapping is one to one


def model_name(folder: str | Path) -> str:
    """A model folder's name for a table or a report: its Hub id when it is a Hub snapshot, else its own name."""
    return repo_id_of(folder) or Path(folder).name


def _fetch_errors() -> tuple[type[BaseException], ...]:
    """What a download that fails on the way raises besides the cases said apart: the Hub's HTTP errors, OSError
    (a full disk, a cache this user cannot write), the HTTP library's own errors, which huggingface_hub re-exports as
    errors.HTTPError (httpx's, raised when its retries are spent, are no OSError, unlike requests'), and Xet
    storage's, where most repositories' files are now (an error class only the versions with Xet have)."""
    from huggingface_hub import errors

    return (errors.HfHubHTTPError, errors.HTTPError, OSError,
            *((errors.XetDownloadError,) if hasattr(errors, "XetDownloadError") else ()))


@lru_cache(maxsize=None)  # once a process: every loader of a command resolves the same id (a failure is not kept)
def download(repo_id: str, weights: bool = True) -> Path:
    """The local folder of Hub model `repo_id` (its files fetched into the Hub cache unless already there): config,
    tokenizer files and, with `weights`, its safetensors or else its pytorch_model.bin."""
    import huggingface_hub
    from huggingface_hub import errors

    def fetch(patterns: list[str]) -> Path:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=["config.json", *TOKENIZER_FILES,
                                                                              *patterns]))

    where = f"{repo_id}: no such folder here, and the Hugging Face Hub model of that name"
    fetch_errors = _fetch_errors()
    try:
        folder = fetch(_SAFETENSORS if weights else [])
        if weights and not any(folder.glob("*.safetensors")):  # an older repository: its pickled weights
            folder = fetch(_PICKLES)
    except errors.GatedRepoError:
        raise BertkitError(f"{where} is gated; expected its terms accepted on the Hub and a login (`hf auth login` "
                           "or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise BertkitError(f"{where} does not exist (or is private: log in with `hf auth login` or HF_TOKEN); "
                           "expected a model folder or a Hub model id such as google-bert/bert-base-uncased") from None
    except errors.RevisionNotFoundError as e:
        raise BertkitError(f"{where}: {cause(e)}; expected a revision the repository has") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        raise BertkitError(f"{where} is not in the Hub cache and the Hub cannot be reached (no network, or "
                           "HF_HUB_OFFLINE=1); expected a model folder, or a Hub model id with a network") from None
    except fetch_errors as e:
        raise BertkitError(f"{where} could not be fetched ({cause(e)})") from None
    if not (folder / "config.json").is_file() and weights:
        raise BertkitError(f"{repo_id}: the Hub repository has no config.json (fetched into {folder}); expected a "
                           "BERT model in transformers' layout")
    return folder


def resolve(name: str | Path | None, weights: bool = True):
    """`name` as given when it is on disk (or not a Hub id: the caller's own error then names it), else the local
    folder of the Hub model it names."""
    if name is None or str(name) == "" or not is_hub_id(name):
        return name
    return download(str(name), weights)
