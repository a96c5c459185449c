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
    p.add_argument("--estimate-memory", action="store_true",
                   help="print the predicted peak GPU memory of MISA, LoRA, LISA and full AdamW for this model "
                   "(from its config alone, no weights loaded) and exit")
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


def _parse(argv: Sequence[str] | None) -> tuple[str | None, dict[str, Any], bool]:
    """(config file, {field: raw value} of the options given, --estimate-memory)."""
    values = vars(build_parser().parse_args(argv))
    config, estimate = values.pop("config"), values.pop("estimate_memory")
    return config, {k: v for k, v in values.items() if v is not None}, estimate


def parse_overrides(argv: Sequence[str] | None = None) -> tuple[str | None, dict[str, Any]]:
    """(config file, {field: raw value}) for the options that were given."""
    config, overrides, _ = _parse(argv)
    return config, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, validate, train (or ``export ...``). Returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    config_path, overrides, estimate = _parse(argv)
    try:
        cfg = load_config(config_path, overrides)
        if estimate:  # before any weights load: the whole point is to know whether they fit
            from misa_train.estimate import print_estimate

            return print_estimate(cfg)
    except ConfigError as e:
        fail(str(e))
    from misa_train.train import RunStopped, run_validated  # heavy imports only after the input is known good

    try:
        summary = run_validated(cfg)
    except ConfigError as e:  # checks that need the model (budget vs module sizes, resume compatibility)
        fail(str(e))
    except RunStopped as e:
        fail(str(e), code=1)
    return int(summary.get("exit_code", 0))


def export_main(argv: Sequence[str]) -> int:
    """``python -m misa_train export RUN_DIR OUT [--checkpoint STEP|DIR] [--merge-lora]``: a checkpoint as a
    ``from_pretrained`` folder (misa_train/hf_export.py). Returns the exit code."""
    p = _Parser(prog=f"python -m {PROG} export",
                description="Write a run's checkpoint as a Hugging Face folder (from_pretrained loads it).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder (or one of its checkpoints/step-N folders)")
    p.add_argument("out", metavar="OUT", help="folder to write")
    p.add_argument("--checkpoint", default=None, metavar="STEP|DIR",
                   help="step number or checkpoint folder (default: the run's newest checkpoint)")
    p.add_argument("--merge-lora", action="store_true", help="lora runs: also write OUT-merged")
    ns = p.parse_args(argv)
    spec = ns.run_dir
    if ns.checkpoint is not None:
        spec = (os.path.join(ns.run_dir, "checkpoints", f"step-{int(ns.checkpoint):07d}")
                if ns.checkpoint.isdigit() else ns.checkpoint)
    from misa_train.hf_export import export_checkpoint

    try:
        written = export_checkpoint(spec, ns.out, merge_lora=ns.merge_lora)
    except (ConfigError, ValueError) as e:
        fail(str(e))
    for path in written:
        print(str(path), flush=True)
    return 0
