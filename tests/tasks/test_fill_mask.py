"""`bertkit predict` on a pretraining folder fills in [MASK]: the tokens and probabilities of transformers' fill-mask
pipeline on the same folder, several masks at once, and the lines and settings it refuses or answers with an error."""

import json

import pytest

from bertkit.cli import main
from bertkit.errors import BertkitError
from bertkit.model import BertForMaskedLM, BertForPreTraining
from bertkit.tasks.evaluation import predict
from tiny_folders import save_tiny

TEXTS = ["the movie was [MASK] and very fun", "what did the company [MASK] ?", "[MASK] film , [MASK] profit ."]


@pytest.fixture(scope="module", params=[BertForPreTraining, BertForMaskedLM], ids=lambda c: c.__name__)
def pretrained(request, tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("fill-mask"), cls=request.param)


def test_the_tokens_and_probabilities_are_transformers_fill_mask_pipelines(pretrained):
    transformers = pytest.importorskip("transformers")
    fill = transformers.pipeline("fill-mask", model=pretrained, top_k=4, device="cpu")
    ours = predict(pretrained, TEXTS, top_k=4, threads=1, device="cpu")
    for text, mine in zip(TEXTS, ours):
        theirs = fill(text)
        theirs = theirs if isinstance(theirs[0], list) else [theirs]  # one list per mask
        assert len(mine["masks"]) == len(theirs) == text.count("[MASK]")
        for my_mask, their_mask in zip(mine["masks"], theirs):
            assert [c["token"] for c in my_mask] == [fill.tokenizer.convert_ids_to_tokens(t["token"])
                                                     for t in their_mask]
            assert [c["probability"] for c in my_mask] == pytest.approx([t["score"] for t in their_mask], abs=1e-5)
        if len(theirs) == 1:  # the pipeline's sequence is the text with its one mask filled by the first token,
            # spaces before punctuation taken out (bertkit's decode keeps them: decode(encode(x)) is x normalised)
            assert fill.tokenizer.clean_up_tokenization(mine["filled"]) == theirs[0][0]["sequence"]


def test_each_mask_is_filled_with_its_first_token_and_errors_name_the_line(pretrained, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("the [MASK] was good\nno mask at all\n\nit was [MASK] [MASK] .\n")
    assert main(["predict", pretrained, str(source), "--top-k", "2", "--threads", "1"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(r["masks"] or []) for r in results] == [1, 0, 0, 2]
    assert all(len(m) == 2 for r in results if r["masks"] for m in r["masks"])
    first = results[3]["masks"]
    words = ["it", "was", first[0][0]["token"], first[1][0]["token"], "."]  # special tokens are not written out
    assert results[3]["filled"] == " ".join(w for w in words if not w.startswith("[")).replace(" ##", "")
    assert results[1]["error"].startswith("no [MASK] to fill within --max-length")
    assert results[2] == {"text": "", "masks": None, "filled": None, "error": "blank line: no text to fill"}
    # a mask past --max-length is not there to fill
    cut = predict(pretrained, ["the movie was good and the film was [MASK]"], max_length=6, threads=1)[0]
    assert cut["masks"] is None and "within --max-length 6" in cut["error"]


def test_pairs_are_filled_too(pretrained):
    (result,) = predict(pretrained, ["the movie [MASK] good\tit was [MASK] fun"], threads=1)
    assert result["pair"] == "it was [MASK] fun" and len(result["masks"]) == 2


@pytest.mark.parametrize("setting, error", [
    ({"top_k": 0}, "--top-k 0; expected a whole number of tokens from 1"),
    ({"top_k": 10**6}, "--top-k 1000000; expected a whole number of tokens from 1"),
])
def test_bad_settings_are_refused(pretrained, setting, error):
    with pytest.raises(BertkitError, match=error.replace("[", "\\[")):
        predict(pretrained, ["the [MASK] was good"], threads=1, **setting)


def test_a_table_and_a_left_to_right_model_are_refused(pretrained, tmp_path):
    table = tmp_path / "in.csv"
    table.write_text("sentence\nthe [MASK] was good\n")
    with pytest.raises(BertkitError, match="a table; .* fills in \\[MASK\\]: expected text"):
        predict(pretrained, table, threads=1)
    causal = save_tiny(tmp_path / "causal", cls=BertForMaskedLM)
    path = tmp_path / "causal" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"is_decoder": True}))
    with pytest.raises(BertkitError, match="is_decoder .*; filling in \\[MASK\\] needs a bidirectional"):
        predict(causal, ["the [MASK] was good"], threads=1)
