"""Tagging every word (named entities, chunks, parts of speech) from CoNLL-format files, as the paper's CoNLL-2003
NER experiment does it (section 5.3): a linear layer on each word's first WordPiece, the other pieces unscored.

A file holds one word per line, the word in the first column and its tag in the last (columns separated by spaces
or tabs: CoNLL-2003's `EU NNP B-NP B-ORG`, or `EU<TAB>B-ORG`), a blank line between sentences; `-DOCSTART-` lines
are skipped. Tags with a chunk prefix (B-, I-, E-, S- and a type, or O: IOB1, IOB2 and IOBES files) are scored by
entity, as conlleval scores them; other tags (NN, VBZ) by word accuracy. A sentence longer than --max-length is
read in consecutive windows of whole words, so every word is tagged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bertkit.checkpoint import atomic_write_text
from bertkit.errors import BertkitError
from bertkit.model import BertForTokenClassification
from bertkit.tasks.classification import metric_key, read_input_lines
from bertkit.tasks.inference import infer

logger = logging.getLogger("bertkit")

TAGS_FILE = "tags.md"  # a tagging run's per type (or per tag) scores, of its best epoch
PREDICTIONS_FILE = "predictions.conll"  # word, gold tag, predicted tag: conlleval's input
# --data-dir's files: the usual names, then CoNLL-2003's own (eng.testa is its dev set, eng.testb its test set)
DATA_FILES = {"train": ("train.txt", "eng.train"), "dev": ("dev.txt", "valid.txt", "eng.testa"),
              "test": ("test.txt", "eng.testb")}
_COLUMNS = re.compile(r"[ \t]+")


@dataclass
class Sentence:
    words: list[str]
    tags: list[str] | None  # None: words to tag
    line: int  # its first word's line in the file (1-based); word i is on line + i


def read_conll(path: str | Path) -> list[Sentence]:
    """The sentences of a CoNLL-format file (see the module's docstring); a line without a tag column is an error
    naming it."""
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(read_input_lines(path), start=1):
        fields = _COLUMNS.split(line.strip(" \t\r\n"))
        if fields == [""] or fields[0] == "-DOCSTART-":
            if words:
                sentences.append(Sentence(words, tags, number - len(words)))
                words, tags = [], []
            continue
        if len(fields) < 2:
            raise BertkitError(f"{path}:{number}: one column ({fields[0][:40]!r}); expected a word and its tag (the "
                               "last column), separated by spaces or a tab, and a blank line between sentences")
        if len(fields) == 10 and fields[0].replace("-", "").replace(".", "").isdigit():
            # read as CoNLL, the token's number would be the word and its MISC column the tag
            raise BertkitError(f"{path}:{number}: ten columns, the first a number: a CoNLL-U file (ID FORM LEMMA UPOS "
                               "...); expected the word first and its tag last (for parts of speech: FORM and UPOS, "
                               "`grep -v '^#' FILE | cut -f2,4`)")
        words.append(fields[0])
        tags.append(fields[-1])
    if words:
        sentences.append(Sentence(words, tags, number + 1 - len(words)))
    if not sentences:
        raise BertkitError(f"{path}: no sentences; expected CoNLL lines, a word and its tag per line, a blank line "
                           "between sentences")
    return sentences


def is_chunk_tag(tag: str) -> bool:
    prefix, dash, kind = tag.partition("-")
    return prefix in ("B", "I", "E", "S") and bool(dash) and bool(kind)


def tag_scheme(files: dict[Path, list[Sentence]]) -> str:
    """"chunks" when every tag is O or has a chunk prefix and a type (B-PER), "tags" when none has (NN); a mix,
    which is a typo or a scheme no scorer reads (IO tags: write them I-PER), is an error naming both lines."""
    first: dict[bool, tuple[str, str]] = {}  # has a chunk prefix -> (tag, where)
    for path, sentences in files.items():
        for sentence in sentences:
            for i, tag in enumerate(sentence.tags):
                if tag != "O":
                    first.setdefault(is_chunk_tag(tag), (tag, f"{path}:{sentence.line + i}"))
        if len(first) == 2:
            break
    if len(first) == 2:
        (chunk, at), (plain, plain_at) = first[True], first[False]
        raise BertkitError(f"{plain_at}: tag {plain!r} has no chunk prefix, but {chunk!r} ({at}) has; expected one "
                           "scheme: every tag O or B-, I-, E-, S- and a type (IO tags: write I-PER for PER), or "
                           "plain tags throughout (NN, VBZ)")
    return "chunks" if True in first or not first else "tags"


def tag_names(sentences: Sequence[Sentence]) -> list[str]:
    """The tags of a training file, O first, then sorted: the classifier's rows."""
    tags = {tag for s in sentences for tag in s.tags}
    return sorted(tags, key=lambda tag: (tag != "O", tag))


def windows(pieces: Sequence[Sequence[int]], room: int) -> list[range]:
    """Ranges of consecutive words whose pieces fit in `room` tokens, covering every word in order (a word of more
    pieces than fit is cut to `room` of them, alone in its window)."""
    spans, start, used = [], 0, 0
    for i, word in enumerate(pieces):
        n = min(len(word), room)
        if used + n > room:
            spans.append(range(start, i))
            start, used = i, 0
        used += n
    spans.append(range(start, len(pieces)))
    return spans


def encode(tokenizer, words: Sequence[Sequence[list[int]]], max_length: int,
           label_ids: Sequence[Sequence[int]] | None = None, later: Sequence[int] | None = None,
           ) -> tuple[list[dict], list[tuple[int, range, list[int]]]]:
    """Rows `[CLS] pieces [SEP]` of each text's words (their WordPiece ids), a window of whole words each, with the
    label of each word at its first piece (-100 elsewhere) when `label_ids` are given, and with `later` (a label
    index -> the label of the word's other pieces) at every piece; and for each row, which text and words it holds
    and the positions of their first pieces."""
    room = max_length - 2
    rows, places = [], []
    for t, pieces in enumerate(words):
        for span in windows(pieces, room):
            ids, firsts = [tokenizer.cls_id], []
            for w in span:
                firsts.append(len(ids))
                ids += pieces[w][:room]
            ids.append(tokenizer.sep_id)
            row = {"input_ids": ids, "token_type_ids": [0] * len(ids)}
            if label_ids is not None:
                row["labels"] = [-100] * len(ids)
                for w, at in zip(span, firsts):
                    label = label_ids[t][w]
                    row["labels"][at] = label
                    if later is not None:
                        rest = min(len(pieces[w]), room) - 1
                        row["labels"][at + 1 : at + 1 + rest] = [later[label]] * rest
            rows.append(row)
            places.append((t, span, firsts))
    return rows, places


def predict_tags(model, tokenizer, words: Sequence[Sequence[list[int]]], labels: Sequence[str], config,
                 device) -> list[list[str]]:
    """The tag of every word of every text (given as its words' WordPiece ids): the best label at its first piece."""
    rows, places = encode(tokenizer, words, config.max_length)
    if not rows:  # no text has a word
        return [[] for _ in words]
    width = max(len(r["input_ids"]) for r in rows)
    logits = infer(model, rows, config.eval_batch_size, tokenizer.pad_id, device, ("logits",), width)["logits"]
    best = logits.argmax(-1)
    tags: list[list[str]] = [[""] * len(pieces) for pieces in words]
    for row, (t, span, firsts) in enumerate(places):
        for w, label in zip(span, best[row, firsts].tolist()):
            tags[t][w] = labels[label]
    return tags


def tag_texts(model, tokenizer, texts: Sequence[str], labels: Sequence[str], config, device) -> list[dict]:
    """Per text: its words (as BERT's pre-tokenizer splits it: at white space and punctuation), their tags and, for
    chunk tags (B-PER, I-PER), the entities they make, with character offsets into the text (a text without a word
    has empty lists). What `bertkit predict` and `bertkit serve` give for a tagging model."""
    from bertkit.tasks.metrics import chunks

    words = tokenizer.word_pieces(texts)
    tags = predict_tags(model, tokenizer, [[ids for ids, _ in w] for w in words], labels, config, device)
    entities = all(tag == "O" or is_chunk_tag(tag) for tag in labels)
    results = []
    for text, found, tagged in zip(texts, words, tags):
        spans = [span for _, span in found]
        result = {"text": text, "words": [text[a:b] for a, b in spans], "tags": tagged}
        if entities:
            result["entities"] = [{"type": kind, "text": text[spans[i][0]:spans[j - 1][1]], "start": spans[i][0],
                                   "end": spans[j - 1][1]} for kind, i, j in chunks(tagged)]
        results.append(result)
    return results


def sentence_pieces(tokenizer, sentences: Sequence[Sentence]) -> list[list[list[int]]]:
    """Each sentence's words as their WordPiece ids."""
    return [[ids for ids, _ in words] for words in tokenizer.word_pieces([s.words for s in sentences])]


@dataclass
class TaggingTask:
    """Sentences and scoring of a tagging task; the first eval split picks the best epoch."""

    labels: list[str]  # tags in the classifier's order
    scheme: str  # "chunks" (entity F1) or "tags" (word accuracy)
    train: list[Sentence] = field(default_factory=list)
    evals: dict[str, list[Sentence]] = field(default_factory=dict)

    model_class = BertForTokenClassification

    @property
    def name(self) -> str:
        return "NER" if self.scheme == "chunks" else "tagging"

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("f1", "precision", "recall", "accuracy") if self.scheme == "chunks" else ("accuracy",)

    @property
    def table_metrics(self) -> list[str]:
        return [metric_key(i, split, m) for i, split in enumerate(self.evals) for m in self.metrics]

    def model_overrides(self) -> dict:
        return {"id2label": dict(enumerate(self.labels))}

    def headline(self, metrics: dict[str, float]) -> float:
        return metrics[self.metrics[0]]

    def train_rows(self, tokenizer, config) -> list[dict]:
        index = {tag: i for i, tag in enumerate(self.labels)}
        label_ids = [[index[tag] for tag in s.tags] for s in self.train]
        later = None
        if config.label_all_tokens:  # a word's other pieces continue its chunk: B-X becomes I-X (where the task has it)
            later = [index.get(f"I-{tag[2:]}", i) if tag.startswith("B-") else i for i, tag in enumerate(self.labels)]
        return encode(tokenizer, sentence_pieces(tokenizer, self.train), config.max_length, label_ids, later)[0]

    def predict(self, model, tokenizer, sentences: Sequence[Sentence], config, device) -> list[list[str]]:
        return predict_tags(model, tokenizer, sentence_pieces(tokenizer, sentences), self.labels, config, device)

    def evaluate(self, model, tokenizer, config, device):
        """Metrics on every eval split (extra splits prefixed with their name) and the writer of the outputs for
        the first split: TAGS_FILE (scores per type, or per tag) and PREDICTIONS_FILE (word, gold tag, predicted
        tag per line: the input of conlleval)."""
        predicted = {split: self.predict(model, tokenizer, sentences, config, device)
                     for split, sentences in self.evals.items()}
        metrics, outputs = self.scores(predicted)

        def write_outputs(out_dir: Path) -> None:
            for name, text in outputs.items():
                atomic_write_text(Path(out_dir) / name, text)

        return metrics, write_outputs

    def scores(self, predicted: dict[str, list[list[str]]]) -> tuple[dict, dict[str, str]]:
        """The metrics of every eval split from its predicted tags (any model's, a probe's too), and the first
        split's outputs (file name -> text)."""
        from bertkit.tasks.metrics import chunk_report, chunk_scores, class_report, compute_metrics

        metrics, outputs = {}, {}
        for i, (split, sentences) in enumerate(self.evals.items()):
            gold = [s.tags for s in sentences]
            per = "type" if self.scheme == "chunks" else "tag"
            title = f"{self.name} per {per}: {split}, {len(sentences):,} sentences"
            if self.scheme == "chunks":
                scores, per_type = chunk_scores(gold, predicted[split])
                report = chunk_report(scores, per_type, title)
            else:
                names = sorted({t for tags in gold + predicted[split] for t in tags})
                index = {t: k for k, t in enumerate(names)}
                flat_p = [index[t] for tags in predicted[split] for t in tags]
                flat_g = [index[t] for tags in gold for t in tags]
                scores = compute_metrics(("accuracy",), flat_p, flat_g)
                report = class_report(names, flat_p, flat_g, title)
            metrics.update({metric_key(i, split, m): scores[m] for m in self.metrics})
            if i == 0:
                outputs = {TAGS_FILE: report, PREDICTIONS_FILE: conll_text(sentences, predicted[split])}
        return metrics, outputs


def conll_text(sentences: Sequence[Sentence], predicted: Sequence[Sequence[str]]) -> str:
    """`word gold predicted` lines, a blank line after each sentence: what conlleval reads."""
    lines = []
    for sentence, tags in zip(sentences, predicted):
        lines += [f"{w} {g} {p}" for w, g, p in zip(sentence.words, sentence.tags, tags)] + [""]
    return "\n".join(lines) + "\n"


def data_files(config, names: dict[str, tuple[str, ...]], what: str) -> tuple[Path | None, dict[str, Path]]:
    """A task's training file and eval files (split -> path): --train-file and --eval-file, else the first of each
    split's `names` found in --data-dir (`what`: the folder the error expects)."""
    folder = Path(config.data_dir) if config.data_dir else None
    if folder is not None and not folder.is_dir():
        raise BertkitError(f"{folder}: no such folder; expected {what}")
    found = {}
    for split, candidates in names.items():
        path = next((folder / n for n in candidates if folder and (folder / n).is_file()), None)
        if path is not None:
            found[split] = path
    train = Path(config.train_file) if config.train_file else found.get("train")
    evals = {"dev": Path(config.eval_file)} if config.eval_file else {s: p for s, p in found.items() if s != "train"}
    return train, evals


def load_tagging_task(config, need_train: bool = True, labels: Sequence[str] | None = None) -> TaggingTask:
    """Read the CoNLL files `config` names: --train-file/--eval-file, or --data-dir's train, dev and test files
    (see DATA_FILES; test, when there, is scored beside dev, which alone picks the best epoch). `labels` (a
    model's id2label) are the tags when nothing is trained."""
    if config.predict:
        raise BertkitError("--predict writes GLUE submission files; tag your own text with `bertkit predict`")
    train_file, eval_files = data_files(config, DATA_FILES, "a folder with CoNLL files (train.txt, dev.txt)")
    if need_train and train_file is None:
        raise BertkitError(f"no training data for the tagging task: expected --train-file, or --data-dir with "
                           f"{' or '.join(DATA_FILES['train'])}")
    if not eval_files:
        raise BertkitError(f"no evaluation data for the tagging task: expected --eval-file, or --data-dir with "
                           f"{' or '.join(DATA_FILES['dev'])}")
    read = {path: read_conll(path) for path in [train_file] * need_train + list(eval_files.values())}
    scheme = tag_scheme(read)
    if need_train:
        labels = tag_names(read[train_file])
        if len(labels) < 2:
            raise BertkitError(f"{train_file}: only one tag ({labels[0]}); expected at least two to tell apart")
    elif labels is None:
        raise BertkitError("the tags of a tagging task come from its training file or the model's id2label")
    for path in eval_files.values():
        unknown = sorted({t for s in read[path] for t in s.tags} - set(labels))
        if unknown:
            logger.warning("%s: tag(s) %s are not among the model's (%s): their words can only be scored wrong",
                           path, ", ".join(unknown[:10]), ", ".join(labels[:10]))
    return TaggingTask(list(labels), scheme, read[train_file] if need_train else [],
                       {split: read[path] for split, path in eval_files.items()})
