"""Where a run lives and what it continues: the run folder and the checkpoint to resume, decided before the
model loads so that every mistake here is a one-line input error.

* ``resume`` unset: a fresh run in ``output_dir`` (default ``runs/<timestamp>-<method>``). A folder that
  already holds a run is refused unless ``overwrite``: a second run there would prune the first run's
  checkpoints along with its own, and ``--resume auto`` would later pick whichever is newest.
* ``resume`` a checkpoint folder: that checkpoint; a damaged one is an error.
* ``resume`` a run folder, or ``auto`` (``output_dir``, else the newest ``runs/*-<method>*`` with a
  checkpoint): its newest checkpoint that is intact (:func:`misa_train.checkpoint.checkpoint_problem`);
  damaged newer ones are skipped with a warning, and only a folder with no intact one is an error.
  ``auto`` with no checkpoint at all starts fresh, so one command line serves the first launch and every
  relaunch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from misa_train import checkpoint as ckpt_mod
from misa_train import report
from misa_train.config import ConfigError, TrainConfig


def resolve_run(cfg: TrainConfig, announce: bool = True) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume or None) from ``cfg.output_dir``, ``resume`` and ``overwrite``.

    ``announce``: print skipped damaged checkpoints on stderr (rank 0 only under torchrun).
    Raises ConfigError when nothing valid can be resumed or a fresh run would land on another run."""
    ckpt = find_checkpoint(cfg, announce)
    if cfg.output_dir:
        run_dir = Path(cfg.output_dir)
    elif ckpt is not None:
        run_dir = ckpt_mod.run_dir_of(ckpt)
    else:
        run_dir = report.default_run_dir(cfg.method)
    if ckpt is None and cfg.resume is None and not cfg.overwrite:
        refuse_other_run(run_dir)
    return run_dir, ckpt


def find_checkpoint(cfg: TrainConfig, announce: bool = True) -> Path | None:
    """The checkpoint ``cfg.resume`` names (see the module docstring), or None for a fresh start."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        ckpt = checkpoint_in(Path(cfg.resume).expanduser(), announce)
        if ckpt is None:
            raise ConfigError(f"resume: no checkpoint in {cfg.resume}")
        return ckpt
    if cfg.output_dir:
        return checkpoint_in(Path(cfg.output_dir), announce)
    runs = sorted(Path("runs").glob(f"*-{cfg.method}*")) if Path("runs").is_dir() else []
    for run in reversed(runs):
        if ckpt_mod.list_checkpoints(run):
            return checkpoint_in(run, announce)
    return None


def checkpoint_in(path: Path, announce: bool = True) -> Path | None:
    """Checkpoint folder ``path`` itself, or the newest intact checkpoint of run folder ``path`` (None if it
    has none). Raises ConfigError for a damaged checkpoint folder, or a run folder whose every one is."""
    if ckpt_mod.is_checkpoint_dir(path):
        problem = ckpt_mod.checkpoint_problem(path)
        if problem is not None:
            raise ConfigError(f"resume: checkpoint {path} is damaged: {problem}")
        return path
    ckpt, skipped = ckpt_mod.newest_valid_checkpoint(path)
    if ckpt is None and skipped:
        damaged = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise ConfigError(f"resume: no intact checkpoint in {path} ({damaged})")
    if announce:
        for p, why in skipped:
            print(f"misa_train: warning: checkpoint {p} is damaged ({why}); resuming from the older {ckpt.name}",
                  file=sys.stderr, flush=True)
    return ckpt


def holds_run(run_dir: Path) -> list[str]:
    """What marks ``run_dir`` as holding a run: a metrics.jsonl or a non-empty checkpoints/, listed with the
    other run files present; empty when it holds none (a config.json alone may be a model's own)."""
    ckpts = run_dir / ckpt_mod.CKPT_DIR
    has_ckpts = ckpts.is_dir() and any(ckpts.iterdir())
    found = report.run_files(run_dir)
    if not has_ckpts and "metrics.jsonl" not in found:
        return []
    return found + ([f"{ckpt_mod.CKPT_DIR}/"] if has_ckpts else [])


def refuse_other_run(run_dir: Path) -> None:
    """Raise ConfigError when ``run_dir`` holds another run (:func:`holds_run`)."""
    found = holds_run(run_dir)
    if found:
        raise ConfigError(f"output_dir: {run_dir} already holds a run ({', '.join(found)}); continue it with "
                          f"--resume auto, or start afresh there with --overwrite")


def prepare_run_dir(run_dir: Path, fresh: bool, writer: bool = True) -> None:
    """Create ``run_dir``; for a fresh run (``fresh``) delete what an earlier run left there.

    Reaching a fresh start in a non-empty folder means ``overwrite`` was given or ``resume auto`` found no
    checkpoint (:func:`resolve_run` refuses every other case). ``writer``: this process owns the folder
    (rank 0 under torchrun). Raises ConfigError when the folder cannot be created."""
    try:  # before the model loads: an unusable folder is an input error, not minutes of work lost at the end
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir: cannot create the run folder {run_dir}: {e.strerror or e}") from None
    if fresh and writer and holds_run(run_dir):
        report.remove_run_files(run_dir)
        ckpt_mod.remove_checkpoints(run_dir)
