"""The README's Python examples run as written (with fewer steps)."""

from pathlib import Path

import torch
from torch import nn

import poetlm


def test_readme_python_examples_run():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [part.split("```", 1)[0] for part in text.split("```python\n")[1:3]]
    assert "range(1, 201)" in blocks[0] and "range(1, 401)" in blocks[1] and "step % 200" in blocks[1]
    namespace = {}
    exec(blocks[0].replace("range(1, 201)", "range(1, 3)"), namespace)
    model, opt = namespace["model"], namespace["opt"]
    weight = model.model.layers[0].mlp.down_proj.weight
    start = poetlm.POETLinear(768, 256, bias=False, config=namespace["config"], name="model.layers.0.mlp.down_proj").weight0
    assert not torch.equal(weight, start)
    torch.testing.assert_close(torch.linalg.svdvals(weight.detach()), torch.linalg.svdvals(start), atol=1e-5, rtol=0)
    assert opt.optimizers[0].spectrum_drift() < 1e-5
    exec(blocks[1].replace("range(1, 401)", "range(1, 3)").replace("step % 200", "step % 2"), namespace)
    model, dense = namespace["model"], namespace["dense"]
    assert all(int(layer.merge_count) == 1 for _, layer in poetlm.poet_layers(model))
    assert isinstance(dense.model.layers[0].mlp.down_proj, nn.Linear)
