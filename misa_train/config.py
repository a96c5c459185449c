"""Run configuration of the MISA trainer: one dataclass, one place where bad input is caught.

Field names are a contract (docs/contracts.md): methods, data and evaluation code read them directly.
Every field carries a help string in its metadata; the command line is generated from it (cli.py),
so the options, the YAML/JSON keys and the documentation cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("misa", "lisa", "badam", "full", "lora")
# Module-wise sampling rules that method "misa" accepts; "lisa"/"badam" rules are implied by those methods.
MODULE_RULES = ("misa", "misa_norm", "optimal", "uniform")
TASKS = ("sft", "pretrain")
DTYPES = ("auto", "bf16", "fp32")
ON_NAN = ("skip", "stop")
REPORT_TO = ("none", "tensorboard")
LOSS_BACKENDS = ("chunked", "torch", "auto")  # misa_train.losses.BACKENDS (config stays torch-free)
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """Bad user input; the message is one line and names the offending field."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """Dataclass field with a help string (read by the CLI generator)."""
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: default, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything one training run needs. The no-argument default is a few-minute CPU demo:
    SmolLM2-135M-Instruct, 320 short reasoning-gym arithmetic examples, 60 MISA steps (δ=3%)."""

    # what to train
    model: str | None = _f(None, "model: HF folder, .gguf/.safetensors file or known name; "
                                 "none = embedded SmolLM2-135M-Instruct")
    data: str | None = _f(None, "training data: .jsonl/.json/.parquet records (question/answer, prompt/completion, "
                                "alpaca, messages, ShareGPT conversations, text), a datasets save_to_disk folder "
                                "or a text file; none = embedded reasoning-gym arithmetic set")
    data_hub: bool = _f(False, "let --data name a Hugging Face Hub dataset, downloaded with datasets.load_dataset "
                               "(split train); off: --data must be a local file or folder")
    task: str = _f("sft", "sft (loss on responses only) or pretrain (loss on all tokens)", choices=TASKS)
    # how to train
    method: str = _f("misa", "training method", choices=METHODS)
    rule: str = _f("misa_norm", "module sampling rule for method misa: misa_norm (softmax of scores over their "
                                "mean; the default, chosen by the rule ablation in docs/results.md), misa (the "
                                "authors' exact rule), optimal (HT-variance optimum), uniform",
                   choices=MODULE_RULES)
    delta: float = _f(0.03, "trainable-parameter budget per period, fraction of the whole model, in (0, 1]")
    eta: float = _f(1.0, "MISA temperature: sampling weight grows like exp(eta * importance)")
    period: int = _f(20, "T: optimizer steps between two module draws")
    ema_beta: float = _f(0.9, "EMA factor of the per-module squared-gradient-norm scores, in [0, 1)")
    min_inclusion: float = _f(0.0, "floor on each module's inclusion probability, in [0, 1]")
    depth_bias: float = _f(0.0, "opt-in: tilt module sampling towards upper layers by exp(depth_bias*(depth-1)), "
                                "depth in [0, 1], so backward stops higher (faster, fewer low-layer updates); "
                                "0 = the paper's rule")
    reweight: bool = _f(False, "scale active modules' gradients by 1/inclusion probability (unbiased)")
    retain_state: bool = _f(False, "keep Adam moments of modules that leave the active set (more memory)")
    train_embeddings: bool = _f(False, "also train the token embeddings (always active)")
    train_head: bool = _f(False, "also train the LM head if untied (always active)")
    train_norms: bool = _f(False, "also train the normalisation weights (always active)")
    lisa_layers: int = _f(2, "LISA: decoder layers active per period")
    badam_layers: int = _f(1, "BAdam: decoder layers per block (blocks are visited cyclically)")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "LoRA dropout, in [0, 1)")
    # optimizer and schedule
    lr: float = _f(1e-4, "peak learning rate (cosine decay to 10% after linear warm-up)")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas (two numbers)")
    eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    warmup_steps: int = _f(5, "linear warm-up steps")
    max_steps: int = _f(60, "optimizer steps in total")
    batch_size: int = _f(4, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_seq_len: int = _f(256, "truncate sequences to this many tokens")
    clip_grad: float = _f(1.0, "clip the active parameters' global gradient norm to this; 0 = off")
    dtype: str = _f("auto", "weights dtype: bf16, fp32, or auto (bf16 on CUDA, else fp32)", choices=DTYPES)
    loss_backend: str = _f("chunked", "loss implementation: chunked (misa_train.losses; exact, "
                                      "fastest), torch (F.linear_cross_entropy, chunked by torch: less memory "
                                      "when the LM head trains, slower), or auto (torch's while the head "
                                      "trains and the installed torch has it, else chunked)", choices=LOSS_BACKENDS)
    grad_checkpointing: bool = _f(False, "activation checkpointing (less memory, ~30% more compute)")
    probe_importance: bool = _f(True, "measure every module's gradient norm with one extra backward at the start "
                                "(gradients dropped as they arrive) so MISA samples by importance from the first "
                                "draw instead of first visiting every module once")
    lean_ops: bool = _f(True, "SwiGLU/RMSNorm that save less for backward (g, u; bf16 norm input), same outputs; "
                               "applied only without grad_checkpointing, where it saves memory")
    compile_ops: bool = _f(False, "with lean_ops: torch.compile the lean SwiGLU/RMSNorm into fused kernels that save "
                                  "the same (misa_train.fused_ops; for CUDA, compiled once at start, a one-line "
                                  "error if that fails); applied with and without grad_checkpointing")
    seed: int = _f(0, "seed for python, numpy, torch, data order and module draws")
    device: str = _f("auto", "auto (cuda if available), cpu, cuda, cuda:N or mps")
    # evaluation, logging, checkpoints
    eval_every: int = _f(20, "held-out loss every N steps (also at start and end); 0 = start and end only")
    eval_batches: int = _f(4, "validation batches per evaluation")
    gen_eval_examples: int = _f(16, "generation accuracy on this many held-out items before/after; 0 = off")
    max_new_tokens: int = _f(32, "generation length for the accuracy evaluation")
    log_every: int = _f(5, "log train loss, tokens/s and memory every N steps")
    save_every: int = _f(20, "checkpoint every N steps (and at the end); 0 = only at the end")
    keep_last: int = _f(2, "checkpoints kept in the run folder (older ones deleted)")
    output_dir: str = _f("", "run folder; empty = runs/<timestamp>-<method>")
    resume: str | None = _f(None, "continue from a run or checkpoint folder; auto = latest in output_dir")
    overwrite: bool = _f(False, "start afresh in an output_dir that holds another run, deleting that run's "
                                "checkpoints and files (without it such a folder is refused)")
    on_nan: str = _f("skip", "non-finite loss: skip the step, or stop the run", choices=ON_NAN)
    val_fraction: float = _f(0.1, "held-out fraction of a data file, in [0, 1)")
    n_train: int = _f(320, "training examples generated for the embedded data set")
    n_val: int = _f(64, "validation examples generated for the embedded data set")
    progress: bool = _f(True, "show a tqdm progress bar")
    # where the results go besides the run folder's own files
    save_hf: bool = _f(True, "at the end, write <run>/hf: from_pretrained weights (a PEFT adapter for lora), "
                             "config, generation config and tokenizer")
    merge_lora: bool = _f(False, "lora with save_hf: also write <run>/hf-merged, the base model with the "
                                 "adapter folded in")
    report_to: str = _f("none", "also log to: none, or tensorboard (event files in <run>/tensorboard)",
                        choices=REPORT_TO)

    # ------------------------------------------------------------------ checks
    def validate(self) -> TrainConfig:
        """Check every field; raise ConfigError naming the first bad one. Returns self for chaining."""
        _check_types(self)
        _choice(self, "method", METHODS)
        _choice(self, "rule", MODULE_RULES)
        _choice(self, "task", TASKS)
        _choice(self, "dtype", DTYPES)
        _choice(self, "on_nan", ON_NAN)
        _choice(self, "report_to", REPORT_TO)
        _choice(self, "loss_backend", LOSS_BACKENDS)
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(f"device: expected auto, cpu, mps, cuda or cuda:N, got {self.device!r}")
        if not 0.0 < self.delta <= 1.0:
            raise ConfigError(f"delta: must lie in (0, 1], got {self.delta:g}")
        _range(self, "eta", lo=0.0)
        _range(self, "ema_beta", lo=0.0, hi=1.0, hi_open=True)
        _range(self, "min_inclusion", lo=0.0, hi=1.0)
        _range(self, "depth_bias", lo=0.0)
        if self.depth_bias != self.depth_bias or self.depth_bias == float("inf"):
            raise ConfigError(f"depth_bias: must be a finite number, got {self.depth_bias}")
        if self.depth_bias > 0 and self.method != "misa":
            raise ConfigError(f"depth_bias: applies to method misa only, not {self.method}")
        if self.reweight and self.method == "misa" and self.rule == "misa":
            raise ConfigError("reweight: rule misa (the authors' draw) has no closed-form inclusion probability "
                              "to divide by; use --rule misa_norm, optimal or uniform")
        if self.merge_lora and self.method != "lora":
            raise ConfigError(f"merge_lora: applies to method lora only, not {self.method}")
        if self.merge_lora and not self.save_hf:
            raise ConfigError("merge_lora: writes <run>/hf-merged beside <run>/hf, so it needs save_hf")
        _range(self, "lora_dropout", lo=0.0, hi=1.0, hi_open=True)
        _range(self, "val_fraction", lo=0.0, hi=1.0, hi_open=True)
        _range(self, "lr", lo=0.0, lo_open=True)
        _range(self, "eps", lo=0.0, lo_open=True)
        _range(self, "lora_alpha", lo=0.0, lo_open=True)
        _range(self, "weight_decay", lo=0.0)
        _range(self, "clip_grad", lo=0.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas: need two numbers in [0, 1), got {list(self.betas)}")
        for name in ("period", "lisa_layers", "badam_layers", "lora_r", "max_steps", "batch_size",
                     "grad_accum", "eval_batches", "max_new_tokens", "log_every", "keep_last", "n_train"):
            _range(self, name, lo=1)
        for name in ("warmup_steps", "seed", "eval_every", "gen_eval_examples", "save_every", "n_val"):
            _range(self, name, lo=0)
        _range(self, "max_seq_len", lo=8)
        if self.compile_ops and not self.lean_ops:
            raise ConfigError("compile_ops: compiles the lean ops, so it needs lean_ops (drop --no-lean-ops)")
        model_path = Path(self.model).expanduser() if self.model is not None else None
        if model_path is not None and _looks_like_path(self.model) and not model_path.exists():
            raise ConfigError(f"model: path does not exist: {self.model}")
        if self.data is not None and not self.data_hub and not Path(self.data).expanduser().exists():
            raise ConfigError(f"data: file does not exist: {self.data}")
        if self.resume not in (None, "auto") and not Path(self.resume).expanduser().exists():
            raise ConfigError(f"resume: folder does not exist: {self.resume}")
        if self.overwrite and self.resume is not None:
            raise ConfigError("overwrite: replaces the run in output_dir, so it cannot be combined with resume")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def replace(self, **changes: Any) -> TrainConfig:
        """Copy with some fields changed (not validated)."""
        return dataclasses.replace(self, **changes)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Fields a resumed run must share with the run that wrote the checkpoint: changing any of them changes
# which parameters exist or what the saved optimizer/sampler/data state means (the seed picks the data split).
RESUME_LOCKED = ("model", "method", "task", "rule", "delta", "lisa_layers", "badam_layers", "lora_r",
                 "train_embeddings", "train_head", "train_norms", "seed")


def _looks_like_path(spec: str) -> bool:
    """A model spec that is clearly a file-system path (hub ids like 'org/name' are not checked here)."""
    return (spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".safetensors", ".bin"))
            or os.sep in spec and spec.count(os.sep) > 1)


def _choice(cfg: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"{name}: unknown value {value!r}; choose from {', '.join(choices)}")


def _range(cfg: TrainConfig, name: str, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> None:
    v = getattr(cfg, name)
    bad = (lo is not None and (v < lo or (lo_open and v == lo))) or (
        hi is not None and (v > hi or (hi_open and v == hi)))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        interval = f"{lb}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{rb}"
        raise ConfigError(f"{name}: must lie in {interval}, got {v}")


def field_kind(f: dataclasses.Field) -> str:
    """Scalar kind of a field from its default: 'bool', 'int', 'float', 'str', 'optstr', 'pair'."""
    if f.name == "betas":
        return "pair"
    d = f.default
    if d is None:
        return "optstr"
    return type(d).__name__


def coerce(name: str, value: Any) -> Any:
    """Convert a value from YAML/JSON/CLI text to the field's type, or raise ConfigError naming the field.

    YAML 1.1 reads '1e-4' as a string, so numeric strings are accepted for numeric fields."""
    f = FIELDS[name]
    kind = field_kind(f)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(value) if isinstance(value, (int, str)) else _raise()
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError
            return out
        if kind == "pair":
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            pair = tuple(float(v) for v in value)
            if len(pair) != 2:
                raise ValueError
            return pair
        if kind == "optstr":
            if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
                return None
            return str(value) if isinstance(value, (str, int, float)) else _raise()
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        want = {"pair": "two numbers", "optstr": "a string or none"}.get(kind, kind)
        raise ConfigError(f"{name}: expected {want}, got {value!r}") from None


def _raise() -> Any:
    raise ValueError


def _check_types(cfg: TrainConfig) -> None:
    for name in FIELDS:
        setattr(cfg, name, coerce(name, getattr(cfg, name)))


def from_dict(d: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Config from a mapping (unknown keys rejected with a suggestion); not yet validated."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for key, value in d.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{key}: unknown config field{hint}")
        setattr(cfg, name, coerce(name, value))
    return cfg


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON config file into a dict."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config: file does not exist: {path}")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path} is not a text file (expected YAML or JSON)") from None
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror or e}") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parser error is bad user input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config: cannot parse {path}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of field: value")
    return data


def load_config(path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the file's values, then overrides (CLI); validated."""
    cfg = TrainConfig()
    if path is not None:
        cfg = from_dict(read_file(path), cfg)
    if overrides:
        cfg = from_dict(overrides, cfg)
    return cfg.validate()


def validate_against_model(cfg: TrainConfig, modules: list, total_params: int,
                           max_positions: int | None = None) -> None:
    """Checks that need the loaded model: budget vs module sizes, layer counts, sequence length.

    ``modules`` is find_modules' list (objects with .size and .layer)."""
    if not modules:
        raise ConfigError("model: no trainable modules found (no decoder-layer Linear weights)")
    if cfg.method == "misa":
        smallest = min(int(m.size) for m in modules)
        budget = int(cfg.delta * total_params)
        if budget < smallest:
            need = smallest / total_params
            raise ConfigError(f"delta: budget {cfg.delta:g} x {total_params} params = {budget} is below the "
                              f"smallest module ({smallest} params); use delta >= {need:.4g}")
    n_layers = len({int(m.layer) for m in modules})
    if cfg.method == "lisa" and cfg.lisa_layers > n_layers:
        raise ConfigError(f"lisa_layers: {cfg.lisa_layers} exceeds the model's {n_layers} layers")
    if cfg.method == "badam" and cfg.badam_layers > n_layers:
        raise ConfigError(f"badam_layers: {cfg.badam_layers} exceeds the model's {n_layers} layers")
    if max_positions is not None and cfg.max_seq_len > max_positions:
        raise ConfigError(f"max_seq_len: {cfg.max_seq_len} exceeds the model's {max_positions} positions")


def check_resume_compatible(cfg: TrainConfig, saved: dict[str, Any], saved_world: int, world: int) -> None:
    """Refuse to resume a checkpoint written by an incompatible run (different model, method, world...)."""
    for name in RESUME_LOCKED:
        if name in saved:
            want = coerce(name, saved[name])
            if want != getattr(cfg, name):
                raise ConfigError(f"resume: checkpoint was written with {name}={want!r}, "
                                  f"this run has {name}={getattr(cfg, name)!r}")
    if saved_world != world:
        raise ConfigError(f"resume: checkpoint was written with world size {saved_world}, "
                          f"this run has {world}")
