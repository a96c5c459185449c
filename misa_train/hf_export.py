"""Hugging Face folders from a run: ``from_pretrained`` loads what MISA trained.

A finished run writes ``<run>/hf/``: ``model.safetensors`` (or an adapter for LoRA), ``config.json``,
``generation_config.json`` and the tokenizer files, so that

    model = AutoModelForCausalLM.from_pretrained("runs/x/hf")                 # misa, lisa, badam, full
    model = AutoPeftModelForCausalLM.from_pretrained("runs/x/hf")             # lora (a PEFT adapter)
    model = AutoModelForCausalLM.from_pretrained("runs/x/hf-merged")          # lora with merge_lora

gives the trainer's final model. ``python -m misa_train export RUN_DIR OUT [--checkpoint STEP]`` writes the
same folder from any checkpoint of a run (single-process safetensors or multi-process DCP).

Two cases need care:

* FSDP2 (several processes): every rank holds a shard; :func:`full_state_dict` gathers the whole state dict
  onto rank 0's CPU (a collective: every rank calls it), and rank 0 writes it.
* A model read from a GGUF file carries a GGUF "quantizer" that ``save_pretrained`` refuses although the
  weights are already dequantised; :func:`_without_gguf_quantizer` hides it (and the config's
  ``quantization_config``, which would make ``from_pretrained`` expect a GGUF file) while saving.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

HF_DIR = "hf"  # <run>/hf; with merge_lora also <run>/hf-merged


def is_peft_model(model: torch.nn.Module) -> bool:
    """True for a peft ``PeftModel`` (LoRA runs): saved as an adapter, not as full weights."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


@contextlib.contextmanager
def _without_gguf_quantizer(model: torch.nn.Module) -> Iterator[None]:
    """Hide a GGUF quantizer and ``config.quantization_config`` for the duration of a save."""
    quantizer = getattr(model, "hf_quantizer", None)
    qcfg = getattr(model.config, "quantization_config", None)
    gguf = quantizer is not None and "gguf" in str(getattr(qcfg, "quant_method", qcfg)).lower()
    if not gguf:
        yield
        return
    model.hf_quantizer = None
    delattr(model.config, "quantization_config")
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        model.config.quantization_config = qcfg


def full_state_dict(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict on the CPU; under FSDP2 gathered to rank 0 (other ranks get ``{}``).

    Collective when ``sharded``: every rank must call it. None when not sharded (``save_pretrained`` then
    reads the model's own state dict, tied weights and all)."""
    if not sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_hf(model: torch.nn.Module, tokenizer: Any, out: str | Path, *, merge_lora: bool = False,
            sharded: bool = False, is_main: bool = True) -> list[Path]:
    """Write ``model`` (+ ``tokenizer``) as ``from_pretrained`` folders; returns the folders written.

    Args:
        model: the trained model: a transformers causal LM (FSDP2-sharded when ``sharded``) or a peft model.
        tokenizer: saved beside the weights (None: not saved).
        out: folder for the weights (an adapter for a peft model).
        merge_lora: peft only: also write ``<out>-merged`` beside ``out``, holding the base
            model with the adapter folded in (W + (α/r)·BA). The merge happens in place, so ``model`` is
            the merged plain model afterwards; call this last.
        sharded: the model is FSDP2-sharded over the process group (collective: call on every rank).
        is_main: whether this process writes (rank 0).
    """
    out = Path(out)
    state = full_state_dict(model, sharded)
    if not is_main:
        return []
    written = [_save_one(model, tokenizer, out, state)]
    if merge_lora and is_peft_model(model):
        merged = model.merge_and_unload()
        written.append(_save_one(merged, tokenizer, out.with_name(out.name + "-merged"), None))
    return written


def _save_one(model: torch.nn.Module, tokenizer: Any, out: Path, state: dict | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if is_peft_model(model) else model
    with _without_gguf_quantizer(base):
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        if is_peft_model(model) and getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(out)  # the adapter folder still generates like its base
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def save_run_output(cfg: Any, model: torch.nn.Module, tokenizer: Any, run_dir: str | Path, *,
                    sharded: bool = False, is_main: bool = True) -> str | None:
    """The end-of-run hook: ``<run_dir>/hf`` (and ``hf-merged`` with ``cfg.merge_lora``) when
    ``cfg.save_hf``. Returns the folder (rank 0) or None."""
    if not cfg.save_hf:
        return None
    written = save_hf(model, tokenizer, Path(run_dir) / HF_DIR, merge_lora=cfg.merge_lora, sharded=sharded,
                      is_main=is_main)
    return str(written[0]) if written else None


# ---------------------------------------------------------------------- from a checkpoint
def _load_checkpoint_weights(ckpt: Path, net: torch.nn.Module) -> None:
    """Copy a checkpoint's tensors into ``net`` (safetensors, or DCP resharded into this single process)."""
    from misa_train.distributed import DCP_DIR

    if (ckpt / DCP_DIR).is_dir():
        import torch.distributed.checkpoint as dcp

        dcp.load({"model": net.state_dict()}, checkpoint_id=str(ckpt / DCP_DIR))
        return
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "weights.safetensors"))
    state = net.state_dict()
    unknown = [k for k in tensors if k not in state]
    if unknown:
        raise ValueError(f"{ckpt}: weights this model lacks: {unknown[:3]}")
    with torch.no_grad():
        for k, v in tensors.items():
            state[k].copy_(v.to(state[k].device, state[k].dtype))


def export_checkpoint(spec: str | Path, out: str | Path, *, merge_lora: bool = False) -> list[Path]:
    """Write the ``from_pretrained`` folder(s) of checkpoint ``spec`` (a checkpoint or a run folder, whose
    newest checkpoint is taken) into ``out``. Raises ValueError (one line) for a folder without checkpoint.

    The model is rebuilt from the run's own config (``meta.json``): base weights from ``cfg.model``, in the
    run's dtype, LoRA adapters with the run's rank and targets, then the checkpoint's tensors on top.
    """
    from misa_train import checkpoint as ckpt_mod
    from misa_train.config import from_dict
    from misa_train.methods import build_method
    from misa_train.models import load_model
    from misa_train.modules import count_parameters, find_modules

    ckpt = ckpt_mod.resolve_checkpoint(spec)
    if ckpt is None:
        raise ValueError(f"{spec}: no checkpoint found (expected a run folder or a checkpoints/step-N folder)")
    cfg = from_dict(ckpt_mod.read_meta(ckpt).get("config", {}))
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    model, tokenizer = load_model(cfg.model, dtype=dtype)
    net = model
    if cfg.method == "lora":  # the same adapter layout as the run, so the saved adapter tensors fit
        net = build_method(cfg, model, find_modules(model), count_parameters(model)).model
    _load_checkpoint_weights(ckpt, net)
    return save_hf(net, tokenizer, out, merge_lora=merge_lora)
