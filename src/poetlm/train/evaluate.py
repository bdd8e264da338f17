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
    totals are all-reduced, so every rank returns the same numbers. Every rank runs the same number of
    forward passes (a rank with fewer windows scores one of them again, uncounted): under FSDP each forward
    is collective, and one rank's extra pass would wait forever for the others.
    """
    device = torch.device(device)
    every = val_windows(tokens, seq_len, max_tokens)
    windows = every[rank::world_size]
    passes = math.ceil(math.ceil(len(every) / world_size) / batch_size)  # the batches of the largest share
    # Remember per-module modes: a model may deliberately keep some submodules in eval().
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    # float64 keeps the running sum exact enough over millions of tokens.
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for start in range(0, passes * batch_size, batch_size):
            counted = start < len(windows)
            x, y = make_batch(tokens, windows[start : start + batch_size] if counted else every[:1], seq_len)
            x, y = x.to(device), y.to(device)
            autocast = (
                torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                logits = model(input_ids=x, use_cache=False).logits  # as in training: compiled blocks share one graph
            if counted:
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
