"""Sentence embeddings trained on pairs (`finetune --task embedding`): the losses, gradients and scores against
sentence-transformers on the same weights, the run folder it loads, runs that learn from scored pairs, pairs and
single texts, and the settings and files refused."""

import csv
import json

import numpy as np
import pytest
import torch

from bertkit.errors import BertkitError
from bertkit.model import BertForSentenceEmbedding, add_lora, set_dropout
from bertkit.tasks.evaluation import evaluate, predict
from bertkit.tasks.finetune import FinetuneConfig, finetune
from bertkit.tasks.similarity import PairExample, retrieval_scores
from conftest import data_path

GOOD, BAD = ["good", "great", "fun"], ["bad", "awful", "boring"]
NEUTRAL = "the movie film is was very and of it to".split()


def sentence(rng, words) -> str:
    out = list(rng.choice(NEUTRAL, int(rng.integers(2, 5))))
    out.insert(int(rng.integers(len(out) + 1)), str(rng.choice(words)))
    return " ".join(out)


def pairs_file(path, count: int, seed: int, scored: bool = True, negatives: bool = False) -> str:
    """Toy pairs (a, b): scored 5 when both carry a word of the same sentiment, else 0 (or, unscored, b always of
    a's sentiment, with a hard negative of the other)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["a", "b"] + ["score"] * scored + ["neg"] * negatives)
        for _ in range(count):
            mine = bool(rng.integers(2))
            same = bool(rng.integers(2)) or not scored
            words = (GOOD, BAD) if mine else (BAD, GOOD)
            row = [sentence(rng, words[0]), sentence(rng, words[0] if same else words[1])]
            out.writerow(row + [5.0 if same else 0.0] * scored + [sentence(rng, words[1])] * negatives)
    return str(path)


def sentence_transformer(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu").eval()  # no dropout, as bertkit's below


def bertkit_batch(minilm_dir, columns: list[list[str]]):
    from bertkit import Tokenizer
    from bertkit.data.batching import collate

    tokenizer = Tokenizer.from_pretrained(minilm_dir)
    rows = [{"input_ids": [tokenizer.encode_batch([t], None, max_length=128, padding=False)["input_ids"][0]
                           for t in row]} for row in zip(*columns)]
    for row in rows:
        row["token_type_ids"] = [[0] * len(ids) for ids in row["input_ids"]]
    model = set_dropout(BertForSentenceEmbedding.from_pretrained(minilm_dir), 0.0)
    return model, collate(rows, tokenizer.pad_id)


def sts_pairs(count: int):
    rows = [line.split("\t") for line in data_path("glue", "STS-B", "dev.tsv").read_text().splitlines()[1:count + 1]]
    return [r[7] for r in rows], [r[8] for r in rows], [float(r[9]) for r in rows]


@pytest.mark.parametrize("loss", ["cosent", "in-batch", "hard-negatives"])
def test_loss_and_gradients_equal_sentence_transformers(minilm_dir, loss):
    """all-MiniLM-L6-v2 on 8 STS-B pairs: bertkit's loss and the gradient of every weight against
    sentence-transformers' CoSENTLoss or MultipleNegativesRankingLoss (with a third column of hard negatives)."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MultipleNegativesRankingLoss

    a, b, scores = sts_pairs(8)
    # the in-batch losses on each text's true pair are near 0 (STS-B's pairs are alike): positives taken from other
    # pairs make a loss the comparison can see (and the true pairs are the hard negatives)
    columns = [a, b] if loss == "cosent" else [a, b[::-1]] + ([b] if loss == "hard-negatives" else [])
    st = sentence_transformer(minilm_dir)
    tokenize = getattr(st, "preprocess", st.tokenize)  # `tokenize` before sentence-transformers 6
    features = [tokenize(column) for column in columns]
    labels = torch.tensor(scores)
    criterion = CoSENTLoss(st) if loss == "cosent" else MultipleNegativesRankingLoss(st)
    expected = criterion(features, labels)
    expected.backward()

    model, batch = bertkit_batch(minilm_dir, columns)
    out = model(**batch, **({"labels": labels} if loss == "cosent" else {}))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # "0.auto_model.encoder..." (sentence-transformers 3-5) or "0.model.encoder..." (6)
    theirs = {n.split(".", 2)[2]: p.grad for n, p in st.named_parameters() if p.grad is not None}
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ours) == set(theirs) - {"pooler.dense.weight", "pooler.dense.bias"}  # the pooler: neither uses it
    for name, grad in ours.items():  # float32 sums in another order (the key's bias: zero both ways, but for noise)
        assert (grad - theirs[name]).norm() <= 1e-4 * theirs[name].norm() + 1e-6, name


def test_scores_equal_sentence_transformers_evaluator(minilm_dir, tmp_path):
    """`evaluate --task embedding` on any encoder: Spearman's and Pearson's correlations as sentence-transformers'
    EmbeddingSimilarityEvaluator computes them on the same pairs."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    a, b, scores = sts_pairs(60)
    path = tmp_path / "sts.jsonl"
    path.write_text("".join(json.dumps({"s1": x, "s2": y, "score": s}) + "\n" for x, y, s in zip(a, b, scores)))
    ours = evaluate(str(minilm_dir), task="embedding", eval_file=str(path), text_a="s1", text_b="s2", label="score")
    st = sentence_transformer(minilm_dir)
    theirs = EmbeddingSimilarityEvaluator(a, b, scores, name="d")(st)
    assert ours["spearman"] == pytest.approx(100 * theirs["d_spearman_cosine"], abs=1e-4)
    assert ours["pearson"] == pytest.approx(100 * theirs["d_pearson_cosine"], abs=1e-4)


def test_run_folder_is_a_sentence_transformers_model(minilm_dir, tmp_path):
    """A run from all-MiniLM-L6-v2 on scored pairs: sentence-transformers loads the folder as mean pooling over the
    encoder and gives the vectors `bertkit embed` gives; transformers' BertModel finds every weight it reads."""
    st_module = pytest.importorskip("sentence_transformers")
    transformers = pytest.importorskip("transformers")
    from bertkit.tasks.embed import EmbedConfig, embed

    a, b, scores = sts_pairs(48)
    train = tmp_path / "train.tsv"
    train.write_text("a\tb\tlabel\n" + "".join(f"{x}\t{y}\t{s}\n" for x, y, s in zip(a, b, scores)))
    record = finetune(FinetuneConfig(model_dir=str(minilm_dir), task="embedding", train_file=str(train),
                                     eval_file=str(train), text_a="a", text_b="b", out_dir=str(tmp_path / "run"),
                                     epochs=1, batch_size=16, threads=2))
    assert set(record["best"]) == {"spearman", "pearson"}
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["architectures"] == ["BertModel"]
    st = st_module.SentenceTransformer(str(run), device="cpu")
    (tmp_path / "texts.txt").write_text("\n".join(a[:10]) + "\n")
    ours = np.stack([r["embedding"].numpy() for r in embed(EmbedConfig(model_dir=str(run),
                                                                       input=str(tmp_path / "texts.txt")))])
    np.testing.assert_allclose(st.encode(a[:10]), ours, atol=2e-5)
    _, info = transformers.BertModel.from_pretrained(str(run), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert evaluate(str(run))["spearman"] == pytest.approx(record["best"]["spearman"], abs=1e-6)
    with pytest.raises(BertkitError, match="bertkit embed"):
        predict(str(run), ["a text"])


def test_scored_pairs_train_the_cosines_to_their_order(toy_model_dir, tmp_path):
    """CoSENT on toy pairs (the same sentiment or not): Spearman's correlation on held-out pairs rises from the
    random encoder's."""
    train, dev = pairs_file(tmp_path / "train.csv", 400, 0), pairs_file(tmp_path / "dev.csv", 100, 1)
    values = dict(task="embedding", eval_file=dev, text_a="a", text_b="b", label="score")
    before = evaluate(toy_model_dir, **values)["spearman"]
    record = finetune(FinetuneConfig(model_dir=toy_model_dir, train_file=train, out_dir=str(tmp_path / "run"),
                                     epochs=3, lr=1e-3, batch_size=16, threads=1, **values))
    assert before < 30 and record["best"]["spearman"] > 60


def test_pairs_with_hard_negatives_and_single_texts_train_retrieval(toy_model_dir, tmp_path):
    """Unscored pairs (with a hard negative each) train by in-batch negatives and are scored by retrieval; a .txt
    of single texts trains by SimCSE, each text its own positive."""
    train = pairs_file(tmp_path / "train.csv", 300, 0, scored=False, negatives=True)
    dev = pairs_file(tmp_path / "dev.csv", 80, 1, scored=False)
    values = dict(task="embedding", eval_file=dev, text_a="a", text_b="b", threads=1, lr=1e-3, batch_size=16)
    record = finetune(FinetuneConfig(model_dir=toy_model_dir, train_file=train, text_neg="neg", epochs=3,
                                     out_dir=str(tmp_path / "pairs"), **values))
    assert set(record["best"]) == {"mrr@10", "recall@1", "recall@10"}
    assert all(0 <= v <= 100 for v in record["best"].values())
    texts = tmp_path / "texts.txt"
    texts.write_text("the movie was good\n\nit was awful\tboring film\n")
    with pytest.raises(BertkitError, match="texts.txt:3"):  # a pair among single texts
        finetune(FinetuneConfig(model_dir=toy_model_dir, train_file=str(texts), out_dir=str(tmp_path / "x"), **values))
    texts.write_text("the movie was good\n\nit was awful\nboring film of the movie\n")  # a blank line is skipped
    record = finetune(FinetuneConfig(model_dir=toy_model_dir, train_file=str(texts), epochs=1,
                                     out_dir=str(tmp_path / "simcse"), **values))
    assert record["train_examples"] == 3 and record["epochs"][0]["train_loss"] > 0


def test_lora_trains_the_update_alone(toy_model_dir, tmp_path):
    """Under LoRA only the low-rank matrices train (no head, the pooler frozen); the folder is merged as any run's."""
    model = BertForSentenceEmbedding.from_pretrained(toy_model_dir)
    add_lora(model, 4, 8.0, ("query", "value"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}
    train, dev = pairs_file(tmp_path / "train.csv", 64, 0), pairs_file(tmp_path / "dev.csv", 32, 1)
    record = finetune(FinetuneConfig(model_dir=toy_model_dir, task="embedding", train_file=train, eval_file=dev,
                                     text_a="a", text_b="b", label="score", epochs=1, lora_rank=4, threads=1,
                                     out_dir=str(tmp_path / "run")))
    assert record["trained_parameters"] == 2 * 2 * 4 * (32 + 32)  # 2 layers x (q, v) x (A: 4 x 32, B: 32 x 4)
    assert (tmp_path / "run" / "adapter").is_dir() and (tmp_path / "run" / "modules.json").is_file()


def test_retrieval_scores_count_ties_against_the_query():
    vectors = {t: torch.tensor(v) for t, v in {"q1": [1.0, 0.0], "q2": [0.0, 1.0], "p1": [1.0, 0.0],
                                                "p2": [1.0, 0.0], "n": [0.6, 0.8]}.items()}
    examples = [PairExample("q1", "p1"), PairExample("q2", "p2", negative="n")]
    # q1: p1 and p2 tie at the top, so p1 counts as second; q2: n (0.8) before p2 (0.0) and p1 (0.0): third
    scores = retrieval_scores(vectors, examples)
    assert scores == pytest.approx({"mrr@10": 100 * (1 / 2 + 1 / 3) / 2, "recall@1": 0.0, "recall@10": 100.0})


@pytest.mark.parametrize("values, message", [
    ({"text_neg": "neg"}, "--text-neg neg without --text-b"),
    ({"task": "SST-2", "text_neg": "neg"}, "expected --task embedding"),
    ({"task": "SST-2", "embedding_scale": 10.0}, "expected --task embedding"),
    ({"embedding_scale": 0.0}, "--embedding-scale is 0.0"),
    ({"bilstm": True}, "--bilstm with --task embedding"),
    ({"class_weight": "balanced"}, "--class-weight balanced with --task embedding"),
    ({"teacher": "t"}, "--teacher with --task embedding"),
])
def test_settings_refused_before_anything_is_read(values, message):
    config = FinetuneConfig(**{"model_dir": "m", "task": "embedding", **values})
    with pytest.raises(BertkitError, match=message):
        config.check()


def test_files_refused_with_their_line(toy_model_dir, tmp_path):
    values = dict(model_dir=toy_model_dir, task="embedding", text_a="a", out_dir=str(tmp_path / "run"))
    single = tmp_path / "single.csv"
    single.write_text("a\nthe movie\n")
    with pytest.raises(BertkitError, match="single texts; expected pairs to score"):
        finetune(FinetuneConfig(train_file=str(single), eval_file=str(single), **values))
    empty = tmp_path / "empty.csv"
    empty.write_text("a,b,label\nthe movie,a film,3\n ,a film,2\n")
    with pytest.raises(BertkitError, match=r"empty.csv:3: an empty text"):
        finetune(FinetuneConfig(train_file=str(empty), eval_file=str(empty), text_b="b", **values))
    score = tmp_path / "score.csv"
    score.write_text("a,b,label\nthe movie,a film,high\n")
    with pytest.raises(BertkitError, match="score.csv:2"):
        finetune(FinetuneConfig(train_file=str(score), eval_file=str(score), text_b="b", **values))
    assert not (tmp_path / "run").exists()
