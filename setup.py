"""Build script: the Python package plus, when the tools exist, the C++ extensions.

``fastbert._C`` (the CUDA kernels, nvcc >= 12), ``fastbert._C_host`` (the same kernels compiled
for the CPU, used by the ``cuda-host`` test backend) and ``fastbert._C_cpu`` (the torch backend's
compiled CPU helpers: dropout keep masks; the torch backend falls back to torch ops without it) are built by CMake + Ninja from csrc/ (see
CMakeLists.txt and csrc/README.md); ``fastbert._C_harness`` (the GPU run of the execution-model
self-test, nvcc) only on request. Environment:

- ``FASTBERT_BUILD_CUDA=0`` / ``FASTBERT_BUILD_HOST=0`` / ``FASTBERT_BUILD_CPU=0``: skip a module;
- ``FASTBERT_BUILD_HARNESS=1``: also build ``fastbert._C_harness`` (the device check sets it);
- ``FASTBERT_CUDA_ARCHS`` (default ``80;90a``): GPU archs (SASS for each, PTX of the lowest);
- the CUDA compiler, first found of: ``CUDACXX``, ``nvcc`` on PATH, ``/usr/local/cuda/bin/nvcc``;
- ``FASTBERT_WERROR=1``: warnings are errors on our sources (CI sets it; a user build never fails
  on a warning, whatever the compiler version);
- ``FASTBERT_HOST_OPT`` (default ``-O2``): the host module's optimisation flag (CI's clang check: -O0);
- ``CMAKE_BUILD_PARALLEL_LEVEL``: compile jobs (default: Ninja's, all cores); ``CXX``: the host
  C++ compiler (CMake's rule).

Without nvcc the package installs without ``fastbert._C`` and says so. Every build writes the
manifest ``fastbert/_build_manifest.json`` (``fastbert/_build_info.py``: which modules were built,
for which archs, with which compilers, or why not; also when a module fails to compile) and prints
it; ``fastbert env`` shows it.
"""

from __future__ import annotations

import collections
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
REPORT = "_C_ptxas.txt"
# fastbert/_build_info.py, loaded by path: importing fastbert would need torch, which the build does not.
_spec = importlib.util.spec_from_file_location("_fastbert_build_info", ROOT / "fastbert" / "_build_info.py")
BUILD_INFO = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(BUILD_INFO)


def _log(msg: str) -> None:
    print(f"fastbert setup: {msg}", file=sys.stderr, flush=True)


def _enabled(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "off", "false", "no")


def _version() -> str:
    text = (ROOT / "fastbert" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _find_nvcc() -> tuple[str | None, str, str]:
    """(path to nvcc >= 12, its version, where it was found) or (None, why not, ""). Looked for in
    this order: $CUDACXX, nvcc on PATH, /usr/local/cuda/bin/nvcc."""
    candidates = [("CUDACXX", os.environ.get("CUDACXX")), ("PATH", shutil.which("nvcc")),
                  ("/usr/local/cuda", "/usr/local/cuda/bin/nvcc")]
    found = next(((how, c) for how, c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)
    if found is None:
        return None, "nvcc not found (looked at $CUDACXX, PATH and /usr/local/cuda/bin/nvcc)", ""
    how, nvcc = found
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{nvcc} --version failed: {exc}", how
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        return None, f"cannot read the CUDA version from {nvcc} --version", how
    if int(m.group(1)) < 12:
        return None, f"{nvcc} is CUDA {m.group(1)}.{m.group(2)}; CUDA >= 12 is required", how
    return nvcc, f"{m.group(1)}.{m.group(2)}", how


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")))


def _plan() -> tuple[list[Extension], dict, dict]:
    """(extensions to build, options, the manifest's module entries: "planned" or "skipped")."""
    exts, opts = [], {"nvcc": None, "cuda": None}
    modules = {name: {"status": "planned", "reason": None} for name in BUILD_INFO.MODULES
               if name not in BUILD_INFO.ON_REQUEST}

    def skip(name, why):
        _log(why)
        modules[name] = {"status": "skipped", "reason": why}

    if _enabled("FASTBERT_BUILD_CUDA"):
        nvcc, info, how = _find_nvcc()
        if nvcc:
            _log(f"building fastbert._C with {nvcc} (CUDA {info}, found via {how})")
            exts.append(Extension("fastbert._C", sources=[]))
            opts["nvcc"], opts["cuda"] = nvcc, info
            modules["_C"]["compiler"] = f"{nvcc} (CUDA {info}, found via {how})"
            if os.environ.get("FASTBERT_BUILD_HARNESS", "0").strip().lower() in ("1", "on", "true", "yes"):
                exts.append(Extension("fastbert._C_harness", sources=[]))
                modules["_C_harness"] = {"status": "planned", "reason": None, "compiler": modules["_C"]["compiler"]}
        else:
            skip("_C", f"NOT building the CUDA extension fastbert._C: {info}; the 'cuda' backend will be unavailable")
    else:
        skip("_C", "FASTBERT_BUILD_CUDA=0: not building fastbert._C")
    # The C++-only modules: each needs its switch on and a C++ compiler.
    for name, switch, without in (("_C_host", "FASTBERT_BUILD_HOST", "the 'cuda-host' test backend"),
                                  ("_C_cpu", "FASTBERT_BUILD_CPU", "the torch backend uses torch ops instead")):
        if not _enabled(switch):
            skip(name, f"{switch}=0: not building fastbert.{name}")
        elif _has_cxx():
            exts.append(Extension(f"fastbert.{name}", sources=[]))
        else:
            skip(name, f"no C++ compiler: not building fastbert.{name} ({without})")
    return exts, opts, modules


EXTENSIONS, OPTIONS, PLAN = _plan()
WERROR = os.environ.get("FASTBERT_WERROR", "0").strip().lower() in ("1", "on", "true", "yes")


def _manifest(modules: dict, tools: dict | None = None) -> dict:
    """The manifest (schema in fastbert/_build_info.py) for these module entries."""
    return {"schema": BUILD_INFO.SCHEMA, "fastbert_version": _version(),
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "python": platform.python_version(), "platform": f"{platform.system()}-{platform.machine()}",
            "werror": WERROR, **(tools or {}), "modules": modules}


def _write_manifest(manifest: dict, package_dir: Path) -> None:
    package_dir.mkdir(parents=True, exist_ok=True)
    (package_dir / BUILD_INFO.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")


def _run_logged(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd`` with its output streamed to stderr; (exit status, its last 40 lines)."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    for line in proc.stdout:
        sys.stderr.write(line)
        tail.append(line.rstrip())
    return proc.wait(), "\n".join(tail)


def _tool(module: str, exe: str) -> str | None:
    """An executable from its pip package (build requirement) or PATH."""
    try:
        mod = __import__(module)
        path = os.path.join(mod.BIN_DIR if module == "ninja" else mod.CMAKE_BIN_DIR, exe)
        if os.path.exists(path):
            return path
    except Exception:
        pass
    return shutil.which(exe)


class CMakeBuild(build_ext):
    """Configures with CMake, builds each planned module (Ninja) and writes the manifest, also when
    a module fails (then the build fails after the manifest records why)."""

    def build_extensions(self) -> None:
        import pybind11

        names = {e.name for e in self.extensions}
        out_dir = Path(self.get_ext_fullpath("fastbert._C")).parent.resolve()
        self._manifest_dir = out_dir
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        modules = json.loads(json.dumps(PLAN))
        cmake, ninja = _tool("cmake", "cmake"), _tool("ninja", "ninja")
        if cmake is None:
            raise RuntimeError("fastbert setup: cmake not found (pip install cmake, or use build isolation)")
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTBERT_OUTPUT_DIR={out_dir}",
            f"-DFASTBERT_BUILD_CUDA={'ON' if 'fastbert._C' in names else 'OFF'}",
            f"-DFASTBERT_BUILD_HOST={'ON' if 'fastbert._C_host' in names else 'OFF'}",
            f"-DFASTBERT_BUILD_CPU={'ON' if 'fastbert._C_cpu' in names else 'OFF'}",
            f"-DFASTBERT_BUILD_HARNESS={'ON' if 'fastbert._C_harness' in names else 'OFF'}",
            f"-DFASTBERT_CUDA_ARCHS={os.environ.get('FASTBERT_CUDA_ARCHS', '80;90a')}",
            f"-DFASTBERT_WERROR={'ON' if WERROR else 'OFF'}",
            f"-DFASTBERT_HOST_OPT={os.environ.get('FASTBERT_HOST_OPT', '-O2')}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if OPTIONS["nvcc"]:
            args.append(f"-DCMAKE_CUDA_COMPILER={OPTIONS['nvcc']}")
            cuda_inc = Path(OPTIONS["nvcc"]).resolve().parent.parent / "include"
            if (cuda_inc / "cuda_fp16.h").exists():
                args.append(f"-DFASTBERT_CUDA_INCLUDE_DIR={cuda_inc}")
        else:
            nvcc, _, _ = _find_nvcc()  # CUDA's half types for the host build, when a toolkit is around
            if nvcc and (Path(nvcc).resolve().parent.parent / "include" / "cuda_fp16.h").exists():
                args.append(f"-DFASTBERT_CUDA_INCLUDE_DIR={Path(nvcc).resolve().parent.parent / 'include'}")
        version = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout.splitlines()
        tools = {"cmake": f"{version[0] if version else '?'} ({cmake})", "generator": "Ninja" if ninja else "default"}
        failure = None
        rc, tail = _run_logged(args)
        if rc != 0:
            failure = f"CMake configure failed (exit {rc}):\n{tail}"
            for ext in self.extensions:
                modules[ext.name.split(".")[1]].update(status="failed", reason=failure)
        facts = self._cmake_facts(build_dir) if rc == 0 else {}
        # One target at a time, host module first: a failure is attributed to its module, and the
        # host module is built even when the CUDA one fails.
        for ext in sorted(self.extensions, key=lambda e: e.name != "fastbert._C_host") if rc == 0 else ():
            name = ext.name.split(".")[1]
            entry, fact = modules[name], dict(facts.get(name, {}))
            configured, why = fact.pop("configured", True), fact.pop("why", None)
            entry.update(fact)
            if not configured:
                entry.update(status="failed", reason=why or "CMake did not configure it")
            else:
                build_rc, tail = _run_logged([cmake, "--build", str(build_dir), "--target", name])
                if build_rc != 0:
                    entry.update(status="failed", reason=f"compiling fastbert.{name} failed (exit {build_rc}):\n{tail}")
                elif not Path(self.get_ext_fullpath(ext.name)).exists():
                    entry.update(status="failed", reason=f"CMake did not produce {self.get_ext_fullpath(ext.name)}")
                else:
                    entry.update(status="built", reason=None)
            failure = failure or (entry["reason"] if entry["status"] == "failed" else None)
        manifest = _manifest(modules, tools)
        _write_manifest(manifest, out_dir)
        _log("\n" + BUILD_INFO.render(manifest))
        if failure is not None:
            raise RuntimeError(f"fastbert setup: {failure}\n(set FASTBERT_BUILD_CUDA=0 / FASTBERT_BUILD_HOST=0 "
                               "to install without the failing module)")

    @staticmethod
    def _cmake_facts(build_dir: Path) -> dict:
        """What CMakeLists.txt recorded at configure time (compilers, archs), by module name."""
        try:
            return json.loads((build_dir / "fastbert_build.json").read_text())
        except (OSError, ValueError):
            return {}

    def run(self) -> None:
        try:
            super().run()
        finally:
            # Editable / in-place builds copy the modules into fastbert/; the ptxas report and the
            # manifest go with them (the manifest also after a failed build: it says why).
            if self.inplace:
                src = getattr(self, "_manifest_dir", None)
                for name in (REPORT, BUILD_INFO.MANIFEST_NAME):
                    if src is not None and (src / name).exists() and src != ROOT / "fastbert":
                        shutil.copyfile(src / name, ROOT / "fastbert" / name)


class BuildPy(build_py):
    """Writes the planned manifest, so that a build with no module to compile (no nvcc, no C++
    compiler, or both disabled) still records why; build_ext overwrites it with the results."""

    def run(self) -> None:
        super().run()
        if EXTENSIONS:
            return
        manifest = _manifest(PLAN)
        _write_manifest(manifest, ROOT / "fastbert" if getattr(self, "editable_mode", False)
                        else Path(self.build_lib) / "fastbert")
        _log("\n" + BUILD_INFO.render(manifest))


setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy})
