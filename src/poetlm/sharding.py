"""Letting POET's whole-matrix operations (merge, diagnostics, export) run on FSDP2-sharded layers.

Under FSDP2 every parameter is a DTensor holding one shard. A merge needs whole matrices (R and P mix
all rows and columns of W0), so `full_parameters` gathers them for the duration of the block and, on
exit, writes each rank's shard of the (possibly changed) full value back. Every rank computes the same
full result from the same inputs, so nothing else has to be communicated. Without sharding it is a no-op.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = None


@contextlib.contextmanager
def full_parameters(module: nn.Module):
    if DTensor is None:
        yield
        return
    swapped = []
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if isinstance(param, DTensor):
                owner._parameters[name] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                swapped.append((owner, name, param))
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, sharded in swapped:
                full = owner._parameters[name].detach()
                sharded.copy_(distribute_tensor(full, sharded.device_mesh, sharded.placements))
                owner._parameters[name] = sharded
