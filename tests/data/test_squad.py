"""SQuAD: reading and checking the JSON, windows and labels on a real tokenizer, logits back to answers."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from bertkit.data.squad import (
    SquadAnswer,
    SquadExample,
    SquadFeature,
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
from bertkit.errors import BertkitError
from bertkit.tasks.metrics import normalize_answer


def data_path(*parts: str) -> Path:
    root = os.environ.get("BERTKIT_DATA")
    if not root or not Path(root, *parts).exists():
        pytest.skip("BERTKIT_DATA is not set or lacks this file")
    return Path(root, *parts)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(data_path("checkpoints", "all-MiniLM-L6-v2", "tokenizer.json")))


def squad_file(path: Path, context: str, answers: list[dict], bom: bool = False, **qa) -> Path:
    data = {"version": "1.1", "data": [{"title": "Paris", "paragraphs": [
        {"context": context, "qas": [{"id": "q1", "question": "Where?", "answers": answers, **qa}]}]}]}
    path.write_text(("\ufeff" if bom else "") + json.dumps(data), encoding="utf-8")
    return path


def qa(context: str, answer: str | None, question: str = "What is it?", qid: str = "q") -> SquadExample:
    answers = [] if answer is None else [SquadAnswer(answer, context.index(answer))]
    return SquadExample(qid, "t", 0, question, context, answers, is_impossible=answer is None)


# --- reading ---------------------------------------------------------------------------------------------


def test_whole_articles_make_the_long_document_task():
    """Every question of dev-v1.1 gets its article as context, with every answer where its new start says; the
    articles run to thousands of tokens (the paragraphs, 100-300)."""
    examples = read_squad(data_path("squad", "dev-v1.1.json"))
    long = whole_articles(examples)
    assert [e.id for e in long] == [e.id for e in examples]
    for e, w in zip(examples, long):
        assert e.context in w.context
        for a, b in zip(e.answers, w.answers):
            assert b.text == a.text and w.context[b.start : b.start + len(b.text)] == a.text
            assert w.context[b.start - a.start :][: len(e.context)] == e.context  # the same paragraph, moved
    contexts = {e.article: e.context for e in long}
    assert len(contexts) == 48 and len({(e.article, e.context) for e in long}) == 48
    tokenizer = Tokenizer.from_file(str(data_path("checkpoints", "all-MiniLM-L6-v2", "tokenizer.json")))
    tokenizer.no_truncation()
    lengths = sorted(len(tokenizer.encode(c).ids) for c in contexts.values())
    assert lengths[len(lengths) // 2] > 2000 and lengths[0] > 1000, lengths


def test_real_files():
    v1 = read_squad(data_path("squad", "dev-v1.1.json"))
    assert len(v1) == 10570 and not any(e.is_impossible for e in v1)
    v2 = read_squad(data_path("squad", "dev-v2.0-half.json"))
    assert len(v2) == 6078 and sum(e.is_impossible for e in v2) == 3168
    assert all(not e.answers for e in v2 if e.is_impossible)  # plausible_answers are not gold
    train, held_out = split_by_article(data_path("squad", "dev-v1.1.json"), 38)
    assert {e.article for e in train} == set(range(38)) and {e.article for e in held_out} == set(range(38, 48))
    assert len(train) + len(held_out) == 10570


def test_answer_checks_and_bom(tmp_path):
    good = squad_file(tmp_path / "good.json", "Paris is in France.", [{"text": "France", "answer_start": 12}], bom=True)
    assert read_squad(good)[0].answers == [SquadAnswer("France", 12)]
    bad = squad_file(tmp_path / "bad.json", "Paris is in France.", [{"text": "France", "answer_start": 10}])
    with pytest.raises(BertkitError, match=r"bad.json: article 0 \('Paris'\), question q1: answer 'France' is not at "
                                           r"answer_start 10 \(context has 'n Fran' there\)"):
        read_squad(bad)
    with pytest.raises(BertkitError, match="question q1: no answers, expected at least one"):
        read_squad(squad_file(tmp_path / "none.json", "Paris.", []))
    with pytest.raises(BertkitError, match="is_impossible is true but answers is not empty"):
        read_squad(squad_file(tmp_path / "both.json", "Paris.", [{"text": "Paris", "answer_start": 0}],
                              is_impossible=True))
    with pytest.raises(BertkitError, match="question q1: field 'answer_start' is str, expected int"):
        read_squad(squad_file(tmp_path / "str.json", "Paris.", [{"text": "Paris", "answer_start": "0"}]))


def test_malformed_files(tmp_path):
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(BertkitError, match="empty.json: file is empty"):
        read_squad(tmp_path / "empty.json")
    (tmp_path / "broken.json").write_text('{"data": [\n  {"title": "x",\n  "paragraphs": [}\n]}')
    with pytest.raises(BertkitError, match=r"broken.json:3: not valid JSON"):
        read_squad(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(BertkitError, match="list.json: missing field 'data'"):
        read_squad(tmp_path / "list.json")
    with pytest.raises(BertkitError, match="nothing.json: file not found"):
        read_squad(tmp_path / "nothing.json")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(BertkitError, match="folder.json: a folder, not a file; expected a SQuAD JSON file"):
        read_squad(tmp_path / "folder.json")
    data = {"data": [{"title": "x", "paragraphs": [{"context": "c", "qas": [
        {"id": "q", "question": "?", "answers": [], "is_impossible": True}] * 2}]}]}
    (tmp_path / "twice.json").write_text(json.dumps(data))
    with pytest.raises(BertkitError, match="question q: question id repeats"):
        read_squad(tmp_path / "twice.json")
    with pytest.raises(BertkitError, match=r"--train-articles 1 of its 1 article\(s\); expected a file of 2 or more"):
        split_by_article(squad_file(tmp_path / "one.json", "P.", [{"text": "P", "answer_start": 0}]), 1)


# --- windows and labels --------------------------------------------------------------------------------------


def labelled_text(example: SquadExample, feature: SquadFeature) -> str:
    return example.context[feature.offsets[feature.start_position][0] : feature.offsets[feature.end_position][1]]


def test_long_paragraph_windows(tokenizer):
    filler = " ".join(f"Sentence number {i} talks about nothing much." for i in range(30))
    context = filler + " The treaty was signed in Utrecht in 1713. " + filler
    example = qa(context, "Utrecht in 1713", "Where and when was the treaty signed?")
    features = featurize([example], tokenizer, max_length=64, doc_stride=16, max_query_length=64)
    assert len(features) > 10
    plain = Tokenizer.from_str(tokenizer.to_str())  # the fixture's tokenizer.json pads and truncates to 128
    plain.no_padding()
    plain.no_truncation()
    question_len = len(plain.encode(example.question, add_special_tokens=False).ids)
    labelled = [f for f in features if f.start_position]
    assert labelled, "some window must hold the answer"
    for f in features:
        assert len(f.input_ids) == len(f.token_type_ids) == len(f.attention_mask) == len(f.offsets) == 64
        assert f.input_ids[0] == tokenizer.token_to_id("[CLS]")
        assert f.input_ids[question_len + 1] == tokenizer.token_to_id("[SEP]")
        n_real = sum(f.attention_mask)
        assert f.input_ids[n_real - 1] == tokenizer.token_to_id("[SEP]")
        assert f.token_type_ids[: question_len + 2] == [0] * (question_len + 2) and f.token_type_ids[n_real - 1] == 1
        if f.start_position:
            assert labelled_text(example, f) == "Utrecht in 1713"
        else:  # the answer is not wholly inside this window
            seen = [o for o in f.offsets if o is not None]
            answer_start = example.answers[0].start
            assert not (seen[0][0] <= answer_start and seen[-1][1] >= answer_start + len("Utrecht in 1713"))
    # the windows cover the context, and each context token has exactly one "max context" window
    n_context = len(plain.encode(context, add_special_tokens=False).ids)
    owners = [o for f in features for o, best in zip(f.offsets, f.is_max_context) if best]
    assert len(owners) == len(set(owners)) == n_context
    assert tokenizer.truncation["max_length"] == 128  # the caller's tokenizer keeps its settings


def test_unicode_offsets_map_back_exactly(tokenizer):
    context = "Zoë moved from Zürich to 東京 in 2019 😀 and loves crème brûlée 👍🏽 très naïvement."
    for answer in ["Zürich", "東京", "😀", "crème brûlée", "👍🏽", "naïvement", "Zoë"]:
        (feature,) = featurize([qa(context, answer)], tokenizer)
        assert labelled_text(qa(context, answer), feature) == answer
    (feature,) = featurize([qa(context, "Zoë")], tokenizer)
    tokens = [tokenizer.id_to_token(i) for i in feature.input_ids]
    for token, offset in zip(tokens, feature.offsets):
        if offset is not None and token != "[UNK]":  # each piece is the normalised text under its offsets
            normalised = tokenizer.normalizer.normalize_str(context[offset[0] : offset[1]])
            assert normalised.strip() == token.removeprefix("##")  # CJK characters come padded with spaces


def test_answer_keeps_the_combining_accent_of_its_last_letter(tokenizer):
    """Decomposed accents (e + U+0301) are stripped by the uncased normaliser, so the last token ends before the
    accent; the gold span must still come back whole, or it is no exact match."""
    context = "The poem was written by Jose\u0301 Marti\u0301 in Cuba."
    example = qa(context, "Jose\u0301 Marti\u0301")
    (feature,) = featurize([example], tokenizer, max_length=64)
    starts, ends = np.zeros((1, 64)), np.zeros((1, 64))
    starts[0, feature.start_position] = ends[0, feature.end_position] = 10.0
    predictions, _ = postprocess([example], [feature], starts, ends)
    assert predictions == {"q": "Jose\u0301 Marti\u0301"}


def test_unanswerable_and_bertkit_tokenizer(tokenizer):
    from bertkit.tokenizer import Tokenizer as BertkitTokenizer

    wrapped = BertkitTokenizer.from_pretrained(data_path("checkpoints", "all-MiniLM-L6-v2"))  # has .backend, .cls_id
    examples = [qa("Nobody knows the answer to this one.", None), qa("It is blue.", "blue")]
    features = featurize(examples, wrapped, max_length=32)
    assert [(f.start_position, f.end_position) for f in features] == [(0, 0), (8, 8)]
    assert features[0].input_ids == featurize(examples[:1], tokenizer, max_length=32)[0].input_ids


def test_question_truncation_and_too_short_windows(tokenizer):
    example = qa("It is blue.", "blue", question="why " * 100)
    (feature,) = featurize([example], tokenizer, max_length=32, max_query_length=10)
    assert feature.input_ids[11] == tokenizer.token_to_id("[SEP]") and feature.token_type_ids[12] == 1
    with pytest.raises(BertkitError, match="max_length 12 leaves no room for context"):
        featurize([example], tokenizer, max_length=12, max_query_length=10)


# --- logits back to answers --------------------------------------------------------------------------------


def word_feature(context: str, question_len: int, window: tuple[int, int], length: int = 16) -> SquadFeature:
    """A hand-made feature whose tokens are the context's words (window = first, last word index)."""
    words, offsets, pos = context.split(), [], 0
    for word in words:
        pos = context.index(word, pos)
        offsets.append((pos, pos + len(word)))
        pos += len(word)
    head = question_len + 2
    inside = offsets[window[0] : window[1] + 1]
    tail = length - head - len(inside)
    return SquadFeature(0, [0] * length, [0] * length, [1] * length, [None] * head + inside + [None] * tail,
                        [False] * head + [True] * len(inside) + [False] * tail, 0, 0)


def logits(length: int = 16, **peaks: float) -> np.ndarray:
    row = np.zeros(length)
    for position, value in peaks.items():
        row[int(position.removeprefix("p"))] = value
    return row


def test_postprocess_chooses_the_best_valid_span():
    context = "The quick brown fox jumps over the lazy dog"
    example = qa(context, "lazy dog")
    feature = word_feature(context, question_len=2, window=(0, 8))  # context tokens at positions 4..12
    start = logits(p1=9.0, p5=3.0, p11=5.0, p12=4.0)  # p1 is a question token: never a start
    end = logits(p3=9.0, p12=4.0, p6=2.0, p14=8.0)  # p3 precedes every valid start; p14 is padding
    predictions, odds = postprocess([example], [feature], [start], [end])
    assert predictions == {"q": "lazy dog"}  # 5 + 4 beats "quick brown" 3 + 2
    assert odds["q"] == pytest.approx(math.exp(0.0 - 9.0))  # exp(null score - best span score)
    short, _ = postprocess([example], [feature], [start], [end], max_answer_length=1)
    assert short == {"q": "dog"}  # p12 + p12 = 8 beats p5 + p5 (3 + 0)


def test_postprocess_across_windows_and_null_threshold():
    context = "one two three four five six"
    example = SquadExample("q", "t", 0, "?", context, [], is_impossible=True)
    first, second = word_feature(context, 1, (0, 3), 10), word_feature(context, 1, (2, 5), 10)
    first.is_max_context[6] = False  # "four" belongs to the second window, "three" to the first
    second.is_max_context[3] = False
    starts = [logits(10, p0=3.0, p4=2.0), logits(10, p0=1.0, p3=9.0, p5=6.0)]  # second p3 ("three") is not owned
    ends = [logits(10, p0=2.0, p4=2.0), logits(10, p0=1.0, p6=1.0)]
    predictions, odds = postprocess([example], [first, second], starts, ends)
    # null = min(3 + 2, 1 + 1) = 2 over windows; best span "five six" = 6 + 1 beats "two" = 2 + 2
    assert odds["q"] == pytest.approx(math.exp(2.0 - 7.0)) and predictions["q"] == "five six"
    assert null_answers(predictions, odds, math.exp(-6.0)) == {"q": ""}  # score_diff -5 > -6
    assert null_answers(predictions, odds, math.exp(-4.0)) == {"q": "five six"}


def test_null_odds_are_positive_and_keep_the_order():
    diffs = [-1e9, -800.0, -30.0, -0.5, 0.0, 1e-7, 2.0, 40.0, 800.0]
    odds = [null_odds(d) for d in diffs]
    assert all(0 < o < math.inf for o in odds) and odds == sorted(odds)
    assert len(set(odds[2:-1])) == len(odds) - 3  # distinct wherever a model's scores can be (|diff| < 700)
    assert null_odds(0.0) == 1.0  # even odds: the official script's default threshold is bertkit's default 0


def test_postprocess_errors_and_writers(tmp_path):
    context = "a b c"
    feature = word_feature(context, 1, (0, 2), 8)
    with pytest.raises(BertkitError, match=r"expected \(1, max_length\)"):
        postprocess([qa(context, "b")], [feature], np.zeros((2, 8)), np.zeros((2, 8)))
    with pytest.raises(BertkitError, match="question q has no features"):
        postprocess([qa(context, "b")], [], np.zeros((0, 8)), np.zeros((0, 8)))
    write_predictions({"q1": "Zürich", "q2": ""}, tmp_path / "predictions.json")
    write_null_odds({"q1": 0.1, "q2": math.exp(1.3)}, tmp_path / "null_odds.json")
    assert json.loads((tmp_path / "predictions.json").read_text()) == {"q1": "Zürich", "q2": ""}
    assert json.loads((tmp_path / "null_odds.json").read_text()) == {"q1": 0.1, "q2": math.exp(1.3)}  # exactly


def test_round_trip_on_real_paragraphs(tokenizer):
    """Labels turned into one-hot logits decode back to the gold answer (up to sub-word boundaries)."""
    examples = read_squad(data_path("squad", "dev-v2.0-half.json"))[:300]
    features = featurize(examples, tokenizer, max_length=128, doc_stride=32)
    starts, ends = np.zeros((len(features), 128)), np.zeros((len(features), 128))
    for i, f in enumerate(features):
        starts[i, f.start_position] = ends[i, f.end_position] = 10.0
    predictions = null_answers(*postprocess(examples, features, starts, ends), threshold=1.0)
    assert any(e.is_impossible for e in examples)
    for example in examples:
        if example.is_impossible:  # [CLS] scores 20, every span 0: null odds e^20 > 1
            assert predictions[example.id] == ""
            continue
        gold = normalize_answer(example.answers[0].text)
        assert normalize_answer(predictions[example.id]) == gold or gold in normalize_answer(predictions[example.id])
