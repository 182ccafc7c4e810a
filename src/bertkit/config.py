"""The model config: one typed dataclass, named presets, and the Hugging Face `config.json` in and out."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from bertkit.errors import BertkitError

CONFIG_NAME = "config.json"

# (layers, hidden, heads): the BERT paper's Base and Large, and the small family of Turc et al. (2019).
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


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
    # keys of a foreign config.json that bertkit does not use, kept so that a round trip loses nothing
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise BertkitError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ("gelu", "gelu_new", "relu"):
            raise BertkitError(f"hidden_act {self.hidden_act!r} is not supported (expected gelu, gelu_new or relu)")
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BertConfig":
        """A named size (`tiny`, `mini`, `small`, `medium`, `base`, `large`), with any field overridden."""
        if name not in PRESETS:
            raise BertkitError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        layers, hidden, heads = PRESETS[name]
        return cls(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, **overrides)

    # ---- Hugging Face config.json ----
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        if d["id2label"] is None:
            d.pop("id2label")
        else:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
            d["label2id"] = {v: k for k, v in self.id2label.items()}
        if d["classifier_dropout"] is None:
            d.pop("classifier_dropout")
        d["model_type"] = "bert"
        d.setdefault("position_embedding_type", "absolute")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if d.get("model_type", "bert") != "bert":
            raise BertkitError(f"config model_type is {d['model_type']!r}; bertkit reads BERT configs (model_type 'bert')")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise BertkitError(f"position_embedding_type {d['position_embedding_type']!r} is not supported (expected 'absolute')")
        if "id2label" in d and "num_labels" not in d:
            d["num_labels"] = len(d["id2label"])
        for key in ("label2id", "model_type", "position_embedding_type"):  # checked above, written back by to_dict
            d.pop(key, None)
        known = {k: d.pop(k) for k in list(d) if k in names}
        return cls(**known, extra=d)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BertConfig":
        """Read `config.json` from a file or a model folder."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.exists():
            raise BertkitError(f"{path}: no config.json (expected a model folder in the Hugging Face layout)")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise BertkitError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except TypeError as e:
            raise BertkitError(f"{path}: bad config field ({e})") from None

    from_pretrained = load
    save_pretrained = save
