"""Sentence embeddings trained on pairs (`finetune --task embedding`): sentence-transformers' bi-encoders.

Each text is encoded alone and its vector is the mean of the last layer (`BertForSentenceEmbedding`); what trains
it depends on the data:
- pairs with a gold similarity (STS-B's 0-5 scores, a --label column): CoSENT, which orders the pairs' cosines as
  their scores (Su 2022; sentence-transformers' CoSENTLoss);
- pairs without one (a question and its answer, two paraphrases; optionally a --text-neg column of hard
  negatives): in-batch negatives, each text's pair against every other pair of the batch (MultipleNegativesRankingLoss);
- single texts: SimCSE (Gao et al. 2021), each text its own positive, the two dropout masks its two views.

Scored on pairs with gold scores by the Spearman (and Pearson) correlation of their cosines with the scores, x 100,
as sentence-transformers' EmbeddingSimilarityEvaluator; on pairs without, by retrieval: each text's pair among all
the file's second texts (MRR@10, recall@1 and @10). Training files are .csv/.tsv/.jsonl (the --text-a, --text-b,
--text-neg and --label columns) or .txt (a text, or text<TAB>pair, per line); --data-dir is an STS-B folder in
GLUE's layout (train.tsv, dev.tsv).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bertkit.data.glue import _float_label, get_task, read_glue_file, read_records, text_field
from bertkit.errors import BertkitError, where
from bertkit.model import BertForSentenceEmbedding
from bertkit.tasks.inference import infer

EMBEDDING_TASK = "embedding"
RETRIEVAL_CUTOFF = 10  # MRR@10 and recall@10, as MS MARCO reports


@dataclass
class PairExample:
    """A text and its positive (None: the text itself, SimCSE), an optional hard negative, an optional gold
    similarity."""

    text: str
    positive: str | None = None
    negative: str | None = None
    score: float | None = None
    line: int | None = None


def objective(examples: list[PairExample]) -> str:
    """What trains on (or scores) these examples, in words."""
    if examples[0].score is not None:
        return "pairs with gold similarities: CoSENT"
    if examples[0].positive is None:
        return "single texts, each its own positive (SimCSE)"
    return "pairs" + (" with hard negatives" if examples[0].negative is not None else "") + ": in-batch negatives"


def read_pairs(path: str | Path, config, training: bool = True) -> list[PairExample]:
    """A training or eval file: .txt lines (text, or text<TAB>pair), or a .csv/.tsv/.jsonl file whose --text-a
    column (and --text-b, --text-neg, when named: an eval file's negatives where it has them) holds the texts and
    whose --label column, where the file has one and the texts are pairs, the gold similarity."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        return _read_lines(path)
    records = read_records(path, [c for c in (config.text_a, config.text_b, config.text_neg if training else None)
                                  if c])
    negative = config.text_neg if training or any(config.text_neg in record for _, record in records) else None
    columns = [c for c in (config.text_a, config.text_b, negative) if c]
    scored = bool(config.text_b) and any(config.label in record for _, record in records)  # single texts: no score
    examples = []
    for line, record in records:
        for column in columns + [config.label] * scored:
            if record.get(column) is None:
                raise BertkitError(f"{where(path, line)}: column {column!r} is missing or null")

        def text(column):
            return text_field(record[column], path, line, column) if column else None

        score = _float_label(str(record[config.label]), path, line) if scored else None
        examples.append(PairExample(text(config.text_a), text(config.text_b), text(negative), score, line))
    return _with_text(examples, path)


def _read_lines(path: Path) -> list[PairExample]:
    from bertkit.tasks.classification import checked_lines, is_blank, parse_line, read_input_lines

    parsed = (parse_line(number, line, str(path)) for number, line in enumerate(read_input_lines(path, str(path)), 1))
    examples = [PairExample(e.text_a, e.text_b, line=e.line)
                for e in checked_lines(parsed, str(path)) if not is_blank(e)]  # blank lines part paragraphs
    if not examples:
        raise BertkitError(f"{path}: no text; expected a text (or text<TAB>pair) per line")
    return examples


def _with_text(examples: list[PairExample], path: Path) -> list[PairExample]:
    empty = [e.line for e in examples if not all(t is None or t.strip() for t in (e.text, e.positive, e.negative))]
    if empty:
        raise BertkitError(f"{where(path, empty[0])}: an empty text ({len(empty)} rows in all); expected text in every "
                           "column read")
    return examples


@dataclass
class SimilarityTask:
    """Pairs to train a sentence-embedding model on, and pairs to score it on; the first eval split picks the best
    epoch."""

    train: list[PairExample] = field(default_factory=list)
    evals: dict[str, list[PairExample]] = field(default_factory=dict)

    name = EMBEDDING_TASK
    model_class = BertForSentenceEmbedding

    @property
    def scored(self) -> bool:
        """Whether the eval pairs have gold similarities (correlations) or not (retrieval)."""
        return next(iter(self.evals.values()))[0].score is not None

    @property
    def metrics(self) -> tuple[str, ...]:
        k = RETRIEVAL_CUTOFF
        return ("spearman", "pearson") if self.scored else (f"mrr@{k}", "recall@1", f"recall@{k}")

    @property
    def table_metrics(self) -> list[str]:
        from bertkit.tasks.classification import metric_key

        return [metric_key(i, split, m) for i, split in enumerate(self.evals) for m in self.metrics]

    def model_overrides(self) -> dict:
        return {}

    def describe(self) -> str:
        dev = next(iter(self.evals.values()))
        return (f"embedding: training on {len(self.train):,} {objective(self.train)}; scoring on {len(dev):,} "
                + ("scored pairs" if self.scored else "pairs (retrieval)"))

    def headline(self, metrics: dict[str, float]) -> float:
        return metrics[self.metrics[0]]  # sentence-transformers' main score: Spearman's, or MRR@10

    def train_rows(self, tokenizer, config) -> list[dict]:
        """One row per example: its texts' token ids (the text, its positive or itself, its negative), each text
        alone; with gold similarities, `labels`."""
        texts = [[e.text, e.positive or e.text] + ([e.negative] if e.negative is not None else [])
                 for e in self.train]
        ids = _token_ids(tokenizer, [t for row in texts for t in row], config.max_length)
        rows = []
        for example, row in zip(self.train, texts):
            tokens = [ids[t] for t in row]
            rows.append({"input_ids": tokens, "token_type_ids": [[0] * len(t) for t in tokens]}
                        | ({"labels": example.score} if example.score is not None else {}))
        return rows

    def vectors(self, model, tokenizer, texts: list[str], config, device) -> dict[str, torch.Tensor]:
        """Each distinct text's unit vector."""
        ids = _token_ids(tokenizer, texts, config.max_length)  # distinct texts, in order
        rows = [{"input_ids": tokens, "token_type_ids": [0] * len(tokens)} for tokens in ids.values()]
        out = infer(model, rows, config.eval_batch_size, tokenizer.pad_id, device, ("embeddings",))["embeddings"]
        return dict(zip(ids, torch.nn.functional.normalize(out, dim=-1)))

    def evaluate(self, model, tokenizer, config, device):
        """Every eval split's correlations (or retrieval scores), extra splits prefixed with their name; nothing
        more to write."""
        from bertkit.tasks.classification import metric_key
        from bertkit.tasks.metrics import compute_metrics

        metrics = {}
        for i, (split, examples) in enumerate(self.evals.items()):
            vectors = self.vectors(model, tokenizer, [t for e in examples for t in (e.text, e.positive, e.negative)
                                                      if t is not None], config, device)
            if self.scored:
                cosines = [float(vectors[e.text] @ vectors[e.positive]) for e in examples]
                scores = compute_metrics(self.metrics, cosines, [e.score for e in examples])
            else:
                scores = retrieval_scores(vectors, examples)
            metrics.update({metric_key(i, split, m): v for m, v in scores.items()})
        return metrics, lambda out_dir: None


def retrieval_scores(vectors: dict[str, torch.Tensor], examples: list[PairExample],
                     k: int = RETRIEVAL_CUTOFF) -> dict[str, float]:
    """Each example's text as a query against every distinct second text (positives and negatives) of the file: its
    own positive's rank by cosine (ties counted against it). MRR@k, recall@1 and recall@k, as percentages."""
    candidates = list(dict.fromkeys(t for e in examples for t in (e.positive, e.negative) if t is not None))
    index = {t: i for i, t in enumerate(candidates)}
    queries = torch.stack([vectors[e.text] for e in examples])
    cosines = queries @ torch.stack([vectors[t] for t in candidates]).T  # (queries, candidates)
    own = cosines[torch.arange(len(examples)), torch.tensor([index[e.positive] for e in examples])]
    rank = (cosines >= own[:, None]).sum(1).numpy()  # 1 = first
    return {f"mrr@{k}": 100.0 * float(np.where(rank <= k, 1.0 / rank, 0.0).mean()),
            "recall@1": 100.0 * float((rank == 1).mean()), f"recall@{k}": 100.0 * float((rank <= k).mean())}


def _token_ids(tokenizer, texts: list[str], max_length: int) -> dict[str, list[int]]:
    """Each distinct text's token ids, [CLS] and [SEP] included, cut to max_length."""
    distinct = list(dict.fromkeys(texts))
    encoded = tokenizer.encode_batch(distinct, None, max_length=max_length, padding=False)["input_ids"]
    return dict(zip(distinct, encoded))


def _stsb(path: Path) -> list[PairExample]:
    return [PairExample(e.text_a, e.text_b, score=e.label, line=e.line) for e in read_glue_file("STS-B", path)]


def load_similarity_task(config, need_train: bool = True) -> SimilarityTask:
    """The pairs `config` names: --train-file/--eval-file (see `read_pairs`), else --data-dir's STS-B train.tsv and
    dev.tsv."""
    if config.predict:
        raise BertkitError("--predict writes GLUE submission files; for the vectors of your own texts: `bertkit "
                           "embed RUN`")
    folder = Path(config.data_dir) if config.data_dir else None
    if folder is not None and not folder.is_dir():
        raise BertkitError(f"{folder}: no such folder; expected an STS-B folder in GLUE's layout (train.tsv, dev.tsv)")
    files = get_task("STS-B").files

    def split(given: str | None, name: str) -> list[PairExample] | None:
        if given:
            return read_pairs(given, config, training=name == "train")
        if folder is not None and (folder / files[name]).is_file():
            return _stsb(folder / files[name])
        return None

    train = split(config.train_file, "train") if need_train else []
    if train is None:
        raise BertkitError("no training data for embedding: expected --train-file (pairs, scored pairs or single "
                           "texts), or --data-dir with STS-B's train.tsv")
    dev = split(config.eval_file, "dev")
    if dev is None:
        raise BertkitError("no evaluation data for embedding: expected --eval-file (pairs, scored or not), or "
                           "--data-dir with STS-B's dev.tsv")
    if dev[0].positive is None:
        raise BertkitError(f"{config.eval_file}: single texts; expected pairs to score (with a --label column of gold "
                           "similarities, or without: each text's pair is retrieved among the file's)")
    return SimilarityTask(train, {"dev": dev})
