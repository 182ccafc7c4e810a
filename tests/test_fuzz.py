"""Property-based fuzzing: generated bad input to every reader and to the CLI ends in a result or a BertkitError.

Over 10,000 generated inputs in all (the per-test `max_examples` below add up; the last test checks the total),
reproducible (`derandomize=True`: the same examples on every run and machine) and quick (tiny files, tiny
models). An example that ends in any other exception fails with the shrunk input that caused it. The bugs the
first runs found are pinned by a test each at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import math
import os
import shutil
import string
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bertkit import BertConfig, BertForSequenceClassification, BertkitError, BertModel, Tokenizer
from bertkit.cli import build_parser, main
from bertkit.checkpoint import meta_model
from bertkit.config import MAX_PARAMETERS
from bertkit.data.corpus import FileReader
from bertkit.data.glue import TASKS, read_custom, read_glue_file
from bertkit.data.prepare import prepare
from bertkit.data.shards import PreparedCorpus
from bertkit.data.squad import read_squad
from bertkit.tasks.evaluation import predict
from bertkit.tasks.finetune import FinetuneConfig
from bertkit.tokenizer import SPECIAL_TOKENS

GENERATED: Counter[str] = Counter()  # examples run per test, for the total checked at the end
MINIMUM_TOTAL = 10_000


def fuzz(examples: int):
    """Hypothesis settings for this suite: reproducible, no deadline (CI machines vary), no example database."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


def count(name: str) -> None:
    GENERATED[name] += 1


# ---- strategies ----------------------------------------------------------------------------------------------

# Characters that break naive text handling: controls, line breaks str.splitlines knows, a BOM, the replacement
# character, lone surrogates, quotes and brackets of CSV and JSON, tabs.
NASTY = list("\t\n\r\x00\x01\x0b\x0c\x1b\x1c\x7f\x85\u2028\u2029\ufeff\ufffd\ud800\udbff\udc00\udfff \"',{}[]#:\\")
CHAR = st.one_of(st.sampled_from(NASTY), st.sampled_from(string.ascii_letters + string.digits + ".!? "),
                 st.characters(blacklist_categories=()))  # any code point, surrogates included
TEXT = st.text(CHAR, max_size=30)
SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)  # encodable as UTF-8
NUMBER = st.one_of(st.integers(-3, 3), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0, 1, 2, 12, 768, 2**31, 2**63, 10**30, -(10**30), 1e309, 0.5, -0.0]))
JSON_SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, SAFE_TEXT)
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(SAFE_TEXT, inner, max_size=3)),
                          max_leaves=8)


def json_text(value) -> str:
    """JSON as Python writes it: NaN and Infinity included, as they are in real files."""
    return json.dumps(value, ensure_ascii=False)


def json_ascii(value) -> str:
    """JSON with every non-ASCII character escaped: a lone surrogate becomes a valid "\\ud800" escape."""
    return json.dumps(value)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def file_bytes(draw, line: st.SearchStrategy) -> bytes:
    """A file's bytes: generated lines, joined by \\n or \\r\\n, UTF-8 with stray invalid bytes now and then."""
    lines = draw(st.lists(line, max_size=8))
    text = draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n"]))
    data = text.encode("utf-8", "surrogatepass")  # a surrogate becomes the invalid bytes a broken encoder writes
    if draw(st.integers(0, 9)) == 0:
        data += draw(st.binary(max_size=12))
    if draw(st.integers(0, 19)) == 0:
        data = b"\xef\xbb\xbf" + data
    return data


def write(path: Path, data: bytes, compress: bool = False, truncate: bool = False) -> Path:
    if compress:
        data = gzip.compress(data, mtime=0)
        if truncate:
            data = data[: len(data) // 2]
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def tokenizer(workdir) -> Tokenizer:
    """WordPiece on a written vocabulary: special tokens, letters, digits, a few words."""
    chars = list(string.ascii_lowercase + string.digits + ".,!?")
    vocab = [*SPECIAL_TOKENS, *chars, *("##" + c for c in chars), "the", "good", "bad"]
    (workdir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return Tokenizer.from_vocab(workdir / "vocab.txt")


def assert_clean(text: str) -> None:
    """Text a reader hands on is a str that UTF-8 (and so the tokenizer backend) can take."""
    assert isinstance(text, str)
    text.encode("utf-8")


# ---- the tokenizer -------------------------------------------------------------------------------------------

ROW = st.one_of(TEXT, TEXT, TEXT, st.none(), st.integers(), st.binary(max_size=4))


@fuzz(2500)
@given(texts=st.lists(ROW, max_size=4), pairs=st.one_of(st.none(), st.lists(ROW, max_size=4)),
       max_length=st.one_of(st.none(), st.integers(-2, 40), st.sampled_from([2**31, 10**20, "8", 3.0])),
       padding=st.booleans(), tensors=st.sampled_from([None, "pt", "np"]))
def test_tokenizer_encode_batch_gives_ids_or_a_bertkit_error(tokenizer, texts, pairs, max_length, padding, tensors):
    count("tokenizer batch")
    try:
        batch = tokenizer.encode_batch(texts, pairs, max_length=max_length, padding=padding, return_tensors=tensors)
    except BertkitError:
        return
    rows = batch["input_ids"].tolist() if tensors == "pt" else batch["input_ids"]
    assert len(rows) == len(texts)
    for row in rows:
        assert all(0 <= i < tokenizer.vocab_size for i in row)
        if max_length is not None and not padding:
            assert len(row) <= max_length


@fuzz(2500)
@given(text=ROW, pair=st.one_of(st.none(), ROW), max_length=st.one_of(st.none(), st.integers(-2, 40)))
def test_tokenizer_encode_and_decode_give_a_result_or_a_bertkit_error(tokenizer, text, pair, max_length):
    count("tokenizer encode")
    try:
        encoded = tokenizer.encode(text, pair, max_length=max_length)
    except BertkitError:
        return
    ids = encoded["input_ids"]
    assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
    assert len(ids) == len(encoded["token_type_ids"]) == len(encoded["attention_mask"])
    assert_clean(tokenizer.decode(ids))
    # a lone surrogate is only ever replaced by U+FFFD: the same ids as the text written with U+FFFD
    replaced = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    assert tokenizer.tokenize(replaced) == tokenizer.tokenize(text)


@fuzz(1000)
@given(ids=st.lists(st.one_of(st.integers(-3, 100), st.integers()), max_size=10), skip=st.booleans())
def test_tokenizer_decode_of_any_ids_gives_text_or_a_bertkit_error(tokenizer, ids, skip):
    count("tokenizer decode")
    try:
        assert_clean(tokenizer.decode(ids, skip_special_tokens=skip))
    except BertkitError:
        pass


# ---- the pretraining corpus reader and prepare ---------------------------------------------------------------

CORPUS_LINE = st.one_of(
    TEXT, TEXT, st.just(""), st.just("   "),
    JSON_VALUE.map(json_text),
    st.dictionaries(st.sampled_from(["text", "body", "id"]), st.one_of(TEXT.map(lambda t: t.replace("\n", " ")),
                                                                       JSON_VALUE), max_size=2).map(json_text),
    st.fixed_dictionaries({"text": TEXT}).map(json_ascii),
    st.integers(1, 3000).map(deep),
    st.text("{}[]\",:\\u0d8", max_size=20),
)


@fuzz(1200)
@given(data=file_bytes(CORPUS_LINE), suffix=st.sampled_from([".txt", ".jsonl", ".json", ".md"]),
       compress=st.booleans(), truncate=st.booleans(), fmt=st.sampled_from(["auto", "bert", "docs", "jsonl", "xml"]),
       field=st.sampled_from(["text", "body", ""]))
def test_corpus_reader_gives_documents_of_clean_sentences_or_a_bertkit_error(workdir, data, suffix, compress,
                                                                             truncate, fmt, field):
    count("corpus reader")
    path = write(workdir / f"corpus{suffix}{'.gz' if compress else ''}", data, compress, truncate)
    try:
        reader = FileReader(path, fmt, field)
        documents = list(reader)
    except BertkitError:
        return
    for document in documents:
        assert document and all(sentence.strip() for sentence in document)
        for sentence in document:
            assert_clean(sentence)
    assert reader.documents == len(documents)


@fuzz(150)
@given(files=st.lists(file_bytes(CORPUS_LINE), min_size=1, max_size=2), heldout=st.sampled_from([0.0, 0.5, 0.99, 1.0, -1]),
       shard_tokens=st.sampled_from([1, 7, 1000, 0]), batch_size=st.sampled_from([1, 3, 1000, 0]))
def test_prepare_on_generated_files_writes_a_readable_corpus_or_a_bertkit_error(workdir, tokenizer, files, heldout,
                                                                                shard_tokens, batch_size):
    count("prepare")
    root = Path(tempfile.mkdtemp(dir=workdir))
    try:
        paths = [write(root / f"in{i}.txt", data) for i, data in enumerate(files)]
        try:
            summary = prepare([str(p) for p in paths], tokenizer, root / "out", shard_tokens=shard_tokens,
                              heldout_fraction=heldout, batch_size=batch_size, progress=False)
        except BertkitError:
            return
        corpora = [PreparedCorpus(root / "out", split) for split in ("train", "heldout")]
        assert sum(c.num_tokens for c in corpora) == summary.tokens
        assert sum(c.num_documents for c in corpora) == summary.documents
        for corpus in corpora:
            assert len(corpus.sentence_offsets) == corpus.num_sentences + 1
            if corpus.num_tokens:
                assert 0 <= int(corpus.tokens[: corpus.num_tokens].max()) < tokenizer.vocab_size
    finally:
        shutil.rmtree(root)


# ---- GLUE, custom and SQuAD readers --------------------------------------------------------------------------

FIELD = st.one_of(st.text(st.characters(blacklist_characters="\t\n\r", blacklist_categories=()), max_size=12),
                  st.sampled_from(["0", "1", "entailment", "not_entailment", "neutral", "nan", "3.5", "", '"', "-"]))


@st.composite
def glue_file(draw):
    """A TSV for a GLUE task: its own header (or a random one), rows of generated fields, a stray row now and then."""
    task = draw(st.sampled_from(sorted(TASKS)))
    spec = TASKS[task]
    own = [c for c in (spec.guid, spec.text_a, spec.text_b, spec.label) if c]
    header = draw(st.one_of(st.just(own), st.permutations(own), st.lists(FIELD, max_size=5)))
    rows = draw(st.lists(st.one_of(
        st.lists(st.one_of(FIELD, st.sampled_from(list(spec.labels) or ["2.5"])), min_size=len(header),
                 max_size=len(header)),
        st.lists(FIELD, max_size=6)), max_size=6))
    lines = (["\t".join(header)] if draw(st.booleans()) or task != "CoLA" else []) + ["\t".join(r) for r in rows]
    return task, "\n".join(lines).encode("utf-8", "surrogatepass") + draw(st.sampled_from([b"", b"\n", b"\xff"]))


@fuzz(1200)
@given(case=glue_file())
def test_glue_reader_gives_examples_or_a_bertkit_error(workdir, case):
    count("glue reader")
    task, data = case
    path = write(workdir / "glue.tsv", data)
    try:
        examples = read_glue_file(task, path)
    except BertkitError:
        return
    spec = TASKS[task]
    for example in examples:
        assert_clean(example.text_a)
        if spec.is_regression:
            assert example.label is None or math.isfinite(example.label)
        else:
            assert example.label is None or 0 <= example.label < len(spec.labels)


CUSTOM_VALUE = st.one_of(FIELD, JSON_VALUE)


@st.composite
def custom_file(draw):
    """A .csv, .tsv or .jsonl with columns text/pair/label (some missing or renamed), generated values."""
    suffix = draw(st.sampled_from([".csv", ".tsv", ".jsonl", ".txt"]))
    columns = draw(st.lists(st.sampled_from(["text", "pair", "label", "other", ""]), max_size=4, unique=True))
    if suffix == ".jsonl":
        records = draw(st.lists(st.one_of(
            st.fixed_dictionaries({c: st.one_of(CUSTOM_VALUE, TEXT) for c in columns}), JSON_VALUE,
            st.integers(1, 3000).map(deep)),
            max_size=5))
        dump = draw(st.sampled_from([json_text, json_ascii]))
        lines = [r if isinstance(r, str) and r.startswith("[") else dump(r) for r in records]
        data = "\n".join(lines).encode("utf-8", "surrogatepass")
    else:
        sep = "," if suffix == ".csv" else "\t"
        rows = draw(st.lists(st.lists(FIELD, min_size=len(columns), max_size=len(columns) + 1), max_size=5))
        data = "\n".join(sep.join(r) for r in [columns, *rows]).encode("utf-8", "surrogatepass")
    return suffix, data


@fuzz(1200)
@given(case=custom_file(), text_b=st.sampled_from([None, "pair"]), label=st.sampled_from(["label", None, "nope"]),
       regression=st.booleans(), labels=st.sampled_from([None, ["0", "1"], []]))
def test_custom_reader_gives_examples_or_a_bertkit_error(workdir, case, text_b, label, regression, labels):
    count("custom reader")
    suffix, data = case
    path = write(workdir / f"custom{suffix}", data)
    try:
        examples, label_list = read_custom(path, "text", label, text_b, labels, regression)
    except BertkitError:
        return
    for example in examples:
        assert isinstance(example.text_a, str) and (text_b is None or isinstance(example.text_b, str))
        if label is None:
            assert example.label is None
        elif regression:
            assert math.isfinite(example.label)
        else:
            assert 0 <= example.label < len(label_list)


SQUAD_JSON = st.one_of(
    st.fixed_dictionaries({"version": st.sampled_from(["1.1", "v2.0", 2]), "data": st.lists(st.fixed_dictionaries({
        "title": CUSTOM_VALUE,
        "paragraphs": st.lists(st.fixed_dictionaries({
            "context": st.one_of(SAFE_TEXT, JSON_VALUE),
            "qas": st.lists(st.fixed_dictionaries({
                "id": st.one_of(SAFE_TEXT, JSON_VALUE), "question": st.one_of(SAFE_TEXT, JSON_VALUE),
                "is_impossible": st.one_of(st.booleans(), JSON_VALUE),
                "answers": st.lists(st.fixed_dictionaries({"text": st.one_of(SAFE_TEXT, JSON_VALUE),
                                                           "answer_start": st.one_of(st.integers(-2, 40), JSON_VALUE)}),
                                    max_size=2)}), max_size=2)}), max_size=2)}), max_size=2)}),
    JSON_VALUE)


@fuzz(600)
@given(value=SQUAD_JSON, raw=st.one_of(st.none(), st.binary(max_size=20), st.integers(1, 5000).map(deep)))
def test_squad_reader_gives_examples_or_a_bertkit_error(workdir, value, raw):
    count("squad reader")
    data = json_text(value).encode("utf-8", "surrogatepass") if raw is None else raw if isinstance(raw, bytes) else raw.encode()
    path = write(workdir / "squad.json", data)
    try:
        examples = read_squad(path)
    except BertkitError:
        return
    for example in examples:
        assert isinstance(example.question, str) and isinstance(example.context, str)


# ---- the config loader ---------------------------------------------------------------------------------------

SIZE = st.one_of(st.integers(1, 64), st.integers(-3, 3), NUMBER, JSON_VALUE)
CONFIG_FIELDS = {
    "vocab_size": SIZE, "hidden_size": st.one_of(st.sampled_from([8, 16, 32, 768]), SIZE),
    "num_hidden_layers": st.one_of(st.integers(1, 4), SIZE), "num_attention_heads": st.one_of(st.sampled_from([1, 2, 4]), SIZE),
    "intermediate_size": st.one_of(st.none(), SIZE), "max_position_embeddings": SIZE, "type_vocab_size": SIZE,
    "pad_token_id": st.one_of(st.none(), SIZE), "num_labels": SIZE,
    "hidden_act": st.one_of(st.sampled_from(["gelu", "relu", "gelu_new", "tanh"]), JSON_VALUE),
    "hidden_dropout_prob": st.one_of(st.floats(0, 1), NUMBER, JSON_VALUE),
    "attention_probs_dropout_prob": st.one_of(st.floats(0, 1), NUMBER), "classifier_dropout": st.one_of(st.none(), NUMBER),
    "initializer_range": st.one_of(st.just(0.02), NUMBER), "layer_norm_eps": st.one_of(st.just(1e-12), NUMBER),
    "id2label": st.one_of(st.none(), st.dictionaries(st.one_of(st.sampled_from(["0", "1", "2", "01", " 1", "-1", "x"]),
                                                                SAFE_TEXT), st.one_of(SAFE_TEXT, JSON_VALUE), max_size=3),
                          JSON_VALUE),
    "label2id": JSON_VALUE, "model_type": st.one_of(st.just("bert"), JSON_VALUE),
    "position_embedding_type": st.one_of(st.just("absolute"), JSON_VALUE),
    "architectures": st.one_of(st.just(["BertModel"]), JSON_VALUE), "extra": JSON_VALUE, "": JSON_VALUE,
}


@st.composite
def config_json(draw) -> bytes:
    """A config.json: some of the fields with sane or generated values, or JSON that is not a config at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=30))
    if kind == 1:
        return json_text(draw(JSON_VALUE)).encode()
    if kind == 2:
        return ('{"vocab_size": ' + deep(draw(st.integers(1, 20_000))) + "}").encode()
    keys = draw(st.lists(st.sampled_from(sorted(CONFIG_FIELDS)), max_size=8, unique=True))
    values = {k: draw(CONFIG_FIELDS[k]) for k in keys}
    return json_text(values).encode("utf-8", "surrogatepass")


@fuzz(1000)
@given(data=config_json())
def test_config_loader_gives_a_buildable_config_or_a_bertkit_error(workdir, data):
    count("config loader")
    folder = workdir / "config"
    folder.mkdir(exist_ok=True)
    write(folder / "config.json", data)
    try:
        config = BertConfig.load(folder)
    except BertkitError:
        return
    assert config.parameter_bound() <= MAX_PARAMETERS
    assert BertConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # saves and loads back
    model = meta_model(BertForSequenceClassification, config)  # a config that loads builds (here at no memory cost)
    assert model.classifier.out_features == config.num_labels


# ---- the CLI -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_template(workdir, tokenizer) -> Path:
    """The files the generated command lines name, copied afresh for every example (commands write into them)."""
    root = workdir / "cli-template"
    root.mkdir()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, id2label={0: "0", 1: "1"})
    BertForSequenceClassification(config).save_pretrained(root / "model", tokenizer=tokenizer)
    FinetuneConfig(model_dir="encoder", task="SST-2", data_dir="SST-2").save(root / "model")  # as `finetune` leaves it
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(root / "encoder", tokenizer=tokenizer)
    (root / "badconfig").mkdir()
    (root / "badconfig" / "config.json").write_text('{"num_attention_heads": 0}')
    (root / "empty").mkdir()
    (root / "SST-2").mkdir()
    (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    (root / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nthe good\t1\nthe bad\t0\n")
    (root / "train.csv").write_text("sentence,label\ngood,pos\nbad,neg\n")
    (root / "corpus.txt").write_text("The good one.\nThe bad one.\n\nAnother doc.\n")
    (root / "lines.txt").write_bytes(b"good\n\nbad\tpair\n\xff\n")
    (root / "afile").write_text("not a folder\n")
    return root


# Values for the flags, by what the flag names: the template's paths, numbers at and past every edge, names.
PATHS = ["model", "encoder", "badconfig", "empty", "afile", "nope", "SST-2", "train.csv", "SST-2/dev.tsv",
         "corpus.txt", "lines.txt", "*.txt", "out"]
INTS = ["-1", "0", "1", "2", "3", "99999999999999999999", "1e3", "x", ""]
FLOATS = ["-1", "0", "0.5", "1", "1e-5", "nan", "inf", "-inf", "1e309", "x", ""]
VALUES = {
    "model_dir": ["model"] * 6 + PATHS, "model": PATHS + ["tiny", "mini", "huge"], "tokenizer": ["model"] * 4 + PATHS, "input": ["-"] * 6 + ["lines.txt"] * 3 + PATHS,
    "files": ["corpus.txt"] * 4 + PATHS, "inputs": ["corpus.txt"] * 4 + PATHS, "corpus": PATHS, "data_dir": PATHS, "train_file": PATHS, "eval_file": PATHS,
    "test_file": PATHS, "resume": PATHS + ["auto"], "out": PATHS + ["v", "o"], "out_dir": PATHS + ["o"],
    "prepared": PATHS, "task": ["SST-2", "sst2", "MRPC", "STS-B", "custom", "squad1",
                                                         "squad2", "bogus", ""],
    "tasks": ["SST-2", "RTE", "bogus"], "device": ["cpu", "auto", "cuda", "cuda:7", "meta", "tpu", ""],
    "threads": ["1", "2", "0", "-1", "99999999999999999999", "x", ""], "text_a": ["sentence", "text", "nope"], "text_b": ["sentence", "nope"],
    "label": ["label", "nope"], "text_field": ["text", ""], "lrs": FLOATS, "betas": FLOATS,
}
# Free text: no "/" or "..", so that a generated path stays in the example's folder.
WORD = st.text(st.characters(blacklist_characters="/.", blacklist_categories=("Cs",)), max_size=8)


def _commands() -> dict[tuple[str, ...], list]:
    """Every leaf (sub)command with its argparse actions, read from the parser itself."""
    out = {}

    def walk(parser, prefix):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in subs:
            for name, sub in action.choices.items():
                walk(sub, prefix + (name,))
        if not subs:
            out[prefix] = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]

    walk(build_parser(), ())
    return out


COMMANDS = _commands()


def _value(draw, action) -> str:
    if action.choices is not None and draw(st.integers(0, 4)):
        return str(draw(st.sampled_from(sorted(map(str, action.choices)))))
    pool = VALUES.get(action.dest) or (INTS if action.type is int else FLOATS if action.type is float else ["x", ""])
    return draw(st.one_of(st.sampled_from(pool), WORD)) if not draw(st.integers(0, 9)) else draw(st.sampled_from(pool))


def _arguments(draw, action) -> list[str]:
    """One use of an action: its flag (if any) and values of the arity it takes."""
    flag = [draw(st.sampled_from(action.option_strings))] if action.option_strings else []
    if action.nargs == 0:  # store_true, --x/--no-x
        return flag
    n = {None: 1, "?": draw(st.integers(0, 1)), "+": draw(st.integers(1, 2)), "*": draw(st.integers(0, 2))}.get(
        action.nargs, action.nargs if isinstance(action.nargs, int) else 1)
    return flag + [_value(draw, action) for _ in range(n)]


@st.composite
def argv(draw) -> list[str]:
    """A command line as a user would type it (its positionals, required flags and a few others, with values of
    the flag's kind), now and then with a token dropped, a stray one added, or --help."""
    command = draw(st.sampled_from(sorted(COMMANDS)))
    actions = COMMANDS[command]
    words = list(command) + (["-v"] if draw(st.integers(0, 9)) == 0 else [])
    optional = [a for a in actions if a.option_strings and not a.required]
    for action in [a for a in actions if a.option_strings and a.required]:
        words += _arguments(draw, action)
    for action in draw(st.lists(st.sampled_from(optional), max_size=4)) if optional else []:
        words += _arguments(draw, action)
    for action in [a for a in actions if not a.option_strings]:
        words += _arguments(draw, action)
    damage = draw(st.integers(0, 19))
    if damage == 0 and len(words) > 1:
        del words[draw(st.integers(1, len(words) - 1))]
    elif damage == 1:
        words.insert(draw(st.integers(0, len(words))), draw(st.one_of(WORD, st.sampled_from(["--", "-x", "--nope"]))))
    elif damage == 2:
        words.append("--help")
    return words


def _flag(words: list[str], flag: str) -> str | None:
    """The value argparse takes for `flag`: the one after its last use."""
    at = max((i for i, word in enumerate(words) if word == flag), default=len(words)) + 1
    return words[at] if at < len(words) else None


@fuzz(1000)
@given(words=argv(), stdin=st.one_of(file_bytes(SAFE_TEXT), file_bytes(SAFE_TEXT), file_bytes(TEXT)))
def test_cli_on_generated_argv_exits_0_or_2_or_through_argparse(workdir, cli_template, monkeypatch, words, stdin):
    """Every command line ends in exit status 0 or 2, or in argparse's SystemExit (usage error or --help):
    never a traceback. Training commands are replaced by a check of their config, so no example trains, and `serve`
    stops before it would listen for requests."""
    count("cli")
    cwd = Path(tempfile.mkdtemp(dir=workdir))
    shutil.copytree(cli_template, cwd, dirs_exist_ok=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr("bertkit.train.pretrain.pretrain", lambda config: None)
    monkeypatch.setattr("bertkit.tasks.finetune.finetune", lambda config: config.check())
    monkeypatch.setattr("bertkit.tasks.glue.glue", lambda config: {"table": ""})
    monkeypatch.setattr("bertkit.tasks.crossval.crossval", lambda config: config.check() or {"table": ""})
    monkeypatch.setattr("bertkit.tasks.suite.suite", lambda config: {"table": ""})
    monkeypatch.setattr("bertkit.tasks.ablate.ablate", lambda config: {"table": ""})
    monkeypatch.setattr("bertkit.serve.run", lambda app, sock, config: None)  # set up, then return: never serve
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(words)
        assert status in (0, 2), (status, err.getvalue())
        message = err.getvalue()
        if status == 2:
            # the error is the last line (progress bars and warnings may come before it), one line, no traceback
            *before, error, end = message.split("\n")
            assert error.startswith("bertkit: error: ") and end == "" and "Traceback" not in message, message
    except SystemExit as e:
        assert e.code in (0, 2)  # argparse: --help, or a usage error
    finally:
        torch.set_num_threads(threads)
        os.chdir(workdir)
        shutil.rmtree(cwd)


# ---- the total, and the known bugs kept out of the properties ------------------------------------------------


def test_the_suite_generated_at_least_ten_thousand_inputs():
    expected = {"tokenizer batch", "tokenizer encode", "tokenizer decode", "corpus reader", "prepare", "glue reader",
                "custom reader", "squad reader", "config loader", "cli"}
    if set(GENERATED) != expected:
        pytest.skip("run the whole file to count")
    assert sum(GENERATED.values()) >= MINIMUM_TOTAL, dict(GENERATED)


# Bugs the first runs of this suite found, each pinned by the input that showed it.


def test_evaluate_with_negative_threads_is_a_bertkit_error(cli_template):
    from bertkit.tasks.evaluation import evaluate

    threads = torch.get_num_threads()
    try:
        with pytest.raises(BertkitError):
            evaluate(cli_template / "model", data_dir=str(cli_template / "SST-2"), threads=-1)
    finally:
        torch.set_num_threads(threads)


def test_predict_on_the_meta_device_is_a_bertkit_error(cli_template):
    with pytest.raises(BertkitError):
        predict(cli_template / "model", ["good"], device="meta")


def test_serve_takes_device_auto_and_names_a_bad_device(cli_template):
    from bertkit.serve import Predictor

    assert Predictor(cli_template / "model", device="auto").device.type in ("cpu", "cuda")
    with pytest.raises(BertkitError, match="not a device to run on"):
        Predictor(cli_template / "model", device="nonsense")


def test_prepare_into_a_file_is_a_bertkit_error(cli_template, tokenizer, tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(BertkitError):
        prepare([str(cli_template / "corpus.txt")], tokenizer, tmp_path / "out", progress=False)


def test_an_error_echoing_a_line_break_still_prints_on_one_line(capsys):
    assert main(["glue", "--lrs", "1\n2"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_squad_file_nested_too_deep_is_a_bertkit_error(tmp_path):
    (tmp_path / "deep.json").write_text(deep(100_000))
    with pytest.raises(BertkitError):
        read_squad(tmp_path / "deep.json")


def test_squad_file_with_a_huge_integer_is_a_bertkit_error(tmp_path):
    (tmp_path / "big.json").write_text('{"version": "1.1", "data": ' + "9" * 5000 + "}")
    with pytest.raises(BertkitError):
        read_squad(tmp_path / "big.json")
