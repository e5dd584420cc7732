"""Compiler launcher for nvcc: runs the compile command and keeps its ptxas (-Xptxas -v) output.

Usage (set by CMakeLists.txt as CMAKE_CUDA_COMPILER_LAUNCHER):
    python ptxas_capture.py LOG_DIR nvcc ARGS...
Writes LOG_DIR/<object file name>.ptxas with the `ptxas info` lines of this compile; every other
line of the compiler's stderr (warnings, errors) passes through unchanged.
"""

import os
import subprocess
import sys


def main() -> int:
    log_dir, cmd = sys.argv[1], sys.argv[2:]
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    keep, rest = [], []
    for line in proc.stderr.splitlines():
        s = line.strip()
        is_info = s.startswith("ptxas info") or s.endswith("bytes spill loads") or (
            s.startswith("ptxas") and "Function properties" in s)
        (keep if is_info else rest).append(line)
    if rest:
        sys.stderr.write("\n".join(rest) + "\n")
    obj = cmd[cmd.index("-o") + 1] if "-o" in cmd else "unknown.o"
    if proc.returncode == 0 and keep:
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, os.path.basename(obj) + ".ptxas"), "w") as f:
            f.write("\n".join(keep) + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
