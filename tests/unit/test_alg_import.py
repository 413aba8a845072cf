"""``rtdmd_ray.algorithms`` is pure torch: importing it must not import Ray or the model stacks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import rtdmd_ray.algorithms as algorithms

FORBIDDEN = ("ray", "diffusers", "transformers", "peft")
ALLOWED_TOP_LEVEL = {
    "__future__",
    "collections",
    "contextlib",
    "hashlib",
    "math",
    "random",
    "typing",
    "torch",
}


def test_algorithms_sources_import_only_torch_and_the_stdlib():
    package_dir = Path(algorithms.__file__).parent
    for path in sorted(package_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                ok = top in ALLOWED_TOP_LEVEL or name.startswith("rtdmd_ray.algorithms")
                assert ok, f"{path.name} imports {name}: algorithms/ must stay pure torch"


def test_importing_algorithms_does_not_import_ray():
    # Fast path: this process imported rtdmd_ray.algorithms (all modules) and nothing else pulled Ray in.
    if not any(m in sys.modules for m in FORBIDDEN):
        assert {"acdmd", "bp", "cps", "dmd", "ema", "grpo", "schedules"} <= set(algorithms.__all__)
        return
    # Another test already imported one of them: check in a fresh interpreter.
    code = (
        "import sys, rtdmd_ray.algorithms; "
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
