"""Ahead-of-time compile of Triton kernels for sm_80 / sm_90 without a GPU, with resource usage.

Why: CI has no GPU, so the interpreter checks what a kernel computes but not what it costs. This
module compiles the real PTX/cubin for a target architecture (``triton.compile`` with a
``GPUTarget``) and reads what ptxas made of it: registers, stack, shared and local memory per
kernel (``cuobjdump --dump-resource-usage`` on the cubin) and spill stores/loads (the ``ptxas -v``
log of the very compile that produced the cubin). A spill is the gate: CI has no GPU, so this is
where register pressure is checked.

The variant compiled is the one the launcher runs: the signature, the constexprs and the
specialization attributes (16-byte divisibility of pointers and integers, integers equal to 1
becoming constants) come from Triton's own launch binder (``create_function_from_signature`` +
``JITFunction._pack_args``, what ``kernel[grid](...)`` calls), applied to example arguments. Kernel
modules build those example arguments with the same function their launcher uses, passing
:func:`pointer` stand-ins (16-byte aligned, like every torch allocation) in place of tensors.

Triton versions: 3.6 (the H200 machine's) and 3.9 (CI's) share this API; :func:`_binder` and
:func:`_pack` are the one place to adapt to another version.

Interpreted and compiled Triton never mix in one process: run this without ``TRITON_INTERPRET=1``
(the command line entry point removes it before importing any kernel), e.g. in CI::

    .venv/bin/python -m fastbert.backends.triton._aot --all
    .venv-triton36/bin/python -m fastbert.backends.triton._aot --all

A kernel module takes part by defining ``aot_variants(full: bool) -> list[AotVariant]`` (the
highest-pressure variants when ``full`` is False, the whole matrix otherwise) and being listed in
:data:`KERNEL_MODULES`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

from fastbert.backends.triton._aot_resources import (cuobjdump_path, parse_ptxas_spills,  # noqa: F401
                                                     parse_resource_usage, resource_usage, run_ptxas_verbose)

ARCHS = (80, 90)
KERNEL_MODULES = ("fastbert.backends.triton._philox", "fastbert.backends.triton.layer_norm", "fastbert.backends.triton.gelu",
                  "fastbert.backends.triton.geglu", "fastbert.backends.triton.rotary", "fastbert.backends.triton.attention")


class Pointer:
    """Stand-in for a tensor argument: a dtype (torch or ``triton.language``) and an address.

    Address 0 is 16-byte aligned, as torch's allocations are, so Triton marks the pointer
    divisible by 16 exactly as it does for a freshly allocated tensor.
    """

    def __init__(self, dtype, address: int = 0, shape=(1,)):
        self.dtype = dtype
        self.address = address
        self.shape = tuple(shape)

    def data_ptr(self) -> int:
        return self.address

    def __repr__(self) -> str:
        return f"Pointer({self.dtype}, address={self.address})"


def pointer(dtype, address: int = 0) -> Pointer:
    """A 16-byte aligned tensor stand-in of ``dtype`` (``torch.float16``, ``tl.bfloat16``, ``"fp16"``...)."""
    if isinstance(dtype, str):
        import triton.language as tl

        names = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64,
                 "i8": tl.int8, "i16": tl.int16, "i32": tl.int32, "i64": tl.int64, "u8": tl.uint8,
                 "u32": tl.uint32, "i1": tl.int1}
        dtype = names[dtype.lstrip("*")]
    return Pointer(dtype, address)


# Example values for scalar type strings: none is divisible by 16 or equal to 1, so the compiled
# variant carries no value specialization for that argument.
_SCALAR_EXAMPLES = {"i32": 17, "i64": 2**33 + 1, "u32": 17, "u64": 2**33 + 1, "fp32": 1.5, "fp16": 1.5,
                    "bf16": 1.5, "fp64": 1.5, "u1": True}


@dataclass(frozen=True)
class KernelResources:
    """What ptxas made of one compiled kernel for one architecture.

    ``registers`` per thread, ``stack``/``local`` bytes per thread, ``shared`` bytes per block
    (static; Triton's dynamic shared memory is ``shared_dynamic``), ``spill_stores`` /
    ``spill_loads`` bytes from the ptxas log (None when no log was available).
    """

    kernel: str
    arch: int
    triton_version: str
    num_warps: int
    num_stages: int
    signature: dict
    specialization: dict  # argument name -> Triton attribute (e.g. "tt.divisibility=16")
    registers: int
    stack: int
    shared: int
    local: int
    shared_dynamic: int
    spill_stores: int | None
    spill_loads: int | None
    compile_s: float

    @property
    def spill_bytes(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)


@dataclass
class AotResult:
    """:class:`KernelResources` plus the compiled object (``compiled.asm["ptx"|"cubin"|...]``)."""

    resources: KernelResources
    compiled: Any = field(repr=False)
    ptxas_log: str = field(default="", repr=False)


@dataclass(frozen=True)
class AotVariant:
    """One kernel configuration a kernel module asks to be compiled (see :func:`compile_variant`).

    ``signature`` maps every non-constexpr parameter to an example value (see
    :func:`compile_kernel`); ``spill_budget`` is the allowed spill bytes (stores + loads) per arch.
    """

    label: str
    fn: Callable
    signature: Mapping[str, Any]
    constexprs: Mapping[str, Any]
    num_warps: int
    num_stages: int = 1
    spill_budget: int = 0


def split_launch(fn, kwargs: Mapping[str, Any]) -> tuple[dict, dict, int, int]:
    """Split launch keyword arguments ``fn[grid](**kwargs)`` into ``(signature, constexprs,
    num_warps, num_stages)`` for :func:`compile_kernel` / :class:`AotVariant`."""
    kw = dict(kwargs)
    num_warps = kw.pop("num_warps", 4)
    num_stages = kw.pop("num_stages", 3)
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    sig = {k: v for k, v in kw.items() if k not in constexpr}
    consts = {k: v for k, v in kw.items() if k in constexpr}
    return sig, consts, num_warps, num_stages


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", int(arch), 32)


def _binder(fn, backend):
    """Triton's launch binder for ``fn`` (what ``fn[grid](...)`` calls to specialize arguments)."""
    from triton.runtime import jit as tjit

    if not hasattr(fn, "params") or not hasattr(fn, "_pack_args"):
        raise TypeError(f"fn: expected a compiled @triton.jit function, got {type(fn).__name__} "
                        "(is TRITON_INTERPRET=1 set? interpreted and compiled Triton never mix in one process)")
    if not hasattr(tjit, "create_function_from_signature"):
        import triton

        raise RuntimeError(f"triton {triton.__version__}: no create_function_from_signature; "
                           "fastbert's ahead-of-time compile supports Triton 3.6 to 3.9")
    return tjit.create_function_from_signature(fn.signature, fn.params, backend)


def _pack(fn, backend, bound_args, specialization, options):
    """``(options, signature, constexprs, attrs)`` exactly as the launcher computes them."""
    return fn._pack_args(backend, options, bound_args, specialization, options)


def compile_kernel(fn, signature: Mapping[str, Any], constexprs: Mapping[str, Any] | None = None, *,
                   num_warps: int = 4, num_stages: int = 3, arch: int = 90) -> AotResult:
    """Compile ``fn`` for ``sm_<arch>`` (no GPU needed) and read its resource usage.

    Args:
        fn: a ``@triton.jit`` kernel (compiled mode: not under ``TRITON_INTERPRET=1``).
        signature: every non-constexpr parameter name -> an example argument, specialized by
            Triton's launch rules: a :func:`pointer` (or any object with ``dtype`` and
            ``data_ptr()``, e.g. a tensor), a type string ``"*fp16"`` (an aligned pointer), an int /
            float / bool value (an int divisible by 16 gets the divisibility attribute, 1 becomes a
            constant), a scalar type string ``"i32"``/``"i64"``/``"fp32"`` (a value with no
            specialization), or None.
        constexprs: ``tl.constexpr`` parameter name -> value (block sizes, feature flags).
        num_warps, num_stages: launch options, as passed to ``fn[grid](..., num_warps=...)``.
        arch: compute capability, 80 (A100) or 90 (H100/H200; Triton emits ``sm_90a``).

    Returns:
        :class:`AotResult` with :class:`KernelResources` and the compiled object.

    Raises:
        ValueError naming a missing or unknown parameter; TypeError for an interpreted kernel;
        RuntimeError when cuobjdump is missing or fails; Triton's own errors when compiling fails.
    """
    import triton
    from triton import knobs
    from triton.compiler import ASTSource, make_backend

    constexprs = dict(constexprs or {})
    names = list(fn.arg_names)
    given = dict(signature) | constexprs
    unknown = sorted(set(given) - set(names))
    missing = [n for n in names if n not in given]
    if unknown or missing:
        raise ValueError(f"signature/constexprs of {fn.__name__}: expected parameters {names}, "
                         f"missing {missing}, unknown {unknown}")
    args = []
    for n in names:
        v = given[n]
        if isinstance(v, str) and v.startswith("*"):
            v = pointer(v)
        elif isinstance(v, str) and n in signature:
            v = _SCALAR_EXAMPLES[v]
        args.append(v)

    target = _target(arch)
    backend = make_backend(target)
    bound_args, specialization, options = _binder(fn, backend)(*args, num_warps=num_warps,
                                                               num_stages=num_stages)
    options, sig, consts, attrs = _pack(fn, backend, bound_args, specialization, options)
    src = ASTSource(fn, sig, consts, attrs)

    log = io.StringIO()
    old = (knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log)
    t0 = time.perf_counter()
    try:
        # A fresh compile (not the cache) so that ptxas runs and prints its -v log here.
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = old
    compile_s = time.perf_counter() - t0
    ptxas_log = log.getvalue()
    name = compiled.metadata.name
    usage = resource_usage(compiled.asm["cubin"]).get(name)
    if usage is None:
        raise RuntimeError(f"cuobjdump: no resource usage for kernel {name!r} in the cubin")
    spills = parse_ptxas_spills(ptxas_log, name)
    if spills is None:  # no log captured: ask ptxas about the PTX with the compile's architecture
        ptxas_log = run_ptxas_verbose(compiled.asm["ptx"], arch)
        spills = parse_ptxas_spills(ptxas_log, name)
    attr_desc = {}
    for path, kv in attrs.items():
        pname = names[path[0]] if isinstance(path, tuple) and path else str(path)
        desc = ",".join(f"{k}={v}" for k, v in kv) if isinstance(kv, (list, tuple)) else str(kv)
        if desc:
            attr_desc[pname] = desc
    res = KernelResources(
        kernel=name, arch=int(arch), triton_version=triton.__version__, num_warps=num_warps,
        num_stages=num_stages, signature=dict(sig), specialization=attr_desc,
        registers=usage["REG"], stack=usage["STACK"], shared=usage["SHARED"], local=usage["LOCAL"],
        shared_dynamic=int(getattr(compiled.metadata, "shared", 0) or 0),
        spill_stores=None if spills is None else spills[0], spill_loads=None if spills is None else spills[1],
        compile_s=round(compile_s, 3))
    return AotResult(res, compiled, ptxas_log)


def compile_variant(variant: AotVariant, arch: int) -> AotResult:
    """:func:`compile_kernel` for an :class:`AotVariant`."""
    return compile_kernel(variant.fn, variant.signature, variant.constexprs, num_warps=variant.num_warps,
                          num_stages=variant.num_stages, arch=arch)


def collect_variants(full: bool = False, modules=KERNEL_MODULES) -> list[AotVariant]:
    """Every kernel module's ``aot_variants(full)``; modules not written yet are skipped."""
    out: list[AotVariant] = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        if hasattr(mod, "aot_variants"):
            out.extend(mod.aot_variants(full))
    return out


def _compile_row(variant: AotVariant, arch: int) -> tuple[dict | None, str | None, str]:
    """Compile one (variant, arch): (table row or None, failure or None, one-line report)."""
    try:
        r = compile_variant(variant, arch).resources
    except Exception as exc:  # report every failing variant, not just the first
        root = exc
        while root.__cause__ is not None:  # Triton chains one error per nested jit call
            root = root.__cause__
        msg = f"{type(root).__name__}: {root}"
        return None, f"{variant.label} sm_{arch}: compile failed: {msg}", \
            f"FAIL {variant.label:48s} sm_{arch}: {msg[-1500:]}"
    row = {"label": variant.label, "spill_budget": variant.spill_budget} | asdict(r)
    ok = r.spill_stores is not None and r.spill_bytes <= variant.spill_budget
    failure = None if ok else (f"{variant.label} sm_{arch}: spills {r.spill_stores}/{r.spill_loads} bytes "
                               f"(stores/loads) > budget {variant.spill_budget}")
    line = (f"{'ok  ' if ok else 'FAIL'} {variant.label:48s} sm_{arch} warps={r.num_warps} REG={r.registers} "
            f"STACK={r.stack} LOCAL={r.local} SHARED={r.shared}+{r.shared_dynamic} "
            f"spill={r.spill_stores}/{r.spill_loads} ({r.compile_s:.1f}s)")
    return row, failure, line


_JOBS: list = []  # (variant, arch) pairs, inherited by forked workers


def _compile_job(i: int):
    return _compile_row(*_JOBS[i])


def check_variants(variants, archs=ARCHS, *, jobs: int = 1, out=sys.stdout) -> tuple[list[dict], list[str]]:
    """Compile each variant for each arch (``jobs`` forked worker processes when > 1); returns
    (rows, failures), printing one line per compile."""
    global _JOBS
    _JOBS = [(v, arch) for v in variants for arch in archs]
    rows, failures = [], []
    if jobs > 1 and len(_JOBS) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.imap(_compile_job, range(len(_JOBS)))
            for row, failure, line in results:
                print(line, file=out, flush=True)
                rows += [row] if row is not None else []
                failures += [failure] if failure is not None else []
    else:
        for i in range(len(_JOBS)):
            row, failure, line = _compile_job(i)
            print(line, file=out, flush=True)
            rows += [row] if row is not None else []
            failures += [failure] if failure is not None else []
    return rows, failures


def main(argv=None) -> int:
    """Command line: compile the kernel modules' variants, print the resource table, exit 1 on a
    compile failure or a spill over budget."""
    os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported
    p = argparse.ArgumentParser(prog="python -m fastbert.backends.triton._aot",
                                description="Compile fastbert's Triton kernels ahead of time and gate on spills.")
    p.add_argument("--all", action="store_true", help="every kernel module's variants (default)")
    p.add_argument("--full", action="store_true", help="the full variant matrix, not just the highest-pressure ones")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    p.add_argument("--module", nargs="+", default=list(KERNEL_MODULES), help="kernel modules to compile")
    p.add_argument("--match", default=None, help="only variants whose label contains this string")
    p.add_argument("--json", default=None, help="write the per-kernel resource table here")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compile processes")
    a = p.parse_args(argv)
    import triton

    variants = collect_variants(a.full, a.module)
    if a.match:
        variants = [v for v in variants if a.match in v.label]
    print(f"triton {triton.__version__}: {len(variants)} variants x archs {a.arch}", flush=True)
    rows, failures = check_variants(variants, a.arch, jobs=a.jobs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "kernels": rows, "failures": failures}, f, indent=1)
    for msg in failures:
        print("FAIL:", msg)
    if not variants:
        print("FAIL: no variants to compile")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
