"""`bertkit vocab extend`: a domain's most used missing tokens appended (old ids kept), their rows the mean of the
pieces they were, text they do not match run exactly as before, and the folder read by transformers as by bertkit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from bertkit import BertForPreTraining, Tokenizer
from bertkit.cli import main
from bertkit.errors import BertkitError
from bertkit.extend import VocabExtendConfig, vocab_extend
from tiny_folders import save_tiny, tiny_config, tokenizer_in, varied

DOMAIN = ("the parser reads the tokenizer output and the tokenizer writes tokens . "
          "a parser is fast . tokens and parsers and tokenizers are fun .\n") * 40


@pytest.fixture
def extended(tmp_path):
    source = save_tiny(tmp_path / "model", cls=BertForPreTraining)
    corpus = tmp_path / "domain.txt"
    corpus.write_text(DOMAIN)
    done = vocab_extend(VocabExtendConfig(model_dir=source, files=[str(corpus)], out=str(tmp_path / "out"), add=4,
                                          domain_vocab_size=120, min_frequency=2))
    return source, tmp_path / "out", done, corpus


def test_the_most_used_missing_tokens_are_appended_and_old_ids_kept(extended):
    source, out, done, _ = extended
    old, new = Tokenizer.from_pretrained(source).vocab(), Tokenizer.from_pretrained(out).vocab()
    tokens = [t for t, _ in done["tokens"]]
    assert new == old + tokens and len(tokens) == done["added"] == 4
    assert not set(tokens) & set(old)
    counts = [n for _, n in done["tokens"]]
    assert counts == sorted(counts, reverse=True) and counts[0] >= 40
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(new) and config["vocab_extension"]["added"] == 4
    assert config["vocab_extension"]["from"] == len(old)


def test_new_rows_are_the_mean_of_the_pieces_they_were(extended):
    source, out, done, _ = extended
    before, after = load_file(f"{source}/model.safetensors"), load_file(f"{out}/model.safetensors")
    tokenizer = Tokenizer.from_pretrained(source)
    for key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias"):
        assert torch.equal(after[key][:tokenizer.vocab_size], before[key])
        for i, (token, _) in enumerate(done["tokens"]):
            pieces = tokenizer.encode(token.removeprefix("##"))["input_ids"][1:-1]
            torch.testing.assert_close(after[key][tokenizer.vocab_size + i], before[key][pieces].mean(0))


def test_text_the_new_tokens_do_not_match_runs_as_before_and_domain_text_is_shorter(extended):
    source, out, _, corpus = extended
    old_model, new_model = (BertForPreTraining.from_pretrained(d).eval() for d in (source, out))
    old, new = Tokenizer.from_pretrained(source), Tokenizer.from_pretrained(out)
    plain = "the movie was good and the film was fun"
    assert old.encode(plain) == new.encode(plain)
    ids = torch.tensor([old.encode(plain)["input_ids"]])
    with torch.no_grad():
        a, b = old_model(ids), new_model(ids)
    torch.testing.assert_close(a.seq_relationship_logits, b.seq_relationship_logits)
    torch.testing.assert_close(a.prediction_logits, b.prediction_logits[..., :old.vocab_size])
    lines = corpus.read_text().splitlines()
    assert sum(map(len, new.tokenize(" ".join(lines)))) < sum(map(len, old.tokenize(" ".join(lines))))
    assert len(new.tokenize(lines[0])) < len(old.tokenize(lines[0]))


def test_transformers_reads_the_extended_folder_as_bertkit_does(extended):
    transformers = pytest.importorskip("transformers")
    _, out, _, corpus = extended
    theirs = transformers.BertForPreTraining.from_pretrained(out).eval()
    their_tokenizer = transformers.BertTokenizerFast.from_pretrained(out)
    ours, tokenizer = BertForPreTraining.from_pretrained(out).eval(), Tokenizer.from_pretrained(out)
    for line in corpus.read_text().splitlines()[:2]:
        assert their_tokenizer(line)["input_ids"] == tokenizer.encode(line)["input_ids"]
    ids = torch.tensor([tokenizer.encode(corpus.read_text().splitlines()[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).prediction_logits, ours(ids).prediction_logits, atol=1e-4, rtol=1e-4)


def test_a_table_padded_past_the_tokenizer_has_its_spare_rows_reused(tmp_path):
    tokenizer = tokenizer_in(tmp_path)
    source = tmp_path / "padded"
    torch.manual_seed(0)
    varied(BertForPreTraining(tiny_config(tokenizer.vocab_size + 3))).save_pretrained(source, tokenizer=tokenizer)
    corpus = tmp_path / "domain.txt"
    corpus.write_text(DOMAIN)
    done = vocab_extend(VocabExtendConfig(model_dir=str(source), files=[str(corpus)], out=str(tmp_path / "out"),
                                          add=2, domain_vocab_size=120))
    assert done["to"] == tokenizer.vocab_size + 2
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == tokenizer.vocab_size + 3


def test_an_encoder_without_heads_is_extended(tmp_path, minilm_dir):
    corpus = tmp_path / "domain.txt"
    corpus.write_text("the kubelet schedules pods; kubectl applies manifests to the kubelet.\n" * 50)
    assert main(["vocab", "extend", str(minilm_dir), str(corpus), "--out", str(tmp_path / "out"), "--add", "3",
                 "--domain-vocab-size", "200"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["vocab_size"] == 30522 + 3
    assert len(Tokenizer.from_pretrained(tmp_path / "out").tokenize("kubelet")) == 1


@pytest.mark.parametrize("setting, error", [
    ({"add": 0}, "--add 0; expected a whole number of tokens from 1"),
    ({"text": "the movie was good and fun .\n" * 30}, "no token that the model's vocabulary lacks"),
])
def test_what_cannot_be_extended_is_refused(tmp_path, setting, error):
    source = save_tiny(tmp_path / "model", cls=BertForPreTraining)
    corpus = tmp_path / "domain.txt"
    corpus.write_text(setting.pop("text", DOMAIN))
    with pytest.raises(BertkitError, match=error):
        vocab_extend(VocabExtendConfig(model_dir=source, files=[str(corpus)], out=str(tmp_path / "out"),
                                       domain_vocab_size=120, **setting))
