"""What counts as a *module* of a torch language model, and the parameter groups around them.

A module is one 2-D weight matrix ``W in R^{out x in}`` of a ``nn.Linear`` (or GPT-2 ``Conv1D``, stored
transposed as ``in x out``) that lives inside one of the model's repeated decoder blocks. For a Llama-style
model every layer contributes ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj`` (7 modules);
GPT-2 contributes ``c_attn, c_proj, c_fc, c_proj``. Embeddings, the LM head, norms and biases are not modules:
they are frozen unless the trainer turns them on through the helpers below.

The decoder blocks are found generically: the ``nn.ModuleList`` holding the most parameters among those whose
children all share one class (``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ...).

peft-wrapped models: a LoRA layer keeps the frozen original in ``<name>.base_layer``; ``find_modules`` reports
that base weight (kind = the wrapped layer's name, e.g. ``q_proj``) and skips the adapter matrices
(``lora_A``/``lora_B``/...), so a peft model yields the same modules, in the same order, as its base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

try:  # GPT-2 family stores its projections in a transposed Linear
    from transformers.pytorch_utils import Conv1D as _Conv1D

    _LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, _Conv1D)
except ImportError:  # pragma: no cover - transformers is an extra
    _LINEAR_TYPES = (nn.Linear,)

# Components of a module path that belong to an adapter, not to the base model.
_ADAPTER_PREFIXES = ("lora_", "vera_", "ia3_", "adapter_")


@dataclass(frozen=True, eq=False)
class ModuleInfo:
    """One trainable unit.

    name:  fully qualified parameter name (as in ``model.named_parameters()``).
    param: the weight itself (2-D; ``size = param.numel() = rows * cols``).
    layer: index of the decoder block in its ModuleList (0-based).
    kind:  last name component of the owning layer (``q_proj``, ``c_attn``, ...).
    """

    name: str
    param: nn.Parameter
    layer: int
    kind: str
    size: int


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified_name, ModuleList)`` of the model's decoder blocks.

    Candidates are ModuleLists of length >= 1 whose children all have the same class; the one with the
    largest parameter count wins (a mixture-of-experts list lives *inside* a block, so it is smaller).
    Raises ``ValueError`` when there is no candidate.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        classes = {type(child) for child in mod}
        if len(classes) != 1:
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > 0 and (best is None or n > best[0]):
            best = (n, name, mod)
    if best is None:
        raise ValueError(f"no decoder-layer linear weights found in {type(model).__name__}")
    return best[1], best[2]


def _kind_of(path: list[str]) -> str:
    # peft puts the original layer under "<kind>.base_layer"; the meaningful name is the wrapper's.
    if len(path) >= 2 and path[-1] == "base_layer":
        return path[-2]
    return path[-1]


def find_modules(model: nn.Module) -> list[ModuleInfo]:
    """List the 2-D Linear/Conv1D weights of every decoder block, layer-major.

    Order: layer 0's weights in registration order (attention then MLP for usual blocks), then layer 1, ...
    For a model with ``L`` layers and ``k`` projections per layer the result has ``L * k`` entries and
    ``sum(m.size)`` equals the parameter count of those matrices. Weights shared between two layers are
    reported once (at their first occurrence). Raises ``ValueError`` when nothing is found.
    """
    try:
        list_name, layers = find_layer_list(model)
    except ValueError:
        raise ValueError(f"no decoder-layer linear weights found in {type(model).__name__}") from None
    prefix = f"{list_name}." if list_name else ""
    seen: set[int] = set()
    out: list[ModuleInfo] = []
    for layer_idx, block in enumerate(layers):
        for sub_name, sub in block.named_modules():
            if not isinstance(sub, _LINEAR_TYPES) or not sub_name:
                continue
            path = sub_name.split(".")
            if any(part.startswith(_ADAPTER_PREFIXES) for part in path):
                continue
            w = getattr(sub, "weight", None)
            if not isinstance(w, nn.Parameter) or w.dim() != 2 or id(w) in seen:
                continue
            seen.add(id(w))
            out.append(
                ModuleInfo(
                    name=f"{prefix}{layer_idx}.{sub_name}.weight",
                    param=w,
                    layer=layer_idx,
                    kind=_kind_of(path),
                    size=w.numel(),
                )
            )
    if not out:
        raise ValueError(f"no decoder-layer linear weights found in {type(model).__name__}")
    return out


class EmbedHead(NamedTuple):
    """Embedding and LM-head parameters, with tied weights listed once.

    embeddings: token (and, for GPT-2, position) embedding matrices.
    head:       the output projection's parameters that are *not* already in ``embeddings``; empty when tied.
    tied:       True when the head's weight is the token-embedding matrix (training the head then means
                training ``embeddings[0]``).
    """

    embeddings: list[nn.Parameter]
    head: list[nn.Parameter]
    tied: bool


def embedding_and_head_params(model: nn.Module) -> EmbedHead:
    """Collect the input embeddings (every ``nn.Embedding`` outside the decoder blocks) and the LM head.

    Parameters are deduplicated by identity, so a tied head (``lm_head.weight is embed_tokens.weight``)
    shows up only under ``embeddings`` and ``tied`` is True.
    """
    try:
        _, layers = find_layer_list(model)
        inside = {id(p) for p in layers.parameters()}
    except ValueError:
        inside = set()
    seen: set[int] = set()
    embeddings: list[nn.Parameter] = []
    get_in = getattr(model, "get_input_embeddings", None)
    first = get_in() if callable(get_in) else None
    candidates = [first] if isinstance(first, nn.Module) else []
    candidates += [m for m in model.modules() if isinstance(m, nn.Embedding) and m is not first]
    for mod in candidates:
        for p in mod.parameters(recurse=False):
            if id(p) in seen or id(p) in inside:
                continue
            seen.add(id(p))
            embeddings.append(p)
    head: list[nn.Parameter] = []
    tied = False
    get_out = getattr(model, "get_output_embeddings", None)
    out_mod = get_out() if callable(get_out) else None
    if isinstance(out_mod, nn.Module):
        for p in out_mod.parameters():
            if id(p) in seen:
                tied = True
                continue
            seen.add(id(p))
            head.append(p)
    return EmbedHead(embeddings, head, tied)


def norm_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every normalisation layer (class name containing ``Norm``: LayerNorm, RMSNorm, ...).

    Includes per-layer and final norms, deduplicated, in ``model.modules()`` order. These are the cheap
    always-on parameters (``train_norms``): about ``(2L + 1) * hidden`` numbers.
    """
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for mod in model.modules():
        if "norm" not in type(mod).__name__.lower():
            continue
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Total number of distinct parameters, ``sum(p.numel())`` over unique tensors (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def module_sizes(modules: list[ModuleInfo]) -> tuple[list[int], list[int]]:
    """``(sizes, layers)`` per module: the inputs ``ModuleSampler(sizes, groups=layers, ...)`` expects."""
    return [m.size for m in modules], [m.layer for m in modules]


def set_requires_grad(params: list[nn.Parameter] | list[torch.Tensor], flag: bool) -> None:
    """Set ``requires_grad`` on each parameter (no-op for tensors that already match)."""
    for p in params:
        if p.requires_grad != flag:
            p.requires_grad_(flag)
