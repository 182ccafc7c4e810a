"""bertkit: BERT end to end, interchangeable with Hugging Face transformers checkpoints."""

from typing import TYPE_CHECKING

from bertkit.errors import BertkitError

if TYPE_CHECKING:  # what editors and type checkers see; at run time each loads when first used (below)
    from bertkit.config import BertConfig
    from bertkit.model import (BertForMaskedLM, BertForMultipleChoice, BertForPreTraining, BertForQuestionAnswering,
                               BertForSentenceEmbedding, BertForSequenceClassification, BertForTokenClassification,
                               BertModel, ModelOutput)
    from bertkit.tokenizer import Tokenizer

__version__ = "0.1.0"


# Imported when first asked for: the model pulls in torch (over a second), the tokenizer the `tokenizers` library.
# Imported with the package, they ran before the CLI's `main` could catch anything, so Ctrl-C while a command
# started showed a traceback from inside torch's import; a Python user who needs neither does not wait for them.
_LAZY = {"BertConfig": "bertkit.config", "Tokenizer": "bertkit.tokenizer",
         **dict.fromkeys(["BertForMaskedLM", "BertForMultipleChoice", "BertForPreTraining", "BertForQuestionAnswering",
                          "BertForSentenceEmbedding", "BertForSequenceClassification", "BertForTokenClassification",
                          "BertModel", "ModelOutput"],
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
    "BertForSentenceEmbedding",
    "ModelOutput",
    "Tokenizer",
]
