"""Evaluation: validation loss/perplexity and generation accuracy on numeric answers."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX, Example, collate, encode_prompt

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def _clean_number(s: str) -> str | None:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    if not s or s in ("-", "."):
        return None
    try:
        float(s)
    except ValueError:
        return None
    return s


def extract_answer(text: str | None) -> str | None:
    """The final numeric answer of a solution text, as a string (commas, ``$`` and a trailing period removed).

    The first number after the last ``####`` wins; without ``####``, the last number in the text; None if
    there is none. ``'... #### $1,234.'`` -> ``'1234'``; ``'so x = -3.5.'`` -> ``'-3.5'``.
    """
    if not text:
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1].replace("$", "")
        m = re.search(_NUMBER, tail)
        if m:
            return _clean_number(m.group(0))
    matches = re.findall(_NUMBER, text.replace("$", ""))
    for cand in reversed(matches):
        val = _clean_number(cand)
        if val is not None:
            return val
    return None


def answers_match(pred: str | None, target: str | None, tol: float = 1e-6) -> bool:
    """Numeric equality ``|p - t| <= tol * max(1, |t|)``; plain string equality if either is not a number."""
    if pred is None or target is None:
        return False
    try:
        p, t = float(pred), float(target)
    except ValueError:
        return pred.strip() == target.strip()
    return math.isfinite(p) and abs(p - t) <= tol * max(1.0, abs(t))


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: str | torch.device | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Token-weighted mean negative log-likelihood over all label tokens of ``batches``.

    With logits ``z`` and labels ``y`` (``-100`` = ignored), the targets are the shifted pairs
    ``(z[b, t], y[b, t+1])``; ``loss = sum_{b,t} -log softmax(z[b,t])[y[b,t+1]] / tokens`` over non-ignored
    targets (computed in float32), ``ppl = exp(loss)``. ``tokens`` = number of such targets. Runs under
    ``no_grad`` in eval mode and restores the model's previous mode. At most ``max_batches`` batches.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            input_ids = batch["input_ids"].to(device)
            attn = batch["attention_mask"].to(device)
            labels = batch["labels"].to(device)
            logits = model(input_ids=input_ids, attention_mask=attn).logits
            shift_logits = logits[:, :-1, :].float()
            shift_labels = labels[:, 1:]
            nll = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total_nll += nll.double()
            total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    loss = float(total_nll) / total_tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": total_tokens}


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> list[str]:
    """Greedy continuations (decoded, special tokens removed) of each example's training-format prompt.

    Prompts are the exact ids ``encode_sft`` trains on, left-padded into batches so every row's last prompt
    token sits at the same position; generation stops at eos or after ``max_new_tokens``.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_cfg = getattr(model, "generation_config", None)
    eos = gen_cfg.eos_token_id if gen_cfg is not None and gen_cfg.eos_token_id is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for s in range(0, len(examples), batch_size):
            chunk = examples[s : s + batch_size]
            batch = collate([{"input_ids": encode_prompt(tokenizer, ex)} for ex in chunk], pad_id, "left")
            input_ids = batch["input_ids"].to(device)
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=eos,
            )
            new = gen[:, input_ids.shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs


def answer_accuracy(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    n_samples: int = 4,
) -> dict:
    """Fraction of examples whose generated final number equals the reference's (``answers_match``).

    ``accuracy = correct / n`` with ``n = len(examples)`` (0.0 when empty). ``samples`` holds the first
    ``n_samples`` items as dicts ``prompt, output, predicted, target, correct`` for the report.
    """
    if not examples:
        return {"accuracy": 0.0, "n": 0, "samples": []}
    outputs = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size, device)
    correct = 0
    samples = []
    for ex, out in zip(examples, outputs, strict=True):
        pred, target = extract_answer(out), extract_answer(ex.response)
        ok = answers_match(pred, target)
        correct += ok
        if len(samples) < n_samples:
            samples.append(
                {"prompt": ex.prompt, "output": out, "predicted": pred, "target": target, "correct": ok}
            )
    return {"accuracy": correct / len(examples), "n": len(examples), "samples": samples}
