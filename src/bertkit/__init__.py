"""bertkit: BERT end to end, interchangeable with Hugging Face transformers checkpoints."""

from bertkit.config import BertConfig
from bertkit.errors import BertkitError
from bertkit.model import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    ModelOutput,
)

__version__ = "0.1.0"


def __getattr__(name):
    # the tokenizer pulls in the `tokenizers` library; import it only when asked for
    if name == "Tokenizer":
        from bertkit.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'bertkit' has no attribute {name!r}")


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
