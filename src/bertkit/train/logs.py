"""Run logs: a progress bar, CSV files, TensorBoard events and a loss-curve PNG, written by rank 0 only."""

from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from bertkit.checkpoint import WriteFailed, atomic_write, out_of_space
from bertkit.errors import BertkitError, free_space

logger = logging.getLogger("bertkit")

# The streams a run logs, each to `<stream>.csv`: the only CSV files of a run folder that are the run's, a folder
# that may hold the user's own beside them (a custom task's data, notes)
STREAMS = ("train", "eval")


class RunLogger:
    """Appends metric rows per stream (`train`, `eval`) to `<stream>.csv` and TensorBoard; plots them on demand."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True, purge_step: int | None = None):
        """`purge_step`: a resumed run's first new step; TensorBoard drops the events an interrupted run wrote from
        there on, as `truncate` does for the CSV files."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        # per stream, the CSV file's columns and last step: read from the file once, then kept, so that a row is
        # appended without reading back all those before it (a long run logs tens of thousands)
        self._tails: dict[str, tuple[list[str], float | None]] = {}
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)
            except ImportError:  # tensorboard is a dependency, but a stripped install should still train
                logger.warning("tensorboard is not installed: logging to CSV only")

    def truncate(self, step: int) -> int | None:
        """Drop rows after `step`: a resumed run rewrites what the interrupted one logged past its checkpoint.
        Returns the last step that was logged when rows were dropped (None when none were). A file left with no
        row is removed, header and all, so that the next row starts it afresh."""
        if not self.enabled:
            return None
        self._tails.clear()
        reached = None
        for path in [self.run_dir / f"{stream}.csv" for stream in STREAMS]:
            if not path.is_file():
                continue
            rows = [r for r in read_csv(path) if r.get("step") not in (None, "")]
            keep = [r for r in rows if float(r["step"]) <= step]
            if len(keep) != len(rows):
                reached = max(reached or step, max(int(float(r["step"])) for r in rows))
            if not keep:
                path.unlink()
            elif len(keep) != len(rows):
                _write_rows(path, keep)
        return reached

    def log(self, stream: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        try:
            self._log(stream, step, metrics)
        except (OSError, WriteFailed) as e:
            raise _write_failed(self.run_dir, e) from None

    def _log(self, stream: str, step: int, metrics: dict[str, float]) -> None:
        path = self.run_dir / f"{stream}.csv"
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if stream not in self._tails:
            rows = read_csv(path) if path.exists() else []
            fields = list(rows[0]) if rows else []
            if rows and not _ends_a_line(path):
                # its last row has no line end (the file edited, a write cut short): a row appended would continue
                # that line, two rows in one; no columns known makes this row rewrite the file, each row a line
                fields = []
            self._tails[stream] = (fields, float(rows[-1]["step"]) if rows else None)
        fields, last = self._tails[stream]
        if last == step or not set(row) <= set(fields):
            # the same step again (a finished run resumed): replace it; a new column: rewrite with the union
            rows = read_csv(path) if path.exists() else []
            rows = rows[:-1] if last == step else rows
            fields = _write_rows(path, rows + [row])
        else:
            with path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerow(row)  # a column this row lacks stays empty
        self._tails[stream] = (fields, float(step))
        if self._writer is not None:
            for k, v in metrics.items():
                self._writer.add_scalar(f"{stream}/{k}", float(v), step)
            self._writer.flush()

    def plot(self, name: str = "loss_curve.png", keys=("loss", "masked_lm_accuracy", "next_sentence_accuracy"),
             marks: dict[int, str] | None = None) -> Path | None:
        """One panel per metric key, train and eval streams overlaid; `marks`: labelled steps (where a phase starts)."""
        if not self.enabled:
            return None
        return plot_run(self.run_dir, self.run_dir / name, keys, marks)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()  # its last events: a full disk again (it is called while a log's error is raised)
            except OSError as e:
                raise _write_failed(self.run_dir, e) from None


def _write_failed(run_dir: Path, e: OSError | WriteFailed) -> Exception:
    """A log row that a full disk stopped (the disk filled after the run's start, which checks for room): a
    BertkitError naming the folder and the free space, where it was an OSError's traceback (TensorBoard's or the
    CSV file's) or, for a CSV file rewritten whole, the file's own message; any other OSError as it is."""
    if isinstance(e, WriteFailed):
        cause = e.cause
    elif out_of_space(e):
        cause = f"{type(e).__name__}: {e}"
    else:
        return e
    return BertkitError(f"{run_dir}: cannot write the run's logs ({cause}); {free_space(run_dir)}; "
                        "expected room for them (the checkpoints saved are kept: free some space, then --resume auto "
                        "continues from the newest)")


_hidden_bars = 0  # > 0 inside `bars_hidden`


@contextmanager
def bars_hidden() -> Iterator[None]:
    """Progress bars made inside are not shown: for a loop with a bar of its own over steps that make theirs
    (`predict`'s chunks, each run by `infer`)."""
    global _hidden_bars
    _hidden_bars += 1
    try:
        yield
    finally:
        _hidden_bars -= 1


def progress_bar(**kw) -> tqdm:
    """A tqdm bar that redraws at most once a minute when it does not write to a terminal: a log file gets a
    line now and then, not a line per update."""
    if _hidden_bars:
        kw["disable"] = True
    file = kw.setdefault("file", sys.stderr)
    if not (hasattr(file, "isatty") and file.isatty()):
        kw["mininterval"] = max(kw.get("mininterval", 0.1), 60.0)
        kw["maxinterval"] = max(kw.get("maxinterval", 10.0), 60.0)
    return tqdm(**kw)


def read_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _ends_a_line(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) in (b"\n", b"\r")


def _write_rows(path: Path, rows: list[dict]) -> list[str]:
    """Write `rows` (header: the union of their columns, in order of appearance); returns the columns."""
    fields = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)  # a full disk leaves the file as it was, and no half-written copy beside it
    return fields


# Drawn on the panel of the metric it is a baseline for, dashed.
BASELINES = {"masked_lm_accuracy": ("unigram_baseline_accuracy", "unigram baseline")}


def plot_run(run_dir: Path, out: Path, keys, marks: dict[int, str] | None = None) -> Path | None:
    import matplotlib.pyplot as plt

    files = [Path(run_dir) / f"{stream}.csv" for stream in sorted(STREAMS)]  # eval first, as ever
    fig = loss_figure({p.stem: read_csv(p) for p in files if p.is_file()}, keys, marks)
    if fig is None:
        return None
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def loss_figure(streams: dict[str, list[dict]], keys, marks: dict[int, str] | None = None):
    """One panel per metric key, the streams (train, eval) overlaid, a metric's baseline where logged, and a dotted
    vertical line at each marked step, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def points(rows, key):
        return [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]

    keys = [k for k in keys if any(rows and k in rows[0] for rows in streams.values())]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for stream, rows in streams.items():
            pts = points(rows, key)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if stream == "eval" else None, ms=3, label=stream)
        baseline, label = BASELINES.get(key, (None, None))
        pts = [p for rows in streams.values() for p in points(rows, baseline)] if baseline else []
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, linestyle="--", color="gray", label=label)
        for step, label in (marks or {}).items():
            ax.axvline(step, linestyle=":", color="black", linewidth=1)
            ax.annotate(label, (step, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig
