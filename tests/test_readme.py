"""The README's promises hold: its Python example runs as written, its links resolve, its commands write where
they say.

The example is a doctest (``>>>`` lines inside a fenced ``python`` block); running it checks that every name it
uses is defined and that every printed value is what the README shows.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)|<img src=\"([^\"]+)\"")


def _doctest_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of every fenced python block that holds ``>>>`` examples."""
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in FENCE.finditer(text) if ">>> " in m.group(1)]


def test_readme_python_example_runs_as_shown() -> None:
    blocks = _doctest_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no doctest example (a ```python block with >>> lines)"
    parser = doctest.DocTestParser()
    for lineno, body in blocks:
        test = parser.get_doctest(body, {}, f"README.md:{lineno}", str(README), lineno)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test)
        result = runner.summarize(verbose=False)
        assert result.attempted > 0 and result.failed == 0, f"README.md:{lineno}: {result.failed} example(s) failed"


def test_readme_relative_links_point_at_files() -> None:
    missing = []
    for m in LINK.finditer(README.read_text(encoding="utf-8")):
        target = (m.group(1) or m.group(2)).split("#", 1)[0]
        if not target or "://" in target or target.startswith("mailto:"):
            continue
        if not (ROOT / target).exists():
            missing.append(target)
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_figure_command_uses_paths_the_notebook_kernel_resolves() -> None:
    """Notebooks execute with notebooks/ as working directory (scripts/run_notebooks.py), so a relative
    MISA_NB_FIGDIR or MISA_IMPORTANCE_JSON would land under notebooks/, not where the README says."""
    text = README.read_text(encoding="utf-8")
    paths = re.findall(r"\b(MISA_NB_FIGDIR|MISA_IMPORTANCE_JSON)=(\S+)", text)
    assert {name for name, _ in paths} == {"MISA_NB_FIGDIR", "MISA_IMPORTANCE_JSON"}, paths
    relative = [f"{name}={value}" for name, value in paths if not value.startswith(("/", "$PWD/", "\"$PWD/"))]
    assert not relative, f"relative to notebooks/, not the repo root: {relative}"
