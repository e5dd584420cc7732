"""Turn the captured ptxas logs into fastbert/_C_ptxas.txt (one line per kernel and arch).

Usage: python ptxas_report.py LOG_DIR OUT_FILE NVCC_VERSION_STRING [OBJECT ...]
With OBJECT paths (the target's objects), logs of objects no longer built are ignored.
ptxas -v prints, per kernel and arch:
    ptxas info    : Compiling entry function '_Z...' for 'sm_80'
    ptxas info    : Function properties for _Z...
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 30 registers, used 1 barriers, 380 bytes cmem[0]   (+ "N bytes smem")
"""

import glob
import os
import re
import shutil
import subprocess
import sys

COLUMNS = ("kernel", "arch", "registers", "stack_bytes", "spill_store_bytes", "spill_load_bytes", "smem_bytes",
           "object")


def parse(text: str, obj: str) -> list[dict]:
    rows, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": 0, "stack_bytes": 0,
                   "spill_store_bytes": 0, "spill_load_bytes": 0, "smem_bytes": 0, "object": obj}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack_bytes"], cur["spill_store_bytes"], cur["spill_load_bytes"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem_bytes"] = int(s.group(1)) if s else 0
    return rows


def demangle(names: list[str]) -> dict:
    exe = shutil.which("c++filt")
    if not exe or not names:
        return {n: n for n in names}
    out = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(name: str) -> str:
    """``void fb::(anonymous namespace)::k<__half>(fb::P, bool)`` -> ``k<__half>``: readable in a table."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "").replace("fb::", "")
    if name.endswith(")"):  # drop the parameter list: the last top-level parenthesised group
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name


def main() -> int:
    log_dir, out_file, nvcc_version = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "?"
    objects = {os.path.basename(o) for o in sys.argv[4:]}
    rows = []
    for path in sorted(glob.glob(os.path.join(log_dir, "*.ptxas"))):
        if objects and os.path.basename(path)[: -len(".ptxas")] not in objects:
            continue
        with open(path) as f:
            rows += parse(f.read(), os.path.basename(path)[: -len(".ptxas")])
    names = {k: short_name(v) for k, v in demangle(sorted({r["kernel"] for r in rows})).items()}
    rows.sort(key=lambda r: (r["object"], names[r["kernel"]], r["arch"]))
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    with open(out_file, "w") as f:
        f.write(f"# fastbert._C ptxas resource usage (nvcc -Xptxas -v; {nvcc_version})\n")
        f.write("# one line per kernel and arch, tab-separated; kernel names demangled, without namespaces"
                " and parameter lists\n")
        f.write("\t".join(COLUMNS) + "\n")
        for r in rows:
            r = dict(r, kernel=names[r["kernel"]])
            f.write("\t".join(str(r[c]) for c in COLUMNS) + "\n")
    print(f"ptxas report: {len(rows)} kernel/arch entries -> {out_file}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
