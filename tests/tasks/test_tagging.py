"""Tagging words (NER) from CoNLL files: the reader, conlleval's chunk scoring checked against seqeval, word pieces
against transformers, windows for long sentences, and a run end to end (finetune, evaluate, predict)."""

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bertkit.errors import BertkitError
from bertkit.tasks.evaluation import evaluate, predict
from bertkit.tasks.finetune import FinetuneConfig, finetune
from bertkit.tasks.metrics import chunk_scores, chunks
from bertkit.tasks.tagging import (PREDICTIONS_FILE, TAGS_FILE, Sentence, encode, read_conll, tag_scheme, windows)
from bertkit.tokenizer import Tokenizer
from conftest import data_path

TAGS = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "B-ORG", "I-ORG"]


def random_tags(rng: random.Random, n: int, skew: float) -> list[str]:
    """Tags of n words: anything goes (invalid IOB2 orders, IOB1, IOBES and mixes); mostly O."""
    return ["O" if rng.random() < skew else rng.choice(TAGS[1:]) for _ in range(n)]


def test_chunks_and_scores_match_seqeval_on_random_tags():
    """seqeval (default mode) reimplements conlleval: the same chunks, and the same precision, recall, F1 (overall
    and per type) and accuracy, on 300 random sentences of any tag order."""
    sequence_labeling = pytest.importorskip("seqeval.metrics.sequence_labeling")
    rng = random.Random(0)
    gold, predicted = [], []
    for _ in range(300):
        n = rng.randint(1, 14)
        gold.append(random_tags(rng, n, 0.5))
        # a prediction near the gold: some tags kept, so that chunks match often enough to test matching
        predicted.append([g if rng.random() < 0.7 else t for g, t in zip(gold[-1], random_tags(rng, n, 0.4))])
    for tags in gold + predicted:
        assert chunks(tags) == [(k, a, b + 1) for k, a, b in sequence_labeling.get_entities(tags)], tags
    scores, per_type = chunk_scores(gold, predicted)
    p, r, f, support = sequence_labeling.precision_recall_fscore_support(gold, predicted, average="micro")
    assert scores["precision"] == pytest.approx(100 * p) and scores["recall"] == pytest.approx(100 * r)
    assert scores["f1"] == pytest.approx(100 * f) and 0 < scores["f1"] < 100
    from seqeval.metrics import accuracy_score

    assert scores["accuracy"] == pytest.approx(100 * accuracy_score(gold, predicted))
    p, r, f, support = sequence_labeling.precision_recall_fscore_support(gold, predicted, average=None)
    assert list(per_type) == ["LOC", "ORG", "PER"]  # seqeval's order: sorted types
    for i, kind in enumerate(per_type):
        assert (per_type[kind]["precision"], per_type[kind]["recall"], per_type[kind]["f1"]) == pytest.approx(
            (100 * p[i], 100 * r[i], 100 * f[i]))
        assert per_type[kind]["gold"] == support[i]


def test_chunks_read_iob1_iob2_and_iobes_the_same_way():
    iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]
    iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC"]
    iobes = ["B-PER", "E-PER", "O", "S-LOC", "B-LOC", "E-LOC"]
    assert chunks(iob2) == chunks(iob1) == chunks(iobes) == [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6)]
    assert chunks(["I-PER", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 2)]  # a type change ends and starts a chunk
    assert chunks([]) == [] and chunks(["O", "O"]) == []


def test_read_conll_takes_first_and_last_columns_and_skips_docstart(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes("\ufeff-DOCSTART- -X- -X- O\n\nRome NNP B-NP B-LOC\r\nis VBZ B-VP O\n\n\n"
                     "Ada\tB-PER\nLovelace  \t I-PER\n-DOCSTART- -X- O\nwrote O".encode())
    sentences = read_conll(path)
    assert [(s.words, s.tags, s.line) for s in sentences] == [
        (["Rome", "is"], ["B-LOC", "O"], 3), (["Ada", "Lovelace"], ["B-PER", "I-PER"], 7), (["wrote"], ["O"], 10)]


@pytest.mark.parametrize("text, problem", [
    ("Rome B-LOC\nis\n", r"train.txt:2: one column \('is'\); expected a word and its tag"),
    ("\n\n-DOCSTART- O\n", r"train.txt: no sentences; expected CoNLL lines"),
    ("Rome B-LOC\n\xff O\n".encode("latin-1"), r"train.txt:2: not UTF-8 text"),
    ("# sent_id = 1\n1\tRome\trome\tPROPN\tNNP\t_\t2\tnsubj\t_\t_\n",
     r"train.txt:2: ten columns, the first a number: a CoNLL-U file"),
])
def test_read_conll_names_the_line_of_a_problem(tmp_path, text, problem):
    path = tmp_path / "train.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(BertkitError, match=problem):
        read_conll(path)


def test_one_tag_scheme_per_task(tmp_path):
    chunked = [Sentence(["Rome", "is"], ["B-LOC", "O"], 1)]
    plain = [Sentence(["Rome", "is"], ["NNP", "VBZ"], 4)]
    assert tag_scheme({tmp_path / "a": chunked}) == "chunks" and tag_scheme({tmp_path / "b": plain}) == "tags"
    with pytest.raises(BertkitError, match=r"b:4: tag 'NNP' has no chunk prefix, but 'B-LOC' \(.*a:1\) has"):
        tag_scheme({tmp_path / "a": chunked, tmp_path / "b": plain})


def test_word_pieces_are_the_pieces_transformers_gives_each_word():
    """Pre-split words of real text (SST-2 dev, and words BERT splits further or drops) map to the same WordPiece
    ids per word as transformers' is_split_into_words gives, and a word without a piece is [UNK]."""
    transformers = pytest.importorskip("transformers")
    folder = data_path("checkpoints", "all-MiniLM-L6-v2")
    ours, theirs = Tokenizer.from_pretrained(folder), transformers.BertTokenizerFast.from_pretrained(str(folder))
    lines = data_path("glue", "SST-2", "dev.tsv").read_text(encoding="utf-8").splitlines()[1:201]
    texts = [line.split("\t")[0].split() for line in lines] + [["U.N.", "Ekéus", "co-operate", "\x00", "naïve"]]
    for words, found in zip(texts, ours.word_pieces(texts)):
        encoding = theirs(words, is_split_into_words=True, add_special_tokens=False)
        expected = [[] for _ in words]
        for token, word in zip(encoding["input_ids"], encoding.word_ids()):
            expected[word].append(token)
        assert [ids for ids, _ in found] == [e or [ours.unk_id] for e in expected]
    text = "Ada Lovelace's notes (1843) describe it."
    (words,) = ours.word_pieces([text])
    assert [text[a:b] for _, (a, b) in words] == ["Ada", "Lovelace", "'", "s", "notes", "(", "1843", ")",
                                                   "describe", "it", "."]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=30), st.integers(1, 12))
def test_windows_cover_every_word_once_in_order_within_room(pieces, room):
    spans = windows([[7] * n for n in pieces], room)
    assert [w for span in spans for w in span] == list(range(len(pieces)))
    assert all(len(span) > 0 and sum(min(pieces[w], room) for w in span) <= room for span in spans)
    for span, after in zip(spans, spans[1:]):  # a window ends only where the next word would not fit
        assert sum(min(pieces[w], room) for w in span) + min(pieces[after[0]], room) > room


def test_labels_sit_on_each_words_first_piece_and_long_sentences_become_windows(toy_model_dir):
    tokenizer = Tokenizer.from_pretrained(toy_model_dir)
    pieces = [[[10, 11], [12], [13, 14, 15], [16]]]
    rows, places = encode(tokenizer, pieces, max_length=6, label_ids=[[1, 2, 3, 4]])
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    assert [r["input_ids"] for r in rows] == [[cls, 10, 11, 12, sep], [cls, 13, 14, 15, 16, sep]]
    assert [r["labels"] for r in rows] == [[-100, 1, -100, 2, -100], [-100, 3, -100, -100, 4, -100]]
    assert places == [(0, range(0, 2), [1, 3]), (0, range(2, 4), [1, 4])]


def test_label_all_tokens_puts_each_words_tag_on_its_other_pieces_b_continued_as_i(tmp_path, toy_model_dir):
    """--label-all-tokens: the word's other pieces carry its tag, a B- tag continued as the I- tag of its type (as
    transformers' run_ner.py); a piece cut off by the window carries nothing."""
    from bertkit.tasks.tagging import TaggingTask

    tokenizer = Tokenizer.from_pretrained(toy_model_dir)
    task = TaggingTask(["O", "B-PER", "I-PER", "B-MISC"], "chunks")  # no I-MISC: B-MISC stays B-MISC
    rows, _ = encode(tokenizer, [[[10, 11], [12], [13, 14, 15]]], max_length=6, label_ids=[[1, 2, 3]],
                     later=[0, 2, 2, 3])
    assert [r["labels"] for r in rows] == [[-100, 1, 2, 2, -100], [-100, 3, 3, 3, -100]]
    rows, _ = encode(tokenizer, [[[13, 14, 15]]], max_length=4, label_ids=[[1]], later=[0, 2, 2, 3])
    assert rows[0]["labels"] == [-100, 1, 2, -100]  # the word cut to the window's 2 pieces
    (tmp_path / "train.txt").write_text("ada B-PER\nlovelace I-PER\nwent O\nhome B-MISC\n")
    task.train = read_conll(tmp_path / "train.txt")
    config = FinetuneConfig(task="ner", max_length=32, label_all_tokens=True)
    labels = task.train_rows(tokenizer, config)[0]["labels"]
    pieces = [len(tokenizer.encode(w)["input_ids"]) - 2 for w in ("ada", "lovelace", "went", "home")]  # less [CLS], [SEP]
    assert labels == [-100] + [1] + [2] * (pieces[0] - 1) + [2] * pieces[1] + [0] * pieces[2] + [3] * pieces[3] + [-100]
    assert sum(n > 1 for n in pieces) >= 2  # the toy vocabulary spells these words in letters: pieces to label
    with pytest.raises(BertkitError, match="--label-all-tokens with --task SST-2; expected --task ner"):
        FinetuneConfig(model_dir="m", task="SST-2", label_all_tokens=True).check()


LEXICON = {"good": "POS", "great": "POS", "fun": "POS", "best": "POS", "funny": "POS", "beautiful": "POS",
           "bad": "NEG", "worst": "NEG", "boring": "NEG", "dull": "NEG", "awful": "NEG", "mess": "NEG"}


def write_lexicon_task(path, lines) -> int:
    """A CoNLL file from real sentences, tagged by a lexicon: a sentiment word is an entity, with "very" or "so"
    before it inside the chunk (IOB2). Returns the number of chunks."""
    count, out = 0, []
    for line in lines:
        words = line.split()
        tags = ["O"] * len(words)
        for i, w in enumerate(words):
            if w in LEXICON:
                count += 1
                joined = i > 0 and words[i - 1] in ("very", "so") and tags[i - 1] == "O"
                if joined:
                    tags[i - 1] = f"B-{LEXICON[w]}"
                tags[i] = f"{'I' if joined else 'B'}-{LEXICON[w]}"
        out += [f"{w} {t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return count


@pytest.fixture(scope="module")
def ner_run(tiny_model_dir, tmp_path_factory):
    """The tiny model tagging a lexicon's words in real SST-2 sentences: 600 to train on, 300 to score."""
    folder = tmp_path_factory.mktemp("ner")
    lines = [l.split("\t")[0] for l in data_path("glue", "SST-2", "train.tsv").read_text().splitlines()[1:]]
    lines = [l for l in lines if 4 <= len(l.split()) <= 30 and any(w in LEXICON for w in l.split())][:900]
    assert write_lexicon_task(folder / "train.txt", lines[:600]) > 600
    assert write_lexicon_task(folder / "dev.txt", lines[600:]) > 300
    config = FinetuneConfig(model_dir=tiny_model_dir, out_dir=str(folder / "run"), task="NER",
                            data_dir=str(folder), lr=3e-3, batch_size=16, epochs=3, seed=0, threads=1, device="cpu")
    return config, finetune(config)


def test_a_tagging_run_learns_and_writes_its_scores(ner_run):
    config, record = ner_run
    assert config.task == "ner" and record["task"] == "NER"
    best = record["best"]
    assert set(best) == {"f1", "precision", "recall", "accuracy"}
    assert best["f1"] > 60, best  # the lexicon's words are easy to find: a model that learnt nothing scores 0
    out = config.out_dir
    table = (out + "/results.md") and open(out + "/results.md").read()
    assert "600 training sentences, 300 scored" in table and TAGS_FILE in table
    assert "| POS |" in open(f"{out}/{TAGS_FILE}").read()
    # conlleval's input: a line per dev word, a blank line after each sentence, the gold tags of the file
    written = open(f"{out}/{PREDICTIONS_FILE}").read().split("\n\n")
    dev = open(f"{config.data_dir}/dev.txt").read().split("\n\n")
    assert len(written) == len(dev)
    assert [[line.split()[:2] for line in s.splitlines()] for s in written] == \
        [[line.split() for line in s.splitlines()] for s in dev]
    predicted = [[line.split()[2] for line in s.splitlines()] for s in written if s.strip()]
    gold = [[line.split()[1] for line in s.splitlines()] for s in dev if s.strip()]
    assert chunk_scores(gold, predicted)[0] == pytest.approx(best)


def test_evaluate_and_predict_use_a_tagging_run(ner_run, tmp_path):
    config, record = ner_run
    assert evaluate(config.out_dir, out_dir=tmp_path) == pytest.approx(record["best"])
    assert (tmp_path / PREDICTIONS_FILE).is_file() and (tmp_path / TAGS_FILE).is_file()
    results = predict(config.out_dir, ["It is a very good, funny film!", "", "a boring mess"])
    first, blank, last = results
    assert first["words"] == ["It", "is", "a", "very", "good", ",", "funny", "film", "!"]
    assert len(first["tags"]) == 9 and all(t in ("O", "B-POS", "I-POS", "B-NEG", "I-NEG") for t in first["tags"])
    for result in (first, last):
        for entity in result["entities"]:  # the offsets index the line
            assert result["text"][entity["start"]:entity["end"]] == entity["text"]
    assert {e["text"] for e in first["entities"]} >= {"funny"} or first["entities"]
    assert blank["tags"] is None and "error" in blank


def test_two_tagging_runs_make_a_soup_that_evaluate_scores_alike(ner_run, tmp_path):
    import dataclasses

    from bertkit.tasks.soup import SoupConfig, soup

    config, record = ner_run
    other = dataclasses.replace(config, out_dir=str(tmp_path / "seed-1"), seed=1, lr=2e-3)
    finetune(other)
    summary = soup(SoupConfig(runs=[config.out_dir, other.out_dir], out=str(tmp_path / "soup"), threads=1))
    assert summary["runs"][0]["metrics"] == pytest.approx(record["best"])
    assert "ensemble" not in summary and summary["selected_on"] == "dev"  # no logits to average for a tagger
    assert evaluate(tmp_path / "soup") == pytest.approx(summary["greedy"]["metrics"])
    assert summary["uniform"]["metrics"]["f1"] > 60  # two taggers from one start average into a tagger


def test_a_sentence_longer_than_max_length_is_tagged_whole(ner_run):
    config, _ = ner_run
    text = " ".join(["a good film"] * 40)  # 120 words: four windows at max_length 32
    (result,) = predict(config.out_dir, [text], max_length=32)
    assert len(result["words"]) == len(result["tags"]) == 120
    assert sum(e["text"] == "good" for e in result["entities"]) >= 30


def test_plain_tags_are_scored_by_word_accuracy(tiny_model_dir, tmp_path):
    lines = ["the film is good", "it was very bad", "a fun and boring movie"] * 20
    pos = {"the": "DT", "a": "DT", "film": "NN", "movie": "NN", "it": "PRP", "is": "VBZ", "was": "VBD",
           "very": "RB", "and": "CC"}
    (tmp_path / "train.txt").write_text("".join(
        "".join(f"{w}\t{pos.get(w, 'JJ')}\n" for w in line.split()) + "\n" for line in lines))
    config = FinetuneConfig(model_dir=tiny_model_dir, out_dir=str(tmp_path / "run"), task="ner",
                            train_file=str(tmp_path / "train.txt"), eval_file=str(tmp_path / "train.txt"),
                            lr=3e-3, batch_size=8, epochs=2, seed=0, threads=1, device="cpu")
    record = finetune(config)
    assert record["task"] == "tagging" and set(record["best"]) == {"accuracy"}
    assert "| JJ |" in (tmp_path / "run" / TAGS_FILE).read_text()
    (result,) = predict(tmp_path / "run", ["the film was fun"])
    assert "entities" not in result and len(result["tags"]) == 4


def test_tagging_data_errors_name_what_is_missing(tiny_model_dir, tmp_path):
    (tmp_path / "train.txt").write_text("Rome B-LOC\n\nis O\n")
    base = dict(model_dir=tiny_model_dir, task="ner", threads=1, device="cpu")
    with pytest.raises(BertkitError, match=r"no evaluation data for the tagging task: expected --eval-file, or "
                                           r"--data-dir with dev.txt or valid.txt or eng.testa"):
        finetune(FinetuneConfig(out_dir=str(tmp_path / "a"), data_dir=str(tmp_path), **base))
    (tmp_path / "one.txt").write_text("Rome O\n")
    with pytest.raises(BertkitError, match=re.escape(f"{tmp_path / 'one.txt'}: only one tag (O)")):
        finetune(FinetuneConfig(out_dir=str(tmp_path / "b"), train_file=str(tmp_path / "one.txt"),
                                eval_file=str(tmp_path / "train.txt"), **base))


def test_a_transformers_tagger_tags_the_same_words_in_bertkit(tmp_path):
    """A BertForTokenClassification saved by transformers, evaluated by bertkit on a CoNLL file of real sentences:
    every word's tag is the one transformers' own model gives at the word's first sub-token."""
    transformers = pytest.importorskip("transformers")
    import torch

    folder = data_path("checkpoints", "all-MiniLM-L6-v2")
    labels = ["O", "B-POS", "I-POS", "B-NEG", "I-NEG"]
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=5, id2label=dict(enumerate(labels)),
                                     label2id={t: i for i, t in enumerate(labels)})
    torch.manual_seed(0)
    theirs = transformers.BertForTokenClassification(config).eval()
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(folder))
    theirs.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lines = [l.split("\t")[0] for l in data_path("glue", "SST-2", "dev.tsv").read_text().splitlines()[1:121]]
    write_lexicon_task(tmp_path / "dev.txt", lines)
    out = tmp_path / "scored"
    metrics = evaluate(tmp_path / "model", task="ner", eval_file=str(tmp_path / "dev.txt"), out_dir=out, threads=1)
    ours = [[line.split()[2] for line in s.splitlines()] for s in (out / PREDICTIONS_FILE).read_text().split("\n\n")
            if s.strip()]
    expected = []
    for sentence in read_conll(tmp_path / "dev.txt"):
        enc = tokenizer(sentence.words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            best = theirs(**enc).logits[0].argmax(-1).tolist()
        words, firsts = enc.word_ids(0), {}
        for position, w in enumerate(words):
            if w is not None:
                firsts.setdefault(w, position)
        expected.append([labels[best[firsts[w]]] for w in range(len(sentence.words))])
    assert ours == expected
    assert metrics["accuracy"] == pytest.approx(chunk_scores([s.tags for s in read_conll(tmp_path / "dev.txt")],
                                                             expected)[0]["accuracy"])


def test_conll2003s_own_file_names_and_its_test_set_scored_beside_dev(tiny_model_dir, tmp_path):
    """eng.train, eng.testa (dev) and eng.testb (test): test is scored after every epoch too, prefixed, while dev
    alone picks the best epoch."""
    lines = [l.split("\t")[0] for l in data_path("glue", "SST-2", "dev.tsv").read_text().splitlines()[1:301]]
    for name, part in (("eng.train", lines[:200]), ("eng.testa", lines[200:250]), ("eng.testb", lines[250:])):
        write_lexicon_task(tmp_path / name, part)
    config = FinetuneConfig(model_dir=tiny_model_dir, out_dir=str(tmp_path / "run"), task="ner",
                            data_dir=str(tmp_path), lr=3e-3, batch_size=16, epochs=1, seed=0, threads=1, device="cpu")
    record = finetune(config)
    assert set(record["best"]) == {"f1", "precision", "recall", "accuracy", "test_f1", "test_precision",
                                   "test_recall", "test_accuracy"}
    assert record["eval_examples"] == 50 and "| test_f1 |" in (tmp_path / "run" / "results.md").read_text()
    assert "NER per type: dev, 50 sentences" in (tmp_path / "run" / TAGS_FILE).read_text()


def test_a_pruned_run_is_scored_and_loaded_as_the_run(ner_run, tmp_path):
    from tasks.test_prune import check_pruned_run

    check_pruned_run(ner_run[0].out_dir, tmp_path)
