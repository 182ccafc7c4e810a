"""SQuAD v1.1 / v2.0 fine-tuning: train on windows, score by turning their logits back into answer strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bertkit.data.corpus import replace_lone_surrogates
from bertkit.data.squad import (
    SquadExample,
    check_questions,
    featurize,
    null_answers,
    null_odds,
    postprocess,
    read_squad,
    split_by_article,
    whole_articles,
    write_null_odds,
    write_predictions,
)
from bertkit.config import parse_json
from bertkit.errors import BertkitError
from bertkit.model import BertForQuestionAnswering
from bertkit.tasks.inference import infer

# the official file names, looked for in --data-dir
FILES = {"squad1": ("train-v1.1.json", "dev-v1.1.json"), "squad2": ("train-v2.0.json", "dev-v2.0.json")}


@dataclass
class SquadTask:
    """Questions to train on and to score; v2.0 adds unanswerable questions and the null-answer threshold."""

    name: str  # squad1 or squad2
    train: list[SquadExample] = field(default_factory=list)
    evals: list[SquadExample] = field(default_factory=list)

    model_class = BertForQuestionAnswering
    metrics = ("exact", "f1")

    @property
    def version2(self) -> bool:
        return self.name == "squad2"

    @property
    def table_metrics(self) -> list[str]:
        if self.version2:
            return ["exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh"]
        return ["exact", "f1"]

    def model_overrides(self) -> dict:
        return {}

    def headline(self, metrics: dict[str, float]) -> float:
        from bertkit.tasks.metrics import headline_score

        # v2.0: the scores at the null threshold tuned on these dev questions, the threshold that predict uses
        names = ("best_exact", "best_f1") if self.version2 else self.metrics
        return headline_score({m: metrics[m] for m in names})

    def train_rows(self, tokenizer, config) -> list[dict]:
        """One row per window, cut back to its real tokens; windows without the answer point at [CLS]."""
        check_questions(self.evals, tokenizer, config.max_length, config.max_query_length)
        rows = []
        for f in featurize(self.train, tokenizer, config.max_length, config.doc_stride, config.max_query_length):
            n = sum(f.attention_mask)
            rows.append({"input_ids": f.input_ids[:n], "token_type_ids": f.token_type_ids[:n],
                         "start_positions": f.start_position, "end_positions": f.end_position})
        return rows

    def answer(self, model, tokenizer, examples: Sequence[SquadExample], config, device,
               null_threshold: float | None):
        """Answers and null odds (exp of BERT's score_diff) by question id. v2.0: "" where the odds exceed
        `null_threshold` (in odds, as best_f1_thresh); None gives every question its best non-null span."""
        features = featurize(examples, tokenizer, config.max_length, config.doc_stride, config.max_query_length)
        rows = [{"input_ids": f.input_ids[: sum(f.attention_mask)],
                 "token_type_ids": f.token_type_ids[: sum(f.attention_mask)]} for f in features]
        out = infer(model, rows, config.eval_batch_size, tokenizer.pad_id, device, ("start_logits", "end_logits"),
                    width=config.max_length)
        spans, odds = postprocess(examples, features, out["start_logits"].numpy(), out["end_logits"].numpy())
        if self.version2 and null_threshold is not None:
            return null_answers(spans, odds, null_threshold), odds
        return spans, odds

    def evaluate(self, model, tokenizer, config, device):
        """EM/F1 as the official script of the version scores them (v2.0: with HasAns/NoAns, the answers null
        where the odds exceed exp(--null-threshold), and the best null thresholds); and a writer of the files.

        The writer saves predictions.json, the answers as scored. For v2.0 also null_odds.json and
        predictions_spans.json, every question's best non-null span: given those, the official evaluate-v2.0.py
        (`--na-prob-file null_odds.json --na-prob-thresh exp(--null-threshold)`, which is its default 1.0 for the
        default 0) prints every number reported here. The search needs the spans, as answers nulled by one
        threshold would hide what another would have said. A span that normalises to nothing (".", "the") is
        written as "": scored the same, but the script's search counts any non-empty answer to an unanswerable
        question as wrong.
        """
        from bertkit.tasks.metrics import normalize_answer, squad_metrics  # its module imports scipy and sklearn

        spans, odds = self.answer(model, tokenizer, self.evals, config, device, None)
        if not self.version2:
            metrics = squad_metrics(self.evals, spans, "1.1")
            return metrics, lambda out_dir: write_predictions(spans, Path(out_dir) / "predictions.json")
        threshold = null_odds(config.null_threshold)
        metrics = squad_metrics(self.evals, spans, "2.0", odds, null_threshold=threshold)
        searched = {q: text if normalize_answer(text) else "" for q, text in spans.items()}

        def write(out_dir: Path) -> None:
            write_predictions(null_answers(spans, odds, threshold), Path(out_dir) / "predictions.json")
            write_predictions(searched, Path(out_dir) / "predictions_spans.json")
            write_null_odds(odds, Path(out_dir) / "null_odds.json")

        return metrics, write


def load_squad_task(config, need_train: bool = True) -> SquadTask:
    """Read the train and eval questions: explicit files, the official names in --data-dir, or one file split
    by article (--train-articles N: the first N articles train, the rest are scored)."""
    train_name, dev_name = FILES[config.task]
    folder = Path(config.data_dir) if config.data_dir else None
    train_file = config.train_file or (folder / train_name if folder else None)
    eval_file = config.eval_file or (folder / dev_name if folder else None)
    task = SquadTask(config.task)
    if config.train_articles:
        source = train_file or eval_file
        if source is None:
            raise BertkitError("--train-articles splits one SQuAD file: expected --train-file or --eval-file")
        task.train, task.evals = split_by_article(source, config.train_articles)
        source_files = [source]
    else:
        if eval_file is None or (need_train and train_file is None):
            raise BertkitError(
                f"{config.task} needs --train-file and --eval-file, --data-dir with {train_name} and {dev_name}, "
                "or one file and --train-articles N to split it by article"
            )
        task.train = read_squad(train_file) if need_train else []
        task.evals = read_squad(eval_file)
        source_files = [eval_file] + ([train_file] if need_train else [])
    if config.whole_articles:
        task.train, task.evals = whole_articles(task.train), whole_articles(task.evals)
    if not task.version2 and any(e.is_impossible for e in task.train + task.evals):
        raise BertkitError(
            f"{', '.join(map(str, source_files))}: has unanswerable questions (SQuAD v2.0); expected --task squad2"
        )
    return task


QUESTION_LINE = '{"question": ..., "context": ...}'


def parse_question(number: int, line: str, source: str) -> SquadExample | None:
    """Line `number` of `predict`'s input to a QA model, `{"question": ..., "context": ...}` (an `id` is kept when
    given; else the line number): a question, or None for a blank line (its output line says so)."""
    if not line.strip():
        return None
    record = parse_json(line, source, f"{QUESTION_LINE} per line", number)
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "context")):
        raise BertkitError(f'{source}:{number}: expected a JSON object with string "question" and "context"')
    # a JSON-escaped lone surrogate ("\ud800") becomes U+FFFD, one character for one, as the tokenizer reads it:
    # echoed back in the question, id or answer, it could not be written as UTF-8
    qid, question, context = (replace_lone_surrogates(str(number if record.get("id") is None else record["id"])),
                              replace_lone_surrogates(record["question"]), replace_lone_surrogates(record["context"]))
    return SquadExample(qid, "", 0, question, context, [])
