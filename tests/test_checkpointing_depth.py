"""With activation checkpointing, backward still stops at the lowest layer that has a trainable module."""

from __future__ import annotations

import pytest
import torch

from misa_train.train import enable_checkpointing
from tests.helpers_tiny import make_tiny


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_backward_skips_frozen_layers_below_the_lowest_trainable_one(arch):
    model, _ = make_tiny(arch, num_layers=4)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.layers if arch != "gpt2" else model.transformer.h
    top = next(m for m in layers[-1].modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
    top.weight.requires_grad_(True)
    enable_checkpointing(model, model)
    assert model.is_gradient_checkpointing

    ran: list[int] = []
    for i, layer in enumerate(layers):
        # a full backward hook fires only when autograd actually goes through the layer
        layer.register_full_backward_hook(lambda _m, _gi, _go, i=i: ran.append(i))
    ids = torch.randint(2, 200, (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert top.weight.grad is not None and torch.isfinite(top.weight.grad).all()
    assert ran == [len(layers) - 1], f"backward ran through layers {ran}"
