"""Activation checkpointing and torch.compile: what TrainConfig's `activation_checkpointing` and `compile` turn on.

Both act per decoder block, the unit a model repeats. Checkpointing keeps only each block's input and
recomputes the block during backward. Compilation is regional: every block's forward (and, through
AOTAutograd, its backward) is compiled, and since the blocks run the same code on tensors of the same
shapes, dynamo traces one graph that all of them share, so compile time does not grow with depth.
Embeddings, the final norm, the head and the loss run eagerly. Weights enter the graph as inputs, so POET's in-place rotations and merges (new values, same
shapes) reuse it; evaluation (no grad, eval mode) traces one more.
"""

from __future__ import annotations

from torch import nn

from .config import ConfigError, TrainConfig

# Tests trace with "aot_eager", which checks the graphs (and their backward) without generating code.
COMPILE_BACKEND = "inductor"


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The entries of the model's outermost module lists (model.layers.N in LLaMA, transformer.h.N in GPT-2)."""
    blocks, lists = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name and not any(name.startswith(outer) for outer in lists):
            lists.append(name + ".")  # lists nested in a block (e.g. a mixture's experts) belong to that block
            blocks.extend(module)
    return blocks


def enable_activation_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing: it needs no input that requires grad, nests inside torch.compile and
    # replays the forward under the autocast state it first ran in.
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):  # newer transformers; the other is its deprecated alias
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ValueError(f"{type(model).__name__} is not a transformers model")
    except ValueError as error:
        raise ConfigError(f"activation_checkpointing=true: {error}; set activation_checkpointing=false for this model") from None


def compile_blocks(model: nn.Module, backend: str | None = None) -> None:
    blocks = decoder_blocks(model)
    if not blocks:
        raise ConfigError(f"compile=true compiles each decoder block, but {type(model).__name__} has no list of blocks "
                          "(nn.ModuleList); set compile=false for this model")
    for block in blocks:
        block.compile(backend=backend or COMPILE_BACKEND)


def accelerate(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Apply the configured options to a prepared model (before DDP/FSDP wrapping); returns it."""
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    if config.compile:
        compile_blocks(model)
    return model
