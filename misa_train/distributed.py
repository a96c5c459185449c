"""Multi-process MISA on torch.distributed with FSDP2: ``torchrun --nproc_per_node N -m misa_train ...``.

One process per GPU (or per CPU "device" with gloo, which is what the CPU tests use). What each piece does:

* :func:`setup` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and opens the process
  group with a timeout, so a dead peer turns into an error instead of a hang. ``WORLD_SIZE`` unset or 1 gives
  a :class:`Dist` that does nothing: the single-process trainer is unchanged.
* :meth:`Dist.shard` applies ``fully_shard`` to every decoder layer, then to the root (embeddings, final norm,
  head). Parameters are stored in the run's dtype (bf16 on CUDA) and sharded along dim 0; the
  MixedPrecisionPolicy keeps that compute dtype and reduce-scatters gradients in fp32. Only parameters
  with ``requires_grad`` produce a gradient, and FSDP2 reduce-scatters only parameters that have one, so the
  frozen modules of a MISA period cost no communication. ActiveAdamW then works on the DTensor shards
  unchanged (its ``_foreach`` ops dispatch on DTensors): moments and fp32 masters exist for the local shard
  of the active modules only.
* Data: every rank iterates the *same* batch stream (same seed) and keeps rows ``rank::world`` of each
  micro-batch (:meth:`Dist.local_batch`). The data state is therefore world-independent, which is what lets a
  checkpoint resume on a different number of processes. The loss is normalised by the *global* number of
  target tokens, so the averaged gradient equals the single-process one.
* Sampling: the sampler is seeded identically on all ranks and fed identical observations: each rank's
  accumulator holds Σ‖local shard of g_b‖², and :meth:`Dist.allreduce_sum` turns that into ‖g_b‖² before the
  host transfer. :meth:`Dist.check_same_active` all-gathers a hash of each drawn set and fails loudly on
  disagreement.
* Checkpoints (:meth:`Dist.save_checkpoint` / :meth:`Dist.load_checkpoint`): model and optimizer tensors
  through torch.distributed.checkpoint (DCP, resharded on load, also into a single unsharded process);
  sampler, data, RNG and step state from rank 0 as in a single-process checkpoint.
* Rank 0 logs, writes reports and shows the progress bar (:func:`reporter`); a SIGINT/SIGTERM seen by any
  rank stops all ranks at the same step (:class:`AgreedStop`).

Environment: ``MISA_DIST_BACKEND`` (nccl | gloo; default nccl on CUDA, else gloo) and ``MISA_DIST_TIMEOUT``
(seconds a collective may wait for a peer before failing; default 600).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from misa_train.checkpoint import CKPT_DIR, fsync_dir, fsync_file, list_checkpoints
from misa_train.config import ConfigError

DCP_DIR = "dcp"  # a checkpoint folder holding this sub-folder was written by a multi-process run
ENV_BACKEND = "MISA_DIST_BACKEND"
ENV_TIMEOUT = "MISA_DIST_TIMEOUT"
_OPT_KEYS = ("exp_avg", "exp_avg_sq", "master")


class DistributedError(ConfigError):
    """The process group could not be set up or the ranks disagree; one-line message (exit code 2)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Dist:
    """This process's place in the job, and the few collectives the trainer needs.

    With ``world == 1`` every method is the identity or a no-op, so the trainer calls them unconditionally.

    Attributes:
        world: number of processes. rank: this process (0 .. world-1). local_rank: index on this host.
        is_main: rank 0, the process that logs, reports and writes the non-tensor checkpoint files.
        backend: "nccl" | "gloo" | None (single process).
    """

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0, backend: str | None = None) -> None:
        self.world = int(world)
        self.rank = int(rank)
        self.local_rank = int(local_rank)
        self.backend = backend
        self.is_main = self.rank == 0
        self.mesh: Any = None

    @property
    def sharded(self) -> bool:
        """True when more than one process shares the model (FSDP2 + DCP paths active)."""
        return self.world > 1

    # ------------------------------------------------------------------ devices and sharding
    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
        if self.sharded and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def load_device(self, device: torch.device) -> torch.device:
        """Where to materialise the unsharded model: the CPU when sharding follows, so that no GPU ever holds
        the whole model (fully_shard moves only this rank's shards to the device)."""
        return torch.device("cpu") if self.sharded else device

    def shard(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        """FSDP2-shard ``model`` in place (each decoder layer, then the root) and return it.

        Raises DistributedError when there are fewer decoder layers than processes: a layer is the unit of
        all-gather and prefetch, and a rank with less than one layer's worth of parameters only adds
        communication without saving memory.
        """
        if not self.sharded:
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from misa_train.modules import find_layer_list

        try:
            _, layers = find_layer_list(model)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        if len(layers) < self.world:
            raise DistributedError(f"world size {self.world} exceeds the model's {len(layers)} decoder layers "
                                   f"to shard; run with at most {len(layers)} processes")
        self.mesh = init_device_mesh(device.type, (self.world,))
        # compute in the storage dtype (no extra cast per all-gather), reduce in fp32 so that averaging
        # bf16 gradients over ranks does not lose the low bits the fp32 masters keep
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=mp)
        fully_shard(model, mesh=self.mesh, mp_policy=mp)
        return model

    # ------------------------------------------------------------------ data and reductions
    def local_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """This rank's rows (``rank::world``) of a global micro-batch, with the loss normalised by the global
        number of target tokens (so that FSDP's average over ranks is the global mean loss)."""
        if not self.sharded:
            return batch
        out: dict[str, Any] = {k: v[self.rank::self.world] for k, v in batch.items()}
        labels = batch.get("labels")
        if labels is not None:
            # the model shifts labels by one: the targets are labels[:, 1:]; per rank the HF loss becomes
            # sum_local / (n_global / world), whose mean over ranks is sum_global / n_global
            n_global = int((labels[:, 1:] != -100).sum())
            out["num_items_in_batch"] = torch.tensor(max(n_global, 1) / self.world)
        return out

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average of ``t`` over ranks (returned; the input is not modified)."""
        if not self.sharded:
            return t
        import torch.distributed as tdist

        out = t.detach().clone()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out / self.world

    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (a new tensor). Used on the importance accumulator, whose entries are
        partial sums of squares over each rank's shard of a gradient."""
        if not self.sharded:
            return t
        import torch.distributed as tdist

        out = t.detach().clone()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out

    def check_same_active(self, active: list[int] | Any) -> list[str]:
        """All-gather a hash of this rank's active module set; raise DistributedError if ranks differ.

        Returns the hashes (rank order). Cheap (one small object gather per draw) and it turns a silent
        divergence, where ranks would train different modules and deadlock or corrupt each other's shards,
        into an immediate error."""
        digest = hashlib.sha1(json.dumps([int(i) for i in active]).encode()).hexdigest()[:16]
        if not self.sharded:
            return [digest]
        import torch.distributed as tdist

        hashes: list[Any] = [None] * self.world
        tdist.all_gather_object(hashes, digest)
        if len(set(hashes)) != 1:
            raise DistributedError(f"ranks drew different active module sets (hashes by rank: {hashes}); "
                                   f"sampler state or importance observations diverged")
        return hashes

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. the run folder, whose default name holds a timestamp)."""
        if not self.sharded:
            return obj
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.sharded:
            import torch.distributed as tdist

            tdist.barrier()

    def close(self, failed: bool = False) -> None:
        """Destroy the process group (idempotent; safe after a failure).

        After a failure under NCCL the group is *aborted* instead: a peer may sit in a collective this rank
        never joined, and destroying the group waits for that work, so the failed rank would hang instead of
        exiting (torchrun stops the other ranks once one exits non-zero)."""
        if not self.sharded:
            return
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            try:
                abort = getattr(tdist.distributed_c10d, "_abort_process_group", None)
                if failed and self.backend == "nccl" and abort is not None:
                    abort()
                else:
                    tdist.destroy_process_group()
            except Exception:  # noqa: BLE001 - teardown after a peer died must not mask the real error
                pass

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, run_dir: str | os.PathLike, step: int, *, model: torch.nn.Module,
                        adapter_only: bool, method_state: dict[str, Any], trainer_state: dict[str, Any],
                        meta: dict[str, Any], keep_last: int) -> Path:
        """Collective: write checkpoint ``step`` as DCP tensors + rank-0 files; same layout, atomicity and
        pruning as :func:`misa_train.checkpoint.save_checkpoint`. Returns the checkpoint folder.

        Every rank writes its shards into one temporary folder (its name is deterministic so all ranks
        agree on it without a broadcast); rank 0 adds method.pt (optimizer steps, sampler, active set),
        trainer.pt and meta.json, fsyncs, then renames the folder into place."""
        import torch.distributed.checkpoint as dcp

        if adapter_only:
            raise DistributedError("method: lora checkpoints are not supported with more than one process")
        root = Path(run_dir) / CKPT_DIR
        name = f"step-{step:07d}"
        tmp = root / f".tmp-{name}-dcp"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        tensors, rest = _split_method_state(method_state)
        if isinstance(rest.get("acc"), torch.Tensor):
            # each rank's accumulator is a partial sum over its shards; a checkpoint must not depend on the
            # world size, so store the global sum (load_checkpoint gives it to rank 0 only)
            rest["acc"] = self.allreduce_sum(rest["acc"]).cpu()
        dcp.save({"model": model.state_dict(), "optim": tensors}, checkpoint_id=str(tmp / DCP_DIR))
        final = root / name
        if self.is_main:
            torch.save(rest, tmp / "method.pt")
            torch.save(trainer_state, tmp / "trainer.pt")
            with open(tmp / "meta.json", "w") as fh:
                json.dump({"step": int(step), "adapter_only": False, **meta, "format": "dcp",
                           "world_size": self.world}, fh, indent=2, default=str)
            for f in tmp.rglob("*"):
                if f.is_file():
                    fsync_file(f)
            fsync_dir(tmp / DCP_DIR)
            fsync_dir(tmp)
            if final.exists():
                old = root / f".tmp-old-{name}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(root)
            for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()  # no rank runs ahead (and maybe saves again) before the folder is in place
        return final

    def load_checkpoint(self, ckpt: str | os.PathLike, model: torch.nn.Module,
                        method: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load a DCP checkpoint into ``model`` (sharded or not) and return ``(method_state, trainer_state)``
        ready for ``method.load_state_dict``. Works for any world size, including 1 without a process group:
        DCP reshards the saved tensors into whatever this process's tensors are."""
        import torch.distributed.checkpoint as dcp

        ckpt = Path(ckpt)
        rest = torch.load(ckpt / "method.pt", map_location="cpu", weights_only=False)
        trainer_state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
        # DCP loads in place, so every saved moment/master needs a tensor of this run's layout to land in
        targets: dict[str, dict[str, torch.Tensor]] = {}
        opt = rest["optimizer"]
        for section in ("state", "retained"):
            for n, st in opt.get(section, {}).items():
                try:
                    p = method.optimizer.param(n)
                except KeyError:
                    raise DistributedError(f"resume: checkpoint {ckpt} has optimizer state for unknown "
                                           f"parameter {n}") from None
                keys = st.get("_tensor_keys", [])
                targets[f"{section}/{n}"] = {k: torch.zeros_like(p, dtype=torch.float32) for k in keys}
        try:
            dcp.load({"model": model.state_dict(), "optim": targets}, checkpoint_id=str(ckpt / DCP_DIR))
        except Exception as e:  # noqa: BLE001 - any mismatch is a checkpoint this run cannot continue
            raise DistributedError(f"resume: cannot load {ckpt} ({_first_line(e)})") from None
        for section in ("state", "retained"):
            for n, st in opt.get(section, {}).items():
                st.pop("_tensor_keys", None)
                st.update(targets[f"{section}/{n}"])
        if isinstance(rest.get("acc"), torch.Tensor) and not self.is_main:
            rest["acc"] = torch.zeros_like(rest["acc"])  # the global sum lives on rank 0 only (see save)
        return rest, trainer_state


def _split_method_state(state: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(optimizer tensors keyed "state/<name>" / "retained/<name>", the rest with tensor keys recorded)."""
    rest = dict(state)
    opt = dict(rest["optimizer"])
    tensors: dict[str, dict[str, Any]] = {}
    for section in ("state", "retained"):
        small: dict[str, Any] = {}
        for n, st in opt.get(section, {}).items():
            keys = [k for k in _OPT_KEYS if isinstance(st.get(k), torch.Tensor)]
            tensors[f"{section}/{n}"] = {k: st[k] for k in keys}
            small[n] = {**{k: v for k, v in st.items() if k not in keys}, "_tensor_keys": keys}
        opt[section] = small
    rest["optimizer"] = opt
    if isinstance(rest.get("acc"), torch.Tensor):
        rest["acc"] = rest["acc"].detach().clone()
    return tensors, rest


def is_dcp_checkpoint(ckpt: str | os.PathLike) -> bool:
    """True for a checkpoint folder written by :meth:`Dist.save_checkpoint`."""
    return (Path(ckpt) / DCP_DIR).is_dir()


def resumable_world(meta: dict[str, Any], world: int, ckpt: str | os.PathLike) -> int:
    """The world size a checkpoint can be resumed with, for config.check_resume_compatible: any for a DCP
    checkpoint (it reshards), otherwise the one it was written with."""
    saved = int(meta.get("world_size", 1))
    if meta.get("format") == "dcp" or is_dcp_checkpoint(ckpt):
        return world
    if saved != world:
        raise ConfigError(f"resume: {ckpt} was written by {saved} process(es) as a safetensors checkpoint, which "
                          f"cannot be resharded to {world}; resume it with {saved} process(es)")
    return saved


# ---------------------------------------------------------------------- setup and rank-0 helpers
def env_world() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) from torchrun's environment; (1, 0, 0) when run directly."""
    def _int(name: str, default: int) -> int:
        raw = os.environ.get(name, str(default))
        try:
            return int(raw)
        except ValueError:
            raise DistributedError(f"{name}: expected an integer, got {raw!r}") from None

    return _int("WORLD_SIZE", 1), _int("RANK", 0), _int("LOCAL_RANK", 0)


def setup(cfg: Any) -> Dist:
    """Join the job torchrun started (or return a single-process Dist). Raises DistributedError (one line)
    on bad input: a method that cannot be sharded, a batch not divisible by the world size, a backend that
    cannot start, or peers that do not show up within MISA_DIST_TIMEOUT seconds."""
    world, rank, local_rank = env_world()
    if world <= 1:
        return Dist()
    if cfg.method == "lora":
        raise DistributedError("method: lora is not supported with more than one process "
                               "(its adapters are not sharded); use misa, lisa, badam or full")
    if cfg.batch_size % world != 0:
        raise DistributedError(f"batch_size: {cfg.batch_size} is not divisible by the world size {world} "
                               f"(batch_size is the global micro-batch, split evenly over ranks)")
    import torch.distributed as tdist

    try:
        timeout = timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, "600")))
    except ValueError:
        raise DistributedError(f"{ENV_TIMEOUT}: expected seconds, got {os.environ.get(ENV_TIMEOUT)!r}") from None
    want_cuda = str(cfg.device).startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    backend = os.environ.get(ENV_BACKEND) or ("nccl" if want_cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise DistributedError(f"{ENV_BACKEND}: expected nccl or gloo, got {backend!r}")
    if backend == "nccl" and not (torch.cuda.is_available() and tdist.is_nccl_available()):
        raise DistributedError("distributed: backend nccl needs CUDA GPUs and an NCCL build of torch; "
                               f"set {ENV_BACKEND}=gloo for CPU processes")
    kw: dict[str, Any] = {}
    if backend == "nccl":
        # select this rank's GPU before anything touches CUDA: collectives on objects (the run-folder broadcast,
        # the active-set hash check) place their buffers on the *current* device, which is cuda:0 on every
        # rank until set; NCCL then refuses rank r's tensor on cuda:0 and rank 0 waits for it forever
        torch.cuda.set_device(local_rank)
        kw["device_id"] = torch.device("cuda", local_rank)  # eager NCCL init: failures surface here
    try:
        tdist.init_process_group(backend, timeout=timeout, world_size=world, rank=rank, **kw)
        # a first collective proves every peer is reachable before any work is done
        probe = torch.ones(1, device=kw.get("device_id", "cpu"))
        tdist.all_reduce(probe)
        if int(probe.item()) != world:
            raise RuntimeError(f"probe all-reduce gave {int(probe.item())}, expected {world}")
    except Exception as e:  # noqa: BLE001 - every init failure becomes the same one-line report
        if tdist.is_initialized():
            try:
                tdist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        raise DistributedError(f"distributed: {backend} process group init failed on rank {rank} of {world} "
                               f"({_first_line(e)})") from None
    return Dist(world, rank, local_rank, backend)


class _NullLog:
    """MetricsLog's interface, writing nothing (ranks other than 0)."""

    def log(self, event: str, step: int, **fields: Any) -> dict[str, Any]:
        """Drop the event."""
        return {}

    def close(self) -> None:
        """Nothing to close."""


class _NullReport:
    """misa_train.report's interface on ranks other than 0: every function is a no-op."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: _NullLog()


def reporter(dist: Dist, report_module: Any) -> Any:
    """``report_module`` on rank 0, a do-nothing stand-in elsewhere: one writer per run folder."""
    return report_module if dist.is_main else _NullReport()


class AgreedStop:
    """A stop flag every rank reads identically: :meth:`agree` takes the max signal number over ranks.

    A SIGTERM reaches ranks at slightly different times; acting on the local flag would let one rank enter
    the collective checkpoint save while another starts the next step, which deadlocks. Between two
    :meth:`agree` calls ``signum`` does not change, whatever the signal handler does meanwhile."""

    def __init__(self, raw: Any, dist: Dist) -> None:
        self._raw = raw
        self._dist = dist
        self.signum: int | None = None

    def agree(self) -> int | None:
        """Collective (one tiny all-reduce): update and return the agreed signal number (None if none)."""
        local = self._raw.signum or 0
        if self._dist.sharded:
            import torch.distributed as tdist

            t = torch.tensor([local], dtype=torch.int64)
            if self._dist.backend == "nccl":
                t = t.cuda()
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
            local = int(t.item())
        self.signum = local or None
        return self.signum
