"""Fault injection: a pretraining or fine-tuning run SIGKILLed anywhere (mid-step, before its first checkpoint,
inside a checkpoint write, while pruning or cleaning up) and resumed with --resume auto ends with the very weights,
logs and scores of an uninterrupted run; a damaged newest checkpoint (truncated, unmarked, one flipped byte) is
set aside for the one before it; Ctrl-C saves a checkpoint and exits 130.

Kill points are (function, call number, before or after the call): the child process wraps the function and
SIGKILLs itself there, so that a point is hit exactly and every point is reproducible. The call numbers are drawn
from the counts an uninterrupted run makes, with a fixed seed. The default run tries a few points per loop; the
slow one (`pytest -m slow`) 20 per loop.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bertkit import BertModel, Tokenizer
from bertkit.checkpoint import COMPLETE_NAME, WEIGHTS_NAME, list_checkpoints
from bertkit.cli import main as cli_main
from bertkit.errors import BertkitError
from bertkit.tasks.finetune import FinetuneConfig, finetune
from bertkit.train.pretrain import PretrainConfig, pretrain
from tiny_folders import tiny_config
from train.test_pretrain import REPO, flags, inputs, rows, small  # noqa: F401 (inputs is a fixture)

# The child: one torch thread (the same floats as the reference), and the kill point (or a call count) from the
# environment.
CHILD = r"""
import atexit, importlib, json, os, signal, sys
import torch
torch.set_num_threads(1)
targets = json.loads(os.environ["FAULT_TARGETS"])
kill = json.loads(os.environ.get("FAULT_KILL", "null"))
counts = {}

def wrap(module_name, attr):
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    key = f"{module_name}:{attr}"

    def wrapper(*args, **kwargs):
        counts[key] = counts.get(key, 0) + 1
        hit = kill is not None and kill[0] == key and kill[1] == counts[key]
        if hit and kill[2] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if hit and kill[2] == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, attr, wrapper)

for target in targets:
    wrap(*target.split(":"))
if "FAULT_COUNTS" in os.environ:
    atexit.register(lambda: open(os.environ["FAULT_COUNTS"], "w").write(json.dumps(counts)))
from bertkit.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Where a run can be killed. Checkpoint writing is taken apart: the weights, the training state, the checksums,
# each fsync, the renames into place; and the steps, evaluations, log and metrics writes, pruning, clean-up.
SAVING = ["bertkit.checkpoint:save_pretrained", "bertkit.checkpoint:save_training_state", "bertkit.checkpoint:_sha256",
          "bertkit.checkpoint:_fsync", "os:rename", "os:replace"]
PRETRAIN_TARGETS = ["bertkit.train.pretrain:train_step", "bertkit.train.pretrain:evaluate",
                    "bertkit.train.pretrain:prune_checkpoints", *SAVING]
FINETUNE_TARGETS = ["bertkit.tasks.finetune:train_step", "bertkit.tasks.finetune:write_json",
                    "bertkit.tasks.finetune:prune_checkpoints", "shutil:rmtree", *SAVING]


def child(args: list[str], targets: list[str], kill=None, counts: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_TARGETS": json.dumps(targets)}
    if kill is not None:
        env["FAULT_KILL"] = json.dumps(kill)
    if counts is not None:
        env["FAULT_COUNTS"] = str(counts)
    return subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def kill_points(counts: dict[str, int], step_target: str, first_save: int, n: int, seed: int) -> list:
    """`n` kill points: one before the first checkpoint, one inside a checkpoint write, the rest anywhere."""
    rng = random.Random(seed)
    points = [[step_target, rng.randint(1, first_save - 1), rng.choice(["before", "after"])],
              ["bertkit.checkpoint:_fsync", rng.randint(1, counts["bertkit.checkpoint:_fsync"]), "before"]]
    reachable = sorted(k for k, v in counts.items() if v)
    while len(points) < n:
        target = rng.choice(reachable)
        points.append([target, rng.randint(1, counts[target]), rng.choice(["before", "after"])])
    return points[:n]


def kill_and_resume(args: list[str], resume: list[str], targets: list[str], point) -> str:
    """Run until the kill point, then resume; returns the resumed run's output."""
    killed = child(args, targets, kill=point)
    assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-2000:])
    resumed = child(args + resume, targets)
    assert resumed.returncode == 0, (point, resumed.stderr[-3000:])
    return resumed.stdout + resumed.stderr


def assert_same_weights(a: Path, b: Path, point) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), f"{key} differs after a kill at {point}"


# ---- pretraining -----------------------------------------------------------------------------------------------


def pretrain_config(inputs, run_dir) -> PretrainConfig:
    return small(inputs, run_dir, max_steps=24, save_every=5, keep_last=2, eval_every=10, eval_batches=2)


def pretrain_outcome(run_dir: Path) -> tuple:
    drop = ("tokens_per_s",)
    train = [{k: v for k, v in r.items() if k not in drop} for r in rows(run_dir)]
    return list_checkpoints(run_dir / "checkpoints")[-1] / WEIGHTS_NAME, train, rows(run_dir, "eval")


@pytest.fixture(scope="module")
def pretrain_reference(inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-reference")
    counts = root / "counts.json"
    done = child(flags(pretrain_config(inputs, root / "run")), PRETRAIN_TARGETS, counts=counts)
    assert done.returncode == 0, done.stderr[-3000:]
    return pretrain_outcome(root / "run"), json.loads(counts.read_text())


def check_pretraining_kills(inputs, tmp_path, pretrain_reference, n: int, seed: int) -> None:
    (weights, train, evals), counts = pretrain_reference
    points = kill_points(counts, "bertkit.train.pretrain:train_step", 5, n, seed)

    def one(i: int) -> None:
        run_dir = tmp_path / f"kill-{i}"
        output = kill_and_resume(flags(pretrain_config(inputs, run_dir)), ["--resume", "auto"], PRETRAIN_TARGETS,
                                 points[i])
        assert "Traceback" not in output, output[-3000:]
        got_weights, got_train, got_evals = pretrain_outcome(run_dir)
        assert_same_weights(weights, got_weights, points[i])
        assert (got_train, got_evals) == (train, evals), points[i]

    with ThreadPoolExecutor(2) as pool:  # two children at a time: one torch thread each
        list(pool.map(one, range(len(points))))


def test_pretraining_killed_anywhere_resumes_to_the_uninterrupted_weights(inputs, tmp_path, pretrain_reference):
    check_pretraining_kills(inputs, tmp_path, pretrain_reference, n=4, seed=0)


@pytest.mark.slow
def test_pretraining_killed_at_20_random_points_resumes_to_the_uninterrupted_weights(inputs, tmp_path,
                                                                                     pretrain_reference):
    check_pretraining_kills(inputs, tmp_path, pretrain_reference, n=20, seed=1)


def _crash_at(monkeypatch, module, step: int) -> None:
    """Make the loop's step function raise at optimizer step `step`, as a crash there would stop it."""
    original, calls = module.train_step, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "train_step", crashing)


def damage(checkpoint: Path, kind: str) -> None:
    weights = checkpoint / WEIGHTS_NAME
    if kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "no completion marker":
        (checkpoint / COMPLETE_NAME).unlink()
    else:  # one byte of a weight flipped: still a valid safetensors file, only the checksum tells
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0x01
        weights.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["truncated weights", "no completion marker", "flipped byte"])
def test_a_damaged_newest_pretraining_checkpoint_falls_back_to_the_one_before(inputs, tmp_path, monkeypatch, caplog,
                                                                             kind):
    import bertkit.train.pretrain as module

    cfg = small(inputs, tmp_path / "whole", max_steps=12, save_every=4, keep_last=3)
    pretrain(cfg)
    with monkeypatch.context() as patch:
        _crash_at(patch, module, 11)
        with pytest.raises(RuntimeError, match="crash"):
            pretrain(PretrainConfig(**{**vars(cfg), "out_dir": str(tmp_path / "cut")}))
    checkpoints = tmp_path / "cut" / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000004", "step-00000008"]
    damage(checkpoints / "step-00000008", kind)
    result = pretrain(PretrainConfig(**{**vars(cfg), "out_dir": str(tmp_path / "cut"), "resume": "auto"}))
    assert "step-00000008" in caplog.text and "falling back to the checkpoint before it" in caplog.text
    assert "the logs reach step 10, past the checkpoint at step 4" in caplog.text
    assert result["step"] == 12
    assert_same_weights(list_checkpoints(tmp_path / "whole" / "checkpoints")[-1] / WEIGHTS_NAME,
                        list_checkpoints(checkpoints)[-1] / WEIGHTS_NAME, kind)
    assert rows(tmp_path / "cut") and [r["loss"] for r in rows(tmp_path / "cut")] == \
        [r["loss"] for r in rows(tmp_path / "whole")]
    assert list(checkpoints.glob(".corrupt-step-00000008-*")) or kind == "no completion marker"


@pytest.mark.parametrize("kind", ["truncated weights", "no completion marker", "flipped byte"])
def test_a_pretraining_run_whose_every_checkpoint_is_damaged_is_refused_not_started_over(inputs, tmp_path, kind):
    cfg = small(inputs, tmp_path / "run", max_steps=12, save_every=4, keep_last=1, stop_at=8)
    pretrain(cfg)
    damage(tmp_path / "run" / "checkpoints" / "step-00000008", kind)
    again = PretrainConfig(**{**vars(cfg), "stop_at": None, "resume": "auto"})
    for _ in range(2):  # refused again: nothing was set aside that a second try would take for a fresh start
        # was: the damaged checkpoint set aside "for the one before it", of which there was none, the logs deleted
        # and the run trained again from step 0
        with pytest.raises(BertkitError, match=r"checkpoints: no whole checkpoint to resume from \(step-00000008: "
                                               r".*\); expected .*--overwrite to start over"):
            pretrain(again)
    assert [int(r["step"]) for r in rows(tmp_path / "run")] == list(range(1, 9))
    assert (tmp_path / "run" / "checkpoints" / "step-00000008").is_dir()


def gpu_fp16(name, device):
    """What `--precision fp16` resolves to on a GPU: an enabled loss scaler (a CPU one here, for want of a GPU)."""
    from bertkit.train.precision import Precision

    return Precision(None, "cpu", torch.amp.GradScaler("cpu", enabled=True))


def test_a_pretraining_run_saved_without_loss_scaling_resumes_in_fp16_with_a_fresh_scale(inputs, tmp_path,
                                                                                         monkeypatch, caplog):
    """--precision fp16 falls back to fp32 on a CPU, which saves no loss scale: the run resumed on a GPU, where fp16
    scales the loss, starts the scale afresh. Was: GradScaler's RuntimeError ('The source state dict is empty'),
    a traceback."""
    import bertkit.train.pretrain as module

    cfg = small(inputs, tmp_path / "run", max_steps=8, stop_at=4, precision="fp16")
    pretrain(cfg)
    monkeypatch.setattr(module, "resolve", gpu_fp16)
    assert pretrain(PretrainConfig(**{**vars(cfg), "stop_at": None, "resume": "auto"}))["step"] == 8
    assert "saved without fp16 loss scaling; the loss scale starts afresh at 65536" in caplog.text


@pytest.mark.parametrize("rerun", [[], ["--resume", "auto"]], ids=["plain rerun", "resume auto"])
def test_a_pretraining_run_killed_before_its_first_checkpoint_starts_over(inputs, tmp_path, monkeypatch, caplog,
                                                                          rerun):
    import bertkit.train.pretrain as module

    cfg = small(inputs, tmp_path / "run", max_steps=8, save_every=5)
    with monkeypatch.context() as patch:
        _crash_at(patch, module, 4)
        with pytest.raises(RuntimeError, match="crash"):
            pretrain(cfg)
    assert [int(r["step"]) for r in rows(tmp_path / "run")] == [1, 2, 3]
    assert cli_main(flags(cfg) + rerun) == 0  # once `KeyError: 'step'` from a train.csv left without a header
    assert "stopped before its first checkpoint; starting over" in caplog.text
    assert [int(r["step"]) for r in rows(tmp_path / "run")] == list(range(1, 9))
    reference = pretrain(PretrainConfig(**{**vars(cfg), "out_dir": str(tmp_path / "reference")}))
    assert_same_weights(Path(reference["checkpoint"]) / WEIGHTS_NAME,
                        list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / WEIGHTS_NAME, rerun)


@pytest.mark.parametrize("signum, status, said", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])  # a scheduler's preemption
def test_ctrl_c_or_sigterm_during_pretraining_saves_a_checkpoint_and_exits_128_plus_the_signal(
        inputs, tmp_path, monkeypatch, capsys, signum, status, said):
    import bertkit.train.pretrain as module

    cfg = small(inputs, tmp_path / "run", max_steps=10, save_every=4)
    original, calls = module.train_step, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            signal.raise_signal(signum)  # the handler only notes it: this step still completes
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, "train_step", interrupted)
        assert cli_main(flags(cfg)) == status
    err = capsys.readouterr().err
    assert f"bertkit: {said}: checkpoint" in err and "saved at step 6; --resume auto continues" in err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone with the run
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000004", "step-00000006"]
    assert cli_main(flags(cfg) + ["--resume", "auto"]) == 0
    reference = pretrain(PretrainConfig(**{**vars(cfg), "out_dir": str(tmp_path / "reference")}))
    assert_same_weights(Path(reference["checkpoint"]) / WEIGHTS_NAME,
                        list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / WEIGHTS_NAME, "ctrl-c")


# ---- fine-tuning -----------------------------------------------------------------------------------------------

WORDS = "the movie film good bad great awful boring fun is was not very and of it to".split()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 2-layer, 32-wide random encoder with an 80-token vocabulary, and a 48-example training file."""
    root = tmp_path_factory.mktemp("toy")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", *letters, *("##" + c for c in letters), *WORDS]
    (root / "model").mkdir()
    (root / "model" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = Tokenizer.from_vocab(root / "model" / "vocab.txt")
    torch.manual_seed(0)
    config = tiny_config(tokenizer.vocab_size)
    BertModel(config).save_pretrained(root / "model", tokenizer=tokenizer)
    examples = [("a good movie", 1), ("a bad film", 0), ("great fun", 1), ("very boring", 0), ("not bad", 1),
                ("awful , it was boring", 0)] * 8
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in examples))
    return root


def finetune_config(toy: Path, out_dir: Path, **overrides) -> FinetuneConfig:
    """36 steps (3 epochs of 12 batches), checkpoints every 5 steps and at every epoch's end."""
    options = dict(model_dir=str(toy / "model"), task="SST-2", train_file=str(toy / "train.tsv"),
                   eval_file=str(toy / "train.tsv"), out_dir=str(out_dir), lr=2e-3, batch_size=4, epochs=3, seed=0,
                   threads=1, device="cpu", save_every=5)
    return FinetuneConfig(**{**options, **overrides})


def finetune_flags(config: FinetuneConfig) -> list[str]:
    out = ["finetune"]
    for name, value in vars(config).items():
        if value is None or value is False:
            continue
        out += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return out


def finetune_outcome(out_dir: Path) -> tuple:
    timing = ("train_seconds", "train_cpu_seconds", "train_examples_per_second", "eval_seconds")
    record = json.loads((out_dir / "metrics.json").read_text())
    record["epochs"] = [{k: v for k, v in e.items() if k not in timing} for e in record["epochs"]]
    assert not (out_dir / "checkpoints").exists() and not (out_dir / ".checkpoints-done").exists()
    return out_dir / WEIGHTS_NAME, record, rows(out_dir, "eval")


@pytest.fixture(scope="module")
def finetune_reference(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-reference")
    counts = root / "counts.json"
    done = child(finetune_flags(finetune_config(toy, root / "run")), FINETUNE_TARGETS, counts=counts)
    assert done.returncode == 0, done.stderr[-3000:]
    return finetune_outcome(root / "run"), json.loads(counts.read_text())


def check_finetuning_kills(toy, tmp_path, finetune_reference, n: int, seed: int) -> None:
    (weights, record, evals), counts = finetune_reference
    points = kill_points(counts, "bertkit.tasks.finetune:train_step", 5, n, seed)

    def one(i: int) -> None:
        out_dir = tmp_path / f"kill-{i}"
        output = kill_and_resume(finetune_flags(finetune_config(toy, out_dir)), ["--resume", "auto"],
                                 FINETUNE_TARGETS, points[i])
        assert "Traceback" not in output, output[-3000:]
        got_weights, got_record, got_evals = finetune_outcome(out_dir)
        assert_same_weights(weights, got_weights, points[i])
        got_record["model_dir"] = record["model_dir"]
        assert (got_record, got_evals) == (record, evals), points[i]

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(len(points))))


def test_finetuning_killed_anywhere_resumes_to_the_uninterrupted_weights(toy, tmp_path, finetune_reference):
    check_finetuning_kills(toy, tmp_path, finetune_reference, n=4, seed=0)


@pytest.mark.slow
def test_finetuning_killed_at_20_random_points_resumes_to_the_uninterrupted_weights(toy, tmp_path,
                                                                                    finetune_reference):
    check_finetuning_kills(toy, tmp_path, finetune_reference, n=20, seed=1)


def test_a_one_epoch_finetuning_killed_after_its_metrics_before_its_checkpoint_still_gets_its_results_table(toy,
                                                                                                           tmp_path):
    """With one epoch and no checkpoint inside it (the usual --save-every 500 on a short task), a kill between the
    epoch's metrics.json and its checkpoint leaves nothing to resume from and a run that is finished: --resume auto
    said "finished already" and never wrote results.md (nor printed the table)."""
    config = finetune_config(toy, tmp_path / "run", epochs=1, save_every=0)
    # write_json: finetune_config.json, then metrics.json
    killed = child(finetune_flags(config), FINETUNE_TARGETS, kill=["bertkit.tasks.finetune:write_json", 2, "after"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "run" / "results.md").exists() and not list_checkpoints(tmp_path / "run" / "checkpoints")
    resumed = child(finetune_flags(config) + ["--resume", "auto"], FINETUNE_TARGETS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "this run has finished already" in resumed.stderr
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| 1 (best) |" in table and table in resumed.stdout


@pytest.mark.parametrize("kind", ["truncated weights", "no completion marker", "flipped byte"])
def test_a_damaged_newest_finetuning_checkpoint_falls_back_to_the_one_before(toy, tmp_path, monkeypatch, caplog, kind):
    import bertkit.tasks.finetune as module

    whole = finetune(finetune_config(toy, tmp_path / "whole"))
    with monkeypatch.context() as patch:
        _crash_at(patch, module, 29)  # in epoch 3, after the checkpoints of steps 24 (epoch 2's end) and 25
        with pytest.raises(RuntimeError, match="crash"):
            finetune(finetune_config(toy, tmp_path / "cut"))
    checkpoints = tmp_path / "cut" / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000024", "step-00000025"]
    damage(checkpoints / "step-00000025", kind)
    resumed = finetune(finetune_config(toy, tmp_path / "cut", resume="auto"))
    assert "step-00000025" in caplog.text and "falling back to the checkpoint before it" in caplog.text
    assert_same_weights(tmp_path / "whole" / WEIGHTS_NAME, tmp_path / "cut" / WEIGHTS_NAME, kind)
    assert [e["train_loss"] for e in resumed["epochs"]] == [e["train_loss"] for e in whole["epochs"]]


def test_a_finetuning_run_whose_every_checkpoint_is_damaged_is_refused_not_started_over(toy, tmp_path, monkeypatch):
    import bertkit.tasks.finetune as module

    with monkeypatch.context() as patch:
        _crash_at(patch, module, 8)  # after the checkpoint of step 5, the only one
        with pytest.raises(RuntimeError, match="crash"):
            finetune(finetune_config(toy, tmp_path / "cut"))
    damage(tmp_path / "cut" / "checkpoints" / "step-00000005", "flipped byte")
    with pytest.raises(BertkitError, match=r"no whole checkpoint to resume from \(step-00000005: .*checksum"):
        finetune(finetune_config(toy, tmp_path / "cut", resume="auto"))
    assert (tmp_path / "cut" / "checkpoints" / "step-00000005").is_dir()


def test_finetuning_saved_without_loss_scaling_resumes_in_fp16_with_a_fresh_scale(toy, tmp_path, monkeypatch, caplog):
    """--device may change on resume: an fp16 run started on a CPU (fp32 there, no loss scale saved) and resumed on a
    GPU starts the scale afresh. Was: GradScaler's RuntimeError, a traceback."""
    import bertkit.tasks.finetune as module

    with monkeypatch.context() as patch:
        _crash_at(patch, module, 8)
        with pytest.raises(RuntimeError, match="crash"):
            finetune(finetune_config(toy, tmp_path / "cut", precision="fp16"))
    monkeypatch.setattr(module, "resolve_precision", gpu_fp16)
    assert len(finetune(finetune_config(toy, tmp_path / "cut", precision="fp16", resume="auto"))["epochs"]) == 3
    assert "saved without fp16 loss scaling; the loss scale starts afresh at 65536" in caplog.text


def test_a_second_finetuning_into_a_live_runs_folder_is_told_it_is_in_use_not_interrupted(toy, tmp_path):
    from bertkit.train.rundir import RunLock

    config = finetune_config(toy, tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step-00000005").mkdir(parents=True)
    config.save(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step-00000005" / COMPLETE_NAME).write_text("{}")
    with RunLock(tmp_path / "run"):  # the first run, still training
        # was: "holds the checkpoints of an interrupted run ...; expected --resume auto", which then said "in use"
        with pytest.raises(BertkitError, match=f"run: in use by process {os.getpid()} on "):
            finetune(finetune_config(toy, tmp_path / "run"))


def test_ctrl_c_during_finetuning_saves_a_checkpoint_and_exits_130(toy, tmp_path, monkeypatch, capsys):
    import bertkit.tasks.finetune as module

    config = finetune_config(toy, tmp_path / "run")
    original, calls = module.train_step, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 17:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, "train_step", interrupted)
        assert cli_main(finetune_flags(config)) == 130
    err = capsys.readouterr().err
    assert "saved at step 17 (epoch 2, batch 5); --resume auto continues" in err
    assert cli_main(finetune_flags(config) + ["--resume", "auto"]) == 0
    finetune(finetune_config(toy, tmp_path / "reference"))
    assert_same_weights(tmp_path / "reference" / WEIGHTS_NAME, tmp_path / "run" / WEIGHTS_NAME, "ctrl-c")
    shutil.rmtree(tmp_path / "reference")


def test_grad_accum_steps_are_exact_and_resume_mid_epoch_bitwise(toy, tmp_path, monkeypatch):
    """Fine-tuning with --grad-accum 2: one optimizer step per two micro-batches (18 steps for 3 epochs of 12
    batches), and a run that crashes mid-epoch resumes with --resume auto to the very weights and epoch losses of
    an uninterrupted one."""
    import bertkit.tasks.finetune as module

    whole = finetune(finetune_config(toy, tmp_path / "whole", grad_accum=2, save_every=4))
    assert len(rows(tmp_path / "whole", "eval")) == 3
    with monkeypatch.context() as patch:
        _crash_at(patch, module, 17)  # epoch 3: after the checkpoints of step 12 (epoch 2's end) and 16 (batch 8)
        with pytest.raises(RuntimeError, match="crash"):
            finetune(finetune_config(toy, tmp_path / "cut", grad_accum=2, save_every=4))
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step-00000012", "step-00000016"]
    resumed = finetune(finetune_config(toy, tmp_path / "cut", grad_accum=2, save_every=4, resume="auto"))
    assert_same_weights(tmp_path / "whole" / WEIGHTS_NAME, tmp_path / "cut" / WEIGHTS_NAME, "grad-accum resume")
    assert [e["train_loss"] for e in resumed["epochs"]] == [e["train_loss"] for e in whole["epochs"]]


def crashed_and_resumed(toy, tmp_path, monkeypatch, **overrides) -> tuple[dict, dict]:
    """The records of a whole run in tmp_path/whole and of one crashed at step 20 (epoch 2, after the checkpoints of
    steps 12, epoch 1's end, and 15) and resumed with --resume auto in tmp_path/cut."""
    import bertkit.tasks.finetune as module

    whole = finetune(finetune_config(toy, tmp_path / "whole", **overrides))
    with monkeypatch.context() as patch:
        _crash_at(patch, module, 20)
        with pytest.raises(RuntimeError, match="crash"):
            finetune(finetune_config(toy, tmp_path / "cut", **overrides))
    return whole, finetune(finetune_config(toy, tmp_path / "cut", resume="auto", **overrides))


def test_a_lora_run_resumes_mid_epoch_to_the_same_update(toy, tmp_path, monkeypatch):
    """--lora-rank: the checkpoints hold the frozen weights and the LoRA matrices (the optimizer only the latter), and
    a run that crashes mid-epoch resumes to the very merged model and adapter of an uninterrupted one."""
    whole, resumed = crashed_and_resumed(toy, tmp_path, monkeypatch, lora_rank=2,
                                         lora_targets="query,value,intermediate.dense")
    assert_same_weights(tmp_path / "whole" / WEIGHTS_NAME, tmp_path / "cut" / WEIGHTS_NAME, "LoRA resume")
    adapter = Path("adapter", "adapter_model.safetensors")
    assert_same_weights(tmp_path / "whole" / adapter, tmp_path / "cut" / adapter, "LoRA resume")
    assert [e["train_loss"] for e in resumed["epochs"]] == [e["train_loss"] for e in whole["epochs"]]


def test_a_simcse_run_resumes_mid_epoch_to_the_same_weights(toy, tmp_path, monkeypatch):
    """--task embedding on single texts (SimCSE: its positives are a second dropout mask, so the restored RNG states
    decide them): a run that crashes mid-epoch resumes to the very weights and epoch losses of an uninterrupted
    one, and writes sentence-transformers' files as a whole run does."""
    texts, pairs = tmp_path / "texts.txt", tmp_path / "pairs.txt"
    texts.write_text("".join(f"{line.split(chr(9))[0]}\n" for line in (toy / "train.tsv").read_text().splitlines()[1:]))
    pairs.write_text("a good movie\tgreat fun\na bad film\tvery boring\nnot bad\tgood\n")
    whole, resumed = crashed_and_resumed(toy, tmp_path, monkeypatch, task="embedding", train_file=str(texts),
                                         eval_file=str(pairs))
    assert_same_weights(tmp_path / "whole" / WEIGHTS_NAME, tmp_path / "cut" / WEIGHTS_NAME, "SimCSE resume")
    assert [e["train_loss"] for e in resumed["epochs"]] == [e["train_loss"] for e in whole["epochs"]]
    assert (tmp_path / "cut" / "modules.json").is_file()


def test_finetuning_saved_by_two_processes_is_not_resumed_by_one(toy, tmp_path, monkeypatch):
    """A step is --grad-accum x processes batches and the schedule counts steps, so a run saved by torchrun with two
    processes is refused by one (it was accepted with a warning and trained another schedule); the checkpoint's
    RNG states, one per process, say how many saved it."""
    import bertkit.tasks.finetune as module

    with monkeypatch.context() as patch:
        _crash_at(patch, module, 6)
        with pytest.raises(RuntimeError, match="crash"):
            finetune(finetune_config(toy, tmp_path / "cut", save_every=4))
    real = module.load_training_state

    def saved_by_two(path):
        state = real(path)
        return {**state, "rng": [state["rng"], state["rng"]]}

    monkeypatch.setattr(module, "load_training_state", saved_by_two)
    with pytest.raises(BertkitError, match=r"saved by 2 process\(es\), resumed by 1; expected 2"):
        finetune(finetune_config(toy, tmp_path / "cut", save_every=4, resume="auto"))
