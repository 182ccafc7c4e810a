"""Multiple choice (SWAG): the reader, batches of (examples, choices, tokens), a run end to end (finetune,
evaluate, predict), and a transformers model choosing the same endings in bertkit."""

import json

import pytest
import torch

from bertkit.data.batching import collate, row_length
from bertkit.errors import BertkitError
from bertkit.tasks.choice import encode, parse_choice, read_choices
from bertkit.tasks.evaluation import evaluate, predict
from bertkit.tasks.finetune import FinetuneConfig, finetune
from bertkit.tokenizer import Tokenizer
from conftest import data_path

HEADER = ",video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label\n"


def test_swags_own_csv_is_read_with_its_unnamed_first_column(tmp_path):
    path = tmp_path / "val.csv"
    path.write_text(HEADER + '0,anetv_1,5,"She opens it. He","She opens it.",He,gold,"runs, fast.",sits.,eats.,'
                    "sleeps.,1\n", encoding="utf-8")
    (example,) = read_choices(path)
    assert (example.id, example.context, example.lead, example.label, example.line) == \
        ("5", "She opens it.", "He", 1, 2)
    assert example.continuations() == ["He runs, fast.", "He sits.", "He eats.", "He sleeps."]


@pytest.mark.parametrize("text, problem", [
    ("sent1,sent2,ending0,label\na,b,c,0\n", r"val.csv:1: endings ending0; expected at least two columns"),
    ("sent1,sent2,ending0,ending2,label\na,b,c,d,0\n", r"endings ending0, ending2; expected at least two columns "
                                                        r"ending0, ending1, ... numbered from 0"),
    ("sent1,sent2,ending0,ending1,label\na,b,c,d,0\na,b,c,d,2\n", r"val.csv:3: label '2'; expected the number of "
                                                                  r"the right ending, 0 to 1"),
    ("sent1,ending0,ending1,label\na,c,d,0\n", r"val.csv:1: no column 'sent2'"),
    ("sent1,sent2,ending0,ending1,label\na,b,c,d,\u00b2\n", r"val.csv:2: label '\u00b2'; expected the number"),
])
def test_a_swag_file_problem_names_its_line(tmp_path, text, problem):
    path = tmp_path / "val.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BertkitError, match=problem):
        read_choices(path)


def test_choice_rows_are_batched_as_examples_by_choices_by_tokens(toy_model_dir):
    tokenizer = Tokenizer.from_pretrained(toy_model_dir)
    lines = ['{"context": "the film", "endings": ["was good", "was very very bad", "fun"]}',
             '{"context": "it", "lead": "was", "endings": ["good", "bad", "not fun"]}']
    examples = [parse_choice(number, line, "<stdin>") for number, line in enumerate(lines, start=1)]
    rows = encode(examples, tokenizer, max_length=32, with_labels=False)
    assert [len(r["input_ids"]) for r in rows] == [3, 3] and row_length(rows[0]) == 9  # [CLS] the film [SEP] ... [SEP]
    batch = collate(rows, tokenizer.pad_id)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape == (2, 3, 9)
    assert batch["attention_mask"][0].sum(1).tolist() == [7, 9, 6]
    assert tokenizer.decode(batch["input_ids"][1, 2].tolist()) == "it was not fun"


def test_choice_lines_that_are_not_examples_are_named():
    assert parse_choice(1, '{"context": "a", "endings": ["b", "c"]}', "<stdin>").endings == ["b", "c"]
    assert parse_choice(2, " ", "<stdin>") is None  # a blank line: its output line says so
    with pytest.raises(BertkitError, match=r"<stdin>:2: expected a JSON object .*two or more string endings"):
        parse_choice(2, '{"context": "a", "endings": ["b"]}', "<stdin>")


GOOD = {"good", "great", "fun", "best", "funny", "beautiful", "wonderful", "delightful"}


def write_lexicon_choices(path, sentences, count: int) -> None:
    """SWAG-format examples from real sentences: the right ending is the one sentence of four with a word of a
    small lexicon (the others have none), its place drawn at random."""
    import csv
    import random

    rng = random.Random(0)
    marked = [s for s in sentences if GOOD & set(s.split())]
    plain = [s for s in sentences if not GOOD & set(s.split())]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sent1", "sent2", "ending0", "ending1", "ending2", "ending3", "label"])
        for _ in range(count):
            endings, label = rng.sample(plain, 3), rng.randrange(4)
            endings.insert(label, rng.choice(marked))
            writer.writerow([rng.choice(plain), "", *endings, label])


@pytest.fixture(scope="module")
def swag_run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("swag")
    lines = data_path("glue", "SST-2", "train.tsv").read_text(encoding="utf-8").splitlines()[1:4000]
    sentences = [l.split("\t")[0] for l in lines if 3 <= len(l.split("\t")[0].split()) <= 12]
    write_lexicon_choices(folder / "train.csv", sentences[:2000], 400)
    write_lexicon_choices(folder / "val.csv", sentences[2000:], 100)
    config = FinetuneConfig(model_dir=tiny_model_dir, out_dir=str(folder / "run"), task="SWAG", data_dir=str(folder),
                            lr=3e-3, batch_size=16, epochs=3, seed=0, threads=1, device="cpu")
    return config, finetune(config)


def test_a_multiple_choice_run_learns_and_is_evaluated_and_used(swag_run):
    config, record = swag_run
    assert config.task == "swag" and record["task"] == "SWAG" and record["eval_examples"] == 100
    assert record["best"]["accuracy"] > 60, record["best"]  # chance is 25
    assert evaluate(config.out_dir) == pytest.approx(record["best"])
    results = predict(config.out_dir, [json.dumps({"context": "it is", "endings": ["a dull film", "a great film"]}),
                                       "", json.dumps({"context": "x", "endings": ["a", "b", "c"]})])
    choice = results[0]["choice"]
    assert choice in (0, 1) and results[0]["ending"] == ["a dull film", "a great film"][choice]
    assert len(results[0]["probabilities"]) == 2 and sum(results[0]["probabilities"]) == pytest.approx(1, abs=1e-5)
    assert results[1]["choice"] is None and "error" in results[1] and len(results[2]["probabilities"]) == 3
    with pytest.raises(BertkitError, match="<input>: no examples; expected one .* per line"):
        predict(config.out_dir, ["", " "], source="<input>")


def test_a_transformers_multiple_choice_model_chooses_the_same_in_bertkit(tmp_path, swag_run):
    """A BertForMultipleChoice saved by transformers, scored by bertkit on a SWAG file: its probabilities are
    those transformers gives to the pairs its own SWAG example builds (sent1, sent2 + " " + ending)."""
    transformers = pytest.importorskip("transformers")
    folder = data_path("checkpoints", "all-MiniLM-L6-v2")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    torch.manual_seed(0)
    theirs = transformers.BertForMultipleChoice(config).eval()
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(folder))
    theirs.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    val = swag_run[0].data_dir + "/val.csv"
    examples = read_choices(val)[:40]
    lines = [json.dumps({"context": e.context, "lead": e.lead, "endings": e.endings}) for e in examples]
    ours = predict(tmp_path / "model", lines, threads=1)
    for e, result in zip(examples, ours):
        enc = tokenizer([e.context] * 4, [f"{e.lead} {x}".strip() for x in e.endings], padding=True,
                        return_tensors="pt")
        with torch.no_grad():
            p = torch.softmax(theirs(**{k: v[None] for k, v in enc.items()}).logits[0], -1)
        assert result["probabilities"] == pytest.approx(p.tolist(), abs=1e-5)


def test_a_pruned_run_is_scored_and_loaded_as_the_run(swag_run, tmp_path):
    from tasks.test_prune import check_pruned_run

    check_pruned_run(swag_run[0].out_dir, tmp_path)
