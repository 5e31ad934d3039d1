"""The edge must never load torch, transformers or ray, not even through splitclip.*."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import edge_node
import splitclip

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "transformers", "ray")


def test_every_edge_module_imports_without_torch_transformers_or_ray() -> None:
    modules = sorted(f"edge_node.{m.name}" for m in pkgutil.iter_modules(edge_node.__path__))
    assert {"edge_node.node", "edge_node.client", "edge_node.cli", "edge_node.local"} <= set(modules)
    # the shared package too, every module and subpackage of it (the edge runs all of it)
    shared = sorted(m.name for m in pkgutil.walk_packages(splitclip.__path__, "splitclip."))
    assert {"splitclip.tower", "splitclip.prompts", "splitclip.codec.api", "splitclip.wire"} <= set(shared)
    modules += shared
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print('LOADED', len(sys.modules)); print('FORBIDDEN', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "FORBIDDEN []" in p.stdout
