"""Command line of the trainer: ``python -m misa_train [--config FILE] [--field value ...]``.

Options are generated from TrainConfig's fields and their help strings, so every config key is a flag
(``max_steps`` -> ``--max-steps``) and --help cannot fall behind the dataclass. Errors are one line on
stderr (``misa_train: error: ...``) with exit code 2 and no traceback.

Exit codes: 0 finished (or stopped by SIGINT/SIGTERM after saving, see docs/trainer.md for 130/143),
2 bad input, 1 a run that stopped on a non-finite loss (on_nan=stop) or another runtime failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from misa_train.config import FIELDS, ConfigError, field_kind, load_config

PROG = "misa_train"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors follow the project's one-line format (argparse prints usage first)."""

    def error(self, message: str) -> NoReturn:
        """Report a bad option the project's way instead of argparse's usage + message."""
        fail(message)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``misa_train: error: <first line of message>`` on stderr and exit."""
    line = str(message).strip().splitlines()[0] if str(message).strip() else "unknown error"
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; one report is enough
        print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _default_text(f: dataclasses.Field) -> str:
    d = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if d is None:
        return "none"
    if isinstance(d, tuple):
        return " ".join(str(x) for x in d)
    if d == "":
        return "''"
    return str(d)


def build_parser() -> argparse.ArgumentParser:
    """Parser with --config plus one option per TrainConfig field (defaults left unset: None = not given)."""
    p = _Parser(
        prog=f"python -m {PROG}",
        description="Fine-tune a language model with MISA (module-wise importance sampling) or a peer method "
        "(full AdamW, LoRA, LISA, BAdam). Values come from the defaults, then --config, then these options.",
        epilog="Exit codes: 0 done (also after a clean stop on SIGINT/SIGTERM with a checkpoint saved), "
        "1 runtime failure (e.g. non-finite loss with --on-nan stop), 2 bad input. "
        "Benchmarks: python benchmarks/bench_gpu.py (separate entry point). "
        "Checkpoint to Hugging Face folder: python -m misa_train export RUN_DIR OUT (export --help).",
    )
    p.add_argument("--config", metavar="FILE", default=None, help="YAML or JSON file of field: value pairs")
    for name, f in FIELDS.items():
        kind = field_kind(f)
        flag = "--" + name.replace("_", "-")
        # argparse %-formats help strings, so a literal "10%" must be doubled
        help_text = f"{f.metadata.get('help', '')} (default: {_default_text(f)})".replace("%", "%%")
        choices = f.metadata.get("choices")
        if kind == "bool":
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=help_text)
        elif kind == "pair":
            p.add_argument(flag, dest=name, nargs=2, metavar=("B1", "B2"), default=None, help=help_text)
        else:
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            if name == "resume":
                metavar = "DIR|auto"
            elif name in ("model", "data", "output_dir"):
                metavar = "PATH"
            # values stay strings here; config.coerce converts them so CLI and file share one error path
            p.add_argument(flag, dest=name, default=None, metavar=metavar, help=help_text)
    return p


def parse_overrides(argv: Sequence[str] | None = None) -> tuple[str | None, dict[str, Any]]:
    """(config file, {field: raw value}) for the options that were given."""
    ns = build_parser().parse_args(argv)
    values = vars(ns)
    config = values.pop("config")
    return config, {k: v for k, v in values.items() if v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, validate, train. Returns the process exit code."""
    config_path, overrides = parse_overrides(argv)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        fail(str(e))
    from misa_train.train import RunStopped, run  # heavy imports only after the input is known good

    try:
        summary = run(cfg)
    except ConfigError as e:  # checks that need the model (budget vs module sizes, resume compatibility)
        fail(str(e))
    except RunStopped as e:
        fail(str(e), code=1)
    return int(summary.get("exit_code", 0))
