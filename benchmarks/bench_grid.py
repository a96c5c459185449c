"""The benchmark grid's architectures and method options, torch-free so the memory-model residual script
(benchmarks/memory_residuals.py) can read them without importing torch; benchmarks/bench_gpu.py runs them."""

from __future__ import annotations

from typing import Any

#: Llama configs (``LlamaConfig`` keywords) of the benchmark, random-initialised there.
ARCHS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                      rope_theta=500000.0, max_position_embeddings=8192),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                        rope_theta=500000.0, max_position_embeddings=8192),
    # held out: never measured while the memory model was written (benchmarks/memory_oos.py)
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                        rope_theta=500000.0, max_position_embeddings=8192),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                      max_position_embeddings=4096),
    # Llama proportions at toy size: the smallest module (k_proj) still fits a 1% budget
    "tiny": dict(hidden_size=64, intermediate_size=224, num_hidden_layers=3, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, max_position_embeddings=256),
}
#: bench method name -> (TrainConfig.method, TrainConfig overrides)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    "lora": ("lora", {"lora_r": 16, "lora_alpha": 32.0}),
    "lisa": ("lisa", {"lisa_layers": 2, "train_embeddings": True, "train_head": True}),
    "badam": ("badam", {"badam_layers": 1}),
    "misa1": ("misa", {"delta": 0.01}),
    "misa3": ("misa", {"delta": 0.03}),
}


def predict_kwargs(row: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``misa_theory.memory.predict_peak`` keywords for a bench row run with TrainConfig overrides ``over``.

    Rows recorded before the chunked loss scaled its head gradient in place carry no ``inplace_head_grad``
    flag: they ran out of place."""
    return dict(seq=row["seq"], batch=row.get("batch", 1), ckpt=row["ckpt"], delta=over.get("delta", 0.01),
                lisa_layers=over.get("lisa_layers", 2), badam_layers=over.get("badam_layers", 1),
                lora_r=over.get("lora_r", 16), train_embeddings=over.get("train_embeddings"),
                train_head=over.get("train_head"), lean_ops=row.get("lean_ops", False),
                inplace_head_grad=row.get("inplace_head_grad", False))
