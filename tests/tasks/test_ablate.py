"""`bertkit ablate`: variants as flags, cells kept and read back, the table, and a tiny grid end to end (slow)."""

import json
import re

import pytest

from bertkit.cli import main
from bertkit.errors import BertkitError
from bertkit.tasks import ablate as ablate_module
from bertkit.tasks.ablate import AblateConfig, ablate, cell_key, pretrain_args, pretrain_key, results_table, save_cell
from conftest import data_path


def test_variants_that_pretrain_alike_share_their_pretrained_models():
    config = AblateConfig(grid="table5", variants=["mix-80-10-10"])
    flags = config.variant_flags()
    keys = {name: pretrain_key(pretrain_args(config, value)[0]) for name, value in flags.items()}
    assert keys["ltr"] == keys["ltr+bilstm"]  # LTR + BiLSTM differs only in fine-tuning
    assert keys["mix-80-10-10"] == keys["mlm+nsp"]  # BERT's mix is the default, written out
    assert len(set(keys.values())) == len(flags) - 2
    assert pretrain_args(config, flags["ltr+bilstm"])[1] == {"bilstm": True}
    fields = pretrain_args(config, "--mask-mix 0 20 80")[0]
    assert fields["mask_mix"] == (0, 20, 80) and fields["model"] == "mini" and fields["max_steps"] == 800


def test_the_size_grid_halves_the_rate_for_the_wider_and_again_for_the_deeper_model():
    """The recipe's lr leaves `small` on the unigram plateau and `medium` stayed there at 5e-4 (docs/findings.md): the
    built-in grid must not hand a user those rows."""
    from bertkit.train.pretrain import PretrainConfig

    config = AblateConfig(grid="size")
    rates = {}
    for value in config.variant_flags().values():
        fields = {**vars(PretrainConfig()), **pretrain_args(config, value)[0]}
        rates.setdefault(fields["model"], set()).add(fields["lr"])
    assert rates["small"] == {5e-4} and rates["medium"] == {2.5e-4} and max(rates["mini"]) == PretrainConfig().lr


def test_the_size_grid_fine_tunes_at_two_rates_unless_told():
    """medium stays at the majority class when fine-tuned at 3e-4: the size grid reads every row at 1e-4 and 3e-4."""
    assert AblateConfig(grid="size").lrs == [1e-4, 3e-4]
    assert AblateConfig(grid="table5").lrs == AblateConfig(grid="custom", variants=["mlm"]).lrs == [3e-4]
    assert AblateConfig(grid="size", lrs=["2e-4"]).lrs == [2e-4]


@pytest.mark.parametrize("variants, expected", [
    (["nonsense"], "not a built-in variant"),
    (["x=--objective mlm+xyz"], "variant 'x'.*expected `bertkit pretrain` flags"),
    (["x=--no-such-flag 3"], "variant 'x'.*unrecognized --no-such-flag"),
    (["x=--mask-mix 50 50"], "variant 'x'.*mask_mix"),
    (["x=--vocab-size 3000"], "variant 'x'.*--vocab-size set the inputs every cell shares"),
    (["x=--format jsonl --text-field body"], "variant 'x'.*--format, --text-field set the inputs"),
    (["x=--model huge"], "variant 'x'.*--model huge: neither a preset nor a file"),
    (["x=--seed 3"], r"variant 'x' \(--seed 3\): --seed set by ablate for every cell"),  # seed 0 was pretrained again
    (["x=--stop-at 5"], "variant 'x'.*--stop-at set by ablate"),  # its record claimed the grid's --steps
    (["x=--overwrite"], "variant 'x'.*--overwrite set by ablate"),  # refused only once the inputs were built
    (["x=--eval-every 10 --threads 3"], "variant 'x'.*--threads, --eval-every set by ablate"),
])
def test_a_bad_variant_is_refused_before_any_work(variants, expected, tmp_path):
    with pytest.raises(BertkitError, match=expected):
        AblateConfig(grid="custom", variants=variants, out_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_a_variant_from_a_model_folder_is_refused_naming_model_dir(tmp_path):
    """The refusal named --tokenizer, which the variant never gave (--model-dir sets it)."""
    model = data_path("checkpoints/all-MiniLM-L6-v2")
    with pytest.raises(BertkitError, match=r"variant 'x' \(--model-dir .*\): --model-dir set the inputs every cell"):
        AblateConfig(grid="custom", variants=[f"x=--model-dir {model}"], out_dir=str(tmp_path))


def test_a_model_that_is_no_preset_is_refused_before_the_vocabulary_is_trained(tmp_path, capsys):
    """Found refused only after the books corpus's vocabulary and prepared corpus were built (minutes)."""
    assert main(["ablate", "--model", "huge", "--out-dir", str(tmp_path)]) == 2
    assert "--model huge: neither a preset nor a file" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, expected", [
    (["--variants", 'x=--lr "5e-4'], r"--variants: variant 'x' \(--lr \"5e-4\): No closing quotation"),
    (["--variants", "mlm", "--pretrain-flags=--lr 5e-4 --warmup '0.05"],
     r"--pretrain-flags \(--lr 5e-4 --warmup '0.05\): No closing quotation"),
])
def test_flags_with_an_unclosed_quote_are_named_not_a_traceback(argv, expected, tmp_path, capsys):
    """shlex's ValueError reached the user as a traceback (exit 1)."""
    assert main(["ablate", "--grid", "custom", "--out-dir", str(tmp_path), *argv]) == 2
    assert re.search(expected, capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def _fake_cell(variant: str, seed: int, ppl: float, sst2: float, parameters: int = 2_600_000) -> dict:
    return {"variant": variant, "seed": seed, "flags": "", "pretrain": {"masked_lm_loss": 9.0,
                                                                      "masked_lm_accuracy": 0.3, "step": 10},
            "held_out": {"masked_lm_perplexity": ppl, "masked_lm_accuracy": 0.1, "parameters": parameters,
                         "examples": 800, "mask_prob": 0.15, "unigram_baseline_accuracy": 0.059},
            "checkpoint": "x", "pretrain_seconds": 60.0, "token_positions": 40960,
            "suite": {"cells": {f"SST-2/lr=0.0003/seed={s}": {"best": {"accuracy": sst2 + s}, "seconds": 1.0,
                                                               "train_examples": 8, "eval_examples": 8}
                                for s in (1, 2)}}}


def test_a_cell_read_back_equals_the_one_written_and_the_table_is_over_seeds(tmp_path):
    path = tmp_path / "ablate.json"
    cells = {cell_key("mlm", s): _fake_cell("mlm", s, 100.0 + 10 * s, 80.0 + 2 * s) for s in (0, 1)}
    for key, cell in cells.items():
        save_cell(path, key, cell)
    assert json.loads(path.read_text()) == cells
    table = results_table(cells, ["mlm"])
    # the held-out scores every cell shares, not the run's own (loss 9.0, accuracy 30%);
    # SST-2: seed 0 has fine-tuning runs 81, 82 (mean 81.5), seed 1 83, 84 (83.5): 82.5 ± 1.4 over the two seeds
    assert "| mlm | `(recipe defaults)` | 2 | 105.0 ± 7.1 | 10.0 ± 0.0 | 82.5 ± 1.4 |" in table
    assert "all 800 held-out examples with the same masks" in table and "params" not in table
    cells["mlm/seed=1"]["held_out"].update(examples=1500, unigram_baseline_accuracy=0.061)  # another input form
    assert "all 800-1,500 held-out examples" in results_table(cells, ["mlm"])
    assert "token: 5.9-6.1%" in results_table(cells, ["mlm"])


def test_the_tables_note_gives_the_range_of_budgets_when_a_variant_changes_it():
    """A variant may set --max-steps (or --batch-size, --max-length): the note said every cell had the first
    cell's token positions and steps."""
    cells = {"mlm/seed=0": _fake_cell("mlm", 0, 100.0, 70.0), "long/seed=0": _fake_cell("long", 0, 90.0, 72.0)}
    assert "Each cell: 0.0M token positions of pretraining (10 steps;" in results_table(cells, ["mlm", "long"])
    cells["mlm/seed=0"].update(token_positions=4_096_000, pretrain={**cells["mlm/seed=0"]["pretrain"], "step": 1000})
    cells["long/seed=0"].update(token_positions=8_192_000, pretrain={**cells["long/seed=0"]["pretrain"], "step": 2000})
    for order in (["mlm", "long"], ["long", "mlm"]):
        assert "Each cell: 4.1-8.2M token positions of pretraining (1000-2000 steps;" in results_table(cells, order)


def test_the_table_gives_sizes_where_they_differ_and_marks_a_left_to_right_models_own_reading():
    cells = {"tiny/seed=0": _fake_cell("tiny", 0, 300.0, 70.0), "mini/seed=0": _fake_cell("mini", 0, 200.0, 75.0, 11_200_000),
             "ltr/seed=0": {**_fake_cell("ltr", 0, 0.0, 60.0), "held_out": {}}}
    cells["ltr/seed=0"]["pretrain"]["masked_lm_loss"] = 0.0  # its own next-token loss: perplexity 1
    table = results_table(cells, ["tiny", "mini", "ltr"]).splitlines()
    assert table[0].startswith("| variant | flags | seeds | MLM ppl | MLM acc | params (M) | pretrain min | SST-2 (acc) |")
    assert table[2].startswith("| tiny | `(recipe defaults)` | 1 | 300.0 | 10.0 | 2.6 | 1 | 71.5 |")
    assert table[3].startswith("| mini | `(recipe defaults)` | 1 | 200.0 | 10.0 | 11.2 | 1 | 76.5 |")
    assert table[4].startswith("| ltr | `(recipe defaults)` | 1 | 1.0† | 30.0† | - | 1 | 61.5 |")


def test_the_glue_average_is_only_for_seeds_with_every_glue_column_whatever_the_order():
    """A seed whose suite stopped after CoLA has no GLUE average while the table has an RTE column (as the suite's
    own table shows "-" for such a row); the average was over the tasks it finished when it came first."""
    def cell(seed, scores):
        runs = {f"{task}/lr=0.0003/seed=1": {"best": {"mcc": value, "accuracy": value}, "seconds": 1.0,
                                               "train_examples": 8, "eval_examples": 8}
                for task, value in scores.items()}
        return {"variant": "mlm", "seed": seed, "flags": "", "checkpoint": f"c{seed}", "pretrain_seconds": 60.0,
                "token_positions": 100, "pretrain": {"step": 5}, "suite": {"cells": runs}}

    stopped, complete = cell(0, {"CoLA": 10.0}), cell(1, {"CoLA": 20.0, "RTE": 60.0})
    table = results_table({"mlm/seed=0": stopped, "mlm/seed=1": complete}, ["mlm"])
    assert "| mlm | `(recipe defaults)` | 2 | - | - | 15.0 ± 7.1 | 60.0 | 40.0 |" in table  # seed 1's (20 + 60) / 2
    assert results_table({"mlm/seed=1": complete, "mlm/seed=0": stopped}, ["mlm"]) == table
    two_rows = results_table({"mlm/seed=0": stopped, "wwm/seed=0": {**complete, "variant": "wwm"}}, ["mlm", "wwm"])
    assert "| mlm | `(recipe defaults)` | 1 | - | - | 10.0 | - | - |" in two_rows  # another row's RTE column counts


def test_a_cell_is_scored_on_the_shared_masks_once(tmp_path, monkeypatch):
    """A cell whose model is on disk and has no shared held-out score gets one, kept; a rerun does not score again."""
    import bertkit.tasks.suite as suite_module

    scored = []
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    cell = {**_fake_cell("mlm", 0, 1.0, 70.0), "flags": "--objective mlm", "checkpoint": str(checkpoint)}
    del cell["held_out"]
    save_cell(tmp_path / "ablate.json", "mlm/seed=0", cell)

    def fake_score(config, fields, path):
        scored.append((fields.get("objective"), path))
        return {"masked_lm_perplexity": 321.0, "masked_lm_accuracy": 0.2, "parameters": 1, "examples": 3,
                "mask_prob": 0.15, "unigram_baseline_accuracy": 0.05}

    monkeypatch.setattr(ablate_module, "score_cell", fake_score)
    monkeypatch.setattr(suite_module, "suite", lambda sc: pytest.fail("the suite has nothing to do"))
    config = AblateConfig(grid="custom", variants=["mlm"], seeds=1, tasks=["SST-2"], out_dir=str(tmp_path))
    assert "| mlm | `--objective mlm` | 1 | 321.0 | 20.0 |" in ablate(config)["table"]
    assert scored == [("mlm", str(checkpoint))]
    ablate(config)
    assert len(scored) == 1


def test_a_rerun_does_only_what_is_missing(tmp_path, monkeypatch):
    """Pretraining and the suite are stood in for: a second run of the same grid calls neither; one more seed
    calls each once."""
    import bertkit.tasks.suite as suite_module

    calls = []

    def fake_pretraining(config, fields, seed, inputs, out):
        calls.append(("pretrain", fields.get("objective"), seed))
        return {"pretrain": {"masked_lm_loss": 6.0, "masked_lm_accuracy": 0.1, "step": 5},
                "checkpoint": str(out / f"ckpt-{fields.get('objective')}-{seed}"), "pretrain_seconds": 1.0,
                "token_positions": 100, "pretrain_fields": dict(fields)}

    rows = {}

    def fake_suite(sc):  # like the suite: the row's runs so far and this call's
        calls.append(("suite", sc.label, sc.bilstm))
        cells = rows.setdefault(sc.label, {})
        cells.update({f"RTE/lr={lr:g}/seed={s}": {"best": {"accuracy": 50.0 + s}, "seconds": 1.0, "train_examples": 1,
                                                  "eval_examples": 1} for lr in sc.lrs for s in range(1, sc.seeds + 1)})
        return {"results": {sc.label: {"cells": dict(cells), "wall_seconds": 2.0}}}

    monkeypatch.setattr(ablate_module, "run_pretraining", fake_pretraining)
    monkeypatch.setattr(ablate_module, "shared_inputs", lambda config, out: ("tok", "data"))
    monkeypatch.setattr(suite_module, "suite", fake_suite)
    config = AblateConfig(grid="custom", variants=["ltr", "ltr+bilstm"], seeds=1, tasks=["RTE"], out_dir=str(tmp_path))
    first = ablate(config)
    assert calls == [("pretrain", "ltr", 0), ("suite", "ltr/seed=0", False),
                     ("pretrain", "ltr", 0), ("suite", "ltr+bilstm/seed=0", True)]
    assert "| ltr+bilstm |" in first["table"] and (tmp_path / "ablate.png").is_file()
    calls.clear()
    assert ablate(config)["cells"] == first["cells"]
    assert calls == []
    config.seeds = 2
    ablate(config)
    assert [c[0] for c in calls] == ["pretrain", "suite", "pretrain", "suite"]
    calls.clear()  # a record copied without its models, one cell not yet fine-tuned: pretrained again, then scored
    record = json.loads((tmp_path / "ablate.json").read_text())
    del record["ltr/seed=1"]["suite"]
    (tmp_path / "ablate.json").write_text(json.dumps(record))
    ablate(config)
    assert calls == [("pretrain", "ltr", 1), ("suite", "ltr/seed=1", False)]
    config.variants = ["ltr=--objective mlm"]  # the same name with other flags: refused, not mixed
    with pytest.raises(BertkitError, match="cell ltr/seed=0 was run with flags '--objective ltr'"):
        ablate(config)
    calls.clear()
    for budget in ({"steps": 400}, {"pretrain_flags": "--lr 5e-4"}):  # the same flags at another budget: refused too
        other = AblateConfig(**{**vars(config), "variants": ["ltr"], **budget})
        with pytest.raises(BertkitError, match="cell ltr/seed=0 was pretrained with (max_steps=800; now max_steps=400|"
                                               "lr=default; now lr=0.0005); expected the same --steps"):
            ablate(other)
    assert calls == []
    calls.clear()  # BERT's mix written out pretrains into the default's run folder: fine-tuned once, scored twice
    config.variants, config.seeds = ["mlm+nsp", "mix-80-10-10"], 1
    cells = ablate(config)["cells"]
    assert calls == [("pretrain", None, 0), ("suite", "mlm+nsp/seed=0", False), ("pretrain", None, 0)]
    assert cells["mix-80-10-10/seed=0"]["suite"] == cells["mlm+nsp/seed=0"]["suite"]
    assert cells["mix-80-10-10/seed=0"]["suite_from"] == "mlm+nsp/seed=0"
    calls.clear()  # another rate: as many runs as the cell has, but not the ones wanted; the twin follows
    config.lrs = [1e-4]
    (tmp_path / "ckpt-None-0").mkdir()  # the model is on disk this time (and scored on the held-out masks)
    monkeypatch.setattr(ablate_module, "score_cell", lambda *a: _fake_cell("mlm+nsp", 0, 1.0, 0.0)["held_out"])
    cells = ablate(config)["cells"]
    assert calls == [("suite", "mlm+nsp/seed=0", False)]
    runs = sorted(cells["mix-80-10-10/seed=0"]["suite"]["cells"])
    assert runs == [f"RTE/lr={lr}/seed={s}" for lr in ("0.0001", "0.0003") for s in (1, 2)]


@pytest.mark.slow
def test_a_tiny_grid_runs_end_to_end(tmp_path, capsys):
    """Two variants (BERT and LTR + BiLSTM), two pretraining seeds of 30 steps of `tiny` on a slice of the Python
    docs, each fine-tuned on RTE once: the table has both rows with every column."""
    lines = data_path("corpus", "python-docs-3.11.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    corpus = tmp_path / "slice.txt"
    corpus.write_text("".join(lines[:3000]), encoding="utf-8")
    argv = ["ablate", "--grid", "custom", "--variants", "mlm+nsp", "ltr+bilstm", "--model", "tiny", "--steps", "30",
            "--batch-size", "8", "--max-length", "64", "--corpus", str(corpus), "--vocab-size", "1000", "--tasks",
            "RTE", "--finetune-seeds", "1", "--seeds", "2", "--out-dir", str(tmp_path / "grid"),
            "--data-dir", str(data_path()), "--threads", "1"]
    assert main(argv) == 0
    table = (tmp_path / "grid" / "ablate.md").read_text()
    for row in ("| mlm+nsp |", "| ltr+bilstm |"):
        line = next(x for x in table.splitlines() if x.startswith(row))
        assert "-" not in line.split("|")[4:], line  # every column filled
    cells = json.loads((tmp_path / "grid" / "ablate.json").read_text())
    assert set(cells) == {"mlm+nsp/seed=0", "mlm+nsp/seed=1", "ltr+bilstm/seed=0", "ltr+bilstm/seed=1"}
    assert cells["ltr+bilstm/seed=0"]["pretrain_fields"]["objective"] == "ltr"
    capsys.readouterr()
    assert main(argv) == 0  # read back: nothing runs again
    assert "ablate: pretraining" not in capsys.readouterr().out


def test_grids_run_apart_merge_into_one_table_without_running_anything(tmp_path, monkeypatch):
    """Two streams' OUT_DIRs merged into a third with --table-only: the union of their cells and suite runs (a cell
    in both merged field by field), the table over all of them, and no pretraining or fine-tuning."""
    a, b, docs = tmp_path / "a", tmp_path / "b", tmp_path / "docs"
    a.mkdir(), b.mkdir()
    save_cell(a / "ablate.json", "mlm/seed=0", _fake_cell("mlm", 0, 100.0, 70.0))
    save_cell(b / "ablate.json", "mlm/seed=1", _fake_cell("mlm", 1, 120.0, 72.0))
    first = {k: v for k, v in _fake_cell("wwm", 0, 90.0, 71.0).items() if k != "suite"}  # pretrained, not scored yet
    save_cell(a / "ablate.json", "wwm/seed=0", first)
    save_cell(b / "ablate.json", "wwm/seed=0", {"suite": _fake_cell("wwm", 0, 90.0, 71.0)["suite"]})  # scored later
    (b / "suite").mkdir()
    (b / "suite" / "suite.json").write_text(json.dumps({"wwm/seed=0": {"cells": {}}}))
    monkeypatch.setattr(ablate_module, "run_pretraining", lambda *a: pytest.fail("nothing is pretrained"))
    config = AblateConfig(grid="custom", variants=["mlm=", "wwm="], seeds=2, tasks=["SST-2"],
                          out_dir=str(docs), merge_from=[str(a), str(b)], table_only=True)
    table = ablate(config)["table"]
    cells = json.loads((docs / "ablate.json").read_text())
    assert set(cells) == {"mlm/seed=0", "mlm/seed=1", "wwm/seed=0"}
    assert cells["wwm/seed=0"]["held_out"]["masked_lm_perplexity"] == 90.0 and "suite" in cells["wwm/seed=0"]
    assert json.loads((docs / "suite" / "suite.json").read_text()) == {"wwm/seed=0": {"cells": {}}}
    # a stream with fewer runs of a cell merged last adds to the runs there are, and drops none
    more = {"SST-2/lr=0.0001/seed=1": {"best": {"accuracy": 60.0}, "seconds": 1.0}}
    (a / "suite").mkdir()
    (a / "suite" / "suite.json").write_text(json.dumps({"wwm/seed=0": {"cells": more}}))
    save_cell(a / "ablate.json", "wwm/seed=0", {**first, "suite": {"cells": more}})
    ablate(AblateConfig(**{**vars(config), "merge_from": [str(b), str(a)]}))
    assert json.loads((docs / "suite" / "suite.json").read_text()) == {"wwm/seed=0": {"cells": more}}
    runs = json.loads((docs / "ablate.json").read_text())["wwm/seed=0"]["suite"]["cells"]
    assert sorted(runs) == ["SST-2/lr=0.0001/seed=1", "SST-2/lr=0.0003/seed=1", "SST-2/lr=0.0003/seed=2"]
    assert "| mlm | `(recipe defaults)` | 2 | 110.0 ± 14.1 |" in table and "| wwm |" in table
    with pytest.raises(BertkitError, match="no ablate.json there"):
        ablate(AblateConfig(grid="custom", variants=["mlm"], out_dir=str(docs), merge_from=[str(tmp_path / "x")]))


@pytest.mark.parametrize("same_model", [True, False])
def test_a_cell_pretrained_again_in_another_folder_keeps_its_runs_only_if_it_is_the_same_model(tmp_path, monkeypatch,
                                                                                             same_model, capsys):
    """A grid merged into another --out-dir without its models and given another rate: the cell is pretrained again
    there. Its suite row still named the old checkpoint, which the suite refuses ("row holds ..."), after the whole
    pretraining; and a model that came back other (other code, other floats) passed its recorded runs off as its own."""
    import bertkit.tasks.suite as suite_module

    old, out = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    cell = _fake_cell("mlm", 0, 100.0, 70.0)
    save_cell(old / "ablate.json", "mlm/seed=0", {**cell, "flags": "--objective mlm", "checkpoint": str(old / "gone")})
    (old / "suite").mkdir()
    (old / "suite" / "suite.json").write_text(json.dumps({"mlm/seed=0": {"model_dir": str(old / "gone"),
                                                                         "cells": cell["suite"]["cells"]}}))
    monkeypatch.setattr(ablate_module, "shared_inputs", lambda config, out: ("tok", "data"))
    monkeypatch.setattr(ablate_module, "run_pretraining", lambda config, fields, seed, inputs, out: {
        "pretrain": {"step": 5}, "checkpoint": str(out / "ckpt"), "pretrain_seconds": 1.0, "token_positions": 100,
        "pretrain_fields": dict(fields)})
    held_out = cell["held_out"] if same_model else {**cell["held_out"], "masked_lm_perplexity": 101.0}
    monkeypatch.setattr(ablate_module, "score_cell", lambda *a: held_out)
    asked = []

    def fake_suite(sc):  # the suite's own check of its row, then one run per rate and seed
        row = json.loads((out / "suite" / "suite.json").read_text())[sc.label]
        assert row["model_dir"] == sc.model_dir, "the suite refuses a row of another model"
        todo = {f"SST-2/lr={lr:g}/seed={s}" for lr in sc.lrs for s in (1, 2)} - row["cells"].keys()
        asked.extend(sorted(todo))
        cells = {**row["cells"], **{k: {"best": {"accuracy": 60.0}, "seconds": 1.0} for k in todo}}
        return {"results": {sc.label: {"cells": cells, "wall_seconds": 1.0}}}

    monkeypatch.setattr(suite_module, "suite", fake_suite)
    config = AblateConfig(grid="custom", variants=["mlm"], seeds=1, tasks=["SST-2"], lrs=[1e-4, 3e-4],
                          out_dir=str(out), merge_from=[str(old)])
    cells = ablate(config)["cells"]
    runs = cells["mlm/seed=0"]["suite"]["cells"]
    if same_model:
        assert asked == ["SST-2/lr=0.0001/seed=1", "SST-2/lr=0.0001/seed=2"]
        assert runs["SST-2/lr=0.0003/seed=1"] == cell["suite"]["cells"]["SST-2/lr=0.0003/seed=1"]
    else:
        assert len(asked) == 4 and all(run["best"]["accuracy"] == 60.0 for run in runs.values())
        assert "mlm/seed=0 pretrained again is not the model of its 2 recorded fine-tuning run(s)" in capsys.readouterr().out
    # merged back into the first grid: the same model's runs add up; another model's replace the old ones
    ablate(AblateConfig(**{**vars(config), "out_dir": str(old), "merge_from": [str(out)], "table_only": True}))
    merged = json.loads((old / "ablate.json").read_text())["mlm/seed=0"]["suite"]["cells"]
    assert merged == runs and len(merged) == 4


def test_a_cell_whose_suite_stopped_part_way_shows_the_runs_it_finished(tmp_path, monkeypatch):
    """The runs of an interrupted suite sit in suite/suite.json only; the table reads them back, for the cell of the
    same key and checkpoint, and not another model's row that happens to carry the key."""
    cells = {"mlm/seed=0": _fake_cell("mlm", 0, 100.0, 70.0), "wwm/seed=0": _fake_cell("wwm", 0, 90.0, 71.0)}
    runs = {"mlm/seed=0": {"model_dir": "x", "cells": cells["mlm/seed=0"].pop("suite")["cells"]},
            "wwm/seed=0": {"model_dir": "elsewhere", "cells": cells["wwm/seed=0"].pop("suite")["cells"]}}
    for key, cell in cells.items():
        save_cell(tmp_path / "ablate.json", key, cell)
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "suite.json").write_text(json.dumps(runs))
    monkeypatch.setattr(ablate_module, "run_pretraining", lambda *a: pytest.fail("nothing is pretrained"))
    config = AblateConfig(grid="custom", variants=["mlm=", "wwm="], seeds=1, tasks=["SST-2"], out_dir=str(tmp_path),
                          table_only=True)
    table = ablate(config)["table"]
    assert "| mlm | `(recipe defaults)` | 1 | 100.0 | 10.0 | 71.5 |" in table  # runs 71 and 72
    assert "| wwm | `(recipe defaults)` | 1 | 90.0 | 10.0 | - |" in table
    assert "suite" not in json.loads((tmp_path / "ablate.json").read_text())["mlm/seed=0"]  # shown, not recorded


def test_a_model_outside_a_pretraining_run_is_named_not_a_traceback(tmp_path):
    checkpoint = tmp_path / "elsewhere" / "checkpoints" / "step-00000010"
    checkpoint.mkdir(parents=True)
    with pytest.raises(BertkitError, match="no pretrain_config.json in its run folder"):
        ablate_module.score_cell(AblateConfig(grid="custom", variants=["mlm"]), {}, str(checkpoint))


@pytest.mark.parametrize("command", ["ablate", "suite"])
def test_learning_rates_that_are_not_numbers_are_named(command, capsys):
    """Found by the fuzz suite: `ablate --only-pretrain --lrs x` raised a ValueError traceback."""
    assert main([command, "--lrs", "x"] + (["--model-dir", "m"] if command == "suite" else [])) == 2
    assert "--lrs x: expected numbers such as 1e-4 3e-4" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["suite", "glue"])
def test_a_learning_rate_given_twice_is_refused(command, capsys):
    """`suite --lrs 1e-4 0.0001` ran the one cell twice at once: the second failed on the first's lock."""
    assert main([command, "--lrs", "1e-4", "0.0001", "--model-dir", "m", "--data-dir", "d"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--lrs 1e-4 0.0001: 0.0001 is given 2 times; expected each learning rate once" in err
    with pytest.raises(BertkitError, match="3e-05 is given 2 times"):  # ablate's cells are keyed the same way
        AblateConfig(grid="size", lrs=["3e-5", "3e-5"])


def test_the_grids_shared_inputs_are_refused_for_another_corpus_naming_what_to_do(tmp_path):
    """Its cells were pretrained on OUT_DIR/inputs: another --corpus is refused (not rebuilt under them), and the
    error names the way out that `ablate` has (it has no --overwrite)."""
    lines = data_path("corpus", "python-docs-3.11.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    for name, part in (("a.txt", lines[:3000]), ("b.txt", lines[3000:6000])):
        (tmp_path / name).write_text("".join(part), encoding="utf-8")
    out = tmp_path / "grid"
    ablate_module.shared_inputs(AblateConfig(corpus=[str(tmp_path / "a.txt")], vocab_size=300, out_dir=str(out)), out)
    with pytest.raises(BertkitError, match=r"were built from other inputs \(--corpus\); expected the inputs they were "
                                           r"built from, or another --out-dir \(or .*inputs deleted"):
        ablate_module.shared_inputs(AblateConfig(corpus=[str(tmp_path / "b.txt")], vocab_size=300, out_dir=str(out)),
                                    out)
