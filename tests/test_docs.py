"""The Python snippets of docs/integrations.md run as written, in order, in one namespace."""

import os
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).parents[1] / "docs" / "integrations.md"


def test_integrations_doc_snippets_run(tmp_path):
    blocks = [block.split("```", 1)[0] for block in DOC.read_text().split("```python\n")[1:]]
    assert len(blocks) == 9
    script = tmp_path / "snippets.py"
    script.write_text("namespace = {}\n" + "".join(f"exec(compile({b!r}, 'snippet {i}', 'exec'), namespace)\n"
                                                    for i, b in enumerate(blocks)))
    # A process of its own: accelerate's state is process-wide, and the snippets write into the working directory.
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable params:" in result.stdout
    assert "poetize(strict=True) refuses" in result.stdout and "mlp.experts.gate_up_proj" in result.stdout
