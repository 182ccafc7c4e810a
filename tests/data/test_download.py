"""`bertkit download`: GLUE written from the Hub's rows in the layout the GLUE reader takes (a stand-in `datasets`
serves the real task files' rows, as nyu-mll/glue names them), SQuAD fetched whole or not at all (a stand-in
urlopen serves the real dev file). Nothing here reaches the network."""

import io
import json
import sys
import types
import urllib.error

import pytest

from bertkit.cli import main
from bertkit.data.glue import TASKS, read_glue, read_glue_file
from conftest import data_path


def _hf_rows(task, split):
    """The rows nyu-mll/glue has for a task's split, made from the shared real files (test: labels -1)."""
    spec = TASKS[task]
    source = "dev" if split != "train" else "train"
    if task == "MRPC":  # the shared folder holds Microsoft's own files
        path = data_path("glue", "MRPC", f"msr_paraphrase_{'train' if source == 'train' else 'test'}.txt")
        examples = read_glue_file(task, path)[:40]
    else:  # QNLI's shared folder has its dev file alone, which then stands in for train too
        source = source if (data_path("glue", task) / f"{source}.tsv").is_file() else "dev"
        examples = read_glue(task, data_path("glue", task), source)[:40]
    rows = []
    for i, e in enumerate(examples):
        row = {"idx": i, spec.hf_text[0]: e.text_a, "label": -1 if split.startswith("test") else e.label}
        if len(spec.hf_text) > 1:
            row[spec.hf_text[1]] = e.text_b
        rows.append(row)
    return rows


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming=False):
        calls.append((name, config, split))
        task = next(spec.name for spec in TASKS.values() if spec.hf_config == config)
        return _hf_rows(task, split)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_glue_is_written_as_glues_own_folders_and_read_back_the_same(tmp_path, fake_datasets, capsys):
    out = tmp_path / "glue"
    tasks = ["SST-2", "CoLA", "STS-B", "MRPC", "QNLI", "RTE", "WNLI"]  # every task the shared data holds
    assert main(["download", "glue", "--tasks", *tasks, "--out", str(out)]) == 0
    # named by their task folders: seven train.tsv alone would not say which is which
    assert "21 file(s) written (SST-2/train.tsv, SST-2/dev.tsv, SST-2/test.tsv, CoLA/train.tsv" in \
        capsys.readouterr().out
    assert sorted(p.name for p in (out / "CoLA").iterdir()) == ["dev.tsv", "test.tsv", "train.tsv"]
    assert ("nyu-mll/glue", "stsb", "validation") in fake_datasets
    for task in tasks:
        for split, hf_split in (("train", "train"), ("dev", "validation")):
            got = read_glue(task, out / task, split)
            want = _hf_rows(task, hf_split)
            spec = TASKS[task]
            assert [e.text_a for e in got] == [r[spec.hf_text[0]] for r in want]
            assert [e.label for e in got] == [r["label"] for r in want]
            if spec.text_b:
                assert [e.text_b for e in got] == [r[spec.hf_text[1]] for r in want]
        test = read_glue(task, out / task, "test")  # unlabelled, with the ids a leaderboard file repeats
        assert [e.label for e in test] == [None] * 40 and [e.guid for e in test] == [str(i) for i in range(40)]
    assert (out / "CoLA" / "train.tsv").read_text().split("\n")[0].split("\t")[:2] == ["hf", "1"]  # no header
    fake_datasets.clear()
    assert main(["download", "glue", "--tasks", "SST-2", "--out", str(out)]) == 0  # all there: nothing fetched
    assert fake_datasets == [] and "all there already" in capsys.readouterr().out


def test_a_text_with_a_tab_or_line_break_and_mnlis_diagnostic_set(tmp_path, monkeypatch):
    def load_dataset(name, config, split, streaming=False):
        if config == "ax":
            return [{"idx": 0, "premise": "The cat\tsat.", "hypothesis": "A cat sat.", "label": -1}]
        label = -1 if split.startswith("test") else 2
        return [{"idx": 7, "premise": "line one\nline two", "hypothesis": "tab\there", "label": label}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert main(["download", "glue", "--tasks", "mnli", "--out", str(tmp_path)]) == 0
    (example,) = read_glue("MNLI", tmp_path / "MNLI", "dev_mismatched")
    assert (example.text_a, example.text_b, example.label) == ("line one line two", "tab here", 2)
    assert TASKS["MNLI"].labels[2] in (tmp_path / "MNLI" / "train.tsv").read_text()  # GLUE spells its labels
    (ax,) = read_glue_file("MNLI", tmp_path / "diagnostic" / "diagnostic.tsv")
    assert (ax.guid, ax.text_a, ax.label) == ("0", "The cat sat.", None)


def test_glue_without_the_datasets_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    assert main(["download", "glue", "--tasks", "RTE", "--out", str(tmp_path)]) == 2
    assert "pip install datasets" in capsys.readouterr().err
    assert not (tmp_path / "RTE" / "train.tsv").exists()


class _Response(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_squad_is_fetched_whole_checked_and_kept(tmp_path, monkeypatch, capsys):
    real = data_path("squad", "dev-v1.1.json").read_bytes()
    urls = []

    def urlopen(url, timeout):
        urls.append(url)
        return _Response(real if url.endswith("dev-v1.1.json") else b"<html>moved</html>")

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    (tmp_path / "train-v1.1.json").write_text("{}")  # there already: kept, not fetched
    assert main(["download", "squad", "--versions", "1.1", "--out", str(tmp_path)]) == 0
    assert urls == ["https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json"]
    assert (tmp_path / "dev-v1.1.json").read_bytes() == real
    assert "1 file(s) written (dev-v1.1.json)" in capsys.readouterr().out
    assert main(["download", "squad", "--versions", "2.0", "--out", str(tmp_path)]) == 2  # a page, not the data
    assert "train-v2.0.json: not JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev-v1.1.json", "train-v1.1.json"]  # nothing half

    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    assert main(["download", "squad", "--versions", "2.0", "--out", str(tmp_path)]) == 2
    assert "cannot download (<urlopen error [Errno -2] Name or service not known>); expected a network " \
        "connection to it" in capsys.readouterr().err
    assert main(["download", "squad", "--versions", "3", "--out", str(tmp_path)]) == 2
    assert "--versions 3: expected 1.1 or 2.0" in capsys.readouterr().err


def test_glue_that_datasets_cannot_load_is_one_line(tmp_path, monkeypatch, capsys):
    def load_dataset(name, config, split, streaming=False):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert main(["download", "glue", "--tasks", "WNLI", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "bertkit: error: nyu-mll/glue wnli train: cannot load it (ConnectionError: Couldn't reach 'nyu-mll/glue' on "
        "the Hub (LocalEntryNotFoundError)); expected that dataset, configuration and split on the Hugging Face Hub "
        "with a network connection to it, or in the datasets cache")


def test_a_corpus_is_streamed_into_json_lines_files_prepare_reads_and_a_cut_fetch_goes_on(tmp_path, monkeypatch,
                                                                                        minilm_dir, capsys):
    lines = [line for line in data_path("corpus", "python-docs-3.11.txt").read_text().splitlines() if line][:24]
    documents = [{"id": i, "text": text} for i, text in enumerate(lines)] + [{"id": 24, "text": "  "}]
    asked = []

    def load_dataset(name, config, split, streaming=False):
        asked.append((name, config, split, streaming))
        return iter(documents)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = tmp_path / "wiki"
    flags = ["download", "corpus", "--dataset", "wikimedia/wikipedia", "--dataset-config", "20231101.en",
             "--out", str(out), "--shard-documents", "10"]
    assert main(flags + ["--max-documents", "15"]) == 0  # cut short: 15 of the 25
    assert asked == [("wikimedia/wikipedia", "20231101.en", "train", True)]
    assert main(flags) == 0  # goes on after row 15
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"wikimedia--wikipedia-20231101.en-train-{a:09d}-{b:09d}.jsonl"
                     for a, b in ((0, 10), (10, 15), (15, 25))]
    written = [json.loads(line)["text"] for name in names for line in (out / name).read_text().splitlines()]
    assert written == lines  # every document once, in order; the blank one left out
    assert main(flags) == 0 and "all there already" in capsys.readouterr().out  # the stream ran dry: nothing new
    assert main(["prepare", str(out), "--tokenizer", str(minilm_dir), "--out", str(tmp_path / "prepared")]) == 0
    assert "24 documents" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda *a, **k: iter([{"id": 0, "content": "x y"}])))
    assert main(["download", "corpus", "--dataset", "./other/set", "--out", str(tmp_path / "o"), "--text-field",
                 "content"]) == 0  # a local dataset folder: its files named by its path, never hidden
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["other--set-train-000000000-000000001.jsonl"]
    assert main(["download", "corpus", "--dataset", "other/set", "--out", str(tmp_path / "o2")]) == 2
    assert "other/set: no text column 'text' (its columns: id, content); expected --text-field naming it" in \
        capsys.readouterr().err


def test_a_corpus_stream_that_breaks_is_one_line_and_a_second_run_goes_on_after_the_files_kept(tmp_path, monkeypatch,
                                                                                             capsys):
    documents = [{"text": f"Document {i}."} for i in range(25)]

    def broken(name, config, split, streaming=False):
        yield from documents[:23]
        raise ConnectionError("Server closed the connection")  # the network gone after 23 rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=broken))
    flags = ["download", "corpus", "--dataset", "owner/set", "--out", str(tmp_path), "--shard-documents", "10"]
    assert main(flags) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "bertkit: error: owner/set: reading stopped after row 20 (ConnectionError: Server closed the connection); "
        "expected its rows to the end (the files written are kept: run again to go on after them)")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: iter(documents)))
    assert main(flags) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"owner--set-train-{a:09d}-{b:09d}.jsonl" for a, b in ((0, 10), (10, 20), (20, 25))]
    written = [json.loads(line)["text"] for name in names for line in (tmp_path / name).read_text().splitlines()]
    assert written == [d["text"] for d in documents]


def test_a_null_text_is_no_document_and_a_text_that_is_no_string_is_named_by_its_row(tmp_path, monkeypatch, capsys):
    rows = [{"text": "One."}, {"text": None}, {"text": "Three."}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: iter(rows)))
    assert main(["download", "corpus", "--dataset", "owner/set", "--out", str(tmp_path / "a")]) == 0
    (written,) = (tmp_path / "a").iterdir()
    assert [json.loads(line)["text"] for line in written.read_text().splitlines()] == ["One.", "Three."]
    rows[1] = {"text": ["a", "list"]}
    assert main(["download", "corpus", "--dataset", "owner/set", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "bertkit: error: owner/set: row 1: 'text' holds a list; expected a string, the document's text")


def test_squad_cut_short_says_so_and_keeps_nothing(tmp_path, monkeypatch, capsys):
    import http.client

    real = data_path("squad", "dev-v1.1.json").read_bytes()

    def closed_early(url, timeout):  # the connection closed half way: read() ends as at the file's end
        response = _Response(real[: len(real) // 2])
        response.headers = {"Content-Length": str(len(real))}
        return response

    monkeypatch.setattr("urllib.request.urlopen", closed_early)
    assert main(["download", "squad", "--versions", "1.1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"bertkit: error: https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json: cut short at "
        f"{len(real) // 2:,} of its {len(real):,} bytes; expected the whole file (nothing kept: run again)")

    class Chunked(_Response):  # a chunked reply cut short
        def read(self, size=-1):
            raise http.client.IncompleteRead(b"{", 1000)

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: Chunked(b""))
    assert main(["download", "squad", "--versions", "1.1", "--out", str(tmp_path)]) == 2
    assert "train-v1.1.json: cannot download (IncompleteRead(1 bytes read, 1000 more expected)); expected a " \
        "network connection to it" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_flag_of_another_kind_of_download_is_refused(tmp_path, capsys):
    assert main(["download", "glue", "--dataset", "wikimedia/wikipedia", "--out", str(tmp_path)]) == 2
    assert "--dataset is for `bertkit download corpus` and `bertkit download ner`; expected the flags of `bertkit " \
        "download glue`" in \
        capsys.readouterr().err
    assert main(["download", "squad", "--tasks", "SST-2", "--out", str(tmp_path)]) == 2
    assert "--tasks is for `bertkit download glue`" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


class _StatefulStream:
    """A streamed dataset as datasets' IterableDataset keeps its place: state_dict() after the rows yielded,
    load_state_dict() before iterating. `produced` counts the rows it had to produce (fetch)."""

    def __init__(self, rows):
        self.rows, self.position, self.produced = rows, 0, 0

    def __iter__(self):
        while self.position < len(self.rows):
            row = self.rows[self.position]
            self.position += 1
            self.produced += 1
            yield row

    def state_dict(self):
        return {"shard_example_idx": self.position}

    def load_state_dict(self, state):
        self.position = state["shard_example_idx"]


def test_a_corpus_fetch_goes_on_from_the_streams_own_state_without_fetching_the_rows_kept_again(tmp_path,
                                                                                              monkeypatch):
    documents = [{"text": f"document {i}."} for i in range(30)]
    streams = []

    def load_dataset(name, config, split, streaming=False):
        streams.append(_StatefulStream(documents))
        return streams[-1]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    flags = ["download", "corpus", "--dataset", "owner/set", "--out", str(tmp_path), "--shard-documents", "10"]
    assert main(flags + ["--max-documents", "20"]) == 0
    assert main(flags) == 0
    assert streams[1].produced == 10  # rows 20-29 alone: the first 20 were not fetched again
    written = [json.loads(line)["text"] for path in sorted(tmp_path.glob("*.jsonl"))
               for line in path.read_text().splitlines()]
    assert written == [d["text"] for d in documents]
    (tmp_path / ".owner--set-train-stream.json").write_text('{"done": 30, "state": {"bad": 1}}')
    assert main(flags + ["--max-documents", "40"]) == 0  # a state it cannot take: streams past the rows, still once
    assert streams[2].produced == 30 and len(list(tmp_path.glob("*.jsonl"))) == 3


class _Split(list):
    """A split of a datasets DatasetDict: its rows, and features naming the tags' classes."""

    def __init__(self, rows, names=None):
        super().__init__(rows)
        tags = types.SimpleNamespace(feature=types.SimpleNamespace(names=names)) if names else object()
        self.features = {"tokens": object(), "ner_tags": tags} if rows else {}


def test_tagged_words_are_written_as_conll_files_finetune_reads(tmp_path, monkeypatch, capsys):
    from bertkit.tasks.tagging import read_conll

    names = ["O", "B-PER", "I-PER", "B-LOC"]
    train = [{"tokens": ["Ada", "Lovelace", "met", "Babbage", "."], "ner_tags": [1, 2, 0, 1, 0]},
             {"tokens": ["in", "New York", "", "today"], "ner_tags": [0, 3, 0, 0]}]
    dev = [{"tokens": ["London", "rains"], "ner_tags": [3, 0]}]
    calls = []

    def load_dataset(name, config, split, streaming=False):
        calls.append((name, config, split))
        return {"train": _Split(train, names), "validation": _Split(dev, names)}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = tmp_path / "ner"
    assert main(["download", "ner", "--dataset", "some/conll", "--out", str(out)]) == 0
    assert "2 file(s) written (train.txt, dev.txt)" in capsys.readouterr().out
    assert calls == [("some/conll", None, None)] and not (out / "test.txt").exists()  # the dataset has no test split
    sentences = read_conll(out / "train.txt")
    assert [s.words for s in sentences] == [["Ada", "Lovelace", "met", "Babbage", "."],
                                            ["in", "New\u00a0York", "today"]]
    assert [s.tags for s in sentences] == [["B-PER", "I-PER", "O", "B-PER", "O"], ["O", "B-LOC", "O"]]
    assert [(s.words, s.tags) for s in read_conll(out / "dev.txt")] == [(["London", "rains"], ["B-LOC", "O"])]
    assert main(["download", "ner", "--dataset", "some/conll", "--out", str(out)]) == 0  # kept: only test is missing
    assert calls[-1] == ("some/conll", None, None)
    calls.clear()
    (out / "test.txt").write_text("x O\n")
    assert main(["download", "ner", "--dataset", "some/conll", "--out", str(out)]) == 0
    assert calls == [] and "all there already" in capsys.readouterr().out


def test_tagged_words_without_the_columns_named_is_one_line(tmp_path, monkeypatch, capsys):
    rows = [{"words": ["Ada"], "labels": ["B-PER"]}]
    split = _Split(rows)
    split.features = {"words": object(), "labels": object()}
    monkeypatch.setitem(sys.modules, "datasets",
                        types.SimpleNamespace(load_dataset=lambda *a, **k: {"train": split}))
    assert main(["download", "ner", "--dataset", "some/tags", "--out", str(tmp_path / "a")]) == 2
    assert "some/tags (train): no column tokens, ner_tags; its columns are words, labels: expected --tokens-field" \
        in capsys.readouterr().err
    assert main(["download", "ner", "--dataset", "some/tags", "--tokens-field", "words", "--tags-field", "labels",
                 "--out", str(tmp_path / "b")]) == 0  # tags that are strings are written as they are
    assert (tmp_path / "b" / "train.txt").read_text() == "Ada B-PER\n\n"
    assert main(["download", "ner", "--out", str(tmp_path / "c")]) == 2
    assert "download ner needs --dataset" in capsys.readouterr().err
    assert main(["download", "glue", "--tags-field", "x", "--out", str(tmp_path / "d")]) == 2
    assert "--tags-field is for `bertkit download ner`" in capsys.readouterr().err


def test_swag_is_fetched_from_its_authors_repository_checked_and_read_by_the_choice_reader(tmp_path, monkeypatch,
                                                                                           capsys):
    from bertkit.tasks.choice import read_choices

    header = ",video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label\n"
    files = {"train.csv": header + '0,v1,3,"A man sits. He","A man sits.",He,gold,"stands, slowly.",sings.,eats.,'
                                   "sleeps.,0\n",
             "val.csv": header + "0,v2,4,x,x,y,gold,a,b,c,d,3\n",
             "test.csv": "<html>moved</html>"}
    urls = []

    def urlopen(url, timeout):
        urls.append(url)
        return _Response(files[url.rsplit("/", 1)[1]].encode())

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    assert main(["download", "swag", "--out", str(tmp_path)]) == 2  # test.csv is a page, not SWAG's file
    assert "test.csv: header '<html>moved</html>'; expected SWAG's CSV" in capsys.readouterr().err
    assert urls[0] == "https://raw.githubusercontent.com/rowanz/swagaf/master/data/train.csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv", "val.csv"]  # the two good ones kept
    (train,) = read_choices(tmp_path / "train.csv")
    assert train.continuations()[0] == "He stands, slowly." and train.label == 0
    assert read_choices(tmp_path / "val.csv")[0].label == 3
