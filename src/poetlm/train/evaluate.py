"""Validation perplexity over the fixed validation windows."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from .data import make_batch, val_windows


@torch.no_grad()
def perplexity(
    model,
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None,
    device,
    autocast_dtype=None,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """exp(mean next-token cross-entropy) over ``val_windows(tokens, seq_len, max_tokens)``.

    With ``world_size > 1`` each rank scores its share of the windows and the (sum, count)
    totals are all-reduced, so every rank returns the same numbers.
    """
    device = torch.device(device)
    windows = val_windows(tokens, seq_len, max_tokens)[rank::world_size]
    # Remember per-module modes: a model may deliberately keep some submodules in eval().
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    # float64 keeps the running sum exact enough over millions of tokens.
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for start in range(0, len(windows), batch_size):
            x, y = make_batch(tokens, windows[start : start + batch_size], seq_len)
            x, y = x.to(device), y.to(device)
            autocast = (
                torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                logits = model(input_ids=x, use_cache=False).logits  # as in training: compiled blocks share one graph
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            totals[0] += loss.double()
            totals[1] += y.numel()
    finally:
        for module, mode in modes:
            module.training = mode
    if world_size > 1:
        torch.distributed.all_reduce(totals)
    loss_sum, count = totals.tolist()
    mean = loss_sum / count
    ppl = math.exp(mean) if mean < 700 else math.inf  # a diverged model must not crash the run
    return {"val_loss": mean, "val_ppl": ppl, "val_tokens": int(count)}
