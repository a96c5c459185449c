"""MisaOptimizer + MisaCallback inside transformers.Trainer and TRL's SFTTrainer (tiny Llama, CPU).

The resume test is the contract: a run resumed from a Trainer checkpoint ends with exactly the weights and
sampler state of the uninterrupted run (same draws, same moments, same data order)."""

from __future__ import annotations

import types

import pytest
import torch

from misa_train.config import ConfigError
from misa_train.data import collate, encode_sft
from misa_train.hf_trainer import MisaCallback, MisaOptimizer
from tests.helpers_tiny import make_tiny, tiny_examples

pytest.importorskip("transformers")


def _encoded(tok, n=24):
    return encode_sft(tok, tiny_examples(n), max_seq_len=64)


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3,
                lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1, save_strategy="steps", save_steps=3,
                report_to=[], use_cpu=True, seed=0, max_grad_norm=0.0, remove_unused_columns=False,
                dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def _train(out, resume=None, spy=None, **kw):
    """(model, optimizer, active sets drawn) after a Trainer run of the tiny Llama with MISA, T = 2;
    ``spy(model)`` is called before training."""
    from transformers import Trainer

    model, tok = make_tiny("llama")
    if spy is not None:
        spy(model)
    opt = MisaOptimizer(model, lr=1e-3, delta=0.2, period=2, seed=0, eta=0.1)  # eta 0.1: varied draws
    draws: list[list[int]] = []

    class Record(MisaCallback):
        def on_step_begin(self, args, state, control, **k):
            if self.optimizer.begin_period(state.global_step):
                draws.append(self.optimizer.method.active_indices().tolist())

    trainer = Trainer(model=model, args=_args(out, **kw), train_dataset=_encoded(tok),
                      data_collator=lambda items: collate(items, tok.pad_token_id),
                      optimizers=(opt, None), callbacks=[Record(opt)])
    trainer.train(resume_from_checkpoint=resume)
    return model, opt, draws


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_trains_only_drawn_modules_and_resumes_exactly(tmp_path):
    """8 steps over 6-step epochs, checkpoint at 3 (mid-period, mid-epoch): the resumed run crosses the epoch
    and the period boundaries exactly as the uninterrupted one."""
    initial = _weights(make_tiny("llama")[0])
    model, opt, draws = _train(tmp_path / "a")
    final = _weights(model)
    assert opt.method.sampler.n_draws == 4 and not opt.method.sampler.exploring  # probed, then 4 draws
    assert len(draws) == 4 and len({tuple(d) for d in draws}) > 1  # a draw every T = 2 steps, not all alike
    modules = opt.method.modules
    trained = {modules[i].name for d in draws for i in d}
    for name, w in final.items():
        changed = not torch.equal(w, initial[name])
        assert changed == (name in trained), name  # drawn modules moved, everything else is frozen

    resumed, ropt, rdraws = _train(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert rdraws == draws[2:]  # the resumed run draws at steps 4 and 6, the same sets
    for name, w in _weights(resumed).items():
        torch.testing.assert_close(w, final[name], rtol=0, atol=0, msg=name)
    assert ropt.method.sampler.state_dict() == opt.method.sampler.state_dict()


def test_lr_comes_from_param_groups(tmp_path):
    """A scheduler's lr reaches the update: lr 0 leaves every weight where it was."""
    model, _ = make_tiny("llama")
    before = _weights(model)
    opt = MisaOptimizer(model, lr=1e-2, delta=0.2, period=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    opt.begin_period(0)
    model(input_ids=torch.tensor([[2, 40, 41, 42]]), labels=torch.tensor([[2, 40, 41, 42]])).loss.backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="before any draw"):
        MisaOptimizer(make_tiny("llama")[0], delta=0.2).step()


def test_gradient_checkpointing_stops_backward_at_the_active_layers(tmp_path):
    """Trainer's checkpointing makes the embeddings' output require grad (backward then runs through every
    frozen layer); the callback makes it non-reentrant without that, and the weights equal the run without
    checkpointing."""
    embed_grad: list[bool] = []

    def record(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        embed_grad.append(hidden.requires_grad)

    def spy(model):  # what the lowest decoder layer receives from the embeddings
        model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)

    plain, _, _ = _train(tmp_path / "p", max_steps=2)
    ckpt, _, _ = _train(tmp_path / "c", max_steps=2, gradient_checkpointing=True, spy=spy)
    assert ckpt.is_gradient_checkpointing and embed_grad and not any(embed_grad)
    for (name, w), (_, v) in zip(_weights(plain).items(), _weights(ckpt).items(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(w, v) for w, v in zip(_weights(plain).values(),
                                                      _weights(make_tiny("llama")[0]).values(), strict=True))


def test_plain_ddp_and_bad_options_are_refused():
    model, _ = make_tiny("llama")
    opt = MisaOptimizer(model, delta=0.2)
    args = types.SimpleNamespace(world_size=2, fsdp="")
    with pytest.raises(ValueError, match="plain DDP"):
        MisaCallback(opt).on_train_begin(args, types.SimpleNamespace(global_step=0), None, model=model)
    with pytest.raises(ConfigError, match="^delta:"):
        MisaOptimizer(model, delta=1e-6)
    with pytest.raises(ValueError, match="^method:"):
        MisaOptimizer(model, method="full")


def _sft_train(out, resume=None):
    """(model, optimizer) after TRL's SFTTrainer on prompt/completion chat records (its default
    activation checkpointing on), checkpoint at step 2."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")

    model, tok = make_tiny("llama")
    rows = [{"prompt": [{"role": "user", "content": ex.prompt}],
             "completion": [{"role": "assistant", "content": ex.response}]} for ex in tiny_examples(16)]
    opt = MisaOptimizer(model, lr=1e-3, delta=0.2, period=2, eta=0.1)
    args = trl.SFTConfig(output_dir=str(out), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-3,
                         logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, seed=0,
                         max_length=64, disable_tqdm=True, max_grad_norm=0.0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, optimizers=(opt, None), callbacks=[MisaCallback(opt)])
    result = trainer.train(resume_from_checkpoint=resume)
    assert result.global_step == 5 and torch.isfinite(torch.tensor(result.training_loss))
    return model, opt


def test_sft_trainer_runs_misa_and_resumes_exactly(tmp_path):
    """TRL's SFTTrainer: only modules train, and a resumed run ends with the uninterrupted run's weights."""
    initial = _weights(make_tiny("llama")[0])
    model, opt = _sft_train(tmp_path)
    final = _weights(model)
    changed = {n for n, p in final.items() if not torch.equal(p, initial[n])}
    module_names = {m.name for m in opt.method.modules}
    assert changed and changed <= module_names
    assert sum(initial[n].numel() for n in changed) < sum(p.numel() for p in initial.values())
    resumed, ropt = _sft_train(tmp_path, resume=str(tmp_path / "checkpoint-2"))
    for name, w in _weights(resumed).items():
        torch.testing.assert_close(w, final[name], rtol=0, atol=0, msg=name)
    assert ropt.method.sampler.state_dict() == opt.method.sampler.state_dict()
