"""Parallelism for the training app, in one place: torchrun set-up, parallelizing a model (DDP or FSDP2)
in the style of torchtitan's `parallelize_*`, the collectives the loop needs, and `full_parameters`.

The library (layers, merges, diagnostics, adapters) knows nothing of this. Its whole-matrix operations
take whole tensors; under FSDP2 the app runs them inside `full_parameters`, one layer at a time
(`poetlm.merge(..., gather=full_parameters)`).

POET detail: the training loop builds each effective weight once per optimizer step and carries its
gradient into the rotation parameters in one extra backward pass after the micro-batches (see
`poetlm.step_weight_cache`). That pass happens outside DDP's forward/backward, so DDP is told to ignore
the rotation parameters and `all_reduce_rotation_grads` averages them (one flat all-reduce).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..model import rotation_parameters
from .acceleration import decoder_blocks
from .config import ConfigError


# Rank 0 alone tokenizes the corpus (hours for a large one) or writes a checkpoint while the others wait,
# which can outlast the default collective timeout (10 min for NCCL) and abort the waiting ranks. They wait in
# a group with a long timeout instead; a rank that fails still ends the job at once (torchrun stops the rest).
WAIT_FOR_MAIN = timedelta(hours=24)


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    waiting: object = None  # the process group of `barrier` (gloo, WAIT_FOR_MAIN); None: the default group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int = 0, setting: str = "device={}") -> torch.device:
    """The torch device `requested` names; `setting` formats a value as the user gives it (a key, or a flag)."""
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{setting.format(repr(requested))} but CUDA is not available here (torch {torch.__version__}); "
                          f"use {setting.format('cpu')} or {setting.format('auto')}, or install a CUDA build of torch")
    try:
        device = torch.device(f"cuda:{local_rank}" if requested == "cuda" else requested)
    except RuntimeError:
        raise ConfigError(f"{setting.format(repr(requested))} is not a device torch knows: use auto, cpu, cuda or cuda:N "
                          "(or another torch device type, e.g. mps)") from None
    if device.type == "meta":
        raise ConfigError(f"{setting.format(repr(requested))}: the meta device holds no data, so nothing can train or "
                          f"be evaluated on it; use {setting.format('cpu')} or {setting.format('auto')}")
    try:  # a known type this torch or machine lacks (mps on Linux, xpu, cuda:3 of one GPU) fails only later, as "damaged" files
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ImportError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = reason if len(reason) <= 160 else reason[:160].rsplit(" ", 1)[0] + " …"
        raise ConfigError(f"{setting.format(repr(requested))} but this torch build or machine has no usable "
                          f"{device.type} device (torch says: {reason}); use {setting.format('cpu')} or "
                          f"{setting.format('auto')}") from None
    return device


def setup(requested_device: str) -> Runtime:
    """Single process unless started by torchrun (WORLD_SIZE > 1): then init the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    waiting = dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN) if world_size > 1 else None
    return Runtime(rank, world_size, local_rank, device, waiting)


def teardown(runtime: Runtime, clean: bool = True) -> None:
    """End the process group. After an error (clean=False) this rank leaves at once: the other ranks may be
    inside a collective that a barrier here would never match, and torchrun stops them when this one exits."""
    if not (runtime.distributed and dist.is_initialized() and clean):
        return
    # Rank 0 writes the report after the last collective; a rank that tears down and exits meanwhile
    # can abort in gloo's background threads ("terminate called without an active exception").
    dist.barrier()
    # A rank returns from a gloo barrier once its own messages are through, possibly before its peers
    # have read theirs; closing its sockets then can reset a peer still inside the barrier ("Read error …
    # Connection reset by peer", seen once in CI under FSDP2). No rank closes any until all are out of it.
    _store_barrier("poetlm/teardown", runtime.world_size)
    gc.collect()  # release FSDP's pending collectives before their process group goes away
    dist.destroy_process_group()


def _store_barrier(key: str, world_size: int) -> None:
    """Wait until every rank has reached this point, through torchrun's key-value store (not the process
    group's sockets). The store may outlive the process group (a second run in one job, a restarted worker
    group), so arrivals are counted in rounds of `world_size`."""
    store = dist.distributed_c10d._get_default_store()
    round_ = (store.add(key, 1) - 1) // world_size
    if store.add(key, 0) >= (round_ + 1) * world_size:
        store.set(f"{key}/{round_}", "1")
    store.wait([f"{key}/{round_}"], WAIT_FOR_MAIN)


def agreed_signal(received: int | None, runtime: Runtime) -> int | None:
    """The stop signal of any rank, on every rank: a signal reaches one worker, and all must stop at the same step.

    A rank that stopped alone would wait in the checkpoint's barrier while the others wait in the next
    step's collectives, for ever.
    """
    if not runtime.distributed:
        return received
    flag = torch.tensor([received or 0], dtype=torch.int64, device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) or None


# What gloo and NCCL say when a collective loses a process that has stopped (its own error says why).
_PEER_GONE = ("closed by peer", "reset by peer", "remote process exited", "Broken pipe")


def peer_stopped(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process of the job stopped."""
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in _PEER_GONE)


def barrier(runtime: Runtime) -> None:
    """Wait until every rank is here; for rank 0's long solo work (see WAIT_FOR_MAIN)."""
    if runtime.distributed:
        dist.barrier(group=runtime.waiting)


def from_main(value, runtime: Runtime):
    """Rank 0's `value` (any picklable object) on every rank."""
    if not runtime.distributed:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def parallelize(model: nn.Module, runtime: Runtime, parallel: str) -> nn.Module:
    """The model as the forward passes see it: as is (one process), under DDP, or FSDP2-sharded in place
    (one unit per decoder block; its parameters become DTensors, so build optimizers after this)."""
    if not runtime.distributed:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
        for block in decoder_blocks(model):  # one FSDP unit per decoder block
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    rotation_ids = {id(p) for p in rotation_parameters(model)}
    if not any(p.requires_grad for p in model.parameters() if id(p) not in rotation_ids):
        # Only the rotations train (a poet-paper finetune): all_reduce_rotation_grads averages them, and DDP
        # refuses a model left with nothing else to train.
        return model
    ignored = [name for name, p in model.named_parameters() if id(p) in rotation_ids]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # Buffers (coordinates, merge counts, probes) and the frozen W0 are identical on every rank by
    # construction: no per-step broadcast.
    ddp = nn.parallel.DistributedDataParallel
    no_broadcast = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
                    else {"broadcast_buffers": False})
    return ddp(model, device_ids=device_ids, **no_broadcast)


def all_reduce_rotation_grads(model: nn.Module, runtime: Runtime) -> None:
    if not runtime.distributed:
        return
    grads = [p.grad for p in rotation_parameters(model) if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= runtime.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def mean_over_ranks(value: float, runtime: Runtime) -> float:
    if not runtime.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return float(tensor) / runtime.world_size


@torch.no_grad()
def replica_divergence(model: nn.Module, runtime: Runtime) -> float | None:
    """Largest difference between ranks of any parameter or buffer checksum (0.0 when all ranks agree).

    Under FSDP the ranks hold different shards by design; there the check does not apply (None).
    """
    if not runtime.distributed:
        return 0.0
    if any(isinstance(t, DTensor) for t in model.state_dict().values()):
        return None
    sums = torch.stack([t.detach().double().sum() for t in model.state_dict().values() if t.is_floating_point()])
    sums = sums.to(runtime.device)
    gathered = [torch.empty_like(sums) for _ in range(runtime.world_size)]
    dist.all_gather(gathered, sums)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def is_sharded(runtime: Runtime, parallel: str) -> bool:
    return runtime.distributed and parallel == "fsdp"


def training_state(model: nn.Module, optimizers, sharded: bool) -> tuple[dict, list[dict]]:
    """Model and optimizer states to checkpoint. Sharded: gathered into full tensors (a collective call)."""
    if not sharded:
        return model.state_dict(), [o.state_dict() for o in optimizers]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            [get_optimizer_state_dict(model, o, options=options) for o in optimizers])


def load_training_state(model: nn.Module, optimizers, model_state: dict, optimizer_states: list[dict], sharded: bool) -> None:
    if len(optimizer_states) != len(optimizers):
        raise RuntimeError(f"checkpoint holds {len(optimizer_states)} optimizer states, the run builds {len(optimizers)}")
    if not sharded:
        model.load_state_dict(model_state)
        for optimizer, state in zip(optimizers, optimizer_states):
            optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    for optimizer, state in zip(optimizers, optimizer_states):
        set_optimizer_state_dict(model, optimizer, by_name(model, optimizer, state), options=options)


def by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An optimizer state as `set_optimizer_state_dict` reads it: keyed by parameter names. One that
    `optimizer.state_dict()` wrote (one process, DDP) numbers the parameters in the optimizer's order instead,
    which is this optimizer's too (the run builds the same one); an FSDP2 checkpoint's is keyed by name already."""
    if not all(isinstance(key, int) for group in state["param_groups"] for key in group["params"]):
        return state
    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    return {"state": {order[index]: value for index, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[index] for index in group["params"]]}
                             for group in state["param_groups"]]}


class RankSplit:
    """The POET optimizer's rotations spread over the processes of a data-parallel job (`POET(split=)`):
    each process folds its share of the weights, then every weight is broadcast from the one that folded it."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def broadcast(self, sources: list[tuple[torch.Tensor, int]]) -> None:
        works = [dist.broadcast(tensor.data, src, async_op=True) for tensor, src in sources]
        for work in works:
            work.wait()


def rank_split(model: nn.Module) -> RankSplit | None:
    """A RankSplit for a data-parallel (replicated) model in a multi-process job, else None (one process,
    or FSDP2, where every rank rotates the weights it gathers whole)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return None if any(isinstance(p, DTensor) for p in model.parameters()) else RankSplit()


@contextlib.contextmanager
def whole_tensor(tensor: torch.Tensor):
    """Within the block, the whole value of a sharded (DTensor) tensor; on exit each rank's shard takes the
    (possibly changed) whole value, computed alike on every rank. Other tensors pass through unchanged.
    Entering is collective on a sharded tensor."""
    if not isinstance(tensor, DTensor):
        yield tensor
        return
    whole = tensor.full_tensor()
    yield whole
    _write_shard(tensor, whole)


@torch.no_grad()
def _write_shard(sharded: DTensor, whole: torch.Tensor) -> None:
    """Each rank's shard of `sharded` ← its part of `whole`, a value every rank holds alike."""
    try:  # each rank keeps its own part, nothing is sent
        shard = distribute_tensor(whole, sharded.device_mesh, sharded.placements, src_data_rank=None)
    except TypeError:  # torch < 2.7 has no src_data_rank: rank 0's copy is scattered
        shard = distribute_tensor(whole, sharded.device_mesh, sharded.placements)
    sharded.copy_(shard)


@contextlib.contextmanager
def full_parameters(module: nn.Module):
    """Within the block, every FSDP2-sharded parameter of `module` is whole; on exit each rank's shard of
    the (possibly changed) whole value is written back. A merge needs whole matrices (R and P mix every row
    and column of W0); every rank computes the same result from the same inputs, so nothing else is
    communicated. Entering is collective on a sharded module; without sharding it changes nothing.
    """
    swapped = []
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if isinstance(param, DTensor):
                owner._parameters[name] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                swapped.append((owner, name, param))
    try:
        yield
    finally:
        for owner, name, sharded in swapped:
            _write_shard(sharded, owner._parameters[name].detach())
            owner._parameters[name] = sharded
