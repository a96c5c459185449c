"""misa_theory must import and run with numpy/scipy alone: the trainer imports the theory, never the reverse."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

THEORY = Path(__file__).resolve().parents[1] / "misa_theory"
FORBIDDEN = {"torch", "transformers", "peft", "misa_train"}


def test_importing_the_theory_loads_no_torch():
    code = ("import sys, misa_theory, misa_theory.sampler, misa_theory.simulate, misa_theory.memory, "
            f"misa_theory.cli; bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}); "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=THEORY.parent)
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_theory_source_imports_torch_or_the_trainer():
    for path in THEORY.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
