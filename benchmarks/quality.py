"""Quality comparison of MISA against full AdamW, LoRA, LISA and BAdam (issue 5, item 4).

Sub-commands (each a small step of scripts/quality.sh; run ``python benchmarks/quality.py CMD --help``):

* ``convert``   GGUF -> plain safetensors folder (dequantised once), tokenizer eos/pad aligned as the trainer does.
* ``make-tiny`` random-initialised small Llama (e.g. 6 layers x 384) with the byte-level tokenizer, for the
                from-scratch pre-training comparison.
* ``grid``      the SFT grid (GSM8K): every method, a small lr grid per method family and several seeds, run
                as subprocesses ``W`` at a time on one GPU, each job = one ``misa_train`` run plus a test-set
                evaluation; jobs are started only while they fit a wall-clock deadline; one JSON is rewritten
                after every job so a killed call still returns what finished.
* ``pretrain``  from-scratch pre-training: full Adam vs MISA (embeddings/head/norms always on) at equal steps.
* ``job``       internal: one run (what ``grid``/``pretrain`` start).
* ``report``    tables (markdown) and figures from the JSON files.

Training is the trainer's own ``misa_train.train.run(cfg)`` with a validated ``TrainConfig``; this file only
wraps it: it keeps a reference to the trained network (``build_method``'s result) and the tokenizer so the
test set can be scored without reloading a checkpoint, and caches the tokenised data set on disk (keyed by
every argument that changes it) so parallel jobs do not tokenise the same 7.5k examples again.

Test metrics (GSM8K test, never used for any choice):
* answer-token loss: token-weighted mean NLL of the response tokens of *all* test items, prompts formatted
  exactly as in training (``misa_train.data.encode_sft``, chat template), computed by
  ``misa_train.evaluate.eval_loss``;
* accuracy: greedy generation on the first ``acc_n`` test items (``misa_train.evaluate.answer_accuracy``:
  final number after ``####``, else the last number, compared numerically).
The learning rate of each method is chosen on the trainer's validation split of the *training* file
(``val_fraction``), by the final validation loss of seed 0.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# method key -> TrainConfig overrides that define it
METHODS: dict[str, dict[str, Any]] = {
    "full": {"method": "full"},
    "lora": {"method": "lora", "lora_r": 16, "lora_alpha": 32.0},
    "lisa": {"method": "lisa", "lisa_layers": 2},
    "badam": {"method": "badam", "badam_layers": 1},
    "misa1": {"method": "misa", "delta": 0.01},
    "misa3": {"method": "misa", "delta": 0.03},
    # opt-in depth-aware sampling (TrainConfig.depth_bias): not the paper's rule, run only when named
    "misa1d2": {"method": "misa", "delta": 0.01, "depth_bias": 2.0},
    "misa3d2": {"method": "misa", "delta": 0.03, "depth_bias": 2.0},
    # the rule ablation (issue 15): one budget, δ = 3%, every module-wise rule, then reweighting and kept moments
    "abl_misa": {"method": "misa", "delta": 0.03, "rule": "misa"},
    "abl_norm": {"method": "misa", "delta": 0.03, "rule": "misa_norm"},
    "abl_ht": {"method": "misa", "delta": 0.03, "rule": "optimal"},
    "abl_unif": {"method": "misa", "delta": 0.03, "rule": "uniform"},
    "abl_layer": {"method": "lisa", "lisa_layers": 1},
    "abl_norm_rw": {"method": "misa", "delta": 0.03, "rule": "misa_norm", "reweight": True},
    "abl_misa_keep": {"method": "misa", "delta": 0.03, "rule": "misa", "retain_state": True},
}
FAMILY = {"full": "full", "lora": "lora", "lisa": "block", "badam": "block", "misa1": "block", "misa3": "block",
          "misa1d2": "block", "misa3d2": "block", **{k: "block" for k in METHODS if k.startswith("abl_")}}
# learning-rate grid per family: (middle, lower, upper); the middle is run first with every seed
LR_GRID = {"full": (2e-5, 1e-5, 5e-5), "lora": (5e-4, 2e-4, 1e-3), "block": (5e-5, 2e-5, 1e-4)}


def _log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ model folders
def cmd_convert(a: argparse.Namespace) -> None:
    """Dequantise a GGUF into a safetensors folder the trainer loads with ``--model DIR``."""
    from misa_train import models

    t0 = time.time()
    out = Path(a.out)
    n = models.save_gguf_as_folder(Path(a.gguf), out)
    _log(f"converted {a.gguf} -> {out}: {n / 1e6:.1f}M params ({time.time() - t0:.0f}s)")


def cmd_make_tiny(a: argparse.Namespace) -> None:
    """Random-initialised Llamas (tied embeddings, one per seed) + the trainer's byte-level tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from misa_train.models import tiny_tokenizer

    tok = tiny_tokenizer(chat_template=True)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                      max_position_embeddings=a.max_positions, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    for seed in (int(x) for x in str(a.seeds).split(",")):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        out = Path(f"{a.out}-s{seed}")
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        n = sum(p.numel() for p in model.parameters())
        _log(f"tiny llama {a.layers}x{a.hidden} (vocab {len(tok)}, seed {seed}) -> {out}: {n / 1e6:.2f}M params")


# ------------------------------------------------------------------------------------------ one job
def _disk_cached(cache: Path, key: Any, build):
    """``build()`` memoised in ``cache/<sha1(key)>.pkl``; a file lock makes parallel jobs build it once."""
    cache.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path, lock = cache / f"{h}.pkl", cache / f"{h}.lock"
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        try:
            if path.is_file():
                with open(path, "rb") as fh:
                    return pickle.load(fh)
            obj = build()
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
            return obj
        finally:
            fcntl.flock(lf, fcntl.LOCK_UN)


def _file_id(path: str | None) -> Any:
    if path is None:
        return None
    p = Path(path).resolve()
    st = p.stat()
    return [str(p), st.st_size, int(st.st_mtime)]


def _curves(run_dir: Path) -> dict[str, list]:
    ev, tr = [], []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "eval" and rec.get("val_loss") is not None:
                ev.append([rec["step"], rec["val_loss"]])
            elif rec.get("event") == "train" and rec.get("loss") is not None:
                tr.append([rec["step"], rec["loss"]])
    return {"val": ev, "train": tr}


def _test_metrics(net: Any, tok: Any, spec: dict[str, Any], cache: Path) -> dict[str, Any]:
    """Answer-token loss over the whole test file and greedy accuracy on its first ``acc_n`` items."""
    import torch

    from misa_train import data, evaluate

    max_len = int(spec["overrides"].get("max_seq_len", 512))
    test_path = spec["test"]

    def build():
        ex = data.load_examples(test_path)
        return ex, data.encode_sft(tok, ex, max_len)

    examples, enc = _disk_cached(cache, ["test", _file_id(test_path), max_len, tok.name_or_path, len(tok)], build)
    out: dict[str, Any] = {"test_items": len(examples), "test_encoded": len(enc)}
    t0 = time.time()
    with torch.no_grad():
        batches = data.Batches(enc, spec.get("eval_batch", 32), seed=0, pad_token_id=tok.pad_token_id,
                               shuffle=False, repeat=False)
        ev = evaluate.eval_loss(net, batches)
    out.update(test_loss=ev["loss"], test_ppl=ev["ppl"], test_tokens=ev["tokens"], test_loss_s=time.time() - t0)
    n = int(spec.get("acc_n", 0))
    if n > 0:
        t0 = time.time()
        acc = evaluate.answer_accuracy(net, tok, examples[:n], max_new_tokens=int(spec.get("max_new_tokens", 256)),
                                       batch_size=int(spec.get("gen_batch", n)), n_samples=2)
        out.update(accuracy=acc["accuracy"], accuracy_n=acc["n"], samples=acc["samples"],
                   accuracy_s=time.time() - t0)
    return out


def cmd_job(a: argparse.Namespace) -> None:
    """One training run (or, kind 'base', only the test evaluation of the untouched model)."""
    spec = json.loads(Path(a.spec).read_text())
    cache = Path(spec["cache"])
    import torch

    from misa_train import data, methods, models
    from misa_train import train as train_mod
    from misa_train.config import load_config

    res: dict[str, Any] = {"name": spec["name"], "key": spec.get("key"), "kind": spec["kind"],
                           "lr": spec["overrides"].get("lr"), "seed": spec["overrides"].get("seed"),
                           "overrides": spec["overrides"], "torch": torch.__version__,
                           "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    if os.environ.get("QUALITY_NO_CUDNN_SDP"):  # cuDNN attention failed under several processes per GPU
        torch.backends.cuda.enable_cudnn_sdp(False)
    t_job = time.time()
    if spec["kind"] == "base":
        ov = spec["overrides"]
        dev = train_mod.resolve_device(ov.get("device", "auto"))
        dtype = train_mod.resolve_dtype(ov.get("dtype", "auto"), dev)
        net, tok = models.load_model(ov["model"], dtype=dtype, device=dev)
        res.update(_test_metrics(net, tok, spec, cache))
        res["job_s"] = time.time() - t_job
        _write_json(Path(a.result), res)
        return

    captured: dict[str, Any] = {}
    orig_build, orig_load, orig_prep = methods.build_method, models.load_model, data.prepare_data

    def build_method(*args: Any, **kw: Any) -> Any:
        captured["method"] = orig_build(*args, **kw)
        return captured["method"]

    def load_model(*args: Any, **kw: Any) -> Any:
        captured["model_tok"] = orig_load(*args, **kw)
        return captured["model_tok"]

    def prepare_data(src: Any, tokenizer: Any, **kw: Any) -> Any:
        key = ["data", _file_id(src), tokenizer.name_or_path, len(tokenizer),
               {k: v for k, v in kw.items() if k != "model_config"}]
        if kw.get("model_config") is not None:
            data.check_seq_len(kw["max_seq_len"], kw["model_config"])
        kw = {k: v for k, v in kw.items() if k != "model_config"}
        return _disk_cached(cache, key, lambda: orig_prep(src, tokenizer, **kw))

    # run() imports these names at call time, so the wrappers are what it uses
    methods.build_method, models.load_model, data.prepare_data = build_method, load_model, prepare_data
    # every job is a fresh run: a folder left by a failed attempt (re-run with --only) is replaced
    cfg = load_config(None, {**spec["overrides"], "overwrite": True})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    summary = train_mod.run(cfg)
    res["train_s"] = time.time() - t0
    res["summary"] = {k: summary.get(k) for k in ("steps", "train_loss", "val_loss_start", "val_loss_end",
                                                   "tokens_per_s", "step_time_s", "peak_mem_mb", "stats")}
    res["curves"] = _curves(Path(summary["run_dir"]))
    if spec["kind"] == "sft":
        net = captured["method"].model
        tok = captured["model_tok"][1]
        res.update(_test_metrics(net, tok, spec, cache))
    res["job_s"] = time.time() - t_job
    _write_json(Path(a.result), res)
    if not spec.get("keep_run"):
        shutil.rmtree(summary["run_dir"], ignore_errors=True)


def cmd_make_arith(a: argparse.Namespace) -> None:
    """Arithmetic SFT data with worked steps (the trainer's embedded task, larger): train/test JSONL whose test
    expressions never occur in train. reasoning-gym repeats items, so prompts are de-duplicated first."""
    import random

    from misa_train.data import default_examples

    seen: set[str] = set()
    uniq = [e for e in default_examples(a.n, seed=a.seed) if not (e.prompt in seen or seen.add(e.prompt))]
    random.Random(a.seed).shuffle(uniq)
    test = uniq[: a.n_test]
    expr = {e.response.split("####")[0] for e in test}
    train = [e for e in uniq[a.n_test:] if e.response.split("####")[0] not in expr]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, items in (("train", train), ("test", test)):
        lines = [json.dumps({"prompt": e.prompt, "response": e.response}) for e in items]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    _log(f"{len(train)} train, {len(test)} test items -> {out}")


# ------------------------------------------------------------------------------------------ scheduling
class Pool:
    """Run job specs as subprocesses, ``workers`` at a time, under a wall-clock deadline."""

    def __init__(self, work: Path, workers: int, deadline: float, hard: float, est: float, out: Path,
                 meta: dict[str, Any], env: dict[str, str]) -> None:
        self.work, self.workers, self.deadline, self.hard = work, workers, deadline, hard
        self.est, self.out, self.meta, self.env = est, out, meta, env
        self.t0 = time.time()
        self.results: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.running: dict[str, tuple[subprocess.Popen, float, dict[str, Any], Any]] = {}
        self.durations: dict[str, list[float]] = {}

    def elapsed(self) -> float:
        return time.time() - self.t0

    def estimate(self, spec: dict[str, Any]) -> float:
        d = self.durations.get(spec["kind"])
        return max(d) if d else self.est

    def fits(self, spec: dict[str, Any]) -> bool:
        return self.elapsed() + self.estimate(spec) <= self.deadline

    def start(self, spec: dict[str, Any]) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        sp = self.work / f"{spec['name']}.spec.json"
        _write_json(sp, spec)
        logf = open(self.work / f"{spec['name']}.log", "w")  # noqa: SIM115 - closed when the job ends
        cmd = [sys.executable, str(Path(__file__).resolve()), "job", "--spec", str(sp),
               "--result", str(self.work / f"{spec['name']}.result.json")]
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env, cwd=str(ROOT))
        self.running[spec["name"]] = (proc, time.time(), spec, logf)
        _log(f"start {spec['name']} (t={self.elapsed():.0f}s, running {len(self.running)})")

    def poll(self) -> list[dict[str, Any]]:
        """Reap finished jobs; return the results that came in."""
        done = []
        for name, (proc, t, spec, logf) in list(self.running.items()):
            if proc.poll() is None:
                if self.elapsed() > self.hard:
                    proc.kill()
                    proc.wait()
                else:
                    continue
            logf.close()
            del self.running[name]
            dur = time.time() - t
            rp = self.work / f"{name}.result.json"
            if proc.returncode == 0 and rp.is_file():
                res = json.loads(rp.read_text())
                res["wall_s"] = dur
                self.results.append(res)
                self.durations.setdefault(spec["kind"], []).append(dur)
                done.append(res)
                _log(f"done  {name} in {dur:.0f}s: " + ", ".join(
                    f"{k}={res[k]:.4f}" for k in ("test_loss", "accuracy") if isinstance(res.get(k), float))
                    + (f" val_end={res['summary']['val_loss_end']:.4f}" if res.get("summary") else ""))
            else:
                tail = (self.work / f"{name}.log").read_text()[-3000:]
                self.failed.append({"name": name, "rc": proc.returncode, "log_tail": tail})
                _log(f"FAIL  {name} rc={proc.returncode} after {dur:.0f}s\n{tail}")
        if done or self.failed:
            self.save()
        return done

    def run(self, queue: list[dict[str, Any]], refill: Any = None) -> None:
        """Start jobs from ``queue`` while workers are free until all are done; a job that would end after the
        deadline is skipped. ``refill()`` (optional) returns jobs to put at the front after every poll."""
        while queue or self.running:
            self.poll()
            if refill is not None:
                queue[:0] = refill()
            while queue and len(self.running) < self.workers:
                nxt = queue.pop(0)
                if self.fits(nxt):
                    self.start(nxt)
                else:
                    self.skipped.append(nxt["name"])
                    _log(f"skip  {nxt['name']} (would end after the {self.deadline:.0f}s deadline)")
            time.sleep(0.5)
        self.save()

    def save(self) -> None:
        _write_json(self.out, {"meta": {**self.meta, "elapsed_s": self.elapsed()}, "jobs": self.results,
                               "failed": self.failed, "skipped": self.skipped})


def _base_overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {"model": a.model, "data": a.train, "task": "sft", "max_steps": a.steps, "batch_size": a.batch,
            "max_seq_len": a.seq, "warmup_steps": a.warmup, "period": a.period, "dtype": a.dtype,
            "device": a.device, "val_fraction": a.val_fraction, "eval_batches": a.eval_batches,
            "eval_every": a.eval_every, "gen_eval_examples": 0, "log_every": 10, "save_every": 0,
            "keep_last": 1, "progress": False, "weight_decay": 0.0, "clip_grad": 1.0}


def _env(a: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    # an explicit PYTHONPATH (e.g. a frozen copy of the trainer) wins over the checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(ROOT)) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _parse_lrs(text: str, keys: list[str]) -> dict[str, tuple[float, ...]]:
    """``misa1=3e-4,1e-4;lisa=1e-4`` -> {key: lrs}: per-method lr grids replacing LR_GRID (first lr = the
    two-seed one)."""
    out: dict[str, tuple[float, ...]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, lrs = part.partition("=")
        if key.strip() not in keys or not lrs:
            raise SystemExit(f"--lrs: {part!r} must be KEY=lr[,lr...] with KEY one of {', '.join(keys)}")
        out[key.strip()] = tuple(float(x) for x in lrs.split(","))
    return out


def cmd_grid(a: argparse.Namespace) -> None:
    """The SFT comparison; see the module docstring for the order in which jobs are started."""
    keys = [k.strip() for k in a.methods.split(",") if k.strip()]
    seeds = [int(s) for s in a.seeds.split(",")]
    base = _base_overrides(a)
    work = Path(a.work)
    common = {"cache": str(work / "cache"), "test": a.test, "acc_n": a.acc_n, "max_new_tokens": a.max_new_tokens,
              "gen_batch": a.gen_batch or a.acc_n, "eval_batch": 32}

    def spec(key: str, lr: float, seed: int) -> dict[str, Any]:
        ov = {**base, **METHODS[key], "lr": lr, "seed": seed,
              "output_dir": str(work / "runs" / f"{key}-{lr:g}-s{seed}")}
        return {**common, "name": f"{key}-lr{lr:g}-s{seed}", "key": key, "kind": "sft", "overrides": ov}

    grids = {k: LR_GRID[FAMILY[k]][: a.n_lr] for k in keys}
    grids.update(_parse_lrs(a.lrs, keys))
    queue: list[dict[str, Any]] = []
    if a.base:
        queue.append({**common, "name": "base", "key": "base", "kind": "base",
                      "overrides": {"model": a.model, "dtype": a.dtype, "device": a.device, "max_seq_len": a.seq}})
    # 1. the middle lr, every seed (a complete two-seed table first); 2. the rest of the lr grid on seed 0
    for s in seeds:
        queue += [spec(k, grids[k][0], s) for k in keys]
    # lr-major, so a deadline that cuts the grid short cuts it the same way for every method
    queue += [spec(k, grids[k][i], seeds[0]) for i in range(1, max(map(len, grids.values()))) for k in keys
              if i < len(grids[k])]
    if a.only:  # re-run named jobs only (e.g. after a device failure), nothing derived
        queue = [q for q in queue if q["name"] in set(a.only.split(","))]
    meta = {"what": "SFT GSM8K quality grid", "settings": {**base, "methods": {k: METHODS[k] for k in keys},
            "lr_grid": grids, "seeds": seeds, "acc_n": a.acc_n, "max_new_tokens": a.max_new_tokens,
            "workers": a.workers, "deadline_s": a.deadline}, "argv": sys.argv}
    pool = Pool(work, a.workers, a.deadline, a.hard, a.est, Path(a.out), meta, _env(a))
    added: set[str] = set()

    def derived() -> list[dict[str, Any]]:
        # 3. a method whose seed-0 validation loss is best at another lr gets its other seeds there too
        # (once none of its seed-0 grid runs is still queued or running; skipped or failed ones do not count)
        got = {(r["key"], r["lr"], r["seed"]): r for r in pool.results if r["kind"] == "sft"}
        waiting = {q["name"] for q in queue} | set(pool.running)
        new = []
        for k in keys:
            if any(spec(k, lr, seeds[0])["name"] in waiting for lr in grids[k]):
                continue
            runs = [got[(k, lr, seeds[0])] for lr in grids[k] if (k, lr, seeds[0]) in got]
            if not runs:
                continue
            best = min(runs, key=lambda r: r["summary"]["val_loss_end"] or float("inf"))["lr"]
            if best != grids[k][0]:
                for s in seeds[1:]:
                    sp = spec(k, best, s)
                    if sp["name"] not in added:
                        added.add(sp["name"])
                        new.append(sp)
        return new

    # the derived seeds complete a table row: they go first
    pool.run(queue, refill=None if a.only else derived)
    _log(f"grid finished in {pool.elapsed():.0f}s: {len(pool.results)} done, {len(pool.failed)} failed, "
         f"{len(pool.skipped)} skipped")


def cmd_pretrain(a: argparse.Namespace) -> None:
    """Full Adam vs MISA from scratch at equal steps; model folders ``<models>-s<seed>``."""
    seeds = [int(s) for s in a.seeds.split(",")]
    work = Path(a.work)
    base = {"data": a.text, "task": "pretrain", "max_steps": a.steps, "batch_size": a.batch, "max_seq_len": a.seq,
            "warmup_steps": a.warmup, "lr": a.lr, "betas": [0.9, 0.99], "weight_decay": 0.1, "dtype": a.dtype,
            "device": a.device, "val_fraction": 0.1, "eval_batches": a.eval_batches, "eval_every": a.eval_every,
            "gen_eval_examples": 0, "log_every": 20, "save_every": 0, "keep_last": 1, "progress": False,
            "period": a.period}
    variants = {"full": {"method": "full"},
                "misa": {"method": "misa", "delta": a.delta, "train_embeddings": True, "train_head": True,
                         "train_norms": True}}
    queue = []
    for s in seeds:
        for name, ov in variants.items():
            o = {**base, **ov, "model": f"{a.models}-s{s}", "seed": s,
                 "output_dir": str(work / "runs" / f"{name}-s{s}")}
            queue.append({"name": f"pt-{name}-s{s}", "key": name, "kind": "pretrain", "overrides": o,
                          "cache": str(work / "cache")})
    if a.smoke_sft_test:  # a tiny SFT job through the same path as the real grid (catches device-only bugs)
        o = {"model": f"{a.models}-s{seeds[0]}", "data": a.smoke_sft_train, "task": "sft", "method": "misa",
             "delta": 0.25, "max_steps": 6, "batch_size": 4, "max_seq_len": 256, "dtype": a.dtype,
             "device": a.device, "period": 2, "eval_batches": 2, "eval_every": 0, "gen_eval_examples": 0,
             "save_every": 0, "progress": False}
        for m in ("misa", "lora"):
            ov = {**o, "method": m, "output_dir": str(work / "runs" / f"smoke-{m}")}
            queue.append({"name": f"smoke-{m}", "key": m, "kind": "sft", "overrides": ov,
                          "cache": str(work / "cache"), "test": a.smoke_sft_test, "acc_n": 8,
                          "max_new_tokens": 8, "eval_batch": 8, "keep_run": False})
    meta = {"what": "pre-training from scratch, full Adam vs MISA", "settings": {**base, "variants": variants,
            "seeds": seeds, "models": a.models}, "argv": sys.argv}
    pool = Pool(work, a.workers, a.deadline, a.hard, a.est, Path(a.out), meta, _env(a))
    pool.run(queue)
    _log(f"pretrain finished in {pool.elapsed():.0f}s: {len(pool.results)} done, {len(pool.failed)} failed")


# ------------------------------------------------------------------------------------------ report
def _mean_spread(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (max(xs) - min(xs)) / 2 if len(xs) > 1 else 0.0


LABEL = {"full": "full AdamW", "lora": "LoRA r16", "lisa": "LISA (2 layers)", "badam": "BAdam (1 layer)",
         "misa1": "MISA δ=1%", "misa3": "MISA δ=3%", "misa1d2": "MISA δ=1%, depth_bias 2",
         "misa3d2": "MISA δ=3%, depth_bias 2", "base": "no fine-tuning"}


def select_rows(d: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: the lr with the best seed-0 validation loss among those run with every seed."""
    settings = d["meta"]["settings"]
    seeds = settings["seeds"]
    jobs = [j for j in d["jobs"] if j["kind"] == "sft"]
    rows = []
    for key in settings["methods"]:
        by_lr: dict[float, dict[int, dict]] = {}
        for j in jobs:
            if j["key"] == key:
                by_lr.setdefault(j["lr"], {})[j["seed"]] = j
        if not by_lr:
            continue
        s0 = {lr: r[seeds[0]]["summary"]["val_loss_end"] or float("inf") for lr, r in by_lr.items() if seeds[0] in r}
        best_val = min(s0, key=s0.get) if s0 else None
        complete = [lr for lr, r in by_lr.items() if len(r) == len(seeds)]
        if complete:
            lr = min(complete, key=lambda x: s0.get(x, float("inf")))
        else:
            lr = max(by_lr, key=lambda x: len(by_lr[x]))
        runs = [by_lr[lr][s] for s in sorted(by_lr[lr])]
        rows.append({"key": key, "lr": lr, "runs": runs, "best_val_lr": best_val, "val_by_lr": s0,
                     "test_by_lr": {x: r[seeds[0]].get("test_loss") for x, r in by_lr.items() if seeds[0] in r}})
    return rows


def _fmt_params(n: float | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def sft_table(d: dict[str, Any]) -> str:
    """Markdown table of the SFT comparison (one row per method at its selected lr)."""
    rows = select_rows(d)
    base = next((j for j in d["jobs"] if j["kind"] == "base"), None)
    out = ["| method | budget | lr | seeds | test answer-token loss (mean ± half-range) | accuracy (mean, n) "
           "| val loss | trainable params (per period) | peak GPU mem | train time / run | step time |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    if base is not None:
        out.append(f"| no fine-tuning | — | — | — | {base['test_loss']:.4f} | {100 * base.get('accuracy', 0):.1f}% "
                   f"(n={base.get('accuracy_n', 0)}) | — | — | — | — | — |")
    budget = {"full": "all", "lora": "r=16", "lisa": "2 layers/period", "badam": "1 layer/period",
              "misa1": "δ=1%", "misa3": "δ=3%", "misa1d2": "δ=1%", "misa3d2": "δ=3%"}
    for r in rows:
        runs = r["runs"]
        tl = _mean_spread([x["test_loss"] for x in runs])
        acc = _mean_spread([x.get("accuracy", float("nan")) for x in runs])
        vl = _mean_spread([x["summary"]["val_loss_end"] for x in runs])
        st = runs[0]["summary"]["stats"] or {}
        mem = max(x["summary"]["peak_mem_mb"] for x in runs)
        t = sum(x["train_s"] for x in runs) / len(runs)
        stp = sum(x["summary"]["step_time_s"] for x in runs) / len(runs)
        active = st.get("active_params")
        out.append(f"| {LABEL[r['key']]} | {budget[r['key']]} | {r['lr']:g} | {len(runs)} | {tl[0]:.4f} ± {tl[1]:.4f} "
                   f"| {100 * acc[0]:.1f}% (n={runs[0].get('accuracy_n')}) | {vl[0]:.4f} "
                   f"| {_fmt_params(st.get('trainable_params'))} ({_fmt_params(active)}) "
                   f"| {mem / 1024:.2f} GiB | {t:.0f} s | {1000 * stp:.0f} ms |")
    return "\n".join(out)


def lr_table(d: dict[str, Any]) -> str:
    """Seed-0 validation (selection) and test loss at every lr that ran."""
    out = ["| method | lr | seed-0 val loss | seed-0 test loss | selected |", "|---|---|---|---|---|"]
    for r in select_rows(d):
        for lr in sorted(r["val_by_lr"]):
            out.append(f"| {LABEL[r['key']]} | {lr:g} | {r['val_by_lr'][lr]:.4f} | {r['test_by_lr'][lr]:.4f} "
                       f"| {'yes' if lr == r['lr'] else ''} |")
    return "\n".join(out)


def pretrain_table(d: dict[str, Any]) -> str:
    """Markdown table of the from-scratch comparison."""
    import math

    out = ["| method | seeds | val loss (mean ± half-range) | val perplexity | trainable (per period) | peak GPU mem "
           "| step time |", "|---|---|---|---|---|---|---|"]
    for key, label in (("full", "full Adam"), ("misa", "MISA δ=25% (+emb/head/norms)")):
        runs = [j for j in d["jobs"] if j["kind"] == "pretrain" and j["key"] == key]
        if not runs:
            continue
        vl = _mean_spread([x["summary"]["val_loss_end"] for x in runs])
        st = runs[0]["summary"]["stats"] or {}
        stp = sum(x["summary"]["step_time_s"] for x in runs) / len(runs)
        mem = max(x["summary"]["peak_mem_mb"] for x in runs)
        out.append(f"| {label} | {len(runs)} | {vl[0]:.4f} ± {vl[1]:.4f} | {math.exp(vl[0]):.3f} "
                   f"| {_fmt_params(st.get('trainable_params'))} ({_fmt_params(st.get('active_params'))}) "
                   f"| {mem / 1024:.2f} GiB | {1000 * stp:.0f} ms |")
    return "\n".join(out)


ABL_LABEL = {"abl_misa": "misa (paper: p ∝ exp(min(5, η·G²)))", "abl_norm": "misa_norm (scores / mean)",
             "abl_ht": "optimal (HT-variance optimum)", "abl_unif": "uniform module-wise",
             "abl_layer": "layer-wise (1 uniform layer)", "abl_norm_rw": "misa_norm + reweight 1/π",
             "abl_misa_keep": "misa + moments kept"}


def _mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    from scipy import stats

    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    sd = (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5
    return m, float(stats.t.ppf(0.975, n - 1)) * sd / n**0.5


def ablation_table(d: dict[str, Any]) -> str:
    """Markdown table of the rule ablation: one row per (key, lr), every seed that ran."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for j in d["jobs"]:
        if j["kind"] == "sft":
            groups.setdefault((j["key"], j["lr"]), []).append(j)
    base = next((j for j in d["jobs"] if j["kind"] == "base"), None)
    out = ["| rule | lr | seeds | test accuracy (mean ± 95% CI) | test answer-token loss (mean ± 95% CI) "
           "| step time | peak GPU mem |", "|---|---|---|---|---|---|---|"]
    if base is not None:
        out.append(f"| no fine-tuning | — | — | {100 * base['accuracy']:.1f}% | {base['test_loss']:.4f} | — | — |")
    for (key, lr), runs in sorted(groups.items(), key=lambda kv: (list(ABL_LABEL).index(kv[0][0])
                                                                   if kv[0][0] in ABL_LABEL else 99, kv[0][1])):
        acc = _mean_ci([100 * r["accuracy"] for r in runs])
        loss = _mean_ci([r["test_loss"] for r in runs])
        step = sorted(r["summary"]["step_time_s"] for r in runs)[len(runs) // 2]
        mem = max(r["summary"]["peak_mem_mb"] for r in runs) / 1024
        out.append(f"| {ABL_LABEL.get(key, key)} | {lr:g} | {len(runs)} | {acc[0]:.1f}% ± {acc[1]:.1f} "
                   f"| {loss[0]:.4f} ± {loss[1]:.4f} | {1000 * step:.0f} ms | {mem:.2f} GiB |")
    return "\n".join(out)


def cmd_report(a: argparse.Namespace) -> None:
    """Print the markdown tables and write the figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = Path(a.fig_dir)
    figs.mkdir(parents=True, exist_ok=True)
    if a.ablation:  # one table over every file (a grid split over several calls)
        print(ablation_table({"jobs": [j for f in a.ablation for j in json.loads(Path(f).read_text())["jobs"]]}))
    if a.sft and Path(a.sft).is_file():
        d = json.loads(Path(a.sft).read_text())
        print(sft_table(d), "\n")
        print(lr_table(d), "\n")
        rows = select_rows(d)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for r in rows:
            curves = [x["curves"]["val"] for x in r["runs"] if x["curves"]["val"]]
            if not curves:
                continue
            steps = [s for s, _ in curves[0]]
            mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(min(map(len, curves)))]
            axes[0].plot(steps[: len(mean)], mean, marker="o", ms=3, label=f"{LABEL[r['key']]} (lr {r['lr']:g})")
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("validation answer-token loss")
        axes[0].set_title("GSM8K SFT, SmolLM2-135M-Instruct (mean over seeds)")
        axes[0].legend(fontsize=8)
        names = [LABEL[r["key"]] for r in rows]
        tl = [_mean_spread([x["test_loss"] for x in r["runs"]]) for r in rows]
        axes[1].bar(range(len(rows)), [m for m, _ in tl], yerr=[s for _, s in tl], capsize=4, color="C0")
        lo = min(m - s for m, s in tl)
        hi = max(m + s for m, s in tl)
        axes[1].set_ylim(lo - 0.3 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
        axes[1].set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
        axes[1].set_ylabel("test answer-token loss")
        axes[1].set_title("GSM8K test (all 1319 items)")
        fig.tight_layout()
        fig.savefig(figs / "quality_sft.png", dpi=120)
        plt.close(fig)
    if a.pretrain and Path(a.pretrain).is_file():
        d = json.loads(Path(a.pretrain).read_text())
        print(pretrain_table(d), "\n")
        fig, ax = plt.subplots(figsize=(6, 4))
        for j in sorted((j for j in d["jobs"] if j["kind"] == "pretrain"), key=lambda j: j["name"]):
            c = j["curves"]["val"]
            ax.plot([s for s, _ in c], [v for _, v in c], color="C0" if j["key"] == "full" else "C1",
                    ls="-" if j["seed"] == 0 else "--", label=f"{j['key']} seed {j['seed']}")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title("tinyshakespeare from scratch, Llama 6x384")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(figs / "quality_pretrain.png", dpi=120)
        plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> None:
    """Parse the sub-command and run it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="GGUF -> safetensors folder")
    c.add_argument("--gguf", required=True)
    c.add_argument("--out", required=True)

    t = sub.add_parser("make-tiny", help="random small Llama with the byte-level tokenizer")
    t.add_argument("--out", required=True, help="folder prefix: <out>-s<seed> per seed")
    t.add_argument("--seeds", default="0,1")
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--hidden", type=int, default=384)
    t.add_argument("--intermediate", type=int, default=1024)
    t.add_argument("--heads", type=int, default=6)
    t.add_argument("--max-positions", type=int, default=1024)

    def pool_args(q: argparse.ArgumentParser, deadline: float) -> None:
        q.add_argument("--work", required=True, help="scratch folder (runs, caches, job logs)")
        q.add_argument("--out", required=True, help="aggregated results JSON")
        q.add_argument("--workers", type=int, default=3, help="jobs run at once on the one GPU")
        q.add_argument("--deadline", type=float, default=deadline, help="start no job that would end later (s)")
        q.add_argument("--hard", type=float, default=deadline + 60, help="kill jobs still running then (s)")
        q.add_argument("--est", type=float, default=60.0, help="job duration assumed before one has finished (s)")
        q.add_argument("--dtype", default="bf16")
        q.add_argument("--device", default="auto")

    m = sub.add_parser("make-arith", help="arithmetic train/test JSONL (reasoning-gym, worked steps)")
    m.add_argument("--out", required=True)
    m.add_argument("--n", type=int, default=7000, help="items generated before de-duplication")
    m.add_argument("--n-test", type=int, default=500)
    m.add_argument("--seed", type=int, default=101)
    g = sub.add_parser("grid", help="the SFT comparison")
    pool_args(g, 480.0)
    g.add_argument("--model", required=True)
    g.add_argument("--train", required=True)
    g.add_argument("--test", required=True)
    g.add_argument("--methods", default=",".join(k for k in METHODS
                                                  if "depth_bias" not in METHODS[k] and not k.startswith("abl_")))
    g.add_argument("--seeds", default="0,1")
    g.add_argument("--n-lr", type=int, default=3, help="how much of each family's lr grid to try (1..3)")
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--batch", type=int, default=16)
    g.add_argument("--seq", type=int, default=512)
    g.add_argument("--warmup", type=int, default=30)
    g.add_argument("--period", type=int, default=5)
    g.add_argument("--val-fraction", type=float, default=0.02)
    g.add_argument("--eval-batches", type=int, default=10)
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--acc-n", type=int, default=300)
    g.add_argument("--gen-batch", type=int, default=0, help="generation batch (0 = all acc-n items at once)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--only", default="", help="comma-separated job names: run just these")
    g.add_argument("--lrs", default="", help="per-method lr grids, e.g. 'misa1=3e-4,1e-4;lisa=3e-4' "
                   "(first lr runs on every seed; replaces the family grid for those methods)")
    g.add_argument("--base", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the model before fine-tuning")

    r = sub.add_parser("pretrain", help="from-scratch comparison")
    pool_args(r, 150.0)
    r.add_argument("--models", required=True, help="model folder prefix; <prefix>-s<seed> per seed")
    r.add_argument("--text", required=True)
    r.add_argument("--seeds", default="0,1")
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--seq", type=int, default=256)
    r.add_argument("--warmup", type=int, default=50)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--delta", type=float, default=0.25)
    r.add_argument("--period", type=int, default=20)
    r.add_argument("--eval-batches", type=int, default=14)
    r.add_argument("--eval-every", type=int, default=100)
    r.add_argument("--smoke-sft-train", default=None, help="with --smoke-sft-test: also run a tiny SFT smoke job")
    r.add_argument("--smoke-sft-test", default=None)

    j = sub.add_parser("job", help="internal: one run")
    j.add_argument("--spec", required=True)
    j.add_argument("--result", required=True)

    rp = sub.add_parser("report", help="markdown tables and figures")
    rp.add_argument("--sft", default=str(ROOT / "docs" / "results" / "quality_sft.json"))
    rp.add_argument("--pretrain", default=str(ROOT / "docs" / "results" / "quality_pretrain.json"))
    rp.add_argument("--fig-dir", default=str(ROOT / "docs" / "figures"))
    rp.add_argument("--ablation", nargs="*", default=[], help="rule-ablation JSON files: one table")

    a = p.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    with contextlib.suppress(BrokenPipeError):
        {"convert": cmd_convert, "make-tiny": cmd_make_tiny, "make-arith": cmd_make_arith, "grid": cmd_grid,
         "pretrain": cmd_pretrain, "job": cmd_job, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
