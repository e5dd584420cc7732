"""The build manifest: what ``setup.py`` built into this package, with which tools, or why not.

``setup.py`` writes ``fastbert/_build_manifest.json`` at every build (``pip install``, an editable
install, ``python setup.py build_ext --inplace``), also when a module fails to compile; a source
checkout that was never built has none. ``fastbert env`` shows it, the tests read it (a module the
manifest says was built must load), and ``setup.py`` prints :func:`render` of it.

Schema ``fastbert.build/1``::

    {"schema": "fastbert.build/1", "fastbert_version": "0.1.0", "created": "<UTC ISO time>",
     "python": "3.12.3", "platform": "Linux-x86_64", "werror": false,
     "cmake": "<cmake --version>", "generator": "Ninja" | "default",
     "modules": {
       "_C":      {"status": "built" | "failed" | "skipped", "reason": null | "<why not>",
                   "compiler": "<nvcc path> (CUDA 13.0, found via PATH)", "host_compiler": "GNU 13.2.0",
                   "archs": ["90a-real"]},
       "_C_host": {"status": ..., "reason": ..., "compiler": "GNU 12.2.0 (/usr/bin/c++)",
                   "cuda_headers": true},
       "_C_cpu":  {"status": ..., "reason": ..., "compiler": "GNU 12.2.0 (/usr/bin/c++)"},
       "_C_harness": {...}}}   # only when FASTBERT_BUILD_HARNESS=1 asked for it (the device check)

``reason`` is set whenever ``status`` is not ``"built"``: the build output's last lines for
``"failed"``, the cause (``FASTBERT_BUILD_CUDA=0``, no nvcc, ...) for ``"skipped"``.

This module imports nothing from fastbert or torch: ``setup.py`` loads it by path, before either
is importable.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "fastbert.build/1"
MANIFEST_NAME = "_build_manifest.json"
MODULES = ("_C", "_C_host", "_C_cpu", "_C_harness")
ON_REQUEST = ("_C_harness",)  # in the manifest only when asked for (FASTBERT_BUILD_HARNESS=1)
MANIFEST_PATH = Path(__file__).resolve().parent / MANIFEST_NAME


def read_manifest(path: str | Path | None = None) -> dict:
    """The manifest as a dict; ``{"present": False, "path": ..., "reason": ...}`` when there is none
    or it cannot be read (a checkout that was never built, or a damaged file). A manifest read from
    disk gets ``"present": True`` and ``"path"``."""
    path = Path(path) if path is not None else MANIFEST_PATH
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"present": False, "path": str(path),
                "reason": "no build manifest: this fastbert was not built by setup.py "
                          "(pip install ., or python setup.py build_ext --inplace)"}
    except (OSError, ValueError) as exc:
        return {"present": False, "path": str(path), "reason": f"unreadable build manifest: {exc}"}
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return {"present": False, "path": str(path),
                "reason": f"build manifest of another schema ({data.get('schema') if isinstance(data, dict) else '?'}, "
                          f"expected {SCHEMA}): rebuild"}
    return {"present": True, "path": str(path), **data}


def module_status(name: str, manifest: dict | None = None) -> tuple[str, str | None]:
    """``(status, reason)`` of module ``name`` (one of :data:`MODULES`): ``"built"``,
    ``"failed"`` or ``"skipped"`` as recorded, or ``"unknown"`` without a manifest."""
    manifest = read_manifest() if manifest is None else manifest
    if not manifest.get("present"):
        return "unknown", manifest.get("reason")
    entry = manifest.get("modules", {}).get(name)
    if not entry:
        return "unknown", f"the build manifest has no entry for {name}"
    return entry.get("status", "unknown"), entry.get("reason")


def render(manifest: dict | None = None) -> str:
    """A few lines for people: one per module (status, compiler, archs, or why not) and the build's
    tools. Used by ``setup.py`` after a build and by ``fastbert env``."""
    m = read_manifest() if manifest is None else manifest
    if m.get("present") is False:
        return f"build manifest: {m.get('reason')}"
    head = (f"build manifest ({m.get('created', '?')}, fastbert {m.get('fastbert_version', '?')}, "
            f"python {m.get('python', '?')}, {m.get('platform', '?')}; warnings as errors: "
            f"{'yes' if m.get('werror') else 'no'})")
    lines = [head]
    for name in MODULES:
        if name in ON_REQUEST and name not in m.get("modules", {}):
            continue
        e = m.get("modules", {}).get(name, {})
        status = e.get("status", "unknown")
        line = f"  fastbert.{name:8s} {status}"
        if e.get("compiler"):
            line += f"  compiler: {e['compiler']}"
        if e.get("host_compiler"):
            line += f"  host compiler: {e['host_compiler']}"
        if e.get("archs"):
            line += f"  archs: {';'.join(e['archs'])}"
        if "cuda_headers" in e and status == "built":
            line += f"  half types: {'CUDA headers' if e['cuda_headers'] else 'own'}"
        lines.append(line)
        if e.get("reason"):
            reason = str(e["reason"]).strip().splitlines()
            lines += [f"      {r}" for r in (reason[:1] + reason[-12:] if len(reason) > 13 else reason)]
    if m.get("cmake"):
        lines.append(f"  cmake: {m['cmake']}  generator: {m.get('generator', '?')}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m fastbert._build_info
    print(render())
