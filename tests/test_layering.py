"""Invariant 4: the method package imports nothing from Ray, the pipelines or the cluster code."""

from __future__ import annotations

import subprocess
import sys


def test_dynllava_imports_no_ray_pipelines_or_cluster():
    code = (
        "import sys, pkgutil, importlib, dynllava\n"
        "for m in pkgutil.walk_packages(dynllava.__path__, 'dynllava.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'pipelines', 'cluster'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
