"""The training step pretraining and fine-tuning share: accumulating micro-batches is one step on their union."""

import pytest
import torch

from bertkit import BertForSequenceClassification
from bertkit.train.optim import build_optimizer, warmup_linear
from bertkit.train.precision import resolve
from bertkit.train.step import train_step
from tiny_folders import tiny_config


def _setup():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(50, num_labels=2, hidden_dropout_prob=0.0,
                                                      attention_probs_dropout_prob=0.0))
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.01)
    return model, optimizer, warmup_linear(optimizer, 0, 10)


def _batch(rows: list[list[int]], labels: list[int], length: int) -> dict:
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": (ids != 0).long(),
            "labels": torch.tensor(labels)}


def test_two_micro_batches_make_the_step_of_their_union():
    rows = [[2, 7, 9, 3], [2, 11, 3], [2, 5, 6, 8, 13, 3], [2, 40, 3]]
    labels = [0, 1, 1, 0]
    fp32 = resolve("fp32", torch.device("cpu"))
    one, opt1, sched1 = _setup()
    loss1, ok1 = train_step(one, [_batch(rows, labels, 6)], opt1, sched1, fp32, 1.0, torch.device("cpu"))
    two, opt2, sched2 = _setup()
    seen = []
    loss2, ok2 = train_step(two, [_batch(rows[:2], labels[:2], 4), _batch(rows[2:], labels[2:], 6)], opt2, sched2,
                            fp32, 1.0, torch.device("cpu"), on_output=lambda out, batch: seen.append(len(batch["labels"])))
    assert ok1 and ok2 and seen == [2, 2]
    torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(one.parameters(), _setup()[0].parameters()))  # it did train


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_a_nan_loss_makes_no_update_but_the_schedule_moves_on():
    model, optimizer, scheduler = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    batch = _batch([[2, 7, 3]], [0], 3)

    def nan_forward(model, batch):
        out = model(**batch)
        out.loss = out.loss * float("nan")
        return out

    _, ok = train_step(model, [batch], optimizer, scheduler, resolve("fp32", torch.device("cpu")), 1.0,
                       torch.device("cpu"), forward=nan_forward)
    assert not ok and scheduler.last_epoch == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_pretraining_micro_batches_weight_the_masked_lm_loss_by_their_masked_tokens():
    """Pretraining's step over four micro-batches equals the step over their union, although their masked-token
    counts differ (4 against 32): each micro-batch's MLM mean counts by its tokens, not as a quarter."""
    from bertkit import BertForPreTraining
    from bertkit.train.distributed import Distributed
    from bertkit.train.pretrain import train_step as pretrain_step

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (16, 12), generator=g)
    labels = torch.full_like(ids, -100)
    for row in range(16):  # rows 0-3 predict one token each, rows 12-15 eight
        picked = torch.randperm(11, generator=g)[: 1 + 7 * (row // 4) // 3] + 1
        labels[row, picked] = ids[row, picked]
    union = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
             "labels": labels, "next_sentence_label": torch.randint(0, 2, (16,), generator=g)}
    quarters = [{k: v[i : i + 4] for k, v in union.items()} for i in range(0, 16, 4)]
    assert [int((q["labels"] != -100).sum()) for q in quarters] == [4, 12, 20, 32]
    stepped = []
    for micro_batches in ([union], quarters):
        torch.manual_seed(0)
        model = BertForPreTraining(tiny_config(50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient itself
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        sums, ok = pretrain_step(model, micro_batches, optimizer, scheduler, resolve("fp32", torch.device("cpu")),
                                 1e9, Distributed(), top_token=5)
        assert ok and sums[3] == 68  # mlm_total
        stepped.append(model)
    for (name, a), b in zip(stepped[0].named_parameters(), stepped[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_fine_tuning_micro_batches_of_unequal_sizes_make_the_step_of_their_union():
    """--grad-accum over the epoch's short last batch: a micro-batch of 1 row next to one of 3 is a quarter of the
    step, as in one batch of 4, not half of it; the loss is the mean over the 4 rows."""
    from bertkit.tasks.finetune import train_step as finetune_step

    rows = [[2, 7, 9, 3], [2, 11, 3], [2, 5, 6, 8, 13, 3], [2, 40, 3]]
    labels = [0, 1, 1, 0]
    fp32, cpu = resolve("fp32", torch.device("cpu")), torch.device("cpu")
    one, opt1, sched1 = _setup()
    loss1, ok1 = finetune_step(one, [_batch(rows, labels, 6)], opt1, sched1, fp32, 1e9, cpu)
    two, opt2, sched2 = _setup()
    loss2, ok2 = finetune_step(two, [_batch(rows[:3], labels[:3], 6), _batch(rows[3:], labels[3:], 3)], opt2, sched2,
                               fp32, 1e9, cpu)
    assert ok1 and ok2 and loss2 == pytest.approx(loss1, rel=1e-5)
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)  # Adam: lr x sign where g ~ 0
