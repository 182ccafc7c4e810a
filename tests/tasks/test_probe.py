"""`bertkit probe`: a linear probe per layer of a frozen encoder. The probes equal scikit-learn's on the same real
features (logistic regression, binary and multinomial; ridge), the features transformers' hidden states pooled, and
a real pretrained encoder's probes beat its random-weights control on SST-2; reruns keep what was probed."""

import gzip
import json

import numpy as np
import pytest
import torch

from bertkit.cli import main as cli_main
from bertkit.errors import BertkitError
from bertkit.model import BertModel
from bertkit.tasks.classification import encode
from bertkit.tasks.finetune import FinetuneConfig
from bertkit.tasks.probe import CONTROL, LinearProbe, ProbeConfig, layer_features, probe
from bertkit.tokenizer import Tokenizer
from conftest import data_path

pytest.importorskip("sklearn")


def glue_rows(task: str, count: int, columns: tuple[int, ...], label: int) -> tuple[list[tuple], list[str]]:
    lines = data_path("glue", task, "train.tsv").read_text(encoding="utf-8").splitlines()[1:count + 1]
    fields = [line.split("\t") for line in lines]
    return [tuple(f[c] for c in columns) for f in fields], [f[label] for f in fields]


@pytest.fixture(scope="module")
def minilm_features():
    """all-MiniLM-L6-v2's mean-pooled features of 400 STS-B training pairs at every layer, and their scores."""
    from bertkit.data.glue import TextExample

    minilm_dir = data_path("checkpoints", "all-MiniLM-L6-v2")
    pairs, scores = glue_rows("STS-B", 400, (7, 8), 9)
    tokenizer = Tokenizer.from_pretrained(minilm_dir)
    model = BertModel.from_pretrained(minilm_dir).eval()
    examples = [TextExample(str(i), a, b, None) for i, (a, b) in enumerate(pairs)]
    rows = encode(examples, tokenizer, 128, with_labels=False)
    return layer_features(model, rows, "mean", 16, tokenizer.pad_id, "test"), np.array(scores, dtype=np.float64), pairs


def test_features_are_transformers_hidden_states_pooled(minilm_dir, minilm_features):
    """Every layer's vector (0 the embeddings) is the mean of transformers' hidden state over the pair's tokens."""
    from transformers import AutoModel, AutoTokenizer

    features, _, pairs = minilm_features
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tokenizer([a for a, _ in pairs[:24]], [b for _, b in pairs[:24]], padding=True, truncation=True,
                      max_length=128, return_tensors="pt")
    with torch.no_grad():
        states = AutoModel.from_pretrained(minilm_dir).eval()(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"][..., None]
    theirs = torch.stack([(s * mask).sum(1) / mask.sum(1) for s in states]).numpy()
    assert features.shape == (7, 400, 384) and features.dtype == np.float32
    np.testing.assert_allclose(features[:, :24], theirs, atol=2e-5)


def standardized(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)


@pytest.mark.parametrize("layer", [0, 6])
def test_logistic_probe_is_scikit_learns(minilm_features, layer):
    """Three classes (STS-B's scores cut at 2 and 4: real features, real labels): the multinomial fit equals
    LogisticRegression's with C = 1 / (l2 x N). Two classes: one logistic output (class 0's logit 0), scikit-learn's
    binary model, its decision function the logit; multi-label, that binary model per label. A fit started from
    another's weights reaches the same optimum."""
    from sklearn.linear_model import LogisticRegression

    features, scores, _ = minilm_features
    x = torch.from_numpy(features[layer]).double()
    z = standardized(features[layer].astype(np.float64))
    n, l2 = len(x), 0.01
    three = np.digitize(scores, [2.0, 4.0])
    ours = LinearProbe.fit(x, torch.from_numpy(three), "classes", l2, 3)
    theirs = LogisticRegression(C=1 / (l2 * n), tol=1e-10, max_iter=20000).fit(z, three)
    np.testing.assert_allclose(torch.softmax(ours.logits(x), -1).numpy(), theirs.predict_proba(z), atol=1e-4)
    np.testing.assert_allclose(ours.weight.numpy(), theirs.coef_, atol=2e-3, rtol=1e-3)
    # started from another penalty's fit on other rows (as the L2 search chains them): the same optimum
    start = LinearProbe.fit(x[:300], torch.from_numpy(three[:300]), "classes", 1.0, 3)
    warm = LinearProbe.fit(x, torch.from_numpy(three), "classes", l2, 3, start)
    np.testing.assert_allclose(torch.softmax(warm.logits(x), -1).numpy(), theirs.predict_proba(z), atol=1e-4)

    two = (scores >= 2.5).astype(np.int64)
    ours = LinearProbe.fit(x, torch.from_numpy(two), "classes", l2, 2)
    theirs = LogisticRegression(C=1 / (l2 * n), tol=1e-10, max_iter=20000).fit(z, two)
    logits = ours.logits(x).numpy()
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], theirs.decision_function(z), atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(torch.softmax(ours.logits(x), -1).numpy(), theirs.predict_proba(z), atol=1e-4)
    assert not ours.weight[0].any() and ours.bias[0] == 0

    both = np.stack([scores >= 2.0, scores >= 4.0], 1).astype(np.float64)  # multi-label: a binary model per label
    ours = torch.sigmoid(LinearProbe.fit(x, torch.from_numpy(both), "multi_label", l2, 2).logits(x)).numpy()
    for label in range(2):
        theirs = LogisticRegression(C=1 / (l2 * n), tol=1e-10, max_iter=20000).fit(z, both[:, label])
        np.testing.assert_allclose(ours[:, label], theirs.predict_proba(z)[:, 1], atol=1e-4)


def test_ridge_probe_is_scikit_learns(minilm_features):
    """Squared error + l2 x |w|^2 on the mean is Ridge with alpha = l2 x N: the same weights and predictions."""
    from sklearn.linear_model import Ridge

    features, scores, _ = minilm_features
    x = torch.from_numpy(features[6]).double()
    z = standardized(features[6].astype(np.float64))
    ours = LinearProbe.fit(x, torch.from_numpy(scores), "regression", 0.1, 0)
    theirs = Ridge(alpha=0.1 * len(x)).fit(z, scores)
    np.testing.assert_allclose(ours.weight[0].numpy(), theirs.coef_, atol=1e-8)
    np.testing.assert_allclose(ours.logits(x)[:, 0].numpy(), theirs.predict(z), atol=1e-8)


def sst2(count: int, eval_file=None) -> FinetuneConfig:
    return FinetuneConfig(task="SST-2", data_dir=str(data_path("glue", "SST-2")), eval_file=eval_file,
                          limit_train_examples=count)


def test_probe_minilm_on_sst2_beats_its_random_control(minilm_dir, tmp_path, capsys):
    """600 SST-2 training sentences, the first 400 of dev scored: the pretrained encoder's best layer is far above
    its random-weights twin and the majority class; the files are written, a rerun keeps what was probed, another
    setting is refused."""
    dev = data_path("glue", "SST-2", "dev.tsv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "dev.tsv").write_text("\n".join(dev[:401]) + "\n", encoding="utf-8")
    out = tmp_path / "probe"
    args = ["probe", str(minilm_dir), "--task", "SST-2", "--data-dir", str(data_path("glue", "SST-2")),
            "--eval-file", str(tmp_path / "dev.tsv"), "--limit-train-examples", "600", "--out", str(out),
            "--l2", "0.01", "1", "--threads", "2"]
    assert cli_main(args) == 0
    table = capsys.readouterr().out
    summary = json.loads((out / "probe.json").read_text())
    best = {name: max(cell["metrics"]["accuracy"] for cell in record["layers"])
            for name, record in summary["models"].items()}
    assert list(best) == [str(minilm_dir), CONTROL]
    assert best[str(minilm_dir)] > 72 and best[str(minilm_dir)] > best[CONTROL] + 10, best
    majority = sum(line.endswith("\t1") for line in dev[1:401]) / 4  # the training rows' common class is 1
    assert summary["majority"]["accuracy"] == pytest.approx(majority)
    assert [cell["layer"] for cell in summary["models"][CONTROL]["layers"]] == list(range(7))
    assert "| 6 |" in table and "random control" in table and (out / "probe.png").stat().st_size > 10_000
    assert (out / "probe.md").read_text() == table

    calls = []
    import bertkit.tasks.probe as module

    original = module.layer_features
    module.layer_features = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        again = probe(ProbeConfig(models=[str(minilm_dir)], out=str(out), l2=[0.01, 1], threads=2),
                      sst2(600, str(tmp_path / "dev.tsv")))
    finally:
        module.layer_features = original
    assert calls == [] and again["models"] == summary["models"]
    with pytest.raises(BertkitError, match="probes of other settings \\(data, train_examples\\)"):
        probe(ProbeConfig(models=[str(minilm_dir)], out=str(out), l2=[0.01, 1]), sst2(500, str(tmp_path / "dev.tsv")))


def test_probe_refuses_what_it_cannot_do(minilm_dir, tmp_path):
    squad = FinetuneConfig(task="squad1", data_dir=str(data_path("squad")))
    with pytest.raises(BertkitError, match="--l2 0.01 x; expected one or more positive numbers"):
        ProbeConfig(models=[str(minilm_dir)], l2=["0.01", "x"])
    with pytest.raises(BertkitError, match="--l2 0; expected"):
        ProbeConfig(models=[str(minilm_dir)], l2=[0])
    cases = [(ProbeConfig(models=[]), sst2(10), "no model"),
             (ProbeConfig(models=[str(minilm_dir)] * 2), sst2(10), "a model given twice"),
             (ProbeConfig(models=[str(minilm_dir)], out=str(minilm_dir / "probe")), sst2(10), "inside the model 1"),
             (ProbeConfig(models=[str(minilm_dir)], out=str(tmp_path / "p")), squad, "probes are for a GLUE task")]
    for config, data, message in cases:
        with pytest.raises(BertkitError, match=message):
            probe(config, data)


def test_word_probes_read_each_word_at_its_first_piece(minilm_dir, tmp_path):
    """A tagging task (names in books, the silver task of benchmarks/tagging_books.py: 200 training sentences from
    one book, 100 dev sentences from another): every word's feature is transformers' hidden state at its first piece,
    in order; the pretrained encoder's best layer finds names far better than its random twin; the probe's scores
    are `evaluate`'s for the tags it predicts, the majority tag's entity F1 is 0."""
    import sys
    from pathlib import Path

    from transformers import AutoModel

    from bertkit.tasks.probe import WordUnits
    from bertkit.tasks.tagging import encode as encode_words, sentence_pieces

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from tagging_books import WORD, write_conll

    def first_sentences(piece: str, count: int) -> list[list[str]]:  # of 5 to 40 words, as tagging_books.py's
        rows = []
        with gzip.open(data_path("corpus", f"gutenberg-en-{piece}.txt.gz"), "rt", encoding="utf-8") as f:
            while len(rows) < count:
                if 5 <= len(words := WORD.findall(next(f))) <= 40:
                    rows.append(words)
        return rows

    write_conll(tmp_path / "train.txt", first_sentences("05", 200))  # other books than dev's: other names
    write_conll(tmp_path / "dev.txt", first_sentences("06", 100))
    data = FinetuneConfig(task="ner", data_dir=str(tmp_path))
    summary = probe(ProbeConfig(models=[str(minilm_dir)], out=str(tmp_path / "probe"), l2=[0.01, 1], threads=2), data)
    best = {name: max(cell["metrics"]["f1"] for cell in record["layers"])
            for name, record in summary["models"].items()}
    assert best[str(minilm_dir)] > 40 and best[str(minilm_dir)] > best[CONTROL] + 15, best
    assert summary["majority"]["f1"] == 0 and summary["settings"]["unit"] == "word"
    assert "each word's vector" in summary["table"] and "(100 sentences)" in summary["table"]

    from bertkit.tasks.finetune import load_task

    task = load_task(data)
    units = WordUnits(task, data)
    tokenizer = Tokenizer.from_pretrained(minilm_dir)
    model = BertModel.from_pretrained(minilm_dir).eval()
    config = ProbeConfig(models=[str(minilm_dir)], batch_size=7)
    ours = units.features(model, tokenizer, task.evals["dev"][:20], config, "test")
    encoded, places = encode_words(tokenizer, sentence_pieces(tokenizer, task.evals["dev"][:20]), 128)
    reference = AutoModel.from_pretrained(minilm_dir).eval()
    theirs = []
    with torch.no_grad():
        for row, (_, _, firsts) in zip(encoded, places):
            states = reference(torch.tensor([row["input_ids"]]), output_hidden_states=True).hidden_states
            theirs.append(torch.stack([s[0, firsts] for s in states]))
    assert ours.shape == (7, sum(len(s.words) for s in task.evals["dev"][:20]), 384)
    np.testing.assert_allclose(ours, torch.cat(theirs, 1).numpy(), atol=2e-5)
    # a probe's tags scored as a tagger's: the same metrics from the same predicted tags
    logits = torch.randn(ours.shape[1], len(task.labels), generator=torch.Generator().manual_seed(0))
    task.evals = {"dev": task.evals["dev"][:20]}
    tags = [task.labels[i] for i in logits.argmax(-1).tolist()]
    at, predicted = 0, []
    for s in task.evals["dev"]:
        predicted.append(tags[at:at + len(s.words)])
        at += len(s.words)
    assert units.scores({"dev": logits}) == task.scores({"dev": predicted})[0]
