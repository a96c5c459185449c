"""Shared builders for the trainer's tests: a tiny model saved as a folder, a tiny JSONL data file and a
config that trains in about a second on CPU."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from misa_train.config import TrainConfig
from tests.helpers_tiny import make_tiny, tiny_qa_records

ROOT = Path(__file__).resolve().parents[1]


def make_model_dir(path: Path, arch: str = "llama") -> Path:
    """Save a tiny random model + its byte tokenizer as a HF folder that load_model(path) reads."""
    model, tok = make_tiny(arch)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_data_file(path: Path, n: int = 48) -> Path:
    """A JSONL file of short question/answer records ('... #### <number>')."""
    with open(path, "w") as fh:
        for rec in tiny_qa_records(n):
            fh.write(json.dumps(rec) + "\n")
    return path


def tiny_config(model_dir: Path, data_file: Path, out: Path, **kw) -> TrainConfig:
    """A few-step CPU run on the tiny model: 2-step periods, checkpoints every 3 steps, per-step logging."""
    base = dict(model=str(model_dir), data=str(data_file), output_dir=str(out), max_steps=6, period=2,
                batch_size=4, max_seq_len=64, eval_every=3, eval_batches=2, gen_eval_examples=2,
                max_new_tokens=4, log_every=1, save_every=3, keep_last=2, device="cpu", dtype="fp32",
                progress=False, delta=0.2, warmup_steps=1, lr=1e-3, val_fraction=0.25)
    base.update(kw)
    return TrainConfig(**base)


def cli_args(cfg: TrainConfig) -> list[str]:
    """The command line equivalent of ``cfg`` (only fields that differ from the defaults)."""
    default = TrainConfig().to_dict()
    args: list[str] = []
    for k, v in cfg.to_dict().items():
        if v == default[k]:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, list):
            args += [flag, *map(str, v)]
        else:
            args += [flag, str(v)]
    return args


def subprocess_env() -> dict[str, str]:
    """Environment for a child trainer: this checkout importable, one thread (the CI box has 2 cores)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


PYTHON = sys.executable
