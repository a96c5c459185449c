"""--estimate-memory: misa_theory.memory's prediction for MISA, LoRA, LISA and full from config.json alone."""

from __future__ import annotations

import pytest

from misa_theory.memory import predict_peak
from misa_train.cli import main
from tests.trainer_helpers import make_model_dir


def test_estimate_reads_config_only_and_matches_the_memory_model(tmp_path, capsys):
    folder = make_model_dir(tmp_path / "m")
    (folder / "model.safetensors").unlink()  # no weights: the estimate must not need them
    assert main(["--estimate-memory", "--model", str(folder), "--max-seq-len", "128", "--batch-size", "2",
                 "--delta", "0.2", "--grad-checkpointing"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "seq 128, batch 2, checkpointing on" in lines[0]
    rows = {line.split()[0]: float(line.split()[-2]) for line in lines[2:]}
    assert list(rows) == ["misa", "lora", "lisa", "full"]
    import json

    config = json.loads((folder / "config.json").read_text())
    want = predict_peak(config, "misa", seq=128, batch=2, ckpt=True, delta=0.2, train_embeddings=False,
                        train_head=False)
    full = predict_peak(config, "full", seq=128, batch=2, ckpt=True)
    assert rows["misa"] == pytest.approx(want.peak_bytes / 2**20, abs=0.06)
    assert rows["full"] == pytest.approx(full.peak_bytes / 2**20, abs=0.06)
    assert rows["misa"] < rows["full"]


def test_estimate_refuses_a_non_llama_config(tmp_path, capsys):
    folder = make_model_dir(tmp_path / "g", arch="gpt2")
    with pytest.raises(SystemExit) as e:
        main(["--estimate-memory", "--model", str(folder)])
    assert e.value.code == 2
    assert "Llama-style" in capsys.readouterr().err
