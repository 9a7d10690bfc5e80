"""The fast commands start fast: `steps` is arithmetic and imports neither torch nor transformers.

Modules that need torch import it at their top (reference/methods/train.py, models.py, lora.py, checkpoints.py);
only the command line and the commands that need no model stay free of it. `render` and `filter` are
checked beside their other tests (spec/test_formats.py, spec/test_filter_command.py).
"""

from __future__ import annotations

import subprocess
import sys


def test_the_steps_command_imports_neither_torch_nor_transformers():
    """The console command itself, in a fresh interpreter: it prints its plan, and afterwards neither
    library is among the loaded modules."""
    code = (
        "import sys; from reference.cli import main; "
        "main(['steps', '--records', '10', '--batch-size', '2']); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("False False"), result.stdout + result.stderr
