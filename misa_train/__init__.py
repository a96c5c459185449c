"""The reference MISA trainer (PyTorch + transformers); imports misa_theory, never the reverse.

    from misa_train import TrainConfig, run
    summary = run(TrainConfig(model="./my-llama", data="train.jsonl", method="misa", delta=0.03))

The names below are the public API. The config names import with the package; the others load torch and
transformers, so they are imported on first use (``misa_train.run`` etc.), which keeps ``import misa_train``
and ``python -m misa_train --help`` free of torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from misa_train.config import ConfigError, TrainConfig, load_config

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "run": "misa_train.train",
    "RunStopped": "misa_train.train",
    "ActiveAdamW": "misa_train.optim",
    "Method": "misa_train.methods",
    "build_method": "misa_train.methods",
    "ModuleInfo": "misa_train.modules",
    "find_modules": "misa_train.modules",
    "load_model": "misa_train.models",
}

__all__ = [
    "ActiveAdamW",
    "ConfigError",
    "Method",
    "ModuleInfo",
    "RunStopped",
    "TrainConfig",
    "build_method",
    "find_modules",
    "load_config",
    "load_model",
    "run",
]

if TYPE_CHECKING:
    from misa_train.methods import Method, build_method
    from misa_train.models import load_model
    from misa_train.modules import ModuleInfo, find_modules
    from misa_train.optim import ActiveAdamW
    from misa_train.train import RunStopped, run


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562) and cache the name here."""
    if name not in _LAZY:
        raise AttributeError(f"module 'misa_train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
