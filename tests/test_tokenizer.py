"""WordPiece tokenizer: parity with transformers' BertTokenizerFast, hard inputs, vocab training, save/load."""

import csv
import gzip
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import data_path

from bertkit.errors import BertkitError
from bertkit.tokenizer import SPECIAL_TOKENS, Tokenizer, tokenizer_threads, train_vocab

transformers = pytest.importorskip("transformers")

TRAIN_LINES = 8000  # the first lines of the Python docs train the vocab; every later line is held out
TRAIN_VOCAB_SIZE = 4000

HARD_CASES = [
    "café naïve Ångström résumé façade Zürich",
    "combining e\u0301 accent and precomposed é",
    "中文字符 and 日本語 mixed with 한국어",
    "中文字符日本語한국어",
    "emoji 😀👍🏽 and ❤️ hearts 🇫🇷",
    "null\x00byte",
    "tab\tseparated\tvalues",
    "zero\u200bwidth\u200bjoin",
    "replacement \ufffd char",
    "control \x07 bell \x1b escape \x7f delete",
    "line\nbreak\r\nwindows\rmac",
    "\u00a0non-breaking\u2009thin\u3000ideographic space",
    "a" * 100,
    "a" * 101,
    "b" * 300 + " short words after",
    "x" + "é" * 100,  # 101 characters before accent stripping
    "",
    " ",
    "\t\n  \u3000",
    "\x00",
    "Ελληνικά Русский текст العربية עברית हिन्दी ไทย",
    "mixedCase CamelCase ALLCAPS lower",
    "punctuation!?.,;:()[]{}<>\"'`~@#$%^&*-_=+\\|/",
    "numbers 3.14159 1,000,000 2nd 10%",
    "ﬁ ligature ① ｆｕｌｌｗｉｄｔｈ ½",
    "don't won't it's",
    "e-mail someone@example.com http://example.com/a_b?c=d",
    "the [MASK] token and [CLS] [SEP] literal [PAD] [UNK]",
    "lowercase [mask] is not special, nor is [ MASK ]",
]


def hf_tokenizer(vocab_file: Path, lowercase: bool = True):
    """transformers' BertTokenizerFast on a vocab.txt, checked to have really read it."""
    major = int(transformers.__version__.split(".")[0])
    # transformers 5 takes the file as `vocab=` and silently ignores `vocab_file=` (it builds a 5-token vocab).
    key = "vocab" if major >= 5 else "vocab_file"
    reference = transformers.BertTokenizerFast(**{key: str(vocab_file)}, do_lower_case=lowercase)
    assert reference.vocab_size == len(vocab_file.read_text(encoding="utf-8").splitlines())
    return reference


def read_tsv(path: Path, columns: tuple[int, ...], rows: int) -> list[tuple[str, ...]]:
    """The given columns of a GLUE-style TSV after its header; checks the row count so a misread cannot pass."""
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: MRPC starts with a byte-order mark
        table = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    assert len(table) == rows, f"{path}: {len(table)} rows"
    return [tuple(row[c] for c in columns) for row in table]


def as_lists(encoding) -> dict[str, list]:
    """A transformers BatchEncoding as our plain dict of the three BERT inputs."""
    return {key: encoding[key] for key in ("input_ids", "token_type_ids", "attention_mask")}


def assert_same_encodings(ours: list[dict], reference, inputs: list) -> None:
    """Compare one encoding per input with a batched transformers result, naming the first input that differs."""
    reference = [dict(zip(("input_ids", "token_type_ids", "attention_mask"), row)) for row in zip(
        reference["input_ids"], reference["token_type_ids"], reference["attention_mask"]
    )]
    assert len(ours) == len(reference) == len(inputs)
    for mine, theirs, text in zip(ours, reference, inputs):
        assert mine == theirs, f"differs on {text!r}"


@pytest.fixture(scope="module")
def minilm_vocab() -> Path:
    return data_path("checkpoints", "all-MiniLM-L6-v2", "vocab.txt")


@pytest.fixture(scope="module")
def uncased(minilm_vocab: Path) -> tuple[Tokenizer, object]:
    """Ours and transformers' tokenizer on the all-MiniLM-L6-v2 vocab.txt (uncased)."""
    return Tokenizer.from_vocab(minilm_vocab), hf_tokenizer(minilm_vocab)


@pytest.fixture(scope="module")
def glue() -> dict[str, list]:
    """Every sentence of the GLUE dev sets present, as single texts and as pairs."""
    sst2 = [s for (s,) in read_tsv(data_path("glue", "SST-2", "dev.tsv"), (0,), 872)]
    rte = read_tsv(data_path("glue", "RTE", "dev.tsv"), (1, 2), 277)
    mrpc = read_tsv(data_path("glue", "MRPC", "msr_paraphrase_test.txt"), (3, 4), 1725)
    pairs = rte + mrpc
    return {"singles": sst2 + [s for pair in pairs for s in pair], "pairs": pairs}


@pytest.fixture(scope="module")
def corpus_lines() -> list[str]:
    return data_path("corpus", "python-docs-3.11.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_lines: list[str]) -> tuple[Tokenizer, Path]:
    """An uncased vocab trained (from a .gz file) on the first TRAIN_LINES lines of the Python docs."""
    out = tmp_path_factory.mktemp("uncased")
    train_file = out / "train.txt.gz"
    with gzip.open(train_file, "wt", encoding="utf-8") as f:
        f.write("\n".join(corpus_lines[:TRAIN_LINES]) + "\n")
    return train_vocab([train_file], out / "vocab", vocab_size=TRAIN_VOCAB_SIZE, show_progress=False), out / "vocab"


@pytest.fixture(scope="module")
def cased(tmp_path_factory, corpus_lines: list[str]) -> tuple[Tokenizer, object, Path]:
    """A cased vocab (with the hard cases' characters in its alphabet) and transformers' tokenizer on it."""
    out = tmp_path_factory.mktemp("cased")
    train_file = out / "train.txt"
    train_file.write_text("\n".join(corpus_lines[:3000] + HARD_CASES * 2) + "\n", encoding="utf-8")
    ours = train_vocab([train_file], out / "vocab", vocab_size=2000, lowercase=False, show_progress=False)
    return ours, hf_tokenizer(out / "vocab" / "vocab.txt", lowercase=False), out / "vocab"


def test_glue_single_sentences_match_transformers(uncased, glue):
    ours, reference = uncased
    texts = glue["singles"]
    assert_same_encodings([ours.encode(t) for t in texts], reference(texts), texts)


@pytest.mark.parametrize("max_length", [None, 32, 128])
def test_glue_pairs_match_transformers(uncased, glue, max_length):
    ours, reference = uncased
    pairs = glue["pairs"]
    first, second = [a for a, _ in pairs], [b for _, b in pairs]
    mine = [ours.encode(a, b, max_length=max_length) for a, b in pairs]
    truncation = {} if max_length is None else {"truncation": "longest_first", "max_length": max_length}
    assert_same_encodings(mine, reference(first, second, **truncation), pairs)
    if max_length is not None:  # the cut really happened, or this case tests nothing
        assert sum(len(m["input_ids"]) == max_length for m in mine) > 10


def test_glue_padded_batches_match_transformers(uncased, glue):
    ours, reference = uncased
    pairs = glue["pairs"]
    for start in range(0, len(pairs), 64):
        first, second = zip(*pairs[start : start + 64])
        mine = ours.encode_batch(list(first), list(second), max_length=128, return_tensors="pt")
        theirs = reference(list(first), list(second), padding=True, truncation=True, max_length=128, return_tensors="pt")
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            assert torch.equal(mine[key], theirs[key]), (key, start)
    assert (mine["attention_mask"] == 0).any()  # padding was exercised
    singles = ours.encode_batch(glue["singles"][:50])
    assert singles == as_lists(reference(glue["singles"][:50], padding=True))


def test_hard_cases_match_transformers_uncased(uncased):
    ours, reference = uncased
    assert_same_encodings([ours.encode(t) for t in HARD_CASES], reference(HARD_CASES), HARD_CASES)
    pairs = list(itertools.pairwise(HARD_CASES))
    mine = [ours.encode(a, b, max_length=20) for a, b in pairs]
    first, second = zip(*pairs)
    assert_same_encodings(mine, reference(list(first), list(second), truncation=True, max_length=20), pairs)


def test_hard_cases_match_transformers_cased(cased):
    ours, reference, _ = cased
    assert_same_encodings([ours.encode(t) for t in HARD_CASES], reference(HARD_CASES), HARD_CASES)
    pairs = list(itertools.pairwise(HARD_CASES))
    first, second = zip(*pairs)
    assert_same_encodings([ours.encode(a, b) for a, b in pairs], reference(list(first), list(second)), pairs)


def test_uncased_normalises_as_bert(uncased):
    ours, _ = uncased
    assert ours.tokenize("Café NAÏVE") == ["cafe", "naive"]
    assert ours.tokenize("日本語") == ["日", "本", "語"]  # CJK: one character per token
    assert ours.tokenize("zero\u200bwidth\x00") == ours.tokenize("zerowidth")  # format/control characters dropped
    assert ours.tokenize("a" * 101) == ["[UNK]"] and ours.tokenize("a" * 100) != ["[UNK]"]
    assert ours.tokenize("the [MASK] is") == ["the", "[MASK]", "is"]
    for blank in ("", " ", "\t\n\u3000"):
        assert ours.encode(blank) == {"input_ids": [ours.cls_id, ours.sep_id], "token_type_ids": [0, 0], "attention_mask": [1, 1]}


def test_cased_keeps_case_and_accents(cased):
    ours, _, _ = cased
    assert not ours.lowercase
    assert "".join(ours.tokenize("Zürich Café")).replace("##", "") == "ZürichCafé"


def test_trained_vocab_layout(trained):
    tokenizer, out = trained
    assert tokenizer.vocab()[:5] == list(SPECIAL_TOKENS)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (0, 1, 2, 3, 4)
    assert tokenizer.vocab_size == TRAIN_VOCAB_SIZE and tokenizer.lowercase
    assert any(token.startswith("##") for token in tokenizer.vocab())
    assert (out / "vocab.txt").read_text(encoding="utf-8").splitlines() == tokenizer.vocab()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is True and config["tokenizer_class"] == "BertTokenizer"


def test_train_vocab_reads_gzip_like_plain_text(tmp_path, corpus_lines):
    """Same text, plain or gzipped, gives the same vocab.txt (small enough that the trainer's ties do not bite)."""
    text = "\n".join(corpus_lines[:1000]) + "\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    plain = train_vocab([tmp_path / "a.txt"], tmp_path / "plain", vocab_size=300, show_progress=False)
    gz = train_vocab([tmp_path / "a.txt.gz"], tmp_path / "gz", vocab_size=300, show_progress=False)
    assert plain.vocab() == gz.vocab()


def test_train_vocab_on_json_lines_learns_their_text_as_on_the_same_plain_text(tmp_path, corpus_lines):
    """The vocabulary trainer read JSON lines raw: it learned "text", "{" and "u00" and never saw a character
    json.dumps escaped. It now reads them as prepare does: the text field only."""
    lines = corpus_lines[:1000] + ["Café naïve résumé, \"quoted\" 中文 \\ back\tslash."] * 20
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    documents = "\n".join(lines).split("\n\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    plain, jsonl = (train_vocab([tmp_path / name], tmp_path / name.replace(".", "-"), vocab_size=400,
                                lowercase=False, show_progress=False) for name in ("a.txt", "a.jsonl"))
    assert jsonl.vocab() == plain.vocab() and {"é", "中"} <= set(plain.vocab())


def test_vocab_train_cli_takes_the_format_and_text_field_of_prepare(tmp_path):
    from bertkit.cli import main

    lines = ["One sentence here.", "Another one there."]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "a.data").write_text("".join(json.dumps({"id": 1, "body": s}) + "\n" for s in lines))
    assert main(["vocab", "train", str(tmp_path / "a.txt"), "--out", str(tmp_path / "plain")]) == 0
    assert main(["vocab", "train", str(tmp_path / "a.data"), "--out", str(tmp_path / "jsonl"), "--format", "jsonl",
                 "--text-field", "body"]) == 0
    plain, jsonl = (Tokenizer.from_pretrained(tmp_path / name) for name in ("plain", "jsonl"))
    assert jsonl.vocab() == plain.vocab()


def test_vocab_train_cli_prints_only_its_result_when_its_output_is_a_file(tmp_path):
    import subprocess
    import sys

    (tmp_path / "a.txt").write_text("One sentence here.\nAnother one there.\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "bertkit.cli", "vocab", "train", str(tmp_path / "a.txt"), "--out",
                           str(tmp_path / "v"), "--vocab-size", "100"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    size = Tokenizer.from_pretrained(tmp_path / "v").vocab_size
    assert done.stdout == f"wrote {tmp_path / 'v'}/vocab.txt and tokenizer.json: {size} tokens, uncased\n"


def test_a_full_disk_while_writing_a_vocabulary_names_the_file_and_leaves_no_cut_one(tmp_path, monkeypatch):
    """`vocab train` on a full disk ended in an OSError's traceback and left a cut vocab.txt, which `prepare` and
    `pretrain --tokenizer` then read as a smaller vocabulary without a word."""
    import pathlib

    (tmp_path / "a.txt").write_text("One sentence here.\nAnother one there.\n" * 20, encoding="utf-8")
    write_text = pathlib.Path.write_text

    def full(self, text, *args, **kwargs):
        if "vocab.txt" in self.name:  # half of it fits
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(BertkitError, match=r"vocab.txt: cannot write it \(.*No space left.*GiB free on its "
                                           "filesystem; expected room for it"):
        train_vocab([tmp_path / "a.txt"], tmp_path / "v", vocab_size=100, show_progress=False)
    assert list((tmp_path / "v").iterdir()) == []


def test_train_vocab_skips_an_invalid_utf8_line_with_a_warning_as_prepare_does(tmp_path, corpus_lines, caplog):
    text = "\n".join(corpus_lines[:1000]) + "\n"
    (tmp_path / "good.txt").write_text(text, encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(text.encode() + "a latin-1 café\n".encode("latin-1"))
    good = train_vocab([tmp_path / "good.txt"], tmp_path / "good", vocab_size=300, show_progress=False)
    bad = train_vocab([tmp_path / "bad.txt"], tmp_path / "bad", vocab_size=300, show_progress=False)
    assert bad.vocab() == good.vocab()
    assert [r.getMessage() for r in caplog.records] == [
        f"vocabulary training skipped 1: invalid UTF-8 1 (first at {tmp_path / 'bad.txt'}:1001)"
    ]


def test_train_vocab_knows_gzip_by_its_magic_number_not_its_name(tmp_path, corpus_lines):
    text = "\n".join(corpus_lines[:1000]) + "\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(gzip.compress(text.encode()))
    plain = train_vocab([tmp_path / "a.txt"], tmp_path / "plain", vocab_size=300, show_progress=False)
    gz = train_vocab([tmp_path / "b.txt"], tmp_path / "gz", vocab_size=300, show_progress=False)
    assert plain.vocab() == gz.vocab()


def test_train_vocab_breaks_ties_at_the_alphabet_limit_the_same_way_every_time(tmp_path):
    """26 letters equally frequent, 10 allowed: the trainer alone kept 10 in hash-map order, a different 10 from run
    to run (the Python and Linux docs gave three different vocabularies in three runs); train_vocab keeps the most
    frequent, ties by character, so "z" (the most frequent) and then a to i."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = [" ".join(letters[(i + k) % 26] * 3 for k in range(5)) for i in range(26 * 8)] + ["zzz " * 40]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocabs = [train_vocab([tmp_path / "a.txt"], tmp_path / str(i), vocab_size=60, limit_alphabet=10,
                          show_progress=False).vocab() for i in range(4)]
    assert all(v == vocabs[0] for v in vocabs)
    single = {t for t in vocabs[0] if len(t) == 1}
    assert single == set("zabcdefghi"), sorted(single)


def test_held_out_lines_round_trip(trained, corpus_lines):
    """decode(encode(x)) equals normalised x: the BERT normaliser's output (clean text, CJK spaced, lowercased,
    accents stripped), split by the BERT pre-tokenizer (whitespace, then each punctuation character alone) and
    the pieces joined by single spaces. WordPiece keeps no record of the spacing around punctuation, so that is
    the most decode can give back. Lines with a character outside the trained alphabet encode to [UNK] and
    cannot round-trip; they are counted apart and must stay rare."""
    tokenizer, out = trained
    # transformers' own normaliser and pre-tokenizer define "normalised", independent of our backend.
    reference = hf_tokenizer(out / "vocab.txt").backend_tokenizer
    held_out = [line for line in corpus_lines[TRAIN_LINES:] if line.strip()]
    encoded = tokenizer.encode_batch(held_out, padding=False)["input_ids"]
    failures, unk_lines = [], 0
    for line, ids in zip(held_out, encoded):
        if tokenizer.unk_id in ids:
            unk_lines += 1
            continue
        pieces = reference.pre_tokenizer.pre_tokenize_str(reference.normalizer.normalize_str(line))
        if tokenizer.decode(ids) != " ".join(piece for piece, _ in pieces):
            failures.append(line)
    print(f"held-out lines: {len(held_out)}, with [UNK]: {unk_lines}, round-trip failures: {len(failures)}")
    assert not failures, failures[:5]
    assert unk_lines < 0.01 * len(held_out)


def test_decode_keeps_or_skips_special_tokens(uncased):
    ours, _ = uncased
    ids = ours.encode("Hello, World!", "it's here")["input_ids"]
    assert ours.decode(ids) == "hello , world ! it ' s here"
    assert ours.decode(ids, skip_special_tokens=False) == "[CLS] hello , world ! [SEP] it ' s here [SEP]"
    assert ours.decode(torch.tensor(ids)) == ours.decode(ids)
    assert ours.decode(__import__("numpy").array(ids)) == ours.decode(ids)


@pytest.mark.parametrize("ids, expected", [
    ([2, 7.7, 3], "decode got 7.7; expected integer token ids"),
    (torch.tensor([2.0, 7.0, 3.0]), "decode got a 1-D float32 tensor; expected one sequence of integer token ids"),
    (torch.tensor([[2, 7, 3]]), "decode got a 2-D int64 tensor"),
    ([[2, 7, 3]], r"decode got \[2, 7, 3\]; expected integer token ids"),
    ([True, False], "decode got True"),
])
def test_decode_refuses_what_is_not_a_sequence_of_integer_ids(letters, ids, expected):
    """A float was cut to an int (7.7 decoded as the token of id 7), a batch was a TypeError from int()."""
    with pytest.raises(BertkitError, match=expected):
        letters.decode(ids)


def test_save_pretrained_round_trip(trained, tmp_path, corpus_lines):
    tokenizer, _ = trained
    tokenizer.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"
    ]
    sample = corpus_lines[TRAIN_LINES : TRAIN_LINES + 300] + HARD_CASES
    expected = [tokenizer.encode(t) for t in sample]
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.vocab() == tokenizer.vocab() and loaded.lowercase
    assert [loaded.encode(t) for t in sample] == expected
    theirs = transformers.BertTokenizerFast.from_pretrained(tmp_path)
    assert theirs.do_lower_case and theirs.model_max_length == 512
    assert_same_encodings(expected, theirs(sample), sample)
    (tmp_path / "tokenizer.json").unlink()  # vocab.txt path of from_pretrained
    assert [Tokenizer.from_pretrained(tmp_path).encode(t) for t in sample] == expected


def test_save_pretrained_cased_round_trip(cased, tmp_path):
    tokenizer, _, _ = cased
    tokenizer.save_pretrained(tmp_path)
    theirs = transformers.BertTokenizerFast.from_pretrained(tmp_path)
    assert not theirs.do_lower_case
    assert_same_encodings([tokenizer.encode(t) for t in HARD_CASES], theirs(HARD_CASES), HARD_CASES)
    (tmp_path / "tokenizer.json").unlink()  # do_lower_case must now come from tokenizer_config.json
    assert not Tokenizer.from_pretrained(tmp_path).lowercase


@pytest.mark.parametrize("setting", [{"strip_accents": False}, {"tokenize_chinese_chars": False},
                                     {"do_lower_case": False, "strip_accents": True}], ids=str)
def test_normalizer_settings_match_transformers_both_ways(minilm_vocab, tmp_path, setting):
    """strip_accents and tokenize_chinese_chars, like do_lower_case, are read from tokenizer_config.json (which
    transformers applies over tokenizer.json), with or without tokenizer.json, and written back."""
    texts = ["Café naïve 北京 résumé", "Ünïcödé ÀÉÎ 中文字 日本語"]
    theirs = transformers.BertTokenizerFast.from_pretrained(minilm_vocab.parent, **setting)
    theirs.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_bytes(minilm_vocab.read_bytes())  # transformers 5 writes none
    ours = Tokenizer.from_pretrained(tmp_path / "hf")
    assert_same_encodings([ours.encode(t) for t in texts], theirs(texts), texts)
    ours.save_pretrained(tmp_path / "ours")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert_same_encodings([ours.encode(t) for t in texts], again(texts), texts)
    (tmp_path / "hf" / "tokenizer.json").unlink()  # vocab.txt + tokenizer_config.json alone
    alone = Tokenizer.from_pretrained(tmp_path / "hf")
    assert_same_encodings([alone.encode(t) for t in texts], theirs(texts), texts)


@pytest.mark.parametrize("layout", ["added_tokens_decoder", "added_tokens.json"])
def test_a_slow_tokenizer_folder_keeps_its_added_tokens_as_transformers_does(minilm_vocab, tmp_path, layout):
    """A folder that transformers' slow BertTokenizer saved (no tokenizer.json) keeps the tokens added over vocab.txt
    in tokenizer_config.json's added_tokens_decoder or, before transformers 4.34, in added_tokens.json: a special
    [E1], a new word, and a vocab.txt entry made special, each encoded as one token at its id."""
    (tmp_path / "vocab.txt").write_bytes(minilm_vocab.read_bytes())
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
    if layout == "added_tokens_decoder":
        def token(content, special):
            return {"content": content, "lstrip": False, "normalized": not special, "rstrip": False,
                    "single_word": False, "special": special}
        config["added_tokens_decoder"] = {"0": token("[PAD]", True), "1": token("[unused0]", True),
                                          "30522": token("[E1]", True), "30523": token("newword", False)}
    else:
        (tmp_path / "added_tokens.json").write_text(json.dumps({"[E1]": 30522, "newword": 30523}))
        # listed in both files, as transformers 4 wrote them; [unused0] is in vocab.txt, so not in added_tokens.json
        config["additional_special_tokens"] = ["[E1]", "[unused0]"]
        (tmp_path / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": ["[E1]", "[unused0]"]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    text = "a NewWord [E1] [unused0] newword"
    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = transformers.BertTokenizerFast.from_pretrained(tmp_path)
    assert ours.vocab_size == len(theirs) == 30524
    assert ours.encode(text) == as_lists(theirs(text))
    assert ours.encode("[E1] newword [unused0]")["input_ids"] == [101, 30522, 30523, 1, 102]
    assert ours.decode(ours.encode(text)["input_ids"]) == theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True)


def test_added_special_tokens_stay_special_for_transformers_after_a_round_trip(minilm_vocab, tmp_path):
    """Special tokens added in transformers ([E1], [E2]) are still special tokens to transformers once bertkit has
    saved the tokenizer: get_special_tokens_mask (which keeps DataCollatorForLanguageModeling from masking them)
    flags them, from tokenizer.json and from vocab.txt + tokenizer_config.json alone."""
    theirs = transformers.BertTokenizerFast.from_pretrained(minilm_vocab.parent)
    theirs.add_special_tokens({"additional_special_tokens": ["[E1]", "[E2]"]})
    theirs.save_pretrained(tmp_path / "hf")
    Tokenizer.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "ours")
    text = "the [E1] cat [E2] sat"
    expected = theirs(text)["input_ids"]
    assert theirs.get_special_tokens_mask(expected, already_has_special_tokens=True) == [1, 0, 1, 0, 1, 0, 1]
    for alone in (False, True):
        if alone:
            (tmp_path / "ours" / "tokenizer.json").unlink()
        again = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
        ids = again(text)["input_ids"]
        assert ids == expected == Tokenizer.from_pretrained(tmp_path / "ours").encode(text)["input_ids"]
        assert again.get_special_tokens_mask(ids, already_has_special_tokens=True) == [1, 0, 1, 0, 1, 0, 1]


def test_a_saved_folder_keeps_its_added_tokens_without_tokenizer_json(minilm_vocab, tmp_path):
    """A token added over the vocabulary (not special) is still an added token, matched inside words, when the folder
    bertkit saved is read from vocab.txt + tokenizer_config.json alone: by bertkit, transformers' BertTokenizer and
    its slow BertTokenizerLegacy (transformers 5), which all ignore or lack tokenizer.json."""
    theirs = transformers.BertTokenizerFast.from_pretrained(minilm_vocab.parent)
    theirs.add_tokens(["newword"])
    theirs.add_special_tokens({"additional_special_tokens": ["[E1]"]})
    theirs.save_pretrained(tmp_path / "hf")
    Tokenizer.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "ours")
    (tmp_path / "ours" / "tokenizer.json").unlink()
    text = "xnewwordy NewWord [E1] newword"
    expected = theirs(text)["input_ids"]
    assert expected == [101, 1060, 30522, 1061, 30522, 30523, 30522, 102]  # x newword y newword [E1] newword
    assert Tokenizer.from_pretrained(tmp_path / "ours").encode(text)["input_ids"] == expected
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")(text)["input_ids"] == expected
    slow = getattr(transformers, "BertTokenizerLegacy", None)
    if slow is not None:
        assert slow.from_pretrained(tmp_path / "ours")(text)["input_ids"] == expected


def test_do_lower_case_is_read_over_a_normalizer_that_is_not_berts(uncased, tmp_path):
    """A tokenizer.json with another normalizer (here NFC) is left as it is, and tokenizer_config.json's
    do_lower_case still says whether the folder is cased, and is written back."""
    uncased[0].save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved | {"normalizer": {"type": "NFC"}}))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"do_lower_case": False}))
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert not tokenizer.lowercase and tokenizer.backend.normalizer.__class__.__name__ == "NFC"
    tokenizer.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["do_lower_case"] is False


def test_a_tokenizer_json_without_a_post_processor_still_encodes_cls_and_sep(uncased, tmp_path):
    """A WordPiece tokenizer trained with the tokenizers library alone saves "post_processor": null; encode still lays
    out [CLS] A [SEP] B [SEP] with segment ids 0/1, as transformers' BertTokenizer does on the same folder."""
    uncased[0].save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved | {"post_processor": None}))
    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for args in (("The cat sat.",), ("The cat sat.", "It was tired.")):
        assert ours.encode(*args) == uncased[0].encode(*args) == as_lists(theirs(*args))


def test_from_pretrained_ignores_saved_padding(minilm_vocab, uncased):
    # all-MiniLM-L6-v2's tokenizer.json pads and truncates everything to 128.
    loaded = Tokenizer.from_pretrained(minilm_vocab.parent)
    assert loaded.encode("hello world") == uncased[0].encode("hello world")
    assert len(loaded.encode("word " * 200)["input_ids"]) == 202


def test_bad_vocab_files_raise(tmp_path):
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(BertkitError, match=str(missing)):
        Tokenizer.from_vocab(missing)
    no_mask = tmp_path / "no_mask.txt"
    no_mask.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", encoding="utf-8")
    with pytest.raises(BertkitError, match=r"no_mask\.txt.*\[MASK\]"):
        Tokenizer.from_vocab(no_mask)
    repeated = tmp_path / "repeated.txt"
    repeated.write_text("\n".join([*SPECIAL_TOKENS, "a", "b", "a"]) + "\n", encoding="utf-8")
    with pytest.raises(BertkitError, match=r"repeated\.txt:8"):
        Tokenizer.from_vocab(repeated)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("\n".join([*SPECIAL_TOKENS, "café"]).encode("latin-1"))
    with pytest.raises(BertkitError, match=r"latin1\.txt"):
        Tokenizer.from_vocab(latin1)
    with pytest.raises(BertkitError, match=str(tmp_path)):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(BertkitError, match=r"missing\.txt"):
        train_vocab([tmp_path / "missing.txt"], tmp_path / "out", show_progress=False)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"text\x00\x01\x02\n")
    with pytest.raises(BertkitError, match=r"binary\.txt: binary data"):
        train_vocab([binary], tmp_path / "out", show_progress=False)


def test_bad_arguments_raise(uncased):
    ours, _ = uncased
    with pytest.raises(BertkitError, match="max_length"):
        ours.encode("a", "b", max_length=2)
    with pytest.raises(BertkitError, match="pairs"):
        ours.encode_batch(["a", "b"], ["c"])
    with pytest.raises(BertkitError, match="id"):
        ours.decode([ours.vocab_size])


# ---- text that is not clean text; vocabularies that cannot be trained ----


@pytest.fixture(scope="module")
def letters(tmp_path_factory) -> Tokenizer:
    """A tokenizer on a written vocabulary of the special tokens and the letters: needs no data."""
    path = tmp_path_factory.mktemp("letters") / "vocab.txt"
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    path.write_text("\n".join([*SPECIAL_TOKENS, *letters, *("##" + c for c in letters), "hello"]) + "\n")
    return Tokenizer.from_vocab(path)


def test_lone_surrogates_are_replaced_by_u_fffd_and_dropped_like_bert_does(letters):
    """No UTF-8 text holds a lone surrogate, but a Python str can (surrogateescape, JSON "\\ud800"): the backend
    refuses such a str with a TypeError; encode replaces each by U+FFFD, which BERT's normalizer drops."""
    clean = letters.encode("hello", "ab")
    assert letters.encode("hel\ud800lo", "a\udc80b") == clean
    assert letters.encode_batch(["hel\udfffl\ud800o", "a"], ["ab", "\ud83d"])["input_ids"][0] == clean["input_ids"]
    assert letters.tokenize("hello\udc00") == ["hello"]
    assert letters.encode("\ud83d\ude00")["input_ids"] == [letters.cls_id, letters.unk_id, letters.sep_id]  # a pair is its emoji


def test_encode_batch_reads_an_iterator_of_texts_once(letters):
    """The rows were read again to clean a lone surrogate or name a non-str: from a generator, an empty batch came
    back."""
    assert letters.encode_batch(t for t in ["hello", "a\ud800b"]) == letters.encode_batch(["hello", "ab"])
    expected = letters.encode_batch(["hello", "ab"], ["a", "b"])
    assert letters.encode_batch((t for t in ["hello", "a\ud800b"]), iter(["a", "b"])) == expected
    with pytest.raises(BertkitError, match=r"texts\[1\] has type int"):
        letters.encode_batch(t for t in ["hello", 5])


def test_pairs_given_as_rows_of_texts_are_encoded_and_truncated_as_pairs(letters):
    """transformers takes a batch of pairs as (text, pair) rows too, and so does the backend; with max_length=2 their
    truncation was skipped (no room for three specials) and the rows came back whole, where pairs= is refused."""
    texts, pairs = ["hello", "abcab"], ["ab", "a"]
    for max_length in (None, 4):
        expected = letters.encode_batch(texts, pairs, max_length=max_length)
        assert letters.encode_batch(list(zip(texts, pairs)), max_length=max_length) == expected
        assert letters.encode_batch([list(row) for row in zip(texts, pairs)], max_length=max_length) == expected
    with pytest.raises(BertkitError, match="max_length=2 leaves no room; expected at least 3"):
        letters.encode_batch([("hello", "ab")], max_length=2)
    assert letters.encode_batch([("hel\ud800lo", "ab")]) == letters.encode_batch(["hello"], ["ab"])
    with pytest.raises(BertkitError, match=r"texts\[0\]\[1\] has type int"):
        letters.encode_batch([("hello", 5)])


def test_control_characters_are_dropped_by_the_normalizer(letters):
    assert letters.encode("hel\x00l\x01o\x7f\x1b") == letters.encode("hello")
    assert letters.encode("\x00\x01\x02")["input_ids"] == [letters.cls_id, letters.sep_id]


@pytest.mark.parametrize("call, expected", [
    (lambda t: t.encode(None), "text has type NoneType; expected a str"),
    (lambda t: t.encode(b"hello"), "text has type bytes; expected a str"),
    (lambda t: t.encode("a", 5), "pair has type int; expected a str"),
    (lambda t: t.encode_batch(["a", 5]), r"texts\[1\] has type int; expected a str"),
    (lambda t: t.encode_batch(["a"], [None]), r"pairs\[0\] has type NoneType"),
    (lambda t: t.encode_batch("hello"), "encode_batch got a str; expected a list of texts"),
    (lambda t: t.encode("a", max_length=10**40), "max_length=.*; expected a whole number of tokens"),
    (lambda t: t.encode("a", max_length="8"), "max_length='8'"),
    (lambda t: t.tokenize(3.5), "text has type float"),
])
def test_a_text_that_is_not_a_str_is_a_bertkit_error_not_a_type_error(letters, call, expected):
    with pytest.raises(BertkitError, match=expected):
        call(letters)


def test_vocab_train_on_an_empty_corpus_fails_clearly_and_writes_nothing(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n")
    with pytest.raises(BertkitError, match=r"blank.txt: no line with text; expected a corpus of text"):
        train_vocab([blank], tmp_path / "out", show_progress=False)
    control = tmp_path / "control.txt"
    control.write_text("\u200b\u2060\n\x7f\n")  # format and control characters (NUL would be refused as binary)
    with pytest.raises(BertkitError, match=r"control.txt: no character left after normalisation"):
        train_vocab([control], tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("vocab_size", [0, -5, 3, 5, 10**30, True, 2.5])
def test_vocab_train_with_an_impossible_vocabulary_size_fails_before_training(tmp_path, vocab_size):
    text = tmp_path / "text.txt"
    text.write_text("hello world\n")
    with pytest.raises(BertkitError, match=r"vocab_size is .*; expected a whole number from 6 to 1,048,576"):
        train_vocab([text], tmp_path / "out", vocab_size=vocab_size, show_progress=False)


def test_vocab_train_with_a_vocabulary_smaller_than_its_alphabet_fails_naming_the_size_needed(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 3)
    with pytest.raises(BertkitError, match=r"vocab_size 10 is too small: .* already make 50; expected a vocab_size "
                                           r"of at least that, or a smaller limit_alphabet"):
        train_vocab([text], tmp_path / "out", vocab_size=10, show_progress=False)
    assert not (tmp_path / "out").exists()
    assert train_vocab([text], tmp_path / "out", vocab_size=50, show_progress=False).vocab_size == 50


def test_vocab_train_cli_fails_in_one_line_with_exit_status_2(tmp_path, capsys):
    from bertkit.cli import main

    (tmp_path / "empty.txt").write_text("")
    assert main(["vocab", "train", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "v")]) == 2
    text = tmp_path / "text.txt"
    text.write_text("hello\n")
    assert main(["vocab", "train", str(text), "--out", str(tmp_path / "v"), "--vocab-size", "-1"]) == 2
    text.write_text("hello\n")
    (tmp_path / "file").write_text("")
    assert main(["vocab", "train", str(text), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("bertkit: error: ") for line in err)
    assert "vocab_size is -1" in err[1] and "file: a file, not a folder" in err[2]


def test_two_demo_vocabularies_are_identical(tmp_path):
    """The no-argument demo's vocabulary (8,000 tokens on the Python docs) is the same on every run: the WordPiece
    trainer's hash-map order once changed a few dozen tokens near the cut-off from run to run."""
    corpus = data_path("corpus", "python-docs-3.11.txt")
    first = train_vocab([corpus], tmp_path / "a", vocab_size=8000, show_progress=False)
    train_vocab([corpus], tmp_path / "b", vocab_size=8000, show_progress=False)
    assert first.vocab_size == 8000
    assert (tmp_path / "a" / "vocab.txt").read_bytes() == (tmp_path / "b" / "vocab.txt").read_bytes()


def test_a_new_vocabulary_never_replaces_a_models_own(tmp_path, corpus_lines):
    """`vocab train --out MODEL_DIR` wrote over the model's vocab.txt and tokenizer.json without a word: its
    embedding rows then answered to another vocabulary's ids."""
    (tmp_path / "a.txt").write_text("\n".join(corpus_lines[:200]) + "\n", encoding="utf-8")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "vocab.txt").write_text("mine\n")
    with pytest.raises(BertkitError, match=r"model: holds a model \(config.json\), whose embeddings belong to its "
                                           "own vocabulary; expected a folder of its own"):
        train_vocab([tmp_path / "a.txt"], model, vocab_size=300, show_progress=False)
    assert (model / "vocab.txt").read_text() == "mine\n" and not (model / "tokenizer.json").exists()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts threads through /proc")
def test_threads_bounds_the_tokenizers_thread_pool(tmp_path):
    """`prepare` and `vocab train` had no --threads, and pretrain's bounded torch alone: tokenizing took one thread
    per core of the machine, whatever the user asked for. Each process here tokenizes a batch and counts its
    threads; a RAYON_NUM_THREADS the user set wins."""
    probe = ("import os, sys; from bertkit.tokenizer import tokenizer_threads; import tokenizers\n"
             "tokenizer_threads(int(sys.argv[1]))\n"
             "tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({'a': 0, '[UNK]': 1}, unk_token='[UNK]'))\n"
             "tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()\n"
             "tok.encode_batch(['a a a'] * 5000)\n"
             "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('Threads')))")
    # nor TOKENIZERS_PARALLELISM: "false" (which transformers' pipelines set in their process) runs no pool at all
    env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}

    def threads(n, **extra):
        done = subprocess.run([sys.executable, "-c", probe, str(n)], env=env | extra, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout)

    assert threads(3) - threads(1) == 2
    assert threads(1, RAYON_NUM_THREADS="3") == threads(3)
    with pytest.raises(BertkitError, match=r"--threads 0: expected a whole number of threads, at least 1"):
        tokenizer_threads(0)


def test_threads_past_the_bound_of_torchs_threads_are_refused(monkeypatch):
    """--threads 100000 on `vocab train` or `prepare` was handed to the tokenizers pool, which started every
    thread: minutes of spinning instead of an error, where pretrain and finetune refuse more than 1024."""
    monkeypatch.setenv("RAYON_NUM_THREADS", "")  # so that monkeypatch puts back the value of before (or none)
    monkeypatch.delenv("RAYON_NUM_THREADS")
    with pytest.raises(BertkitError, match=r"--threads 100000: expected a whole number of threads, at least 1 and at "
                                           r"most 1024"):
        tokenizer_threads(100000)
    assert "RAYON_NUM_THREADS" not in os.environ
    tokenizer_threads(1024)  # the bound itself is allowed
    assert os.environ["RAYON_NUM_THREADS"] == "1024"
