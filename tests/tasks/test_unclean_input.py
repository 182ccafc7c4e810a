"""Input that is not clean text, at `bertkit predict` and in training files: one output line per input line, a
documented replacement or a one-line error naming file:line, never a traceback."""

import io
import json
import logging

import pytest
import torch

from bertkit import BertConfig, BertForSequenceClassification, BertkitError, Tokenizer
from bertkit.cli import main
from bertkit.tasks.classification import load_text_task
from bertkit.tasks.evaluation import predict
from bertkit.tasks.finetune import FinetuneConfig

BLANK = {"label": None, "probability": None, "error": "blank line: no text to label"}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny random sentiment classifier (labels neg/pos) on a vocabulary of letters."""
    directory = tmp_path_factory.mktemp("classifier")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters,
                                                   *("##" + c for c in letters)]) + "\n")
    tokenizer = Tokenizer.from_vocab(directory / "vocab.txt")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, id2label={0: "neg", 1: "pos"})
    BertForSequenceClassification(config).save_pretrained(directory, tokenizer=tokenizer)
    return directory


def test_predict_keeps_one_result_per_input_line_blank_lines_included(classifier):
    results = predict(classifier, io.BytesIO(b"good film\n\n   \nbad\n"))
    assert [r["text"] for r in results] == ["good film", "", "   ", "bad"]
    assert results[1] == {"text": ""} | BLANK and results[2] == {"text": "   "} | BLANK
    assert results[0]["label"] in ("neg", "pos") and "error" not in results[3]


def test_predict_splits_lines_at_newlines_only(classifier, tmp_path):
    """A form feed, U+2028 or U+0085 inside a line (which str.splitlines would split at) keeps it one line."""
    path = tmp_path / "in.txt"
    path.write_bytes("\ufeffa\x0cb\n\u2028c\x85d\r\ne\x1cf\n".encode("utf-8"))
    assert [r["text"] for r in predict(classifier, path)] == ["a\x0cb", "\u2028c\x85d", "e\x1cf"]


def test_predict_replaces_lone_surrogates_and_keeps_control_characters_in_its_output(classifier):
    results = predict(classifier, ["go\ud800od", "\x00\x01", "ok"])
    assert results[0]["text"] == "go\ufffdod" and results[0]["label"] in ("neg", "pos")
    assert results[1]["text"] == "\x00\x01" and results[1]["label"] in ("neg", "pos")  # labelled as BERT sees it
    json.dumps(results, ensure_ascii=False).encode("utf-8")  # printable as UTF-8


def test_predict_input_that_is_not_utf8_is_refused_naming_the_line(classifier, tmp_path):
    with pytest.raises(BertkitError, match=r"<stdin>:2: not UTF-8 text \(byte 4 of the line\); expected UTF-8"):
        predict(classifier, io.BytesIO(b"good\ncaf\xe9\n"))
    (tmp_path / "latin1.txt").write_bytes(b"good\n\nbad \xff\n")
    with pytest.raises(BertkitError, match=r"latin1.txt:3: not UTF-8 text"):
        predict(classifier, tmp_path / "latin1.txt")


def test_cli_predict_prints_one_line_per_input_line_from_binary_stdin(classifier, monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b"good\n\nx\x00y\xed\xa0\x80\n"), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"good\n\nbad\n"), encoding="utf-8"))
    assert main(["predict", str(classifier)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and json.loads(lines[1]) == {"text": ""} | BLANK
    monkeypatch.setattr("sys.stdin", stdin)  # \xed\xa0\x80 is a surrogate encoded in UTF-8: not UTF-8 text
    assert main(["predict", str(classifier)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "<stdin>:3: not UTF-8 text" in err


def test_cli_predict_bad_out_path_is_a_one_line_error(classifier, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("good\n")
    assert main(["predict", str(classifier), str(tmp_path / "in.txt"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_pair_for_a_model_with_one_segment_embedding_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """type_vocab_size 1 (no sentence B): single texts are labelled, a pair is refused instead of an IndexError."""
    from tiny_folders import tiny_config, tokenizer_in

    tokenizer = tokenizer_in(tmp_path)
    config = tiny_config(tokenizer.vocab_size, type_vocab_size=1, id2label={0: "neg", 1: "pos"})
    BertForSequenceClassification(config).save_pretrained(tmp_path, tokenizer=tokenizer)
    assert predict(tmp_path, ["good film"])[0]["label"] in ("neg", "pos")
    monkeypatch.setattr("sys.stdin", io.StringIO("good film\tbad film\n"))
    assert main(["predict", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one segment embedding (type_vocab_size 1)" in err


def test_a_tokenizer_larger_than_the_models_vocabulary_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """A folder whose vocab.txt has more tokens than config.json's vocab_size (another model's tokenizer copied in)
    is refused naming the folder, by predict, evaluate, finetune and serve, instead of an IndexError on the first text holding one
    of the ids past the embedding table."""
    from tiny_folders import tiny_config, tokenizer_in

    folder = tmp_path / "model"
    folder.mkdir()
    tokenizer = tokenizer_in(folder)
    config = tiny_config(tokenizer.vocab_size - 10, id2label={0: "neg", 1: "pos"})
    BertForSequenceClassification(config).save_pretrained(folder, tokenizer=tokenizer)
    monkeypatch.setattr("sys.stdin", io.StringIO("the treaty was signed\n"))  # "signed" is one of the last ids
    assert main(["predict", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the tokenizer has {tokenizer.vocab_size} tokens, more than config.json's " \
        f"vocab_size {config.vocab_size}" in err
    (tmp_path / "dev.csv").write_text("sentence,label\nthe treaty was signed,pos\nthe treaty,neg\n")
    assert main(["evaluate", str(folder), "--task", "custom", "--eval-file", str(tmp_path / "dev.csv")]) == 2
    assert "more than config.json's vocab_size" in capsys.readouterr().err
    assert main(["finetune", "--model-dir", str(folder), "--task", "custom", "--train-file", str(tmp_path / "dev.csv"),
                 "--eval-file", str(tmp_path / "dev.csv"), "--out-dir", str(tmp_path / "run")]) == 2
    assert "more than config.json's vocab_size" in capsys.readouterr().err
    from bertkit.serve import Predictor

    with pytest.raises(BertkitError, match="more than config.json's vocab_size"):
        Predictor(folder)


def test_predict_help_documents_blank_lines_and_errors(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "one JSON line per input line" in help_text and '"error": "blank line: no text to label"' in help_text


def test_training_examples_with_an_empty_text_are_skipped_and_counted_with_a_warning(tmp_path, caplog):
    rows = ["text,label", "good,pos", ",neg", "bad,neg", "  ,pos", "fine,pos"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("text,label\n,neg\ngood,pos\n")
    config = FinetuneConfig(task="custom", train_file=str(tmp_path / "train.csv"), eval_file=str(tmp_path / "dev.csv"),
                            text_a="text", label="label")
    with caplog.at_level(logging.WARNING, logger="bertkit"):
        task = load_text_task(config)
    assert [e.text_a for e in task.train] == ["good", "bad", "fine"]
    assert len(task.evals["dev"]) == 2  # evaluation data is scored whole, as the official scripts do
    assert "train.csv: skipped 2 training example(s) with an empty text (first at line 3, 5)" in caplog.text
    (tmp_path / "train.csv").write_text("text,label\n,pos\n ,neg\n")
    with pytest.raises(BertkitError, match="train.csv: every example has an empty text"):
        load_text_task(config)
