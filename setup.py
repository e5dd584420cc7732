"""Build script: the Python package plus, when the tools exist, the C++ extensions.

``fastbert._C`` (the CUDA kernels, nvcc >= 12) and ``fastbert._C_host`` (the same kernels compiled
for the CPU, used by the ``cuda-host`` test backend) are built by CMake + Ninja from csrc/ (see
CMakeLists.txt and csrc/README.md). Environment:

- ``FASTBERT_BUILD_CUDA=0`` / ``FASTBERT_BUILD_HOST=0``: skip a module;
- ``FASTBERT_CUDA_ARCHS`` (default ``80;90a``): GPU archs (SASS for each, PTX of the lowest);
- ``CUDACXX`` or ``nvcc`` on PATH (else /usr/local/cuda/bin/nvcc): the CUDA compiler;
- ``CMAKE_BUILD_PARALLEL_LEVEL``: compile jobs (default: Ninja's, all cores).

Without nvcc the package installs without ``fastbert._C`` and says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
REPORT = "_C_ptxas.txt"


def _log(msg: str) -> None:
    print(f"fastbert setup: {msg}", file=sys.stderr, flush=True)


def _enabled(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "off", "false", "no")


def _find_nvcc() -> tuple[str | None, str]:
    """(path to nvcc >= 12, its version) or (None, why not)."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    nvcc = next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)
    if nvcc is None:
        return None, "nvcc not found (set CUDACXX or put nvcc on PATH)"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{nvcc} --version failed: {exc}"
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        return None, f"cannot read the CUDA version from {nvcc} --version"
    if int(m.group(1)) < 12:
        return None, f"{nvcc} is CUDA {m.group(1)}.{m.group(2)}; CUDA >= 12 is required"
    return nvcc, f"{m.group(1)}.{m.group(2)}"


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")))


def _plan() -> tuple[list[Extension], dict]:
    exts, opts = [], {"nvcc": None}
    if _enabled("FASTBERT_BUILD_CUDA"):
        nvcc, info = _find_nvcc()
        if nvcc:
            _log(f"building fastbert._C with {nvcc} (CUDA {info})")
            exts.append(Extension("fastbert._C", sources=[]))
            opts["nvcc"] = nvcc
        else:
            _log(f"NOT building the CUDA extension fastbert._C: {info}; the 'cuda' backend will be unavailable")
    else:
        _log("FASTBERT_BUILD_CUDA=0: not building fastbert._C")
    if _enabled("FASTBERT_BUILD_HOST"):
        if _has_cxx():
            exts.append(Extension("fastbert._C_host", sources=[]))
        else:
            _log("no C++ compiler: not building fastbert._C_host (the 'cuda-host' test backend)")
    else:
        _log("FASTBERT_BUILD_HOST=0: not building fastbert._C_host")
    return exts, opts


EXTENSIONS, OPTIONS = _plan()


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
    """Configures and builds every planned module with one CMake + Ninja run."""

    def build_extensions(self) -> None:
        import pybind11

        names = {e.name for e in self.extensions}
        out_dir = Path(self.get_ext_fullpath("fastbert._C")).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
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
            f"-DFASTBERT_CUDA_ARCHS={os.environ.get('FASTBERT_CUDA_ARCHS', '80;90a')}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if OPTIONS["nvcc"]:
            args.append(f"-DCMAKE_CUDA_COMPILER={OPTIONS['nvcc']}")
            cuda_inc = Path(OPTIONS["nvcc"]).resolve().parent.parent / "include"
            if (cuda_inc / "cuda_fp16.h").exists():
                args.append(f"-DFASTBERT_CUDA_INCLUDE_DIR={cuda_inc}")
        else:
            nvcc, _ = _find_nvcc()  # CUDA's half types for the host build, when a toolkit is around
            if nvcc and (Path(nvcc).resolve().parent.parent / "include" / "cuda_fp16.h").exists():
                args.append(f"-DFASTBERT_CUDA_INCLUDE_DIR={Path(nvcc).resolve().parent.parent / 'include'}")
        subprocess.run(args, check=True)
        subprocess.run([cmake, "--build", str(build_dir)], check=True)
        for ext in self.extensions:
            if not Path(self.get_ext_fullpath(ext.name)).exists():
                raise RuntimeError(f"fastbert setup: CMake did not produce {self.get_ext_fullpath(ext.name)}")

    def run(self) -> None:
        super().run()
        # Editable installs copy the modules into fastbert/; the ptxas report goes with them.
        report = Path(self.build_lib) / "fastbert" / REPORT
        if self.inplace and report.exists():
            shutil.copyfile(report, ROOT / "fastbert" / REPORT)


setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": CMakeBuild})
