"""``--estimate-memory``: predicted peak GPU memory per method from the model's config alone.

No weights are read: a model folder's ``config.json`` (or the metadata of a ``.gguf`` file, or the cached
config of a Hub id) gives the architecture, and ``misa_theory.memory.predict_peak`` gives the peak bytes of
one training step of MISA, LoRA, LISA and full AdamW at the run's sequence length, batch, checkpointing and
budget. The model assumes bf16 weights on a CUDA device and a Llama-style decoder (q, k, v, o, gate, up, down).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from misa_train.config import ConfigError, TrainConfig

COMPARED = ("misa", "lora", "lisa", "full")


def model_config(spec: str | None) -> dict[str, Any]:
    """The architecture fields of ``spec`` (a folder, a ``.gguf`` file, a cached Hub id, or None for the
    embedded SmolLM2) without loading weights. Raises ConfigError naming the model when none is found."""
    if spec is not None and (Path(spec).expanduser() / "config.json").is_file():
        return json.loads((Path(spec).expanduser() / "config.json").read_text())
    from misa_train.models import cache_dir, default_gguf_path

    if spec is None and (cache_dir() / "config.json").is_file():
        return json.loads((cache_dir() / "config.json").read_text())
    from transformers import AutoConfig

    try:
        if spec is None or str(spec).endswith(".gguf"):
            gguf = default_gguf_path() if spec is None else Path(spec)
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to_dict()
        return AutoConfig.from_pretrained(spec, local_files_only=True).to_dict()
    except (OSError, ValueError) as e:
        raise ConfigError(f"model: no config found for {spec or 'the embedded model'} "
                          f"({type(e).__name__})") from None


def estimate_rows(cfg: TrainConfig, config: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(method, misa_theory.memory.Estimate)`` for each of ``COMPARED`` under ``cfg``'s step shape.

    MISA is the worst case of its budget (modules spread from layer 0 up, so backward runs through every
    layer); LISA trains ``cfg.lisa_layers`` layers, LoRA rank ``cfg.lora_r`` on every module kind."""
    from misa_theory.memory import Arch, predict_peak

    try:
        arch = Arch.from_config(config)
    except (TypeError, ValueError) as e:  # a missing field: int(None)
        raise ConfigError(f"model: the memory model covers Llama-style decoders; this config lacks a field "
                          f"it needs ({type(e).__name__})") from None
    shared = dict(seq=cfg.max_seq_len, batch=cfg.batch_size, ckpt=cfg.grad_checkpointing, lean_ops=cfg.lean_ops)
    rows = []
    for method in COMPARED:
        extra: dict[str, Any] = {}
        if method != "full":
            extra = dict(train_embeddings=cfg.train_embeddings, train_head=cfg.train_head)
        rows.append((method, predict_peak(arch, method, delta=cfg.delta, lisa_layers=cfg.lisa_layers,
                                          lora_r=cfg.lora_r, **shared, **extra)))
    return rows


def format_estimate(cfg: TrainConfig, rows: list[tuple[str, Any]], total_params: int) -> str:
    """The table ``--estimate-memory`` prints: one line per method, peak GiB, MiB and the phase it occurs in."""
    head = (f"predicted peak GPU memory of one step (bf16 weights, CUDA; misa_theory.memory): "
            f"{total_params / 1e6:.1f}M params, seq {cfg.max_seq_len}, batch {cfg.batch_size}, "
            f"checkpointing {'on' if cfg.grad_checkpointing else 'off'}")
    lines = [head, f"{'method':<14}{'peak GiB':>9}{'peak MiB':>11}  at"]
    for method, est in rows:
        label = f"misa δ={cfg.delta:g}" if method == "misa" else (
            f"lora r={cfg.lora_r}" if method == "lora" else (
                f"lisa {cfg.lisa_layers}L" if method == "lisa" else method))
        lines.append(f"{label:<14}{est.peak_gib:>9.2f}{est.peak_bytes / 2**20:>11.1f}  {est.phase}")
    return "\n".join(lines)


def print_estimate(cfg: TrainConfig) -> int:
    """Print the estimate for ``cfg`` and return exit code 0 (ConfigError for an unusable config)."""
    from misa_theory.memory import Arch

    config = model_config(cfg.model)
    rows = estimate_rows(cfg, config)
    print(format_estimate(cfg, rows, Arch.from_config(config).total_params()), flush=True)
    return 0
