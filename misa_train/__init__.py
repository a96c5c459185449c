"""The reference MISA trainer (PyTorch + transformers); imports misa_theory, never the reverse."""
