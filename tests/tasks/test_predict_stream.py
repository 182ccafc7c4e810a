"""`bertkit predict` without holding its input or its results: every line checked first, then run a chunk at a time,
the results written as they come."""

import io
import json
import types

import pytest

from bertkit import BertForTokenClassification
from bertkit.cli import main
from bertkit.tasks import evaluation
from bertkit.tasks.classification import TextTask
from bertkit.tasks.evaluation import predict, predict_stream
from tiny_folders import save_tiny

LINES = ["a good movie", "bad film", "great fun", "", " ", "", "very boring", "it was not fun\tthe film", "awful",
         "the movie"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("stream") / "classifier")


def test_the_input_is_run_a_chunk_at_a_time_with_the_same_results(classifier, tmp_path, monkeypatch):
    lines = [line for line in LINES if "\t" not in line]  # 9 single texts, lines 4-6 blank: a chunk of blanks
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    whole = predict(classifier, tmp_path / "in.txt", threads=1)
    read, at_runs = [], []
    opened = evaluation.input_lines

    def counted(inputs, source):
        lines_of = opened(inputs, source)

        def lines():
            for number, line in lines_of():
                read.append(number)
                yield number, line

        return lines

    real_predict = TextTask.predict

    def spied(self, model, tokenizer, examples, config, device):
        at_runs.append((len(read), len(examples)))
        return real_predict(self, model, tokenizer, examples, config, device)

    monkeypatch.setattr(evaluation, "CHUNK", 3)
    monkeypatch.setattr(evaluation, "input_lines", counted)
    monkeypatch.setattr(TextTask, "predict", spied)
    results = predict_stream(classifier, tmp_path / "in.txt", threads=1)
    assert len(read) == 9 and at_runs == []  # checked whole, nothing run yet
    chunked = list(results)
    assert [r["label"] for r in chunked] == [r["label"] for r in whole] and len(whole) == 9
    # the same up to float rounding: a batch of other lengths pads otherwise
    assert [r["probability"] for r in chunked] == pytest.approx([r["probability"] for r in whole], abs=1e-6)
    # read again 3 lines ahead of each run (the second pass's reads), and the chunk of three blanks not run at all
    assert at_runs == [(9 + 3, 3), (9 + 9, 3)]
    assert [r.get("error") for r in whole[3:6]] == ["blank line: no text to label"] * 3


def test_a_bad_line_late_in_the_input_stops_it_before_any_result(classifier, tmp_path, monkeypatch, capsys):
    bad = "\n".join(LINES[:7]).encode() + b"\nok\ncaf\xe9\n"  # line 9 is Latin-1
    (tmp_path / "bad.txt").write_bytes(bad)
    monkeypatch.setattr(evaluation, "CHUNK", 2)
    assert main(["predict", classifier, str(tmp_path / "bad.txt"), "--out", str(tmp_path / "out.jsonl")]) == 2
    assert "bad.txt:9: not UTF-8 text (byte 4 of the line); expected UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists() and list(tmp_path.iterdir()) == [tmp_path / "bad.txt"]
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(bad)))
    assert main(["predict", classifier]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "<stdin>:9: not UTF-8 text" in err
    # a line mixing pairs into single texts, late, is named as before
    (tmp_path / "mixed.txt").write_text("\n".join(LINES) + "\n")
    assert main(["predict", classifier, str(tmp_path / "mixed.txt")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "mixed.txt:8: mixes single texts and text<TAB>pair lines" in err


def test_standard_input_and_a_file_give_the_same_lines(classifier, tmp_path, monkeypatch, capsys):
    text = "\n".join(line for line in LINES if "\t" not in line) + "\n"
    (tmp_path / "in.txt").write_text(text)
    monkeypatch.setattr(evaluation, "CHUNK", 4)
    assert main(["predict", classifier, str(tmp_path / "in.txt"), "--out", str(tmp_path / "file.jsonl")]) == 0
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(text.encode())))
    assert main(["predict", classifier]) == 0
    out = capsys.readouterr().out
    assert out == (tmp_path / "file.jsonl").read_text() and len(out.splitlines()) == 9
    assert [json.loads(line)["text"] for line in out.splitlines()] == text.splitlines()


def test_a_tagger_gives_a_line_for_each_text_of_a_chunk_without_words(tmp_path, monkeypatch):
    tagger = save_tiny(tmp_path / "tagger", BertForTokenClassification, num_labels=3)
    monkeypatch.setattr(evaluation, "CHUNK", 2)
    results = predict(tagger, ["good film", "", " ", "bad"], threads=1)  # the second chunk: two texts, one word
    assert [r["words"] for r in results] == [["good", "film"], None, None, ["bad"]]
    assert results[1]["error"] == "blank line: no word to tag" and results[2]["text"] == " "
    results = predict(tagger, ["good", "", "", " "], threads=1)  # the second chunk has no word at all
    assert len(results) == 4 and [r["tags"] is None for r in results] == [False, True, True, True]


def test_a_long_input_has_one_bar_over_its_lines_and_none_per_chunk(classifier, tmp_path, monkeypatch, capsys):
    from bertkit.train.logs import bars_hidden, progress_bar

    with bars_hidden():
        assert progress_bar(total=10_000).disable
    assert not progress_bar(total=10_000, file=io.StringIO()).disable
    monkeypatch.setattr(evaluation, "CHUNK", 2)
    (tmp_path / "in.txt").write_text("good\nbad\nfun\n")
    assert main(["predict", classifier, str(tmp_path / "in.txt"), "--out", str(tmp_path / "o.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "predict: 100%" in err and "3/3" in err
