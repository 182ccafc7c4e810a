"""The model config: one typed dataclass, named presets, and the Hugging Face `config.json` in and out."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from bertkit.errors import BertkitError, where

CONFIG_NAME = "config.json"
# A config.json is a few KB (a large id2label some hundred KB); a bigger file is not a model config, and reading
# it whole would be the first large allocation.
MAX_JSON_BYTES = 16 << 20
# The largest published BERTs (Megatron-BERT, 3.9B parameters) fit with room to spare; more is a typo or a hostile
# file, refused before building the model would take tens of GB (10B parameters are 40 GB in float32).
MAX_PARAMETERS = 10_000_000_000
# Published BERTs have at most 48 layers; a module per layer costs memory even at hidden size 1.
MAX_LAYERS = 1024
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size", "num_labels")
_PROBABILITIES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")

# (layers, hidden, heads): the BERT paper's Base and Large, and the small family of Turc et al. (2019).
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def option(default, help: str, *, positional: bool = False, required: bool = False, flag: str | None = None,
           aliases: tuple[str, ...] = (), **kwargs):
    """A dataclass field that is also a command-line argument (`bertkit.cli.add_dataclass_args`): its help text,
    and whether it is a positional argument, a required flag, or a flag named other than the field; `aliases` are
    older flag names still accepted. Every subcommand's configuration is written with it. A list default is
    copied for each instance."""
    metadata = {"help": help, "positional": positional, "required": required, "flag": flag, "aliases": aliases}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class BertConfig:
    """The paper's knobs, with the field names of the Hugging Face `BertConfig` so that config.json is shared."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None  # None means 4 * hidden_size, as in the paper
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # fine-tuning heads
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    classifier_dropout: float | None = None
    # variants of the paper's ablations (Table 5): a left-to-right model (causal attention; transformers' name),
    # and a randomly initialised BiLSTM between the encoder and a fine-tuning head (bertkit's own key)
    is_decoder: bool = False
    bilstm: bool = False
    # the masked-LM decoder is the token-embedding table (tied, the paper's BERT) unless config.json says false;
    # None (not stated) is tied, and is not written back
    tie_word_embeddings: bool | None = None
    # inputs longer than 512 (`bertkit extend`): with attention_window w > 0 each token attends to the w / 2 tokens on
    # each side of it and to the global tokens ([CLS]; for QA the question), which attend to everything (Longformer's
    # pattern and name); 0 is full attention. position_extension records how the learned positions were extended.
    attention_window: int = 0
    position_extension: dict | None = None
    # keys of a foreign config.json that bertkit does not use, kept so that a round trip loses nothing
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        """Check every field's type and range, so that a bad value is named here, not deep inside torch."""
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size if _is_int(self.hidden_size) else None
        if self.id2label is not None:
            self.id2label = _id2label(self.id2label)
            self.num_labels = len(self.id2label)
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise BertkitError(f"{name} is {_show(value)}; expected a positive integer")
        if self.num_hidden_layers > MAX_LAYERS:
            raise BertkitError(f"num_hidden_layers is {self.num_hidden_layers}; expected at most {MAX_LAYERS}")
        if self.hidden_size % self.num_attention_heads:
            raise BertkitError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.pad_token_id is not None and (not _is_int(self.pad_token_id)
                                              or not 0 <= self.pad_token_id < self.vocab_size):
            raise BertkitError(
                f"pad_token_id is {_show(self.pad_token_id)}; expected a token id in 0..{self.vocab_size - 1} or null"
            )
        for name in _PROBABILITIES:
            value = getattr(self, name)
            if value is None and name == "classifier_dropout":
                continue
            if not _is_number(value) or not 0 <= value <= 1:
                raise BertkitError(f"{name} is {_show(value)}; expected a probability in [0, 1]")
        if not _is_number(self.initializer_range) or not 0 <= self.initializer_range < math.inf:
            raise BertkitError(f"initializer_range is {_show(self.initializer_range)}; expected a finite number >= 0")
        if not _is_number(self.layer_norm_eps) or not 0 < self.layer_norm_eps < math.inf:
            raise BertkitError(f"layer_norm_eps is {_show(self.layer_norm_eps)}; expected a finite number > 0")
        if self.hidden_act not in ("gelu", "gelu_new", "relu"):
            raise BertkitError(f"hidden_act {_show(self.hidden_act)} is not supported (expected gelu, gelu_new or relu)")
        if self.tie_word_embeddings is not None and not isinstance(self.tie_word_embeddings, bool):
            raise BertkitError(f"tie_word_embeddings is {_show(self.tie_word_embeddings)}; expected true, false or null")
        for name in ("is_decoder", "bilstm"):
            if not isinstance(getattr(self, name), bool):
                raise BertkitError(f"{name} is {_show(getattr(self, name))}; expected true or false")
        if not _is_int(self.attention_window) or self.attention_window < 0 or self.attention_window % 2:
            raise BertkitError(f"attention_window is {_show(self.attention_window)}; expected 0 (full attention) or an "
                               "even number of tokens (half of it on each side)")
        if self.attention_window and self.is_decoder:
            raise BertkitError("attention_window with is_decoder: a windowed left-to-right model is not supported; "
                               "expected one of the two")
        if self.position_extension is not None and not isinstance(self.position_extension, dict):
            raise BertkitError(f"position_extension is {_show(self.position_extension)}; expected an object or null")
        if self.bilstm and self.hidden_size % 2:
            raise BertkitError(f"bilstm with hidden_size {self.hidden_size}; expected an even hidden size (two "
                               "directions of hidden_size / 2)")
        if not isinstance(self.extra, dict):
            raise BertkitError(f"extra is {_show(self.extra)}; expected a dict of other config.json keys")
        architectures = self.extra.get("architectures")
        if architectures is not None and (
            not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)
        ):
            raise BertkitError(f"architectures is {_show(architectures)}; expected a list of class names")
        parameters = self.parameter_bound()
        if parameters > MAX_PARAMETERS:
            raise BertkitError(
                f"vocab_size {self.vocab_size}, hidden_size {self.hidden_size}, num_hidden_layers "
                f"{self.num_hidden_layers}, intermediate_size {self.intermediate_size}, max_position_embeddings "
                f"{self.max_position_embeddings}, type_vocab_size {self.type_vocab_size} and num_labels "
                f"{self.num_labels} make {parameters / 1e9:,.1f}B parameters ({4 * parameters / 2**30:,.0f} GiB in "
                f"float32); expected at most {MAX_PARAMETERS / 1e9:g}B (the largest published BERTs have 4B)"
            )

    def parameter_bound(self) -> int:
        """An upper bound on the parameters of any bertkit model on this config (encoder, pooler, every head)."""
        H, I, V = self.hidden_size, self.intermediate_size, self.vocab_size
        embeddings = (V + self.max_position_embeddings + self.type_vocab_size) * H + 2 * H
        layer = 4 * (H * H + H) + 2 * (H * I) + I + H + 4 * H  # attention, feed-forward, two LayerNorms
        heads = (H * H + H) + (H * H + 3 * H + V) + 2 * (H * self.num_labels + self.num_labels)  # pooler, MLM, others
        heads += 2 * 4 * (H * H // 2 + (H // 2) ** 2 + H) if self.bilstm else 0  # two directions, four gates
        heads += 0 if self.tied_decoder else V * H
        return embeddings + self.num_hidden_layers * layer + heads

    @property
    def tied_decoder(self) -> bool:
        """Whether the masked-LM decoder is the token-embedding table (every BERT but an untied conversion)."""
        return self.tie_word_embeddings is not False

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BertConfig":
        """A named size (`tiny`, `mini`, `small`, `medium`, `base`, `large`), with any field overridden."""
        if name not in PRESETS:
            raise BertkitError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        layers, hidden, heads = PRESETS[name]
        # the preset's sizes are defaults like any other field's: overrides win over them too (passed alongside
        # them, `from_preset("base", num_hidden_layers=6)` was a TypeError for a duplicate keyword)
        return cls(**{"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, **overrides})

    # ---- Hugging Face config.json ----
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        if d["id2label"] is None:
            d.pop("id2label")
        else:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
            d["label2id"] = {v: k for k, v in self.id2label.items()}
        for name in ("classifier_dropout", "tie_word_embeddings"):
            if d[name] is None:
                d.pop(name)
        for name in ("is_decoder", "bilstm", "attention_window", "position_extension"):
            if not d[name]:  # written when set, so an ordinary BERT's config.json is as before
                d.pop(name)
        d["model_type"] = "bert"
        d.setdefault("position_embedding_type", "absolute")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """Build from config.json's object; a missing field takes the default, a bad one raises naming it."""
        if not isinstance(d, dict):
            raise BertkitError(f"config is a JSON {_json_type(d)}; expected a JSON object")
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for key in ("model_type", "position_embedding_type"):
            if key in d and not isinstance(d[key], str):
                raise BertkitError(f"{key} is {_show(d[key])}; expected a string")
        if d.get("model_type", "bert") != "bert":
            raise BertkitError(f"config model_type is {d['model_type']!r}; bertkit reads BERT configs (model_type 'bert')")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise BertkitError(f"position_embedding_type {d['position_embedding_type']!r} is not supported (expected 'absolute')")
        for key in ("label2id", "model_type", "position_embedding_type"):  # checked above, written back by to_dict
            d.pop(key, None)
        known = {k: d.pop(k) for k in list(d) if k in names}
        return cls(**known, extra=d)

    def save(self, directory: str | Path) -> None:
        write_json(save_folder(directory) / CONFIG_NAME, self.to_dict(), sort_keys=True)

    @classmethod
    def load(cls, path: str | Path) -> "BertConfig":
        """Read `config.json` from a file or a model folder (Google's `bert_config.json` in a folder without one);
        every value is checked before anything is built."""
        from bertkit import hub

        path = Path(hub.resolve(path, weights=False))  # a Hub model id: its config.json fetched
        if path.is_dir():
            from bertkit import tf_checkpoint

            if tf_checkpoint.is_google_folder(path):  # Google's original layout: bert_config.json + a TF checkpoint
                return tf_checkpoint.load_config(path)
            path = path / CONFIG_NAME
            if not path.exists():
                checkpoints = sorted(p.name for p in path.parent.glob("*.pt"))
                hint = "" if not checkpoints else (
                    f"; {checkpoints[0]} alone may be a Composer checkpoint (MosaicML), which `bertkit convert "
                    f"{path.parent / checkpoints[0]} --out DIR --to hf` makes a model folder of")
                raise BertkitError(f"{path}: no config.json (expected a model folder in the Hugging Face layout, or "
                                   f"Google's with bert_config.json){hint}")
        elif not path.exists():
            raise BertkitError(f"{path}: no such folder (expected a model folder in the Hugging Face layout)")
        elif path.suffix != ".json":  # a weights file, a vocab.txt, a data file given where a model folder belongs
            raise BertkitError(f"{path}: a file, not a folder (expected a model folder in the Hugging Face layout)")
        value = read_json(path, "a BERT config.json")
        try:
            return cls.from_dict(value)
        except BertkitError as e:
            raise BertkitError(f"{path}: {e}") from None

    from_pretrained = load
    save_pretrained = save


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy integers too, not True


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _show(value) -> str:
    """A value for an error message: its JSON type and, when short, the value itself."""
    text = repr(value)
    return text if len(text) <= 60 else f"a {_json_type(value)} ({text[:40]}...)"


def _id2label(id2label) -> dict[int, str]:
    """Class index -> name, keys 0..n-1 (written as strings in JSON): what transformers' pipelines expect too."""
    if not isinstance(id2label, dict) or not id2label:
        raise BertkitError(f"id2label is {_show(id2label)}; expected a non-empty object of class index -> name")
    out = {}
    for key, name in id2label.items():
        index = key if _is_int(key) else int(key) if isinstance(key, str) and key.strip().isdecimal() else None
        if index is None:
            raise BertkitError(f"id2label key {_show(key)} is not an integer; expected class indices 0, 1, ...")
        if not isinstance(name, str):
            raise BertkitError(f"id2label[{key!r}] is {_show(name)}; expected a label name (a string)")
        out[index] = name
    if sorted(out) != list(range(len(out))):
        raise BertkitError(f"id2label keys are {', '.join(map(str, sorted(out)))}; expected 0..{len(out) - 1}")
    return out


def save_folder(directory: str | Path) -> Path:
    """`directory`, created to save a model, a config or a tokenizer into; a file in its way is named (mkdir said only
    "[Errno 17] File exists")."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = "a file, not a folder" if directory.is_file() else f"cannot create it ({e.strerror or e})"
        raise BertkitError(f"{directory}: {what}; expected a folder to save into") from None
    return directory


def write_json(path: str | Path, value, indent: int = 2, sort_keys: bool = False) -> None:
    """Write `value` as JSON with a final newline: every JSON file bertkit writes goes through here. The file is
    replaced whole (a run killed while rewriting its metrics.json or its config kept a cut one, unreadable after)."""
    from bertkit.checkpoint import atomic_write_text  # it reads configs: imported here, not at the top

    text = json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n"
    atomic_write_text(path, text)


def read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES):
    """Parse a small JSON file; any unreadable, oversized, malformed or too deeply nested file is a BertkitError."""
    try:
        if not path.is_file():
            raise BertkitError(f"{path}: not a file (expected {what})")
        size = path.stat().st_size
        if size > max_bytes:
            raise BertkitError(f"{path}: {size:,} bytes; expected {what} of at most {max_bytes:,} bytes")
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise BertkitError(f"{path}: cannot read ({e.strerror or e}); expected {what}") from None
    except UnicodeDecodeError as e:
        raise BertkitError(f"{path}: not UTF-8 text (byte {e.start}); expected {what}") from None
    return parse_json(text, path, what)


def parse_json(text: str, path, what: str, line: int | None = None):
    """json.loads with its failures as BertkitErrors naming the file, the line (`line`, a JSON-lines file's; else the
    parser's) and `what` was expected: malformed, nested too deeply, or an integer of over 4,300 digits."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BertkitError(f"{where(path, line or e.lineno)}: not valid JSON ({e.msg} at column {e.colno}); "
                           f"expected {what}") from None
    except RecursionError:
        raise BertkitError(f"{where(path, line)}: JSON nested too deeply; expected {what}") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise BertkitError(f"{where(path, line)}: not usable JSON ({e}); expected {what}") from None


def learning_rates(values, example: str = "1e-4 3e-4") -> list[float]:
    """A --lrs flag's values (strings from the command line, or numbers) as floats, each finite and above 0; a
    BertkitError naming the flag otherwise."""
    try:
        lrs = [float(lr) for lr in values]
    except (TypeError, ValueError):
        raise BertkitError(f"--lrs {' '.join(map(str, values))}: expected numbers such as {example}") from None
    if not lrs or not all(math.isfinite(lr) and lr > 0 for lr in lrs):
        raise BertkitError(f"--lrs {' '.join(f'{lr:g}' for lr in lrs)}: expected finite numbers above 0, such as "
                           f"{example}")
    # a run's folder and its cell key name the lr as {lr:g}: one given twice (1e-4 0.0001) is one run, which the
    # suite started twice at once (the second failing on the first's lock) and glue twice in a row
    names = [f"{lr:g}" for lr in lrs]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise BertkitError(f"--lrs {' '.join(map(str, values))}: {twice} is given {names.count(twice)} times; expected "
                           "each learning rate once")
    return lrs
