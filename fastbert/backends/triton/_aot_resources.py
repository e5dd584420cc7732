"""Resource usage of compiled Triton kernels without a GPU: registers / shared memory from a cubin
(``cuobjdump --dump-resource-usage``) and spill bytes from ``ptxas -v`` (the binaries Triton
bundles, else the ones on PATH). Used by :mod:`fastbert.backends.triton._aot`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile


def cuobjdump_path() -> str:
    """Triton's bundled cuobjdump, else the one on PATH; RuntimeError when neither exists."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(bundled):
        return bundled
    found = shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("cuobjdump: not found in Triton's wheel (triton/backends/nvidia/bin) nor on PATH")
    return found


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """``{kernel name: {"REG", "STACK", "SHARED", "LOCAL", ...}}`` from ``cuobjdump --dump-resource-usage``."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump --dump-resource-usage failed ({proc.returncode}): {proc.stderr.strip()}")
    return parse_resource_usage(proc.stdout)


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """Parse cuobjdump's ``Function <name>:`` / ``REG:32 STACK:0 SHARED:0 LOCAL:0 ...`` lines."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "REG:" in line:
            out[current] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            current = None
    return out


def parse_ptxas_spills(log: str, kernel: str) -> tuple[int, int] | None:
    """``(spill store bytes, spill load bytes)`` of ``kernel`` from a ``ptxas -v`` log, or None."""
    block = log
    start = log.find(f"Function properties for {kernel}")
    if start >= 0:
        block = log[start:]
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
    return None if m is None else (int(m.group(1)), int(m.group(2)))


def run_ptxas_verbose(ptx: str, arch: int) -> str:
    """``ptxas -v`` on ``ptx`` with Triton's bundled ptxas (its log, from stderr)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        ptxas = shutil.which("ptxas") or ptxas
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True)
    return proc.stderr + proc.stdout
