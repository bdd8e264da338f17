"""The library knows nothing of FSDP/DDP; the training app's parallel module hands it whole layers."""

import ast
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import poetlm
from poetlm.train.parallel import full_parameters

SRC = Path(__file__).parents[1] / "src" / "poetlm"


def poetlm_imports(path: Path) -> set[str]:
    """The top-level poetlm modules (e.g. "layer", "train") that the file at `path` imports."""
    package = list(path.relative_to(SRC).parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            found |= {target[0]} if target else {alias.name for alias in node.names}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            found |= {name.split(".")[1] for name in names if name.startswith("poetlm.")}
    return found


def torch_distributed_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module)
    return [name for name in names if name.startswith("torch.distributed")]


def test_modules_import_only_the_ones_above_them_in_the_design_notes():
    listing = (SRC.parents[1] / "docs" / "design.md").read_text().split("## Layering")[1].split("```")[1]
    order = [line.split()[0].rstrip("/").removesuffix(".py") for line in listing.splitlines() if line and not line[0].isspace()]
    modules = {p.name.removesuffix(".py") for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert sorted(order) == sorted(modules - {"__init__", "__main__"})  # the list names every module
    for rank, name in enumerate(order):
        files = [SRC / f"{name}.py"] if (SRC / f"{name}.py").is_file() else sorted((SRC / name).rglob("*.py"))
        for path in files:
            later = poetlm_imports(path) - {name} - set(order[:rank])
            assert not later, f"{path.relative_to(SRC)} imports {sorted(later)}, listed below it in docs/design.md"
            if name not in ("train", "cli"):  # the library: no processes, no sharding
                assert not torch_distributed_imports(path), f"{path.relative_to(SRC)} imports torch.distributed"


@pytest.fixture
def process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_every_rank_runs_as_many_evaluation_forwards_as_the_largest_share(process_group):
    """5 windows over 2 ranks in batches of 2: rank 0 ran 2 forwards, rank 1 one, and under FSDP (each forward a
    collective) rank 0's second forward waited forever. Rank 1 now runs a second one, not counted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from poetlm.train.evaluate import perplexity

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    tokens = np.arange(5 * 8 + 1) % 50
    result = perplexity(model, tokens, seq_len=8, batch_size=2, max_tokens=None, device="cpu", rank=1, world_size=2)
    assert len(calls) == 2 and result["val_tokens"] == 2 * 8  # windows 1 and 3 only


def test_a_model_whose_only_trainable_parameters_are_rotations_is_not_wrapped_in_ddp(process_group):
    """A poet-paper finetune trains the rotations alone, which DDP is told to ignore (their gradients are averaged
    by all_reduce_rotation_grads): DDP then refused the model, and `torchrun … finetune --method poet-paper` crashed."""
    from poetlm.train.parallel import Runtime, parallelize

    runtime = Runtime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))  # as DDP sees it: the default group
    model = poetlm.poetize(nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 12)), poetlm.POETConfig(block_size=4))
    assert isinstance(parallelize(model, runtime, "ddp"), nn.parallel.DistributedDataParallel)  # biases train too
    for name, p in model.named_parameters():
        p.requires_grad_(".rotation_" in name)
    assert parallelize(model, runtime, "ddp") is model


def test_a_merge_resets_the_rotations_state_inside_a_zero_redundancy_optimizer(process_group):
    """ZeroRedundancyOptimizer keeps its per-parameter state in `.optim`; its own `state` does not hold them."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = poetlm.poetize(nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 12)), poetlm.POETConfig(block_size=4))
    rotations = poetlm.rotation_parameters(model)
    opt = ZeroRedundancyOptimizer(rotations, optimizer_class=torch.optim.AdamW, lr=1e-3)
    for _ in range(2):
        model(torch.randn(5, 12)).square().sum().backward()
        opt.step()
    assert all(opt.optim.state[p] for p in rotations)
    poetlm.merge(model, opt)
    assert not any(p in opt.optim.state for p in rotations)


def test_sharded_layers_are_refused_whole_matrix_work_and_merge_layer_by_layer_through_gather(process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = poetlm.poetize(nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 12)), poetlm.POETConfig(block_size=4))
    with torch.no_grad():
        for p in poetlm.rotation_parameters(model):
            p.normal_(std=0.1)
    reference = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (1,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(hasattr(p, "full_tensor") for p in model.parameters())

    with pytest.raises(ValueError, match="holds a shard of the layer.*gather="):
        poetlm.merge(model)
    with pytest.raises(ValueError, match="holds a shard"):
        poetlm.model_diagnostics(model)
    assert all(int(layer.merge_count) == 0 for layer in model)  # refused before anything changed

    gathered = []

    def gather(layer):  # records how much is whole at once
        gathered.append(layer)
        return full_parameters(layer)

    poetlm.merge(model, gather=gather)
    poetlm.merge(reference)
    assert gathered == list(model)  # one layer at a time
    for layer, expected in zip(model, reference):
        assert int(layer.merge_count) == 1
        torch.testing.assert_close(layer.weight0.full_tensor(), expected.weight0, rtol=0, atol=0)
        assert hasattr(layer.weight0, "full_tensor")  # written back as shards
    diagnostics = poetlm.model_diagnostics(model, spectrum=True, gather=full_parameters)
    assert diagnostics == pytest.approx(poetlm.model_diagnostics(reference, spectrum=True))
    assert "weight" not in {key.rpartition(".")[2] for key in model.state_dict()}  # no rank holds a dense weight


def test_poet_optimizer_rotates_sharded_weights_as_whole_ones_and_resumes_from_a_gathered_state(process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from poetlm.optim import POET
    from poetlm.train.parallel import load_training_state, training_state, whole_tensor

    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(12, 20, bias=False), nn.Linear(20, 12, bias=False)).double()
    inputs = torch.randn(16, 12, dtype=torch.float64)
    config = poetlm.POETConfig(block_size=4)
    mesh = init_device_mesh("cpu", (1,))

    def sharded_copy():
        model = copy.deepcopy(start)
        for layer in model:
            fully_shard(layer, mesh=mesh)
        return model, POET(list(model.named_parameters()), lr=0.05, poet=config, rule=poetlm.RuleConfig(redraw_every=3),
                           gather=whole_tensor)

    def steps(model, optimizer, count):
        for _ in range(count):
            model(inputs).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    whole = copy.deepcopy(start)
    whole_optimizer = POET(list(whole.named_parameters()), lr=0.05, poet=config, rule=poetlm.RuleConfig(redraw_every=3))
    sharded, sharded_optimizer = sharded_copy()
    assert all(hasattr(p, "full_tensor") for p in sharded.parameters())
    # One rank: its shard is the whole weight, so this checks the gathered state and its resume; the write
    # back to real shards is checked by the two-process run in test_distributed.py.
    sharded(inputs).sum().backward()
    with pytest.raises(ValueError, match="holds a shard.*gather="):
        POET(list(sharded.named_parameters()), poet=config).step()
    sharded_optimizer.zero_grad()
    steps(whole, whole_optimizer, 4)
    steps(sharded, sharded_optimizer, 4)
    model_state, optimizer_states = training_state(sharded, [sharded_optimizer], sharded=True)
    resumed, resumed_optimizer = sharded_copy()
    load_training_state(resumed, [resumed_optimizer], model_state, optimizer_states, sharded=True)
    steps(whole, whole_optimizer, 4)  # across a redraw
    steps(resumed, resumed_optimizer, 4)
    assert (whole[0].weight - start[0].weight).norm() > 1e-2
    for ours, reference in zip(resumed, whole):
        torch.testing.assert_close(ours.weight.full_tensor(), reference.weight.detach(), rtol=0, atol=1e-12)
    assert resumed_optimizer.spectrum_drift() == pytest.approx(whole_optimizer.spectrum_drift(), abs=1e-9)


def test_teardown_store_barrier_holds_every_rank_until_all_arrive_round_after_round(monkeypatch):
    """The store barrier that keeps a rank's sockets open until its peers are out of the last gloo barrier:
    no rank leaves before the last arrives, and a store that outlives a run (a second run in one job)
    syncs again instead of letting everyone through."""
    import threading
    import time

    import torch.distributed as dist

    from poetlm.train import parallel

    store = dist.HashStore()
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)
    for _ in range(2):
        left = []

        def rank(delay):
            time.sleep(delay)
            parallel._store_barrier("poetlm/teardown", 3)
            left.append(time.monotonic())

        threads = [threading.Thread(target=rank, args=(delay,)) for delay in (0.0, 0.0, 0.4)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert len(left) == 3 and min(left) - start >= 0.4  # nobody left before the late rank arrived
