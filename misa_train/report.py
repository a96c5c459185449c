"""The run folder: resolved config, a metrics log, final importance scores and plots.

Layout (``cfg.output_dir``, default ``runs/<timestamp>-<method>``)::

    config.json        resolved TrainConfig (device/dtype made concrete) plus model facts
    metrics.jsonl      one JSON object per event: {"event": "train"|"eval"|"gen"|"period"|"checkpoint"|
                       "start"|"end"|"nan"|"stop", "step": int, ...}
    tensorboard/       with report_to=tensorboard: the train/eval scalars of metrics.jsonl as event files
    hf/                the final model for from_pretrained (misa_train/hf_export.py)
    importance.json    {"modules": [names], "scores": [...], "layers": [...], "kinds": [...], "sizes": [...]}
    loss.png           train and validation loss against step
    active.png         heatmap modules x periods: which modules trained in each period
    checkpoints/       see checkpoint.py

Plots are rebuilt from metrics.jsonl alone, so a resumed run's figures cover the whole run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: What a run writes at the top of its folder (checkpoints/ aside): a folder holding any of them holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "importance.json", "summary.json", "loss.png", "active.png")


def run_files(run_dir: str | os.PathLike) -> list[str]:
    """The :data:`RUN_FILES` present in ``run_dir``."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def remove_run_files(run_dir: str | os.PathLike) -> None:
    """Delete the :data:`RUN_FILES` of an earlier run in ``run_dir`` (nothing else in the folder)."""
    for name in run_files(run_dir):
        (Path(run_dir) / name).unlink()


def default_run_dir(method: str, root: str | os.PathLike = "runs") -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<method>``; a suffix avoids clobbering a run of the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{method}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def _json_default(o: Any) -> Any:
    # numpy scalars/arrays and paths show up in summaries; JSON has no type for them
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, tuple)):
        return str(o) if isinstance(o, Path) else list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (tmp file + rename) so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


TENSORBOARD_DIR = "tensorboard"
# events whose numeric fields become TensorBoard scalars, tagged "<event>/<field>"
_TB_EVENTS = ("train", "eval")


class MetricsLog:
    """Append-only JSONL event log; each line is flushed so a crash keeps every event written so far.

    With ``tensorboard`` the numeric fields of ``train`` and ``eval`` events are also written as scalars
    (tag ``train/loss``, ``eval/val_loss``, ...) into ``<folder of path>/tensorboard``."""

    def __init__(self, path: str | os.PathLike, tensorboard: bool = False) -> None:
        """Open ``path`` for appending (created if missing) and, if asked, a TensorBoard writer beside it."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a")  # noqa: SIM115 - kept open for the run's lifetime
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (train extra)

            self._tb = SummaryWriter(log_dir=str(self.path.parent / TENSORBOARD_DIR))

    def log(self, event: str, step: int, **fields: Any) -> dict[str, Any]:
        """Write one event line and return it."""
        rec = {"event": event, "step": int(step), "time": round(time.time(), 3), **fields}
        self._fh.write(json.dumps(rec, default=_json_default) + "\n")
        self._fh.flush()
        if self._tb is not None and event in _TB_EVENTS:
            for key, value in fields.items():
                if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{event}/{key}", float(value), int(step))
            self._tb.flush()
        return rec

    def close(self) -> None:
        """Close the file and the TensorBoard writer (idempotent)."""
        if not self._fh.closed:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All events of a metrics.jsonl (a torn last line from a killed process is ignored)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Cut metrics.jsonl back to the moment checkpoint ``step`` was written, atomically, before resuming.

    Everything after the last ``checkpoint`` event of ``step`` belongs to the stretch the resumed run repeats
    (including events logged at ``step`` itself once the checkpoint was taken, such as the next period's
    draw), so the resumed run logs each step once. Without that event (the process died between the commit
    and the log line, or the checkpoint came from elsewhere) events after ``step`` and end/stop are dropped.
    """
    p = Path(path)
    if not p.exists():
        return
    events = read_metrics(p)
    marks = [i for i, e in enumerate(events) if e.get("event") == "checkpoint" and e.get("step") == step]
    if marks:
        keep = events[: marks[-1] + 1]
    else:
        keep = [e for e in events if e.get("step", 0) <= step and e.get("event") not in ("end", "stop")]
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "w") as fh:
        for e in keep:
            fh.write(json.dumps(e) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


def write_importance(path: str | os.PathLike, modules: Sequence[Any], scores: Iterable[float] | None,
                     extra: dict[str, Any] | None = None) -> None:
    """importance.json: the sampler's final per-module scores (zeros for methods without a sampler)."""
    names = [m.name for m in modules]
    vals = [0.0] * len(names) if scores is None else [float(s) for s in scores]
    write_json(path, {
        "modules": names,
        "scores": vals,
        "layers": [int(m.layer) for m in modules],
        "kinds": [m.kind for m in modules],
        "sizes": [int(m.size) for m in modules],
        **(extra or {}),
    })


def plot_run(run_dir: str | os.PathLike, module_names: Sequence[str] | None = None) -> list[Path]:
    """Draw loss.png (train/val loss) and active.png (modules x periods) from metrics.jsonl.

    Returns the files written. Uses the Agg backend: works headless and never opens a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    events = read_metrics(run_dir / "metrics.jsonl")
    written: list[Path] = []

    train = [(e["step"], e["loss"]) for e in events if e["event"] == "train" and e.get("loss") is not None]
    val = [(e["step"], e["val_loss"]) for e in events
           if e["event"] == "eval" and e.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    written.append(out)

    periods = [e for e in events if e["event"] == "period" and "active" in e]
    n_mod = len(module_names) if module_names else max((max(e["active"], default=-1) + 1 for e in periods),
                                                       default=0)
    if periods and n_mod:
        grid = np.zeros((n_mod, len(periods)), dtype=np.float32)
        for j, e in enumerate(periods):
            idx = [i for i in e["active"] if 0 <= i < n_mod]
            grid[idx, j] = 1.0
        fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(periods) + 2), max(3.0, 0.06 * n_mod + 1.5)))
        ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1)
        ax.set_xlabel("period")
        ax.set_ylabel("module index (layer-major)")
        ax.set_title("active modules per period")
        fig.tight_layout()
        out = run_dir / "active.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written
