"""Compile a benchmark's small C helper once and reuse it until its source changes."""

from __future__ import annotations

import contextlib
import os
import subprocess


def compile_cached(cache: str, name: str, source: str) -> str:
    """Return the path of ``name`` built from ``source`` in ``cache`` (rebuilt only when the source changed)."""
    os.makedirs(cache, exist_ok=True)
    src, out = os.path.join(cache, f"{name}.c"), os.path.join(cache, name)
    current = ""
    with contextlib.suppress(OSError), open(src) as f:
        current = f.read()
    if current != source or not os.path.exists(out):
        with open(src, "w") as f:
            f.write(source)
        subprocess.run(["cc", "-O2", "-pthread", "-o", out, src], check=True)
    return out
