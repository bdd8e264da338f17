"""activation_checkpointing, compile and POET's bf16 weight build: same numbers as without, no recompiles."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import poetlm
from poetlm.train import acceleration, loop
from poetlm.train.config import ConfigError, resolve_config
from poetlm.train.data import TokenData
from poetlm.train.evaluate import perplexity
from poetlm.train.loop import TrainState, train_step
from poetlm.train.methods import make_method
from poetlm.train.models import build_llama
from poetlm.train.parallel import Runtime

SMALL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
         "model.num_kv_heads=2", "data.seq_len=16", "data.vocab_size=300", "batch_size=2", "grad_accum=2",
         "poet.block_size=8", "poet.merge_every=2", "steps=50", "optim.lr=1e-2", "optim.lr_poet=1e-2"]
METHODS = ["poet", "poet-paper", "adamw", "muon"]
CPU = Runtime(0, 1, 0, torch.device("cpu"))
TOKENS = np.random.default_rng(0).integers(0, 300, 1 << 14).astype(np.int32)
DATA = TokenData(train=TOKENS, val=TOKENS[:400], tokenizer=None, eos_id=0, cache_dir=Path("."))


class Run:
    """One method's model and optimizers, stepped the way the training loop steps them."""

    def __init__(self, method: str, *overrides: str) -> None:
        self.config = resolve_config("tiny", [f"method={method!r}", *SMALL, *overrides])
        torch.manual_seed(0)
        self.method = make_method(self.config)
        self.model = self.method.prepare(build_llama(self.config.model, 300, 16))
        self.optimizers = self.method.optimizers(self.model)
        self.state = TrainState()
        self.sharded = False

    def step(self) -> float:
        loss, _ = train_step(self.method, self.model, self.model, self.optimizers, DATA, self.config, self.state, CPU, None,
                             sharded=self.sharded)
        self.state.step += 1
        if self.method.after_step(self.state.step, self.model, self.optimizers):
            self.state.last_merge_step = self.state.step
        return loss

    def evaluate(self) -> float:
        return perplexity(self.model, DATA.val, seq_len=16, batch_size=2, max_tokens=64, device="cpu")["val_loss"]


def saved_bytes(run: Run) -> int:
    """Bytes autograd saves for backward during one forward pass of the model."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    inputs = torch.as_tensor(TOKENS[:32].astype(np.int64)).view(2, 16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run.model(input_ids=inputs, use_cache=False).logits.sum().backward()
    run.model.zero_grad(set_to_none=True)
    return total


@pytest.mark.parametrize("method", METHODS)
def test_activation_checkpointing_gives_the_same_losses_and_saves_less(method):
    plain, checkpointed = Run(method), Run(method, "activation_checkpointing=true")
    acceleration.accelerate(checkpointed.model, checkpointed.config)
    assert all(block.gradient_checkpointing for block in acceleration.decoder_blocks(checkpointed.model))
    assert saved_bytes(checkpointed) < 0.8 * saved_bytes(plain)
    # Steps after the first depend on every gradient so far, merges (poet-paper) and redraws included.
    losses = [(plain.step(), checkpointed.step()) for _ in range(4)]
    for a, b in losses:
        assert b == pytest.approx(a, abs=1e-5)
    assert checkpointed.evaluate() == pytest.approx(plain.evaluate(), abs=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_compiled_blocks_match_eager_and_merges_do_not_recompile(method):
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = Run(method), Run(method)
    acceleration.compile_blocks(compiled.model, backend="aot_eager")
    for step in range(1, 9):  # merges at steps 2, 4, 6 (poet-paper); the POET optimizer rotates in place every step
        assert compiled.step() == pytest.approx(eager.step(), abs=1e-5)
        if step % 3 == 0:
            assert compiled.evaluate() == pytest.approx(eager.evaluate(), abs=1e-5)
        if step == 3:  # by now one training graph and one evaluation graph, shared by both blocks
            graphs = counters["stats"]["unique_graphs"]
            assert graphs == 2
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
@pytest.mark.parametrize("method", ["poet-paper", "adamw"])
def test_compiled_checkpointed_blocks_under_fsdp2(method, tmp_path):
    """FSDP2's per-block hooks around compiled, checkpointed blocks (one process: the wrapping, not the collectives)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch._dynamo.reset()
    counters.clear()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        eager, run = Run(method), Run(method, "activation_checkpointing=true")
        acceleration.enable_activation_checkpointing(run.model)
        acceleration.compile_blocks(run.model, backend="aot_eager")
        mesh = init_device_mesh("cpu", (1,))
        for block in acceleration.decoder_blocks(run.model):  # as parallel.parallelize does
            fully_shard(block, mesh=mesh)
        fully_shard(run.model, mesh=mesh)
        run.optimizers, run.sharded = run.method.optimizers(run.model), True
        for _ in range(4):  # poet-paper merges at steps 2 and 4, on sharded layers
            assert run.step() == pytest.approx(eager.step(), abs=1e-5)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_compile_and_checkpointing_together_in_a_training_run(tmp_path, monkeypatch):
    """The loop's path: config keys, then a run that trains (loss falls) with both options on."""
    torch._dynamo.reset()
    monkeypatch.setattr(acceleration, "COMPILE_BACKEND", "aot_eager")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 50}" for j in range(60)) for i in range(60)))
    config = resolve_config("tiny", [*SMALL, "method='poet-paper'", "activation_checkpointing=true", "compile=true",
                                     f"data.data={str(text)!r}", f"data.cache_dir={str(tmp_path / 'cache')!r}",
                                     f"out_dir={str(tmp_path / 'runs')!r}", "steps=8", "eval_every=4", "log_every=1",
                                     "eval_tokens=256", "progress=false", "optim.warmup_steps=0"])
    summary = loop.train(config)
    lines = (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    losses = [record["loss"] for record in map(json.loads, lines) if "loss" in record]
    assert len(losses) == 8 and losses[-1] < losses[0]


def test_options_are_checked():
    assert resolve_config("tiny").compile is False and resolve_config("tiny").activation_checkpointing is False
    with pytest.raises(ConfigError, match="compile"):
        resolve_config("tiny", ["compile='yes'"])
    with pytest.raises(ConfigError, match="no list of blocks"):
        acceleration.compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="activation_checkpointing=true"):
        acceleration.enable_activation_checkpointing(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="build_dtype"):
        resolve_config("tiny", ["poet.build_dtype='fp16'"])


def layer_pair():
    """The same trained-looking POET layer with fp32 and with bf16 weight builds."""
    layers = []
    for build in ("fp32", "bf16"):
        config = poetlm.POETConfig(block_size=16, build_dtype=build, forward_mode="weight")
        layer = poetlm.POETLinear(48, 40, config=config, name="layer")
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for side in (layer.rotation_in, layer.rotation_out):
                side.skew.copy_(torch.randn(side.skew.shape, generator=gen) * 0.05)
        layers.append(layer)
    return layers


def test_bf16_build_rounds_the_step_weight_and_keeps_gradients_and_merges_fp32():
    full, half = layer_pair()
    gen = torch.Generator().manual_seed(2)
    x, target = torch.randn(4, 48, generator=gen), torch.randn(4, 40, generator=gen)
    for layer in (full, half):
        with poetlm.step_weight_cache(torch.nn.ModuleList([layer])):
            assert layer.step_weight.dtype == torch.float32
            assert layer.step_weight.requires_grad and layer.step_weight.is_leaf
            (layer(x) * target).sum().backward()  # not ‖y‖²: rotating the output side would not change it
            layer.cached = layer.step_weight.detach().clone()
    assert torch.equal(half.cached, half.cached.bfloat16().float())  # built in bf16, held in fp32
    torch.testing.assert_close(half.cached, full.cached, rtol=0, atol=2e-2)
    for a, b in zip(full.rotation_parameters(), half.rotation_parameters()):
        assert b.grad.dtype == torch.float32
        assert (b.grad - a.grad).norm() < 3e-2 * a.grad.norm()
    # Without the cache (the forward builds), under bf16 autocast, and in merges (always fp32).
    assert half(x).dtype == torch.float32
    torch.testing.assert_close(half(x), full(x), rtol=0, atol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert half(x).dtype == torch.bfloat16
    with torch.no_grad():
        full.merge()
        half.merge()
    assert half.weight0.dtype == torch.float32 and torch.equal(half.weight0, full.weight0)


def test_bf16_build_trains_with_the_training_loop():
    fp32, bf16 = Run("poet-paper"), Run("poet-paper", "poet.build_dtype='bf16'")
    for _ in range(3):
        assert bf16.step() == pytest.approx(fp32.step(), abs=2e-2)
    assert all(layer.weight0.dtype == torch.float32 for _, layer in poetlm.poet_layers(bf16.model))
