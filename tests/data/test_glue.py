"""GLUE readers on the official layouts (small files written here, real SST-2/RTE/MRPC), custom data, submissions."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bertkit.data.glue import (
    TASKS,
    TextExample,
    get_task,
    load_hf_glue,
    read_custom,
    read_glue,
    read_glue_file,
    write_submission,
)
from bertkit.errors import BertkitError


def data_path(*parts: str) -> Path:
    root = os.environ.get("BERTKIT_DATA")
    if not root or not Path(root, *parts).exists():
        pytest.skip("BERTKIT_DATA is not set or lacks this file")
    return Path(root, *parts)


def write(path: Path, lines: list[str], bom: bool = False) -> Path:
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def tsv(*rows: tuple) -> list[str]:
    return ["\t".join(map(str, row)) for row in rows]


# --- the official layouts --------------------------------------------------------------------------


def test_cola_has_no_header_but_its_test_file_does(tmp_path):
    write(tmp_path / "train.tsv", tsv(
        ("gj04", 1, "", "Our friends won't buy this analysis, let alone the next one we propose."),
        ("gj04", 0, "*", 'One more pseudo generalization and I\'m giving up "quoted.'),
    ))
    write(tmp_path / "test.tsv", tsv(("index", "sentence"), (0, "Bill whistled past the house.")))
    train = read_glue("cola", tmp_path, "train")
    assert [e.label for e in train] == [1, 0]
    assert train[1].text_a.endswith('giving up "quoted.')  # a stray quote is text, not a delimiter
    assert train[0].text_b is None
    assert read_glue("CoLA", tmp_path, "test") == [TextExample("0", "Bill whistled past the house.", None, None)]


def test_sts_b_reads_float_scores(tmp_path):
    header = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2")
    write(tmp_path / "dev.tsv", tsv(
        (*header, "score"),
        (0, "main-captions", "MSRvid", "2012test", "0000", "none", "none", "A man with a hard hat is dancing.",
         "A man wearing a hard hat is dancing.", "5.000"),
        (1, "main-captions", "MSRvid", "2012test", "0002", "none", "none", "A young child is riding a horse.",
         "A child is riding a horse.", "4.750"),
    ))
    write(tmp_path / "test.tsv", tsv(header, (0, "main-captions", "MSRvid", "2012test", "0024", "none", "none",
                                              "A girl is styling her hair.", "A girl is brushing her hair.")))
    dev = read_glue("sts-b", tmp_path, "dev")
    assert [e.label for e in dev] == [5.0, 4.75]
    assert dev[1].text_b == "A child is riding a horse."
    assert get_task("stsb").is_regression
    test = read_glue("STS-B", tmp_path, "test")
    assert test[0].label is None and test[0].guid == "0"


def test_qqp_skips_broken_rows_and_says_where(tmp_path, caplog):
    write(tmp_path / "train.tsv", tsv(
        ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
        (133273, 213221, 213222, "How is the life of a math student?", "Which level of preparation is enough?", 0),
        (402555, 536040, 536041, "How do I control my horny emotions?", "How do you control your horniness?", 1),
        (1, 2, 3, "A question broken by a newline"),
        ("in the middle?", "Another question?", 0),
    ))
    with caplog.at_level(logging.WARNING):
        train = read_glue("qqp", tmp_path, "train")
    assert [e.label for e in train] == [0, 1]
    assert "skipped 2 broken rows" in caplog.text and "lines 4, 5" in caplog.text
    write(tmp_path / "test.tsv", tsv(("id", "question1", "question2"), (0, "Why?", "Why not?")))
    assert read_glue("QQP", tmp_path, "test") == [TextExample("0", "Why?", "Why not?", None)]


def test_mnli_matched_mismatched_and_test(tmp_path):
    base = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2")
    row = (0, 31193, "31193n", "government", "( ( Conceptually ...", "( Product ...", "(ROOT ...", "(ROOT ...",
           "Conceptually cream skimming has two basic dimensions.", "Product and geography are what work.")
    write(tmp_path / "train.tsv", tsv((*base, "label1", "gold_label"), (*row, "neutral", "neutral")))
    labels5 = ("label1", "label2", "label3", "label4", "label5")
    write(tmp_path / "dev_matched.tsv", tsv((*base, *labels5, "gold_label"), (*row, *["entailment"] * 5, "entailment")))
    write(tmp_path / "dev_mismatched.tsv", tsv((*base, *labels5, "gold_label"),
                                               (*row, *["contradiction"] * 5, "contradiction")))
    write(tmp_path / "test_matched.tsv", tsv(base, row))
    assert read_glue("mnli", tmp_path, "train")[0].label == 1  # HF order: entailment, neutral, contradiction
    assert read_glue("mnli", tmp_path, "dev_matched")[0].label == 0
    mismatched = read_glue("mnli", tmp_path, "dev_mismatched")[0]
    assert mismatched.label == 2 and mismatched.text_b == "Product and geography are what work."
    assert read_glue("mnli", tmp_path, "test_matched")[0].label is None
    with pytest.raises(BertkitError, match="no split 'dev'.*dev_matched"):
        read_glue("mnli", tmp_path, "dev")


@pytest.mark.parametrize("task, columns, labels", [
    ("QNLI", ("index", "question", "sentence", "label"), ["entailment", "not_entailment"]),
    ("WNLI", ("index", "sentence1", "sentence2", "label"), ["1", "0"]),
])
def test_qnli_and_wnli(tmp_path, task, columns, labels):
    rows = [(i, f"first {i}", f"second {i}", label) for i, label in enumerate(labels)]
    write(tmp_path / "dev.tsv", tsv(columns, *rows))
    write(tmp_path / "test.tsv", tsv(columns[:3], (0, "a", "b")))
    dev = read_glue(task, tmp_path, "dev")
    assert [e.label for e in dev] == [get_task(task).labels.index(label) for label in labels]
    assert dev[1] == TextExample("1", "first 1", "second 1", dev[1].label)
    assert read_glue(task, tmp_path, "test")[0].label is None


def test_mrpc_glue_layout_with_bom(tmp_path):
    write(tmp_path / "train.tsv", tsv(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                                      (1, 702876, 702977, "Amrozi accused his brother .", "Referring to him .")),
          bom=True)
    write(tmp_path / "test.tsv", tsv(("index", "#1 ID", "#2 ID", "#1 String", "#2 String"), (0, 1, 2, "a", "b")),
          bom=True)
    assert read_glue("mrpc", tmp_path, "train")[0].label == 1
    mojibake_bom = "\u00ef\u00bb\u00bf"
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    (tmp_path / "train.tsv").write_text(mojibake_bom + header + "0\t1\t2\ta\tb\n", encoding="utf-8")
    assert read_glue("mrpc", tmp_path, "train")[0].label == 0  # the mojibake BOM Microsoft's files carry
    assert read_glue("mrpc", tmp_path, "test")[0].guid == "0"


def test_every_task_has_its_leaderboard_file():
    names = {name for spec in TASKS.values() for name in spec.submissions.values()}
    assert names == {"CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv",
                     "QNLI.tsv", "RTE.tsv", "WNLI.tsv", "AX.tsv"}
    assert get_task("sst_2").name == "SST-2"
    with pytest.raises(BertkitError, match="unknown GLUE task 'squad'.*CoLA"):
        get_task("squad")


# --- the real files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("task, split, rows, positives", [
    ("SST-2", "train", 67349, None), ("SST-2", "dev", 872, None), ("RTE", "train", 2490, None),
    ("RTE", "dev", 277, 146),
])
def test_real_glue_files(task, split, rows, positives):
    examples = read_glue(task, data_path("glue", task), split)
    assert len(examples) == rows
    assert all(e.text_a and e.label is not None for e in examples)
    if positives is not None:  # RTE dev: 146 entailment = class 0
        assert sum(e.label == 0 for e in examples) == positives


@pytest.mark.parametrize("name, rows, paraphrases", [
    ("msr_paraphrase_train.txt", 4076, 2753), ("msr_paraphrase_test.txt", 1725, 1147),
])
def test_real_microsoft_mrpc_files(name, rows, paraphrases):
    examples = read_glue_file("MRPC", data_path("glue", "MRPC", name))
    assert len(examples) == rows and sum(e.label for e in examples) == paraphrases
    assert examples[0].text_a.startswith(("Amrozi", "PCCW"))  # the BOM did not eat the header


# --- malformed input -----------------------------------------------------------------------------------


def test_malformed_glue_files(tmp_path):
    with pytest.raises(BertkitError, match="train.tsv: file not found"):
        read_glue("rte", tmp_path, "train")
    (tmp_path / "dev.tsv").mkdir()
    with pytest.raises(BertkitError, match="dev.tsv: a folder, not a file; expected a tab- or comma-separated file"):
        read_glue("rte", tmp_path, "dev")
    for name in ("folder.csv", "folder.jsonl", "folder"):
        (tmp_path / name).mkdir()
        with pytest.raises(BertkitError, match=f"{name}: a folder, not a file; expected a"):
            read_custom(tmp_path / name, "text", "label")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(BertkitError, match="empty.tsv: file is empty"):
        read_glue_file("rte", tmp_path / "empty.tsv")
    header = ("index", "sentence1", "sentence2", "label")
    write(tmp_path / "header.tsv", tsv(header))
    with pytest.raises(BertkitError, match="no examples after the header"):
        read_glue_file("rte", tmp_path / "header.tsv")
    write(tmp_path / "cols.tsv", tsv(header, (0, "a", "b", "entailment"), (1, "a", "entailment")))
    with pytest.raises(BertkitError, match=r"cols.tsv:3: 3 tab-separated columns, expected 4 \(index, sentence1"):
        read_glue_file("rte", tmp_path / "cols.tsv")
    write(tmp_path / "label.tsv", tsv(header, (0, "a", "b", "neutral")))
    with pytest.raises(BertkitError, match="label.tsv:2: unknown label 'neutral' .expected one of entailment, not_"):
        read_glue_file("rte", tmp_path / "label.tsv")
    write(tmp_path / "stsb.tsv", tsv(("index", "sentence1", "sentence2", "score"), (0, "a", "b", "high")))
    with pytest.raises(BertkitError, match="stsb.tsv:2: label 'high' is not a number"):
        read_glue_file("sts-b", tmp_path / "stsb.tsv")
    write(tmp_path / "other.tsv", tsv(("sentence", "target"), ("a", 0)))
    with pytest.raises(BertkitError, match="other.tsv:1: header has neither .* 'label' nor .* 'index' of RTE"):
        read_glue_file("rte", tmp_path / "other.tsv")
    latin1 = "index\tsentence1\tsentence2\tlabel\n0\tcaf\xe9\tb\tentailment\n".encode("latin-1")
    (tmp_path / "latin1.tsv").write_bytes(latin1)
    with pytest.raises(BertkitError, match=r"latin1.tsv:2: not UTF-8 text \(byte 6 of the line\); expected UTF-8"):
        read_glue_file("rte", tmp_path / "latin1.tsv")
    (tmp_path / "latin1.csv").write_bytes("text,label\ngood,pos\nbad,neg\n".encode() + "caf\xe9,neg\n".encode("latin-1"))
    with pytest.raises(BertkitError, match=r"latin1.csv:4: not UTF-8 text \(byte 4 of the line\)"):
        read_custom(tmp_path / "latin1.csv", "text", "label")
    write(tmp_path / "qqp.tsv", tsv(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), (1, 2, "a")))
    with pytest.raises(BertkitError, match="qqp.tsv: all 1 rows are broken .expected 6 columns"):
        read_glue_file("qqp", tmp_path / "qqp.tsv")
    write(tmp_path / "cola.tsv", tsv(("gj04", 1, "", "Fine."), ("gj04", 1, "Three columns.")))
    with pytest.raises(BertkitError, match=r"cola.tsv:2: 3 .* expected 4 \(source, label, original label, sentence"):
        read_glue_file("cola", tmp_path / "cola.tsv")


# --- custom data -------------------------------------------------------------------------------------


def test_custom_csv_tsv_jsonl(tmp_path):
    csv_text = '\ufefftext,label\n"Good, really good",pos\nbad,neg\nmeh,neutral\n'  # BOM as Excel writes it
    (tmp_path / "train.csv").write_text(csv_text, encoding="utf-8")
    train, labels = read_custom(tmp_path / "train.csv", text_a="text", label="label")
    assert labels == ["neg", "neutral", "pos"]  # inferred, sorted
    assert [(e.text_a, e.label) for e in train] == [("Good, really good", 2), ("bad", 0), ("meh", 1)]

    write(tmp_path / "dev.tsv", tsv(("premise", "hypothesis", "y"), ('He said "hi', "b", 10), ("c", "d", 2)))
    dev, numeric = read_custom(tmp_path / "dev.tsv", text_a="premise", text_b="hypothesis", label="y")
    assert numeric == ["2", "10"] and [e.label for e in dev] == [1, 0]  # numeric labels sort as numbers
    assert dev[0].text_a == 'He said "hi'

    jsonl = '{"q": "a\u2028z", "score": 0.5}\n\n{"q": "b", "score": 3}\n'
    (tmp_path / "rate.jsonl").write_text(jsonl, encoding="utf-8")
    rated, none = read_custom(tmp_path / "rate.jsonl", text_a="q", label="score", is_regression=True)
    assert none == [] and [e.label for e in rated] == [0.5, 3.0]
    assert rated[0].text_a == "a\u2028z"  # a line separator inside a JSON string does not split the line
    unlabelled, _ = read_custom(tmp_path / "rate.jsonl", text_a="q", label=None)
    assert unlabelled[1].label is None


def test_custom_errors(tmp_path):
    (tmp_path / "dev.csv").write_text("text,label\ngood,pos\nodd,maybe\n")
    with pytest.raises(BertkitError, match="dev.csv:3: unknown label 'maybe' .expected one of neg, pos"):
        read_custom(tmp_path / "dev.csv", "text", "label", labels=["neg", "pos"])
    with pytest.raises(BertkitError, match="dev.csv:1: no column 'sentence' .found text, label"):
        read_custom(tmp_path / "dev.csv", "sentence", "label")
    (tmp_path / "short.csv").write_text("text,label\ngood\n")
    with pytest.raises(BertkitError, match="short.csv:2: 1 columns, expected 2"):
        read_custom(tmp_path / "short.csv", "text", "label")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", \n')
    with pytest.raises(BertkitError, match="bad.jsonl:2: not valid JSON"):
        read_custom(tmp_path / "bad.jsonl", "text", "label")
    (tmp_path / "null.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": null, "label": "x"}\n')
    with pytest.raises(BertkitError, match="null.jsonl:2: column 'text' is missing or null"):
        read_custom(tmp_path / "null.jsonl", "text", "label")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(BertkitError, match="empty.jsonl: file is empty"):
        read_custom(tmp_path / "empty.jsonl", "text", "label")
    with pytest.raises(BertkitError, match="unsupported file type '.xlsx'"):
        read_custom(tmp_path / "data.xlsx", "text", "label")


# --- Hugging Face and submissions ----------------------------------------------------------------------


@pytest.mark.parametrize("name, content", [("train.csv", "text,label\ngood,pos\nbad,\nok,neg\n"),
                                           ("train.tsv", "text\tlabel\ngood\tpos\nbad\t \nok\tneg\n"),
                                           ("train.jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad", "label": ""}\n')])
def test_custom_empty_label_is_refused_not_made_a_class(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(BertkitError, match=f"{name}:3: column 'label' is empty; expected a label"
                       if name != "train.jsonl" else "train.jsonl:2: column 'label' is empty"):
        read_custom(tmp_path / name, "text", "label")


@pytest.mark.parametrize("name, sep", [("long.csv", ","), ("long.tsv", "\t")])
def test_custom_csv_tsv_take_a_document_as_long_as_a_jsonl_line_may_be(tmp_path, name, sep):
    document = "word " * 40_000  # 200,000 characters: past csv's default field limit of 131,072
    (tmp_path / name).write_text(f"text{sep}label\n{document}{sep}pos\nbad{sep}neg\n", encoding="utf-8")
    examples, labels = read_custom(tmp_path / name, "text", "label")
    assert [len(e.text_a) for e in examples] == [len(document), 3] and labels == ["neg", "pos"]


def test_load_hf_glue_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(BertkitError, match="pip install datasets"):
        load_hf_glue("rte", "dev")


def test_write_submission(tmp_path):
    out = write_submission("rte", [0, 1, 1], tmp_path)
    assert out.name == "RTE.tsv"
    assert out.read_text() == "index\tprediction\n0\tentailment\n1\tnot_entailment\n2\tnot_entailment\n"
    assert write_submission("cola", [1, 0], tmp_path).read_text() == "index\tprediction\n0\t1\n1\t0\n"
    assert write_submission("sts-b", [4.25, 0.1234], tmp_path).read_text().splitlines()[1:] == ["0\t4.250", "1\t0.123"]
    assert write_submission("mnli", [2], tmp_path, split="test_mismatched").name == "MNLI-mm.tsv"
    assert (tmp_path / "MNLI-mm.tsv").read_text().splitlines()[1] == "0\tcontradiction"
    assert write_submission("mnli", [0], tmp_path, split="diagnostic").name == "AX.tsv"
    with pytest.raises(BertkitError, match="MNLI has no submission for split 'test'.*test_matched"):
        write_submission("mnli", [0], tmp_path)
    with pytest.raises(BertkitError, match="prediction 1 is class 3, expected 0..1"):
        write_submission("qnli", [0, 3], tmp_path)


def test_submission_indices_are_the_test_files_ids_when_the_reader_skips_a_row(tmp_path):
    """QQP skips a malformed row (with a warning): the predictions after it keep their own ids."""
    test = write(tmp_path / "test.tsv", ["id\tquestion1\tquestion2", "0\ta?\tb?", "1\tbroken", "2\tc?\td?", "3\te?\tf?"])
    examples = read_glue_file("QQP", test)
    assert [e.guid for e in examples] == ["0", "2", "3"]
    out = write_submission("qqp", [0, 1, 1], tmp_path, ids=[e.guid for e in examples])
    assert out.read_text() == "index\tprediction\n0\t0\n2\t1\n3\t1\n"
    with pytest.raises(BertkitError, match="2 predictions for 3 ids"):
        write_submission("qqp", [0, 1], tmp_path, ids=["0", "2", "3"])


def test_custom_jsonl_nested_too_deep_or_with_a_huge_line_fails_naming_the_line(tmp_path, monkeypatch):
    (tmp_path / "deep.jsonl").write_text('{"text": "a", "label": "x"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(BertkitError, match=r"deep.jsonl:2: JSON nested too deeply"):
        read_custom(tmp_path / "deep.jsonl", text_a="text", label="label")
    (tmp_path / "big.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "' + "b" * 2000 + '"}\n')
    monkeypatch.setattr("bertkit.data.glue.MAX_JSONL_LINE_BYTES", 1000)
    with pytest.raises(BertkitError, match=r"big.jsonl:2: line longer than 1,000 bytes; expected one JSON object"):
        read_custom(tmp_path / "big.jsonl", text_a="text", label="label")


@pytest.mark.parametrize("record, expected", [
    ('{"text": ["a"], "label": "x"}', r"bad.jsonl:1: column 'text' is list; expected text"),
    ('{"text": {"a": 1}, "label": "x"}', r"column 'text' is dict; expected text"),
    ('{"text": "a", "label": ["x"]}', r"column 'label' is list; expected text"),
    ('{"text": "a", "label": null}', r"column 'label' is missing or null"),
])
def test_custom_jsonl_field_that_is_not_text_is_refused_naming_file_line_and_column(tmp_path, record, expected):
    (tmp_path / "bad.jsonl").write_text(record + "\n")
    with pytest.raises(BertkitError, match=expected):
        read_custom(tmp_path / "bad.jsonl", text_a="text", label="label")


def test_custom_jsonl_numbers_and_booleans_are_read_as_text_and_labels(tmp_path):
    (tmp_path / "n.jsonl").write_text('{"text": 1990, "label": true}\n{"text": "b", "label": false}\n')
    examples, labels = read_custom(tmp_path / "n.jsonl", text_a="text", label="label")
    assert labels == ["False", "True"] and [(e.text_a, e.label) for e in examples] == [("1990", 1), ("b", 0)]


@pytest.mark.parametrize("score", ["nan", "inf", "-Infinity"])
def test_regression_label_that_is_not_a_finite_number_is_refused(tmp_path, score):
    write(tmp_path / "stsb.tsv", tsv(("index", "sentence1", "sentence2", "score"), (0, "a", "b", score)))
    with pytest.raises(BertkitError, match=rf"stsb.tsv:2: label '{score}' is not a finite number"):
        read_glue_file("sts-b", tmp_path / "stsb.tsv")


def test_a_score_column_read_without_regression_is_named_in_a_warning(tmp_path, caplog):
    (tmp_path / "scores.csv").write_text("text,label\ngood,4.5\nbad,0.8\nok,2.6\n", encoding="utf-8")
    examples, labels = read_custom(tmp_path / "scores.csv", "text", "label")
    assert labels == ["0.8", "2.6", "4.5"]
    assert "scores.csv: column 'label' holds scores such as 0.8; read as 3 classes (expected --regression" in caplog.text
    caplog.clear()
    (tmp_path / "classes.csv").write_text("text,label\ngood,1\nbad,0\nok,2\n", encoding="utf-8")
    read_custom(tmp_path / "classes.csv", "text", "label")  # whole numbers are class names: nothing said
    assert caplog.text == ""


def test_a_label_written_with_a_stray_space_is_named_in_a_warning(tmp_path, caplog):
    (tmp_path / "spaced.csv").write_text('text,label\ngood,pos\nbad,neg\nfine,"pos "\n', encoding="utf-8")
    assert read_custom(tmp_path / "spaced.csv", "text", "label")[1] == ["neg", "pos", "pos "]
    assert "spaced.csv: column 'label' holds 'pos ' beside 'pos', read as 3 classes" in caplog.text


def test_a_column_missing_from_a_custom_header_is_named_at_the_header_line(tmp_path):
    (tmp_path / "train.csv").write_text("\nID,Text,Label\ngood,pos,1\n", encoding="utf-8")  # a blank line first
    with pytest.raises(BertkitError, match=r"train.csv:2: no column 'text' \(found ID, Text, Label\)"):
        read_custom(tmp_path / "train.csv", "text", "label")


def test_a_custom_header_naming_a_column_twice_is_refused(tmp_path):
    (tmp_path / "train.csv").write_text("text,label,text\ngood,pos,bad\n", encoding="utf-8")
    with pytest.raises(BertkitError, match="train.csv:1: column 'text' appears 2 times in the header"):
        read_custom(tmp_path / "train.csv", "text", "label")


def test_columns_named_twice_that_the_task_does_not_read_are_ignored(tmp_path):
    # a spreadsheet's export: two unnamed columns after the data, and a notes column repeated
    (tmp_path / "train.csv").write_text("notes,text,label,notes,,\na,good,pos,b,,\nc,bad,neg,d,,\n", encoding="utf-8")
    examples, labels = read_custom(tmp_path / "train.csv", "text", "label")
    assert labels == ["neg", "pos"] and [(e.text_a, e.label) for e in examples] == [("good", 1), ("bad", 0)]


def test_the_label_order_of_a_custom_file_is_the_same_in_every_process(tmp_path):
    # a pandas float column with a missing value written as text, or one class written two ways: the order once
    # followed the set's hash order, so a run resumed in another process trained its classes permuted
    files = []
    for i, labels in enumerate((["1.0", "2.0", "nan"], ["1", "01", "1.0", "2"])):
        files.append(str(tmp_path / f"train{i}.csv"))
        Path(files[-1]).write_text("text,label\n" + "".join(f"t{j},{v}\n" for j, v in enumerate(labels)))
    script = f"from bertkit.data.glue import read_custom\nfor f in {files!r}: print(read_custom(f, 'text', 'label')[1])"
    orders = {subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                             capture_output=True, text=True, check=True).stdout for seed in range(4)}
    assert orders == {"['1.0', '2.0', 'nan']\n['01', '1', '1.0', '2']\n"}, orders
