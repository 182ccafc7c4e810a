"""The run folder and the process: one writer per folder (a live holder named, a dead one's lock taken over),
output paths checked before training, and a thread count that degrades gracefully on a busy machine."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bertkit.errors import BertkitError
from bertkit.train import distributed
from bertkit.train.rundir import LOCK_NAME, RunLock, check_free_space, check_output_path


def test_a_run_folder_held_by_a_live_process_is_refused_naming_it(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(BertkitError, match=rf"in use by process {os.getpid()} on .*; expected one process per run"):
            RunLock(tmp_path / "run").acquire()
    with RunLock(tmp_path / "run"):  # released: free again, and without a notice
        pass


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_notice(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bertkit.train.rundir import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BertkitError, match=f"in use by process {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):
        assert f"took over the lock of process {holder.pid}" in caplog.text
        assert str(os.getpid()) in (tmp_path / LOCK_NAME).read_text()


def test_an_unwritable_output_folder_is_refused_before_training(tmp_path):
    try:  # /sys refuses new folders even to root, which chmod would not stop
        os.mkdir("/sys/bertkit-probe")
    except OSError:
        pass
    else:
        os.rmdir("/sys/bertkit-probe")
        pytest.skip("/sys is writable here")
    with pytest.raises(BertkitError, match="cannot write there"):
        RunLock("/sys/bertkit-run").acquire()


def test_any_command_names_a_path_it_cannot_use_in_one_line(tmp_path, capsys, monkeypatch):
    """An output folder that cannot be created (here one under a file, for `extend`'s --out) is a one-line error
    with status 2; so is any other OSError about a path (the command line's backstop), while one about no path is
    a bug and keeps its traceback."""
    from bertkit.cli import main
    from tiny_folders import save_tiny

    model = save_tiny(tmp_path / "model")
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["extend", model, "--out", str(tmp_path / "notes.txt" / "longer"), "--max-length", "256"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt/longer: cannot create the folder (Not a directory)" in err

    def a_path(args):
        raise PermissionError(13, "Permission denied", "/data/corpus.txt")

    monkeypatch.setattr("bertkit.cli.cmd_info", a_path)
    assert main(["info", model]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/data/corpus.txt: cannot use it (Permission denied)" in err

    def no_path(args):
        raise OSError("something else")

    monkeypatch.setattr("bertkit.cli.cmd_info", no_path)
    with pytest.raises(OSError, match="something else"):
        main(["info", model])


def test_an_output_path_that_is_a_file_or_inside_an_input_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BertkitError, match="notes.txt: a file, not a folder; expected a folder for --out-dir"):
        check_output_path(tmp_path / "notes.txt", "--out-dir", {})
    model = tmp_path / "model"
    model.mkdir()
    for out in (model, model / "ft", tmp_path / "x" / ".." / "model"):  # paths are resolved
        with pytest.raises(BertkitError, match="the run would write into its own input"):
            check_output_path(out, "--out-dir", {"--model-dir": str(model)})
    check_output_path(tmp_path / "elsewhere", "--out-dir", {"--model-dir": str(model)})


def test_a_filesystem_short_of_space_for_a_checkpoint_is_refused(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 29))
    with pytest.raises(BertkitError, match=r"0.50 GiB free on its filesystem; expected at least 1.00 GiB for a ckpt"):
        check_free_space(tmp_path / "not" / "yet", 1 << 30, "a ckpt")
    check_free_space(tmp_path, 1 << 28, "a ckpt")


def test_the_default_thread_count_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for load, processes, threads in ((0.2, 1, 8), (3.4, 1, 5), (7.6, 1, 1), (40.0, 1, 1), (0.0, 2, 4), (5.0, 2, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        assert distributed.default_threads(processes) == threads, (load, processes)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert distributed.default_threads() == 16


def test_a_run_gives_torch_its_thread_setting_back():
    before = torch.get_num_threads()
    with distributed.torch_threads(1) as chosen:
        assert chosen == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    for bad in (0, -1, 10**20):
        with pytest.raises(BertkitError, match="expected a whole number from 1 to 1024"):
            with distributed.torch_threads(bad):
                pass


def test_progress_bars_do_not_flood_a_log_file(tmp_path):
    from bertkit.train.logs import progress_bar

    with open(tmp_path / "log.txt", "w") as log:
        with progress_bar(total=1000, file=log, mininterval=0.0) as bar:
            for _ in range(1000):
                bar.update(1)
                time.sleep(0.0005)
    written = (tmp_path / "log.txt").read_text()
    assert written.count("\r") <= 3, written  # the start, the end: not one line per update
    assert "1000/1000" in written


LEAVE_GROUP = """
import gc, os, torch, torch.distributed as dist
from bertkit.train import distributed
gc.disable()  # teardown must not count on a collection happening to run
dist.init_process_group("gloo", rank=0, world_size=1)  # one real process stands in for a rank of two
d = distributed.Distributed(world_size=2, owns_group=True)

def fit():
    model = distributed.wrap(torch.nn.Linear(4, 4), d)
    model(torch.randn(2, 4)).sum().backward()
    distributed.all_reduce_sum(torch.ones(1), d)

fit()
distributed.teardown(d)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(sorted(n for n in names if "gloo" in n))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads' names from /proc")
def test_leaving_the_process_group_stops_its_threads():
    """Threads left running into interpreter shutdown aborted a process now and then after a finished run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LEAVE_GROUP], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("tensorboard", [False, True])
def test_a_disk_that_fills_during_a_run_stops_it_at_a_log_row_with_one_line(tmp_path, monkeypatch, tensorboard):
    """The room a checkpoint needs is checked before training, but a disk that another job fills during the run
    was found by the next log row (train.csv, or TensorBoard's events): an OSError's traceback, where a checkpoint
    that did not fit said what to do. Another OSError stays as it is."""
    import errno
    import pathlib

    from bertkit.train.logs import RunLogger

    log = RunLogger(tmp_path, tensorboard=tensorboard)
    log.log("train", 1, {"loss": 2.0})
    opened = pathlib.Path.open
    error = OSError(errno.ENOSPC, "No space left on device")

    def full(self, *args, **kwargs):
        if self.name == "train.csv" and not tensorboard:
            raise error
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", full)
    if tensorboard:  # its events file, appended to by its writer's thread, which hands the error to flush
        monkeypatch.setattr(log._writer, "flush", lambda: (_ for _ in ()).throw(error))
    with pytest.raises(BertkitError, match=rf"^{tmp_path}: cannot write the run's logs \(OSError: \[Errno 28\] No "
                                           r"space left on device\); [\d.]+ GiB free on its filesystem; expected room"
                                           r" for them \(the checkpoints saved are kept: .*--resume auto"):
        log.log("train", 2, {"loss": 1.0})
    error = OSError(errno.EACCES, "Permission denied")
    with pytest.raises(OSError, match="Permission denied"):
        log.log("train", 3, {"loss": 1.0})
    monkeypatch.undo()
    log.close()


def test_log_rows_are_appended_without_reading_back_the_rows_before_them(tmp_path, monkeypatch):
    """Each row read the whole CSV file back before it was appended: a run logging tens of thousands of rows spent
    time quadratic in its length on its logs. The file is read once per stream, and again only to replace a row
    or to add a column."""
    from bertkit.train import logs

    (tmp_path / "train.csv").write_text("step,loss\n1,3.0\n")  # an interrupted run's rows, kept
    reads = []
    real = logs.read_csv
    monkeypatch.setattr(logs, "read_csv", lambda path: reads.append(path.name) or real(path))
    log = logs.RunLogger(tmp_path, tensorboard=False)
    for step in range(2, 202):
        log.log("train", step, {"loss": 1.0 / step})
    assert reads == ["train.csv"]
    log.log("train", 202, {"loss": 0.5, "lr": 1e-4})  # a new column: the file rewritten with both
    log.log("train", 203, {"loss": 0.25})  # a row without it: appended, its cell left empty
    log.log("train", 203, {"loss": 0.125, "lr": 2e-4})  # the same step again: replaced
    log.log("eval", 203, {"accuracy": 50.0})
    assert reads == ["train.csv"] * 3
    rows = real(tmp_path / "train.csv")
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 204)]
    assert rows[0] == {"step": "1", "loss": "3.0", "lr": ""}
    assert rows[-2:] == [{"step": "202", "loss": "0.5", "lr": "0.0001"}, {"step": "203", "loss": "0.125", "lr": "0.0002"}]
    assert real(tmp_path / "eval.csv") == [{"step": "203", "accuracy": "50.0"}]
    assert log.truncate(100) == 203  # a resumed run: the rows past its checkpoint dropped, then logged again
    log.log("train", 101, {"loss": 0.75})
    assert [r["step"] for r in real(tmp_path / "train.csv")][-2:] == ["100", "101"]
    assert not (tmp_path / "eval.csv").exists() and not list(tmp_path.glob("*.tmp"))


def test_a_log_whose_last_row_has_no_line_end_gets_the_next_row_on_a_line_of_its_own(tmp_path):
    """A train.csv edited so that its last row lost its line end (or a write cut short): the next row was appended
    onto that line, so `1,5.0` and row 2 became one row `1,5.02,6.0`, the loss of step 1 changed and step 2 gone."""
    from bertkit.train.logs import RunLogger, read_csv

    (tmp_path / "train.csv").write_text("step,loss\n1,5.0")
    log = RunLogger(tmp_path, tensorboard=False)
    assert log.truncate(1) is None
    log.log("train", 2, {"loss": 6.0})
    log.log("train", 3, {"loss": 7.0})
    assert read_csv(tmp_path / "train.csv") == [{"step": "1", "loss": "5.0"}, {"step": "2", "loss": "6.0"},
                                               {"step": "3", "loss": "7.0"}]


def test_ctrl_c_while_the_command_starts_is_one_line_not_an_import_traceback(monkeypatch, capsys):
    """`import bertkit` imported torch (1.5 s here) before `main` could catch anything, and building the parser
    imports it too: Ctrl-C in that time printed a traceback through torch's import machinery."""
    from bertkit import cli

    done = subprocess.run([sys.executable, "-c", "import sys, bertkit.cli; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["--help"]) == 130
    assert capsys.readouterr().err == "bertkit: interrupted\n"
