"""`bertkit embed`: sentence embeddings and per-layer features equal what transformers computes from the same
checkpoint (sentence-transformers' mean pooling for all-MiniLM-L6-v2; the hidden states Google's
extract_features.py writes), in line order, with the errors a user meets."""

import json

import numpy as np
import pytest
import torch

from bertkit.cli import main as cli_main
from bertkit.errors import BertkitError
from bertkit.quantize import has_vnni
from bertkit.tasks.embed import EmbedConfig, embed
from conftest import data_path
from tiny_folders import save_tiny


def sst2_sentences(count: int) -> list[str]:
    lines = data_path("glue", "SST-2", "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0] for line in lines[:count]]


def reference(model_dir, texts, pairs=None):
    """transformers' hidden states (L + 1, N, T, H), its attention mask and input ids, one batch padded."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, pairs, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return torch.stack(out.hidden_states), batch["attention_mask"], batch["input_ids"]


def test_mean_pooled_normalized_embeddings_are_sentence_transformers(minilm_dir, tmp_path):
    """all-MiniLM-L6-v2 as sentence-transformers reads it (its modules.json: mean pooling over the attention mask,
    then Normalize): the same vectors for 64 real sentences of every length, row i for line i."""
    texts = sst2_sentences(64)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    assert cli_main(["embed", str(minilm_dir), str(tmp_path / "in.txt"), "--normalize", "--out", str(out),
                     "--batch-size", "8"]) == 0
    ours = np.load(out)
    states, mask, _ = reference(minilm_dir, texts)
    theirs = (states[-1] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    theirs = torch.nn.functional.normalize(theirs, dim=-1).numpy()
    assert ours.shape == (64, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_embeddings_equal_sentence_transformers_encode(minilm_dir):
    """The library itself on the same folder (its default module list for a plain BERT folder: the encoder, then
    mean pooling), normalized by it and by --normalize; 200 real sentences in one call each."""
    st = pytest.importorskip("sentence_transformers")
    texts = sst2_sentences(200)
    theirs = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, batch_size=32,
                                                                             normalize_embeddings=True)
    ours = embed(EmbedConfig(model_dir=str(minilm_dir), normalize=True), inputs=texts)
    np.testing.assert_allclose(np.stack([r["embedding"].numpy() for r in ours]), theirs, atol=2e-5)


@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_layers_cls_and_tokens_equal_transformers_hidden_states_on_pairs(minilm_dir, combine):
    texts = sst2_sentences(12)
    pairs = texts[::-1]
    states, mask, ids = reference(minilm_dir, texts, pairs)
    chosen = [states[i] for i in (-1, -2, -3, -4)]
    theirs = torch.cat(chosen, -1) if combine == "concat" else torch.stack(chosen).sum(0)
    lines = [f"{a}\t{b}" for a, b in zip(texts, pairs)]
    config = dict(model_dir=str(minilm_dir), layers=[-1, -2, -3, -4], combine=combine, max_length=128)
    tokens = embed(EmbedConfig(**config, pool="tokens"), inputs=lines)
    cls = embed(EmbedConfig(**config, pool="cls"), inputs=lines)
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(minilm_dir)
    for i, (t, c) in enumerate(zip(tokens, cls)):
        n = int(mask[i].sum())
        assert t["line"] == i + 1 and t["pair"] == pairs[i]
        assert t["tokens"] == vocab.convert_ids_to_tokens(ids[i, :n].tolist())
        torch.testing.assert_close(t["vectors"], theirs[i, :n], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(c["embedding"], theirs[i, 0], atol=1e-4, rtol=1e-4)
        assert t["vectors"].shape[1] == (4 * 384 if combine == "concat" else 384)


def test_any_model_folder_gives_its_encoders_vectors_and_json_lines_name_each_line(tmp_path, capsys):
    """A fine-tuned classifier's folder: its encoder (the head unused); JSON lines on standard output, in order;
    layer 0 is the embeddings' output."""
    from bertkit import BertModel

    model_dir = save_tiny(tmp_path / "clf")
    lines = ["the movie was good", "bad", "what a great and very fun film it was"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    assert cli_main(["embed", model_dir, str(tmp_path / "in.txt"), "--layers", "0", "--pool", "cls"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["line"], r["text"]) for r in records] == list(zip([1, 2, 3], lines))
    encoder = BertModel.from_pretrained(model_dir).eval()
    from bertkit import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    for r, text in zip(records, lines):
        batch = tokenizer.encode_batch([text], return_tensors="pt")
        with torch.no_grad():
            first = encoder(batch["input_ids"], batch["token_type_ids"], output_hidden_states=True).hidden_states[0]
        np.testing.assert_allclose(r["embedding"], first[0, 0].numpy(), atol=1e-5)


def test_long_lines_are_cut_and_counted(minilm_dir, caplog):
    lines = ["short", "word " * 300]
    records = embed(EmbedConfig(model_dir=str(minilm_dir), max_length=16, pool="tokens"), inputs=lines)
    assert len(records[1]["tokens"]) == 16 and records[1]["tokens"][-1] == "[SEP]"
    assert "1 of 2 lines are longer than --max-length 16 tokens and were cut to it (the first: line 2)" in caplog.text


@pytest.mark.parametrize("args, message", [
    (["--pool", "tokens", "--out", "x.npy"], "with --pool tokens (a vector per token: expected a .jsonl file)"),
    (["--layers", "x"], "--layers x: expected whole numbers such as -1 -2 -3 -4"),
    (["--layers", "-8"], "--layers -8: the model has 6 blocks; expected -7 to 6"),
    (["--batch-size", "0"], "--batch-size 0 (expected a positive number)"),
    (["--max-length", "600"], "--max-length 600; expected at most the model's 512 positions"),
])
def test_settings_that_cannot_run_are_named(minilm_dir, tmp_path, args, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("a text\n")
    assert cli_main(["embed", str(minilm_dir), "in.txt", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_a_blank_line_or_a_mix_of_pairs_is_named_before_the_model_runs(minilm_dir):
    with pytest.raises(BertkitError, match=r"<input>:2: a blank line \(2 in all\); expected a text on every line"):
        embed(EmbedConfig(model_dir=str(minilm_dir)), inputs=["one", "", "three", " "])
    with pytest.raises(BertkitError, match="<input>:2: mixes single texts and text<TAB>pair lines"):
        embed(EmbedConfig(model_dir=str(minilm_dir)), inputs=["one", "two\tpair"])


def test_int8_vectors_stay_close_to_float32s(minilm_dir):
    texts = sst2_sentences(64)
    fp32 = embed(EmbedConfig(model_dir=str(minilm_dir), normalize=True, device="cpu"), inputs=texts)
    int8 = embed(EmbedConfig(model_dir=str(minilm_dir), normalize=True, device="cpu", int8=True), inputs=texts)
    cosine = [float(a["embedding"] @ b["embedding"]) for a, b in zip(fp32, int8, strict=True)]
    # close (with VNNI, 8-bit inputs: 0.969 at worst on all 872; AVX2 alone, 7-bit inputs: 0.932 on these 64), and
    # quantized indeed
    assert min(cosine) > (0.96 if has_vnni() else 0.92) and max(cosine) < 0.99999


def test_long_inputs_are_embedded_and_written_chunk_by_chunk_as_in_one_piece(minilm_dir, tmp_path, monkeypatch):
    """Chunks of 3 lines (4,096 in use): the .npy rows and the JSON lines are those of one chunk, in line order,
    and a line cut in a later chunk is counted in the one warning."""
    from bertkit.tasks import embed as module

    texts = sst2_sentences(10)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    whole = np.stack([r["embedding"].numpy() for r in embed(EmbedConfig(model_dir=str(minilm_dir)), inputs=texts)])
    monkeypatch.setattr(module, "CHUNK", 3)
    assert cli_main(["embed", str(minilm_dir), str(tmp_path / "in.txt"), "--out", str(tmp_path / "v.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), whole, atol=1e-6)
    assert cli_main(["embed", str(minilm_dir), str(tmp_path / "in.txt"), "--out", str(tmp_path / "v.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["line"] for r in lines] == list(range(1, 11))
    np.testing.assert_allclose(np.array([r["embedding"] for r in lines]), whole, atol=2e-6)


@pytest.mark.parametrize("rows, shown", [(4095, False), (4096, True)])
def test_inference_shows_a_progress_bar_for_long_work_only(tmp_path, capsys, rows, shown):
    """`infer` (predict, evaluate, scoring an epoch) draws a bar on standard error from 4,096 rows on: SQuAD's dev
    set or a big predict file, not a served batch or a GLUE dev set."""
    from bertkit import BertForSequenceClassification
    from bertkit.tasks.inference import infer

    model = BertForSequenceClassification.from_pretrained(save_tiny(tmp_path / "clf"))
    logits = infer(model, [{"input_ids": [2, 40, 3], "token_type_ids": [0, 0, 0]}] * rows, 512, 0,
                   torch.device("cpu"), ("logits",))["logits"]
    assert logits.shape == (rows, 2)
    assert ("inference" in capsys.readouterr().err) == shown


def test_a_file_is_read_a_chunk_at_a_time_and_a_stream_as_a_file(minilm_dir, tmp_path, monkeypatch, capsys):
    """The input is read once to check it and count its lines, then a chunk at a time as the vectors are made (3
    lines a chunk here): never whole. Standard input is copied to a temporary file first, the same vectors; a bad
    line late in it is an error before anything is written."""
    import io
    import types

    from bertkit.tasks import embed as module

    texts = sst2_sentences(10)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    monkeypatch.setattr(module, "CHUNK", 3)
    read, seen = [], []
    examples_of = module.input_examples

    def counted(inputs, source):
        examples = examples_of(inputs, source)
        def again():
            read.append(0)
            for example in examples():
                read[-1] += 1
                yield example
        return again

    embed_rows = module.embed_rows
    monkeypatch.setattr(module, "input_examples", counted)
    monkeypatch.setattr(module, "embed_rows", lambda model, rows, *a: seen.append(read[-1]) or embed_rows(model, rows, *a))
    assert cli_main(["embed", str(minilm_dir), str(tmp_path / "in.txt"), "--out", str(tmp_path / "file.npy")]) == 0
    assert read == [10, 10] and seen == [3, 6, 9, 10]  # the check's pass, then each chunk read as it is embedded
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO((tmp_path / "in.txt").read_bytes())))
    assert cli_main(["embed", str(minilm_dir), "--out", str(tmp_path / "stdin.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "stdin.npy"), np.load(tmp_path / "file.npy"))
    bad = "\n".join(texts[:8]).encode() + b"\ncaf\xe9\n"
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(bad)))
    capsys.readouterr()
    assert cli_main(["embed", str(minilm_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "<stdin>:9: not UTF-8 text (byte 4 of the line); expected UTF-8" in err
