"""prepare(): shards that round-trip to the tokenizer's output, held-out split, incremental and crash-safe runs."""

import gzip
import json
import pickle
from collections import Counter

import numpy as np
import pytest

from bertkit.data import prepare as prepare_module
from bertkit.data.corpus import FileReader
from bertkit.data.prepare import prepare
from bertkit.data.shards import MANIFEST, PreparedCorpus, token_dtype, tokenizer_fingerprint
from bertkit.errors import BertkitError
from bertkit.tokenizer import Tokenizer
from conftest import data_path


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(data_path("checkpoints", "all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def documents():
    """The first 200 documents of the Python docs corpus."""
    reader = FileReader(data_path("corpus", "python-docs-3.11.txt"))
    out = []
    for document in reader:
        out.append(document)
        if len(out) == 200:
            return out


def write_bert(path, documents):
    path.write_text("\n\n".join("\n".join(d) for d in documents) + "\n", encoding="utf-8")
    return path


def encoded(tokenizer, documents):
    """Each document as one tuple of token ids, the way prepare should store it."""
    out = []
    for document in documents:
        ids = [e.ids for e in tokenizer.backend.encode_batch(document, add_special_tokens=False)]
        out.append(tuple(i for sentence in ids for i in sentence))
    return out


def stored(corpus):
    """Each stored document as one tuple of token ids."""
    return [tuple(np.concatenate(corpus.document(d)).tolist()) for d in range(corpus.num_documents)]


def test_round_trip_shards_heldout_and_manifest(tmp_path, tokenizer, documents):
    source = write_bert(tmp_path / "a.txt", documents[:200])
    out = tmp_path / "out"
    summary = prepare([str(source)], tokenizer, out, shard_tokens=5000, heldout_fraction=0.1, progress=False)
    train, heldout = PreparedCorpus(out), PreparedCorpus(out, "heldout")
    expected = encoded(tokenizer, documents[:200])
    assert Counter(stored(train) + stored(heldout)) == Counter(expected)
    assert not set(stored(train)) & set(stored(heldout))  # disjoint by document
    assert 5 <= heldout.num_documents <= 40
    assert summary.documents == 200 and summary.heldout_documents == heldout.num_documents
    assert summary.tokens == train.num_tokens + heldout.num_tokens == sum(map(len, expected))
    assert summary.sentences == sum(map(len, documents[:200]))
    assert len(train.shards) > 5 and train.dtype == np.uint16
    for shard in train.shards:  # plain .npy files, memory-mappable with numpy alone
        tokens = np.load(out / "train" / f"{shard['name']}.tokens.npy", mmap_mode="r")
        assert isinstance(tokens, np.memmap) and tokens.shape == (shard["tokens"],)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["vocab_size"] == 30522 and manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    record = manifest["files"][str(source.resolve())]
    assert record["complete"] and record["size"] == source.stat().st_size and record["documents"] == 200
    assert set(record["shards"]) == {f"train/{s['name']}" for s in train.shards} | {"heldout/00000"}


def test_index_arrays_and_token_view_across_shards(tmp_path, tokenizer, documents):
    out = tmp_path / "out"
    prepare([str(write_bert(tmp_path / "a.txt", documents[:100]))], tokenizer, out, shard_tokens=3000,
            heldout_fraction=0, progress=False)
    corpus = PreparedCorpus(out)
    whole = np.concatenate([corpus.shard_arrays(i)[0] for i in range(len(corpus.shards))])
    assert len(corpus.tokens) == len(whole) == corpus.num_tokens
    boundary = int(corpus.shard_token_starts[1])
    np.testing.assert_array_equal(corpus.tokens[boundary - 7 : boundary + 5], whole[boundary - 7 : boundary + 5])
    np.testing.assert_array_equal(corpus.tokens[:], whole)
    assert corpus.tokens[boundary] == whole[boundary] and corpus.tokens[-1] == whole[-1]
    assert len(corpus.sentence_offsets) == corpus.num_sentences + 1 and corpus.sentence_offsets[-1] == corpus.num_tokens
    np.testing.assert_array_equal(corpus.sentence_ends - corpus.sentence_starts, corpus.sentence_lengths)
    ranges = corpus.document_sentence_ranges
    assert ranges.shape == (100, 2) and ranges[0, 0] == 0 and ranges[-1, 1] == corpus.num_sentences
    np.testing.assert_array_equal(ranges[1:, 0], ranges[:-1, 1])
    assert len(pickle.dumps(corpus)) < 20_000  # DataLoader workers reopen the memory maps, not copy them


def test_heldout_split_independent_of_file_order(tmp_path, tokenizer, documents):
    a = write_bert(tmp_path / "a.txt", documents[:100])
    b = write_bert(tmp_path / "b.txt", documents[100:200])
    prepare([str(a), str(b)], tokenizer, tmp_path / "ab", heldout_fraction=0.1, progress=False)
    prepare([str(b), str(a)], tokenizer, tmp_path / "ba", heldout_fraction=0.1, progress=False)
    assert set(stored(PreparedCorpus(tmp_path / "ab", "heldout"))) == set(stored(PreparedCorpus(tmp_path / "ba", "heldout")))


def test_incremental_run_tokenizes_only_new_files(tmp_path, tokenizer, documents):
    a = write_bert(tmp_path / "a.txt", documents[:100])
    b = write_bert(tmp_path / "b.txt", documents[100:150])
    out = tmp_path / "out"
    prepare([str(a)], tokenizer, out, shard_tokens=4000, progress=False)
    first_shards = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "train").iterdir()}
    summary = prepare([str(tmp_path / "*.txt")], tokenizer, out, shard_tokens=4000, progress=False)
    assert summary.files_already_prepared == [str(a.resolve())] and summary.files_prepared == [str(b.resolve())]
    assert summary.documents == 50
    for name, (content, mtime) in first_shards.items():  # finished shards are not redone
        path = out / "train" / name
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime
    corpus, heldout = PreparedCorpus(out), PreparedCorpus(out, "heldout")
    assert Counter(stored(corpus) + stored(heldout)) == Counter(encoded(tokenizer, documents[:150]))
    again = prepare([str(a), str(b)], tokenizer, out, progress=False)
    assert again.tokens == 0 and len(again.files_already_prepared) == 2


def test_a_file_named_twice_is_prepared_once(tmp_path, tokenizer, documents, monkeypatch):
    """A relative and an absolute path, or a link, to one file: its documents once, not twice in training."""
    a = write_bert(tmp_path / "a.txt", documents[:30])
    (tmp_path / "link.txt").symlink_to(a)
    monkeypatch.chdir(tmp_path)
    summary = prepare(["a.txt", str(a), "link.txt"], tokenizer, tmp_path / "out", heldout_fraction=0, progress=False)
    assert summary.documents == 30 and summary.files_prepared == [str(a.resolve())]
    assert Counter(stored(PreparedCorpus(tmp_path / "out"))) == Counter(encoded(tokenizer, documents[:30]))


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_in", ["flush", "save_manifest"])
def test_crash_then_rerun_gives_the_clean_result(tmp_path, tokenizer, documents, monkeypatch, crash_in):
    a = write_bert(tmp_path / "a.txt", documents[:60])
    b = write_bert(tmp_path / "b.txt", documents[60:120])
    prepare([str(a), str(b)], tokenizer, tmp_path / "clean", shard_tokens=2000, heldout_fraction=0.05, progress=False)

    original = getattr(prepare_module._Preparer, crash_in)
    calls = []

    def crashing(self, *args):
        calls.append(1)
        if len(calls) == 6:  # mid-run: in "save_manifest", after shard files were renamed into place
            raise Crash()
        return original(self, *args)

    monkeypatch.setattr(prepare_module._Preparer, crash_in, crashing)
    out = tmp_path / "out"
    with pytest.raises(Crash):
        prepare([str(a), str(b)], tokenizer, out, shard_tokens=2000, heldout_fraction=0.05, progress=False)
    monkeypatch.undo()
    (out / "train" / "00001.tokens.npy.tmp").write_bytes(b"half a shard")  # as a crash inside np.save would leave
    crashed = PreparedCorpus(out)
    assert len(crashed.shards) == 5  # five train shards were listed before the crash
    # Crashing in save_manifest leaves shard 00005 renamed into place but unlisted: it must not be read.
    assert (out / "train" / "00005.tokens.npy").exists() == (crash_in == "save_manifest")
    assert crashed.num_tokens == sum(len(t) for t in stored(crashed))  # only complete, listed shards are read
    assert not all(f["complete"] for f in crashed.manifest["files"].values())

    prepare([str(a), str(b)], tokenizer, out, shard_tokens=2000, heldout_fraction=0.05, progress=False)
    for split in ("train", "heldout"):
        assert Counter(stored(PreparedCorpus(out, split))) == Counter(stored(PreparedCorpus(tmp_path / "clean", split)))


def test_a_full_disk_names_the_shard_and_the_rerun_resumes(tmp_path, tokenizer, documents, monkeypatch):
    """A disk filling up while a shard was written ended in numpy's traceback ("OSError: 31177 requested and 1984
    written"): it is a one-line error naming the shard, and prepare run again once there is room finishes the job."""
    a = write_bert(tmp_path / "a.txt", documents[:60])
    prepare([str(a)], tokenizer, tmp_path / "clean", shard_tokens=2000, progress=False)
    save, calls = np.save, []

    def full(file, array, *args, **kwargs):  # np.save cut short, as numpy's tofile reports it
        calls.append(1)
        if len(calls) == 7:  # the third shard's tokens
            file.write(b"\x93NUMPY half a shard")
            raise OSError(f"{array.nbytes} requested and 1984 written")
        return save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", full)
    out = tmp_path / "out"
    with pytest.raises(BertkitError, match=r"train/00002.tokens.npy: cannot write it \(OSError: \d+ requested and "
                                           r"1984 written\); [\d.]+ GiB free on its filesystem; expected room for it"):
        prepare([str(a)], tokenizer, out, shard_tokens=2000, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "train").iterdir() if "00002" in p.name) == []  # no temporary left
    prepare([str(a)], tokenizer, out, shard_tokens=2000, progress=False)
    assert Counter(stored(PreparedCorpus(out))) == Counter(stored(PreparedCorpus(tmp_path / "clean")))


def test_a_waiting_document_holds_its_own_tokens_not_its_whole_batch(tmp_path, tokenizer, documents, monkeypatch):
    """A document waits in its split's buffer until a shard fills; the held-out split fills late (1% of the corpus),
    so its documents wait for most of the run. Each kept a view of the whole tokenized batch it came from, so
    prepare's memory grew with the corpus (on short documents, nearly the corpus's tokens): it keeps its own."""
    flush, kept = prepare_module._Preparer.flush, {}

    def measuring(self, split):
        arrays = self.buffers[split].tokens
        owners = {id(a if a.base is None else a.base): (a if a.base is None else a.base).nbytes for a in arrays}
        kept[split] = (sum(a.nbytes for a in arrays), sum(owners.values()))
        return flush(self, split)

    monkeypatch.setattr(prepare_module._Preparer, "flush", measuring)
    short = [document[:3] for document in documents]  # short documents: a few held out of one batch
    prepare([str(write_bert(tmp_path / "a.txt", short))], tokenizer, tmp_path / "out", shard_tokens=10**9,
            heldout_fraction=0.02, progress=False)
    own, held = kept["heldout"]  # bytes
    assert own > 0 and held == own  # it was 83 times as much: the whole batch


def test_a_file_is_finished_only_in_the_layout_and_text_field_it_was_started_in(tmp_path, tokenizer, documents,
                                                                                   monkeypatch):
    """A run resumes a file by the index of its documents: another --format (as the 'read as one document per line'
    warning suggests) read it otherwise and, as its documents were fewer, skipped them all and marked it complete."""
    a = write_bert(tmp_path / "a.txt", documents[:100])
    original, calls = prepare_module._Preparer.flush, []

    def crashing(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise Crash()
        return original(self, *args)

    monkeypatch.setattr(prepare_module._Preparer, "flush", crashing)
    out = tmp_path / "out"
    with pytest.raises(Crash):
        prepare([str(a)], tokenizer, out, fmt="docs", shard_tokens=2000, heldout_fraction=0, progress=False)
    monkeypatch.undo()
    with pytest.raises(BertkitError, match=r"a\.txt: prepared into .* read with --format docs, now --format bert; "
                                           r"expected the same reading of the file \(--format docs\), or a new output"):
        prepare([str(a)], tokenizer, out, fmt="bert", shard_tokens=2000, heldout_fraction=0, progress=False)
    prepare([str(a)], tokenizer, out, shard_tokens=2000, heldout_fraction=0, fmt="docs", progress=False)  # finishes
    with pytest.raises(BertkitError, match="read with --format docs, now --format bert"):  # finished: not kept silently
        prepare([str(a)], tokenizer, out, fmt="bert", progress=False, heldout_fraction=0)
    assert prepare([str(a)], tokenizer, out, progress=False, heldout_fraction=0).files_already_prepared  # auto: as read

    j = tmp_path / "b.jsonl"
    j.write_text("".join(json.dumps({"text": " ".join(d), "body": d[0]}) + "\n" for d in documents[:5]))
    prepare([str(j)], tokenizer, tmp_path / "j", progress=False)
    with pytest.raises(BertkitError, match=r"read with --format jsonl --text-field text, now --format jsonl "
                                           r"--text-field body"):
        prepare([str(j)], tokenizer, tmp_path / "j", fmt="jsonl", text_field="body", progress=False)


def test_changed_tokenizer_settings_or_file_refused(tmp_path, tokenizer, documents):
    a = write_bert(tmp_path / "a.txt", documents[:20])
    out = tmp_path / "out"
    prepare([str(a)], tokenizer, out, progress=False)
    cased = Tokenizer.from_vocab(data_path("checkpoints", "all-MiniLM-L6-v2", "vocab.txt"), lowercase=False)
    with pytest.raises(BertkitError, match="manifest.json: prepared with a different tokenizer"):
        prepare([str(a)], cased, out, progress=False)
    with pytest.raises(BertkitError, match="held-out settings"):
        prepare([str(a)], tokenizer, out, heldout_fraction=0.5, progress=False)
    with open(a, "a", encoding="utf-8") as f:
        f.write("\nOne more document.\n")
    with pytest.raises(BertkitError, match=r"a\.txt: changed since it was prepared"):
        prepare([str(a)], tokenizer, out, progress=False)


def test_bad_input_refused_before_anything_is_written(tmp_path, tokenizer, documents):
    good = write_bert(tmp_path / "good.txt", documents[:20])
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(BertkitError, match=r"weights\.bin: binary data"):
        prepare([str(good), str(tmp_path / "weights.bin")], tokenizer, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / MANIFEST).exists()
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(BertkitError, match="no documents in 1 file"):
        prepare([str(tmp_path / "empty.txt")], tokenizer, tmp_path / "out2", progress=False)
    with pytest.raises(BertkitError, match="seed=-1; expected a whole number from 0"):  # found by the fuzz suite
        prepare([str(good)], tokenizer, tmp_path / "out3", seed=-1, progress=False)
    assert not (tmp_path / "out3").exists()


def test_an_output_folder_inside_an_input_folder_is_refused(tmp_path, tokenizer, documents):
    """An input folder is read whole: a re-run (to add files) read the shards written into it and stopped on them as
    'binary data', or, for the manifest, as JSON lines."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_bert(corpus / "a.txt", documents[:20])
    for out in (corpus / "prepared", corpus):
        with pytest.raises(BertkitError, match=f"--out {out} is (inside )?the input folder {corpus}: the run would "
                                               "write into its own input; expected an output folder outside it"):
            prepare([str(corpus)], tokenizer, out, progress=False)
    assert sorted(p.name for p in corpus.iterdir()) == ["a.txt"]
    prepare([str(corpus / "a.txt")], tokenizer, corpus / "prepared", progress=False)  # a file is read alone


def test_mixed_formats_skips_and_the_report(tmp_path, tokenizer, documents):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with gzip.open(corpus / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for document in documents[:30]:
            f.write(json.dumps({"text": " ".join(document)}) + "\n")
        f.write("{broken\n")
    (corpus / "b.txt").write_bytes(b"A sentence.\nA bad \xff one.\n\nAnother document.\n")
    summary = prepare([str(corpus)], tokenizer, tmp_path / "out", progress=True)
    assert summary.skips.counts == {"bad JSON": 1, "invalid UTF-8": 1}
    assert summary.documents == 32
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["skips"]["counts"] == {"bad JSON": 1, "invalid UTF-8": 1}
    assert [f["format"] for f in manifest["files"].values()] == ["jsonl", "bert"]
    report = str(summary)  # what `bertkit prepare` prints
    assert "tokens/s" in report and f"{summary.tokens:,} tokens" in report and "bad JSON 1" in report
    assert "from 2 file(s)" in report and "0 file(s) already prepared" in report


def test_modified_shard_detected(tmp_path, tokenizer, documents):
    out = tmp_path / "out"
    prepare([str(write_bert(tmp_path / "a.txt", documents[:20]))], tokenizer, out, heldout_fraction=0, progress=False)
    np.save(out / "train" / "00000.tokens.npy", np.zeros(5, np.uint16))
    with pytest.raises(BertkitError, match=r"00000\.tokens\.npy: uint16\[5\]; expected uint16\["):
        PreparedCorpus(out).tokens[0:3]


def test_token_dtype_by_vocab_size():
    assert token_dtype(30522) == np.uint16 and token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
