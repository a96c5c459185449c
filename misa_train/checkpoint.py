"""Atomic, resumable checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step-NNNNNNN`` holding

* ``weights.safetensors`` - module methods (misa/lisa/badam/full): *every* model weight. Saving only the
  modules that ever trained would be smaller, but the full state is what a user can load and evaluate, and it
  cannot go wrong when a module was active in a period whose checkpoint was pruned. LoRA: only the adapter
  (the parameters with requires_grad), since the base model is the unchanged ``cfg.model``.
  Load with ``safetensors.torch.load_model(model, path, strict=False)`` on ``load_model(cfg.model)``.
* ``method.pt``  - ``method.state_dict()``: optimizer moments, active set, sampler state (RNG included).
* ``trainer.pt`` - step, data-iterator state, RNG states of python/numpy/torch/cuda, loss bookkeeping.
* ``meta.json``  - step, world size, the run's config (read before anything heavy, to refuse an
  incompatible resume with a clear message).

Atomicity: everything is written into a hidden sibling ``.tmp-step-...`` folder, each file fsynced, then the
folder is renamed into place and the parent fsynced. A folder named ``step-*`` is therefore always complete;
a crash mid-save leaves at most a hidden temp folder, which is ignored and removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (before a rename makes it visible under its final name)."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make renames inside folder ``path`` durable; a no-op where the platform cannot fsync a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and every CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - global state is what libraries draw from
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured (CUDA only when present on both sides)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module, adapter_only: bool) -> dict[str, torch.Tensor]:
    """Tensors to save: the requires_grad ones for an adapter (LoRA), else the full state dict.

    Tied weights are stored once (safetensors refuses aliases); loading with strict=False restores both names.
    """
    if adapter_only:
        return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: torch.nn.Module, adapter_only: bool,
                    method_state: dict[str, Any], trainer_state: dict[str, Any], meta: dict[str, Any],
                    keep_last: int, _before_commit: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep_last``. Returns its folder.

    ``_before_commit`` is a test hook called with the temp folder just before the rename."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        weights = tmp / "weights.safetensors"
        save_file({k: v.cpu() for k, v in trainable_state(model, adapter_only).items()}, str(weights),
                  metadata={"step": str(step), "adapter_only": str(adapter_only)})
        torch.save(method_state, tmp / "method.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
        with open(tmp / "meta.json", "w") as fh:
            json.dump({"step": int(step), "adapter_only": adapter_only, **meta}, fh, indent=2, default=str)
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        if _before_commit is not None:
            _before_commit(tmp)
        final = root / name
        if final.exists():  # same step saved again (e.g. after a resume): the new one wins
            old = root / f".tmp-old-{name}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str | os.PathLike) -> Path | None:
    """A checkpoint folder from a checkpoint folder or a run folder (its latest checkpoint); None if none."""
    p = Path(spec).expanduser()
    if is_checkpoint_dir(p):
        return p
    found = list_checkpoints(p)
    return found[-1] if found else None


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint folder (``step-NNNNNNN`` with a meta.json), not a run folder."""
    p = Path(path)
    return bool(_STEP_RE.match(p.name)) and (p / "meta.json").is_file()


def newest_valid_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest checkpoint of a run folder that passes :func:`checkpoint_problem`, the newer ones it skipped
    with their problem). A crash, a full disk or a copy cut short can leave a damaged latest checkpoint
    (one not written by :func:`save_checkpoint`'s atomic rename); resuming then falls back to an older one."""
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, skipped
        skipped.append((ckpt, problem))
    return None, skipped


def checkpoint_problem(ckpt: str | os.PathLike) -> str | None:
    """Why checkpoint folder ``ckpt`` cannot be resumed, in a few words, or None when it looks complete.

    Checks structure, not every byte: meta.json parses and names the folder's step; method.pt and trainer.pt
    are whole zip archives (torch.save's format; a truncated one has no central directory); the weights
    are a safetensors file whose size matches its header, or (multi-process) a DCP folder with metadata."""
    ckpt = Path(ckpt)
    try:
        meta = read_meta(ckpt)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        return f"meta.json unreadable ({_first_line(e)})"
    m = _STEP_RE.match(ckpt.name)
    if not isinstance(meta, dict) or (m is not None and meta.get("step") != int(m.group(1))):
        return "meta.json does not describe this step"
    for name in ("method.pt", "trainer.pt"):
        try:
            with zipfile.ZipFile(ckpt / name):
                pass
        except (OSError, zipfile.BadZipFile) as e:
            return f"{name} damaged ({_first_line(e)})"
    if (ckpt / "dcp").is_dir():
        return None if (ckpt / "dcp" / ".metadata").is_file() else "dcp/.metadata missing"
    return safetensors_problem(ckpt / "weights.safetensors")


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (8-byte header length, JSON header, then exactly the
    tensor bytes its offsets name), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"{path.name} damaged (header runs past the end of the file)"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} damaged ({_first_line(e)})"
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    if 8 + n + max(ends, default=0) != size:
        return f"{path.name} damaged ({size} bytes, its header describes {8 + n + max(ends, default=0)})"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def remove_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete a run folder's ``checkpoints/`` (its complete and its half-written checkpoints)."""
    shutil.rmtree(Path(run_dir) / CKPT_DIR, ignore_errors=True)


def run_dir_of(ckpt: Path) -> Path:
    """The run folder that holds checkpoint folder ``ckpt``."""
    return ckpt.parent.parent


def read_meta(ckpt: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a checkpoint (cheap: no tensors loaded)."""
    return json.loads((Path(ckpt) / "meta.json").read_text())


def load_checkpoint(ckpt: str | os.PathLike, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model`` in place; return (method_state, trainer_state).

    The .pt files hold numpy RNG tuples, so they are read with weights_only=False: only load checkpoints
    you wrote yourself."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    tensors = load_file(str(ckpt / "weights.safetensors"))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    missing = [k for k in tensors if k not in params and k not in buffers and k not in model.state_dict()]
    if missing:
        raise ValueError(f"checkpoint {ckpt} has weights this model lacks: {missing[:3]}")
    with torch.no_grad():
        sd = model.state_dict()
        for k, v in tensors.items():
            sd[k].copy_(v.to(sd[k].device, sd[k].dtype))
    method_state = torch.load(ckpt / "method.pt", map_location="cpu", weights_only=False)
    trainer_state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    return method_state, trainer_state
