"""bertkit: BERT end to end, interchangeable with Hugging Face transformers checkpoints."""

from bertkit.errors import BertkitError

__version__ = "0.1.0"


# Imported when first asked for: the model pulls in torch (over a second), the tokenizer the `tokenizers` library,
# and a command that needs neither (`bertkit --help`, a refused flag) should not wait for them, nor show an import's
# traceback when Ctrl-C comes during one
_LAZY = {"BertConfig": "bertkit.config", "Tokenizer": "bertkit.tokenizer",
         **dict.fromkeys(["BertForMaskedLM", "BertForMultipleChoice", "BertForPreTraining", "BertForQuestionAnswering",
                          "BertForSequenceClassification", "BertForTokenClassification", "BertModel", "ModelOutput"],
                         "bertkit.model")}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bertkit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BertConfig",
    "BertkitError",
    "BertModel",
    "BertForPreTraining",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertForQuestionAnswering",
    "BertForTokenClassification",
    "BertForMultipleChoice",
    "ModelOutput",
    "Tokenizer",
]
