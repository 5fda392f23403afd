"""Invariant 4 (DESIGN.md): layers point one way. The method package imports nothing from Ray, the pipelines or
the cluster code; the cluster code (online serving, control plane) imports nothing from the pipelines."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_after_importing(package: str) -> set[str]:
    """Top-level packages in sys.modules after importing every module of `package`, in a fresh interpreter."""
    code = (
        f"import sys, pkgutil, importlib, {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(','.join(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.strip().split(","))


@pytest.mark.parametrize("package,forbidden", [("dynllava", {"ray", "pipelines", "cluster"}),
                                               ("cluster", {"pipelines"})])
def test_layers_point_one_way(package, forbidden):
    assert imported_after_importing(package) & forbidden == set()


def sources(*packages: str) -> dict[str, str]:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return {str(p.relative_to(root)): p.read_text() for pkg in packages for p in (root / pkg).rglob("*.py")}


def test_the_serve_contract_and_the_controller_client_are_defined_once():
    """The deployment's name lives in cluster/serve_handle.py only (everything else imports it), and only the
    shared controller client calls the controller's `report` (replicas and offline actors both use it)."""
    code = sources("dynllava", "cluster", "pipelines", "benchmarks")
    assert [f for f, text in code.items() if '"LlavaServer"' in text] == ["cluster/serve_handle.py"]
    assert [f for f, text in code.items() if ".report.remote(" in text] == ["cluster/controller_client.py"]
