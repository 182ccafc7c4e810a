"""benchmarks/run.py: a small case runs end to end, and a memory probe measures its own process only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bertkit import BertConfig, BertForPreTraining
from conftest import data_path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import ablation  # noqa: E402  (benchmarks/ is not a package)


def test_probe_peak_rss_is_its_own_not_the_parents():
    held = np.ones(1500 * 2**20 // 8)  # 1.5 GB resident in this process when it starts the child
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import run; print(run.peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert held.sum() > 0
    # torch + bertkit imported (about 400 MB with the CPU build, 490 MB with a CUDA build), not the parent's 1.5 GB
    assert float(out.strip().splitlines()[-1]) < 1000


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_suite_case_runs_both_sides_and_writes_results(tmp_path, bf16):
    data = data_path("glue", "SST-2")
    cmd = [sys.executable, str(BENCHMARKS / "run.py"), "--cases", "inference-b1", "--preset", "tiny", "--batches", "1",
           "--rounds", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)] + ["--bf16"] * bf16
    env = {**os.environ, "BERTKIT_DATA": str(data.parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("*.json")
    result = json.loads(result.read_text())
    assert result["machine"]["precision"] == ("bf16 autocast" if bf16 else "fp32")
    row = result["results"][0]
    assert row["case"] == "inference-b1"
    # bf16 emulated (a CPU without AVX512-BF16 or AMX): no GEMM rate bounds the model's, so no MFU is reported
    emulated = bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for side in ("bertkit", "transformers"):
        assert row[side]["tokens_per_s"] > 0
        assert row[side]["mfu"] is None if emulated else 0 < row[side]["mfu"] < 2
        assert 50 < row[side]["peak_mb"] < 4000
    assert (result["machine"]["matmul_peak_gflops"] is None) == emulated
    assert row["ratio"] == row["bertkit"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
    assert (tmp_path / "ratios.png").stat().st_size > 0


def test_loss_curve_trains_both_sides_to_the_same_losses_in_fp32(tmp_path):
    data = data_path("corpus", "python-docs-3.11.txt")
    cmd = [sys.executable, str(BENCHMARKS / "loss_curve.py"), "--preset", "tiny", "--steps", "4", "--batch-size", "4",
           "--lr", "1e-3", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BERTKIT_DATA": str(data.parents[1])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("loss-curve-*.json")
    result = json.loads(result.read_text())
    ours, theirs = result["curves"]["bertkit"], result["curves"]["transformers"]
    assert len(ours) == len(theirs) == 4 and ours[-1] < ours[0]  # it trains
    assert result["summary"]["max_abs_difference"] < 1e-4  # the same weights, batches and optimizer: the same losses
    assert len(list(tmp_path.glob("loss-curve-*.png"))) == 1


@pytest.mark.parametrize("undo", list(ablation.UNDO))
def test_each_ablation_computes_the_same_function(undo, monkeypatch):
    # an ablation must measure the same model done the slower way, or its ratio means nothing
    from bertkit import model as M
    from bertkit.model import set_kernels
    from test_model import varlen_reference

    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=64)
    model = BertForPreTraining(config).eval()
    if undo in ablation.OPT_IN:  # turned on first, varlen attention through its contract written for the CPU
        monkeypatch.setattr(M, "varlen_attention", varlen_reference)
        set_kernels(model, attention="varlen", pack_multiple=16 if undo == "filler-rows" else 1)
        assert ablation.turned_on(undo, model.bert.kernels)
    ids = torch.randint(5, 300, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, 12:] = 0
    mask[2, 5:] = 0
    labels = torch.full((3, 20), -100)
    labels[:, 1:4] = ids[:, 1:4]
    args = dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=mask, labels=labels,
                next_sentence_label=torch.tensor([0, 1, 0]), masked_positions=labels != -100)
    with torch.no_grad():
        shipped = model(**args)
        with ablation.UNDO[undo]():
            slow = model(**args)
    torch.testing.assert_close(slow.loss, shipped.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow.seq_relationship_logits, shipped.seq_relationship_logits, atol=1e-5, rtol=1e-5)


def test_an_ablation_that_would_change_nothing_is_not_measured():
    """Timing the same code twice reports noise as what an optimisation pays: the packing rule on the CPU (which
    packs every batch), blocks of 16 on a GPU (never rounded there), the three-GEMM forward under compiled blocks or
    varlen attention, and SDPA undone where varlen attention calls none."""
    from types import SimpleNamespace

    from bertkit import model as M

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          max_position_embeddings=64))
    ids = torch.randint(5, 300, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 9:] = 0
    units = [(lambda: model(ids, attention_mask=mask), 57)]
    cpu, gpu, shipped, varlen = SimpleNamespace(gpu=False), SimpleNamespace(gpu=True), M.Kernels(), M.Kernels(
        attention="varlen")
    assert "packs every batch" in ablation.not_on_path("packing-rule", cpu, shipped, False, units)
    M.set_kernels(model, packing="never")  # kept padded: "always packed" changes something
    assert ablation.not_on_path("packing-rule", cpu, model.bert.kernels, False, units) is None
    M.set_kernels(model, packing="auto")
    assert ablation.not_on_path("attention-blocks-of-16", gpu, shipped, False, units)
    assert ablation.not_on_path("attention-blocks-of-16", cpu, shipped, False, units) is None
    assert "compiled" in ablation.not_on_path("three-qkv-gemms", cpu, shipped, True, units)
    assert "varlen" in ablation.not_on_path("three-qkv-gemms", cpu, varlen, False, units)
    assert ablation.not_on_path("attention-by-hand", gpu, varlen, False, units)
    assert ablation.not_on_path("attention-by-hand", cpu, shipped, False, units) is None


def test_an_undo_of_packed_rows_is_not_measured_where_no_batch_is_packed():
    """The packed encoder (and what runs on packed rows only) undone where every batch stays padded, as at batch 1
    (no padding) or on a GPU under the packing rule's size, timed the same code twice: inference-b1 read 0.97x."""
    from types import SimpleNamespace

    from bertkit import model as M

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          max_position_embeddings=64))
    ids = torch.randint(5, 300, (3, 20))
    full, padded = torch.ones(3, 20, dtype=torch.long), torch.ones(3, 20, dtype=torch.long)
    padded[1, 9:] = 0
    cpu, shipped = SimpleNamespace(gpu=False), M.Kernels()
    no_padding = [(lambda: model(ids, attention_mask=full), 60)]
    with_padding = [(lambda: model(ids, attention_mask=padded), 49)]
    for undo in ("padded-encoder", "attention-blocks-of-16"):
        assert "no batch of this case is packed" in ablation.not_on_path(undo, cpu, shipped, False, no_padding)
        assert ablation.not_on_path(undo, cpu, shipped, False, with_padding) is None
    M.set_kernels(model, packing="never")  # what the GPU's rule does below 2^24 elements
    assert "no batch of this case is packed" in ablation.not_on_path("padded-encoder", cpu, model.bert.kernels, False,
                                                                     with_padding)


def test_blocks_of_16_undone_are_not_measured_where_every_length_is_whole_blocks():
    """Attention's length rounded up to blocks of 16 changes nothing for batches of 128 (pretraining) or 384 (SQuAD
    windows): undone there, pretrain-mini read 1.07x for the same code."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          max_position_embeddings=64))
    cpu = SimpleNamespace(gpu=False)
    for length, rounded in ((32, False), (20, True)):
        ids = torch.randint(5, 300, (3, length))
        mask = torch.ones(3, length, dtype=torch.long)
        mask[1, 9:] = 0
        units = [(lambda: model(ids, attention_mask=mask), int(mask.sum()))]
        reason = ablation.not_on_path("attention-blocks-of-16", cpu, model.bert.kernels, False, units)
        assert (reason is None) == rounded, (length, reason)
        assert ablation.not_on_path("padded-encoder", cpu, model.bert.kernels, False, units) is None


def test_finetune_comparison_runs_again_with_other_settings(tmp_path, minilm_dir):
    """finetune_vs_transformers.py keeps bertkit's run folder per task and seed; a later invocation with other
    settings (more examples) replaces it, as its results.json row does, instead of stopping at finetune's refusal
    of a folder that holds another run."""
    from types import SimpleNamespace

    import finetune_vs_transformers

    rows = data_path("glue", "SST-2", "train.tsv").read_text(encoding="utf-8").splitlines()
    sst2 = tmp_path / "data" / "glue" / "SST-2"
    sst2.mkdir(parents=True)
    sst2.joinpath("train.tsv").write_text("\n".join(rows[:17]) + "\n", encoding="utf-8")
    sst2.joinpath("dev.tsv").write_text("\n".join(rows[:1] + rows[17:25]) + "\n", encoding="utf-8")
    args = SimpleNamespace(data=tmp_path / "data", model_dir=minilm_dir, out=tmp_path / "out", lr=5e-5, batch_size=8,
                           max_length=32, eval_batch_size=8, threads=1, device="cpu")
    for n_train in (8, 16):
        result = finetune_vs_transformers.run_bertkit(args, "SST-2", n_train, 1, 42)
        assert result["train_examples"] == n_train


def test_finetune_comparison_times_no_checkpoint_writes_on_bertkit_side(tmp_path, monkeypatch):
    """The transformers loop writes nothing while its epoch is timed; bertkit's finetune wrote a resumable checkpoint
    every 500 steps inside its timed epoch (4 in a full SST-2 epoch at batch 32, about 0.3 s each for MiniLM on a
    CPU), so its side did work the other did not. Only the end-of-epoch checkpoint, after the timing, is left."""
    from types import SimpleNamespace

    import finetune_vs_transformers

    configs = []

    def finetune(config):
        configs.append(config)
        return {"epochs": [{"train_seconds": 1.0, "train_cpu_seconds": 1.0, "accuracy": 50.0}], "train_examples": 8}

    monkeypatch.setattr(finetune_vs_transformers, "finetune", finetune)
    args = SimpleNamespace(data=tmp_path, model_dir=tmp_path, out=tmp_path / "out", lr=5e-5, batch_size=32,
                           max_length=128, eval_batch_size=128, threads=1, device="cpu")
    finetune_vs_transformers.run_bertkit(args, "SST-2", 67349, 1, 42)
    assert configs[0].save_every == 0


@pytest.mark.parametrize("option, value", [("--rounds", "0"), ("--batches", "0"), ("--pretrain-batch", "0"),
                                           ("--threads", "0"), ("--warmup", "-1"), ("--rounds", "two")])
def test_case_sizes_below_their_least_are_refused_by_the_parser(option, value, capsys):
    """--rounds 0 and --batches 0 divided by zero after every model was built and warmed up (minutes of a GPU
    lease), and --pretrain-batch 0 ran the default batch instead."""
    import argparse

    import run

    parser = argparse.ArgumentParser(prog="run.py")
    run.add_case_arguments(parser, batches=3)
    with pytest.raises(SystemExit):
        parser.parse_args([option, value])
    assert f"argument {option}: '{value}': expected a whole number >= " in capsys.readouterr().err
    assert parser.parse_args([option, "1"]) is not None


@pytest.mark.parametrize("script", ["run.py", "ablation.py", "loss_curve.py"])
def test_an_unknown_preset_is_a_usage_error(script):
    """It was a BertkitError traceback, raised once the run had started (after the matmul peak, on a GPU too)."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--preset", "huge"], capture_output=True,
                          text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "argument --preset: invalid choice: 'huge'" in proc.stderr and "Traceback" not in proc.stderr


def test_prepare_case_tokenizes_the_same_corpus_on_both_sides(tmp_path):
    data = data_path("corpus", "python-docs-3.11.txt").parents[1]
    data_path("checkpoints", "all-MiniLM-L6-v2")
    cmd = [sys.executable, str(BENCHMARKS / "run.py"), "--cases", "prepare", "--rounds", "1", "--warmup", "0",
           "--no-memory", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BERTKIT_DATA": str(data)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(next(tmp_path.glob("*.json")).read_text())["results"][0]
    tokens = {side: row[side]["tokens_per_s"] * row[side]["seconds"] for side in ("bertkit", "transformers")}
    assert tokens["bertkit"] == pytest.approx(tokens["transformers"]) and tokens["bertkit"] > 500_000
    assert "mfu" not in row["bertkit"]


def test_long_squad_task_keeps_every_answer_where_it_now_starts(tmp_path):
    """benchmarks/long_squad.py's task: each article cut to its first paragraphs within the token budget, every kept
    question's answers at their new offsets in the joined context, train and scored articles disjoint."""
    import long_squad

    squad = data_path("squad", "dev-v1.1.json")
    tokenizer = data_path("checkpoints", "all-MiniLM-L6-v2")
    sizes = long_squad.build(squad, tokenizer, tmp_path, context_tokens=600, train_articles=3, train_per_article=4,
                             dev_per_article=6, seed=0)
    assert sizes["train_questions"] == 12 and sizes["train_articles"] == 3 and sizes["dev_articles"] == 45
    assert sizes["context_tokens"]["max"] <= 600
    train, dev = (json.loads((tmp_path / f"{s}.json").read_text())["data"] for s in ("train", "dev"))
    assert not {a["title"] for a in train} & {a["title"] for a in dev}
    original = {qa["id"]: qa for article in json.loads(squad.read_text())["data"] for p in article["paragraphs"]
                for qa in p["qas"]}
    first = json.loads(squad.read_text())["data"][0]["paragraphs"]
    assert train[0]["paragraphs"][0]["context"].startswith(first[0]["context"] + "\n\n" + first[1]["context"])
    for article in train + dev:
        (paragraph,) = article["paragraphs"]
        for qa in paragraph["qas"]:
            assert [a["text"] for a in qa["answers"]] == [a["text"] for a in original[qa["id"]]["answers"]]
            for a in qa["answers"]:
                assert paragraph["context"][a["answer_start"]:].startswith(a["text"])


def test_long_squad_report_reads_each_arms_run_folder(tmp_path):
    import long_squad

    def arm(model, length, rows, f1):
        epoch = {"epoch": 1, "train_seconds": 10.0, "eval_seconds": 2.0, "exact": 1.0, "f1": f1}
        return {"model": model, "flags": ["--max-length", length], "wall_s": 13.0,
                "metrics": {"best_epoch": 1, "best": {"exact": 1.0, "f1": f1}, "epochs": [epoch], "train_rows": rows}}

    result = {"args": {"context_tokens": 2000}, "arms": {"strided": arm("runs/a/checkpoints/step-9", "512", 1395, 0.5),
                                                         "long": arm("runs/b", "2112", 200, 3.25)},
              "data": {"context_tokens": {"min": 1, "max": 2}, "train_questions": 3, "train_articles": 4,
                       "dev_questions": 5, "dev_articles": 6}}
    long_squad.write_report(tmp_path, result)
    table = (tmp_path / "long_squad.md").read_text()
    assert "| strided | a/step-9 | 512 | 1,395 | 1.00 | 0.50 | 10 s | 2 s |" in table
    assert "| long | b | 2112 | 200 | 1.00 | 3.25 |" in table
    assert json.loads((tmp_path / "long_squad.json").read_text())["arms"]["long"]["metrics"]["best"]["f1"] == 3.25



def test_long_squad_reruns_an_arm_whose_settings_or_data_changed(tmp_path, monkeypatch):
    """An arm with a metrics.json was never run again: rerun with another --lr or --context-tokens, the report gave
    the new settings and data sizes beside the old run's scores."""
    import argparse

    import long_squad

    runs = []

    def finetune(command, check):
        runs.append(command)
        run_dir = Path(command[command.index("--out-dir") + 1])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps({"run": len(runs)}))

    monkeypatch.setattr(long_squad.subprocess, "run", finetune)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"{split}.json").write_text('{"data": []}')
    args = argparse.Namespace(lr=1e-4, seed=0, threads=1)
    arm = lambda: long_squad.run_arm("long", "m", tmp_path, data, args, ["--max-length", "700"])  # noqa: E731
    assert arm()["metrics"] == {"run": 1}
    args.threads = 2  # how fast, not what: the scores stand
    assert arm()["metrics"] == {"run": 1} and len(runs) == 1
    args.lr = 5e-5
    assert arm()["metrics"] == {"run": 2}
    (data / "dev.json").write_text('{"data": [1]}')  # another --context-tokens rewrites the task
    assert arm()["metrics"] == {"run": 3}
    assert arm()["metrics"] == {"run": 3} and len(runs) == 3

def test_int8_gemm_ceiling_times_both_kinds_at_every_shape():
    """`inference_int8.py --gemm`: one row per linear shape of MiniLM and BERT-Base, float32 and each int8 engine
    (x86 and onednn in torch's CPU wheels) positive, with its ratio."""
    import inference_int8

    table = inference_int8.gemm_ceiling(rounds=1).splitlines()
    assert "int8 x86 GOP/s" in table[0] and "int8 onednn GOP/s" in table[0]
    rows = [line.strip("| ").split(" | ") for line in table[2:]]
    assert len(rows) == 6 and {r[0] for r in rows} == {"MiniLM", "BERT-Base"}
    for r in rows:
        assert float(r[2]) > 0
        for cell in r[3:]:
            speed, ratio = cell.split()
            assert float(speed) > 0 and ratio.startswith("(") and ratio.endswith("×)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run needs a machine without CUDA")
def test_gpu_check_script_passes_only_options_its_scripts_accept(tmp_path):
    """benchmarks/gpu_check.sh, every stage, on a machine without CUDA: each benchmark command gets past its parser
    and its --kernels checks to the one error that says there is no GPU. An option renamed since the script was
    written would otherwise be found only on a lent GPU, at the cost of that lease."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python3").write_text(  # the tests stage's pytest needs plugins (xdist, timeout) only the GPU image has
        f'#!/bin/bash\n[ "$1 $2" = "-m pytest" ] && {{ echo "pytest not run"; exit 0; }}\nexec {sys.executable} "$@"\n')
    (shims / "nvidia-smi").write_text("#!/bin/bash\necho 'no GPU here'\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    script = BENCHMARKS / "gpu_check.sh"
    stages = "tests varlen ablation profile pretrain suite memory".split()
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(script), *stages], env=env, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert all(f"{stage}: " in log for stage in stages), log
    errors = [line for line in log.splitlines() if "error" in line.lower() or "Traceback" in line]
    # every python3 benchmarks/... line runs once, loss_curve.py once per kernel choice of its loop
    expected = script.read_text().count("python3 benchmarks/") + 1
    assert errors == [line for line in errors if line.endswith(": no CUDA device here")], "\n".join(errors)
    assert len(errors) == expected, log
    # and the log says which failed (a stage killed at its timeout left no trace): every command but the pytest
    # shim, loss_curve.py's two runs as one, and the script's exit status says so too
    assert f"done, {expected - 1} failed:" in log and "!!! FAILED varlen: eager: exit 2" in log, log
    assert done.returncode == 1


def test_gpu_check_script_refuses_a_stage_it_does_not_have(tmp_path):
    """A misspelt stage (a rerun of what failed, typed on the lease) is refused before anything runs: it ran nothing
    and ended in "done", exit 0, after the machine report."""
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "varlen", "profle"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no stage 'profle'; expected pack, or some of tests varlen" in done.stderr
    assert "machine" not in (tmp_path / "out" / "gpu_check.log").read_text()


def test_mfu_counts_attention_over_each_sequences_real_length():
    """Each token attends over its own sequence: the attention term goes with the sum of n^2, not with the padded
    maximum (a batch of lengths 2 and 4 padded to 4 counts (4 + 16) / 6, not 4)."""
    import run

    assert run.attention_length([2, 4]) == pytest.approx(20 / 6)
    batches = [{"attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])}]
    assert run.real_lengths(batches) == [2, 4]


def test_the_lora_case_trains_the_same_parameters_on_both_sides():
    """finetune-sst2-lora: bertkit's LoRA and peft's on transformers' model adapt the same layers and train the same
    number of parameters (rank 8 on query and value, the classifier and the pooler), on the same batches."""
    import run

    data_path("glue", "SST-2")
    case = run.case_finetune_sst2(run.Bench(), "tiny", 8, 16, lora=True)
    trained = {side: sum(p.numel() for p in model.parameters() if p.requires_grad) for side, model in case.models.items()}
    H, L = case.config.hidden_size, case.config.num_hidden_layers
    assert trained["bertkit"] == trained["transformers"] == L * 2 * 8 * (H + H) + (H * H + H) + (H * 2 + 2)
    assert [n for _, n in case.units["bertkit"]] == [n for _, n in case.units["transformers"]]  # the same tokens
    for side in case.units:
        case.units[side][0][0]()  # an epoch runs


def test_the_embedding_case_gives_both_sides_the_same_loss_on_the_same_pairs():
    """finetune-embedding: sentence-transformers loads bertkit's folder (the same weights) and its CoSENTLoss on the
    first batch equals bertkit's; both sides count the same tokens, and a step runs on each."""
    pytest.importorskip("sentence_transformers")
    import run

    data_path("glue", "STS-B")
    case = run.case_finetune_embedding(run.Bench(), "tiny", 8, 16)
    assert [n for _, n in case.units["bertkit"]] == [n for _, n in case.units["transformers"]]
    losses = {}
    for side, model in case.models.items():
        model.eval()  # no dropout: the same function
        step = case.units[side][0][0]
        batch = step.__defaults__[0]  # the unit's batch, bound in its lambda
        call = step.__defaults__[3]
        with torch.no_grad():
            losses[side] = call(model, batch).item()
    assert losses["bertkit"] == pytest.approx(losses["transformers"], rel=1e-5)
    for side in case.units:
        case.units[side][0][0]()


def test_the_explain_case_gives_both_sides_the_same_attributions():
    """explain-ig: bertkit's integrated gradients and Captum's on transformers' twin agree on every sentence's
    tokens, and both sides count the same tokens."""
    pytest.importorskip("captum")
    import run

    data_path("glue", "SST-2")
    case = run.case_explain(run.Bench(), "tiny", 3, steps=8, batch_size=3)
    assert [n for _, n in case.units["bertkit"]] == [n for _, n in case.units["transformers"]]
    for ours, theirs in zip(case.units["bertkit"], case.units["transformers"]):
        mine = ours[0]().tokens
        shares, _ = theirs[0]()
        torch.testing.assert_close(mine, shares.sum(-1)[0].double(), atol=1e-5 * mine.abs().max().item(), rtol=0)


def test_the_fill_mask_case_gives_both_sides_the_same_tokens(monkeypatch):
    """fill-mask: bertkit's fill_masks and transformers' pipeline on the twin model name the same first tokens with
    the same probabilities for every mask of a batch, and count the same tokens."""
    import run

    # a pipeline given a list sets TOKENIZERS_PARALLELISM=false in the environment when it is unset, for every later
    # test and the processes they start (a tokenizer's thread pool then had one thread): set here, and taken back
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")

    data_path("glue", "SST-2")
    case = run.case_fill_mask(run.Bench(), "tiny", 4, 1)
    assert [n for _, n in case.units["bertkit"]] == [n for _, n in case.units["transformers"]]
    ours, theirs = case.units["bertkit"][0][0](), case.units["transformers"][0][0]()
    assert len(ours) == len(theirs) == 4
    vocab = run.tokenizer().vocab()
    for mine, their in zip(ours, theirs):
        their = their if isinstance(their[0], list) else [their]
        assert [c["token"] for m in mine["masks"] for c in m] == [vocab[t["token"]] for m in their for t in m]
        assert [c["probability"] for m in mine["masks"] for c in m] == pytest.approx(
            [t["score"] for m in their for t in m], rel=1e-4)
