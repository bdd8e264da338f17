"""The README's Python example runs as written (with fewer steps)."""

from pathlib import Path

from torch import nn

import poetlm


def test_readme_python_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "range(1, 401)" in code and "step % 200" in code
    namespace = {}
    exec(code.replace("range(1, 401)", "range(1, 3)").replace("step % 200", "step % 2"), namespace)
    model, dense = namespace["model"], namespace["dense"]
    assert all(int(layer.merge_count) == 1 for _, layer in poetlm.poet_layers(model))
    assert isinstance(dense.model.layers[0].mlp.down_proj, nn.Linear)
