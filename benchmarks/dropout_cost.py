"""What dropout costs: the shared Philox keep masks on the torch backend, a training step with
dropout 0.1 vs 0, and the integer instructions the GPU kernels spend on dropout (SASS counts).

    python benchmarks/dropout_cost.py masks [--old PATH/_philox.py] [--threads 1,2] [--quick]
    python benchmarks/dropout_cost.py step [--layers 12] [--threads 2] [--rounds 7] [--warmup 2] [--quick]
                                           [--clock wall|cpu] [--default-malloc] [--json OUT]
    python benchmarks/dropout_cost.py sass [--cuda-module fastbert/_C*.so] [--cuda-src TREE [--cuda-kernels fwd,bwd]
                                           [--cuda-arch sm_90a]] [--skip-triton] [--json OUT]

``masks`` times ``attention_keep_mask`` (8x12x128x128, padded and varlen at ~50% fill) and
``rows_keep_mask`` (1024x768) of this tree with the compiled generator (``fastbert._C_cpu``) and
with the torch-op generator, and of another version of the module when ``--old`` names its file,
in interleaved rounds (median, min-max). ``step``: fastbert's BertModel (BERT-base shape,
unpadded, torch backend), batch 8 x 128 at ~50% fill, forward + backward + AdamW, dropout 0.1
(compiled masks), dropout 0.1 with the torch-op masks, and 0.0: a paired measurement. One model,
optimizer and batch serve every side (only the modules' ``dropout_p`` and the mask generator
switch); each round runs one step of each side, in an order rotated every round, after
``--warmup`` untimed steps per side; before every step torch's RNG is reseeded and the keep-mask
memo emptied, so every dropout side draws the same masks and generates them itself. The ratio is
taken per round (the rounds' shared load cancels) and reported as median [q25, q75] (min-max) of
the per-round ratios (``--clock cpu``: the process's CPU time, which other jobs do not inflate,
for ``--threads 1`` on a loaded machine); glibc's malloc keeps freed memory
(:func:`fastbert.bench.timing.steady_malloc`) unless ``--default-malloc``.
``--quick``: a smoke run (3 rounds; step: 2 layers, 1 warm-up).
``sass``: compiles the Triton attention forward for sm_90 with and without dropout and counts
integer SASS instructions with ``cuobjdump -sass`` (the difference is dropout's cost; divided by
the elements each thread owns per key block it is the integer instructions per element); with
``--cuda-module`` it does the same for the CUDA forward kernels of a built ``fastbert._C``
(dropout is a runtime flag there: both paths in one count), and with ``--cuda-src TREE`` it
compiles TREE/csrc/attention_fwd.cu (``--cuda-kernels bwd``: attention_bwd.cu, the dQ and dK/dV
kernels; nvcc, ``--cuda-arch``, default sm_90a) with and without dropout, whose difference is
dropout's integer instructions per kernel (the same tile in both trees: their ratio is per element;
for the backward also per element of a thread's tile, and the Philox calls per element).
``--skip-triton``: only the CUDA counts.
Run ``sass`` from two trees (this one and the previous version) to get the before/after ratio.
Wall clock (``step --clock cpu``: CPU time); check ``uptime`` first and report the load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time


def _stats(ts):
    return f"{1e3 * statistics.median(ts):8.1f} ms [{1e3 * min(ts):.1f}-{1e3 * max(ts):.1f}]"


def masks(args):
    import torch

    from fastbert.backends import _philox

    from fastbert.bench.core import variable_lengths

    _philox.MASK_CACHE_BYTES = 0  # time the generation, not the memoized lookup

    def generator(mod, compiled):
        def use():
            mod.USE_COMPILED = compiled
            return mod
        return use

    mods = {"torch ops": generator(_philox, False)}
    if not isinstance(_philox.compiled_generator(), str):
        mods["compiled"] = generator(_philox, True)
    else:
        print(f"compiled generator unavailable: {_philox.compiled_generator()}")
    if args.old:
        spec = importlib.util.spec_from_file_location("philox_old", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        old.MASK_CACHE_BYTES = 0
        mods = {"old": lambda: old, **mods}
    seed = torch.tensor([12345, 678910])
    lengths = variable_lengths(8, 128, 0.5, 0)
    cases = {"attention 8x12x128x128": lambda m: m.attention_keep_mask(seed, 0.1, 8, 12, 128, 128),
             "attention varlen 8x12x128 fill 0.5": lambda m: m.attention_keep_mask(seed, 0.1, 8, 12, 128, 128,
                                                                                    lengths=lengths),
             "LN rows 1024x768": lambda m: m.rows_keep_mask(seed, 0.1, 1024, 768)}
    rounds = 3 if args.quick else args.rounds
    print(f"load {os.getloadavg()}, {rounds} interleaved rounds, median [min-max]")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, fn in cases.items():
            times = {k: [] for k in mods}
            for use in mods.values():
                fn(use())
            for _ in range(rounds):
                for k, use in mods.items():
                    m = use()
                    t0 = time.perf_counter()
                    fn(m)
                    times[k].append(time.perf_counter() - t0)
            print(f"threads={threads} {name}: " + "; ".join(f"{k} {_stats(v)}" for k, v in times.items()), flush=True)


def _set_dropout(model, p: float) -> None:
    """Every fastbert module's dropout probability (``dropout_p``) in ``model`` set to ``p``; the
    model holds no ``nn.Dropout`` (its ``p`` would not follow)."""
    import torch

    for m in model.modules():
        assert not isinstance(m, torch.nn.Dropout), f"an nn.Dropout in the model: {m}"
        if hasattr(m, "dropout_p"):
            m.dropout_p = p


def step(args):
    import torch

    from fastbert.backends import _philox
    from fastbert.bench.core import padding_mask, variable_lengths
    from fastbert.bench.mlm import same_draws
    from fastbert.bench.timing import TimingPlan, malloc_note, measure_interleaved, ratio_stats, steady_malloc
    from fastbert.models import BertConfig, BertModel, unpad_metadata

    malloc = steady_malloc(False)  # what main() set (it cannot be undone: only the command line sets it)
    torch.set_num_threads(args.threads)
    layers, rounds, warmup = (2, 3, 1) if args.quick else (args.layers, args.rounds, args.warmup)
    batch, seqlen = 8, 128
    lengths = variable_lengths(batch, seqlen, 0.5, 0)
    mask = padding_mask(lengths, seqlen, "cpu").long()
    ids = torch.randint(1, 30522, (batch, seqlen), generator=torch.Generator().manual_seed(0)) * mask
    target = torch.randn(batch, seqlen, 768, generator=torch.Generator().manual_seed(1)) * mask[..., None]
    meta = unpad_metadata(mask)
    # One model, one optimizer, one batch for every side: only dropout's p and the mask generator change.
    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=layers, hidden_dropout_prob=0.1,
                                 attention_probs_dropout_prob=0.1), backend=args.backend).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sides = [("dropout 0.1", 0.1, True), ("dropout 0.0", 0.0, True)]
    if not isinstance(_philox.compiled_generator(), str):  # the torch-op generator: the compiled one's gain
        sides.insert(1, ("dropout 0.1 torch-op masks", 0.1, False))
    else:
        print(f"compiled generator unavailable: {_philox.compiled_generator()}")
    same = same_draws(0)

    def setup(i):
        _set_dropout(model, sides[i][1])
        _philox.USE_COMPILED = sides[i][2]
        same()

    def run():
        opt.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask, indices=meta[0], cu_seqlens=meta[1],
                    max_seqlen=meta[2]).last_hidden_state
        (out * target).sum().backward()
        opt.step()

    plan = TimingPlan(warmup=warmup, min_reps=rounds, max_reps=rounds, min_time_s=0.0, clock=args.clock)
    load_before = os.getloadavg()
    stats = dict(zip([s[0] for s in sides], measure_interleaved([run] * len(sides), "cpu", plan, setup=setup)))
    load_after = os.getloadavg()
    print(f"BERT-base-shaped step ({layers} layers), 8x128 fill {sum(lengths) / (batch * seqlen):.2f}, "
          f"threads={args.threads}, backend={args.backend}, {args.clock} clock, {warmup} warm-up + {rounds} "
          f"interleaved rounds, "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}, malloc: {malloc_note(malloc)}")
    res = dict(benchmark="dropout on/off BertModel training step", layers=layers, threads=args.threads,
               backend=args.backend, clock=args.clock, rounds=rounds, warmup=warmup, malloc=malloc, loadavg_before=load_before,
               loadavg_after=load_after, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), sides={},
               ratios={})
    for k, st in stats.items():
        faults = f", minor page faults per step median {statistics.median(st.faults):g}" if st.faults else ""
        print(f"  {k}: {_quartiles(st, 1e3, 'ms')}{faults}")
        res["sides"][k] = dict(median_s=st.median, q25_s=st.quantile(0.25), q75_s=st.quantile(0.75),
                               samples_s=st.samples, faults=st.faults)
    for k in [k for k in stats if k != "dropout 0.0"]:
        r = ratio_stats(stats[k], stats["dropout 0.0"])
        print(f"  ratio {k} / dropout 0.0 per round: {_quartiles(r, 1, 'x', 3)} (goal <= 1.10)")
        res["ratios"][f"{k} / dropout 0.0"] = dict(median=r.median, q25=r.quantile(0.25), q75=r.quantile(0.75),
                                                  per_round=r.samples)
    # Mask generation inside the dropout step (time spent in the generators: cache misses), on the
    # selected clock.
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    spent = []
    for name in ("_attention_keep_mask", "_varlen_keep_mask", "_rows_keep_mask"):
        fn = getattr(_philox, name)

        def timed(*a, _fn=fn, **k):
            t0 = clock()
            try:
                return _fn(*a, **k)
            finally:
                spent.append(clock() - t0)
        setattr(_philox, name, timed)
    setup(0)
    t0 = clock()
    run()
    total = clock() - t0
    print(f"  one more dropout-0.1 step: {1e3 * total:.1f} ms, of which mask generation {1e3 * sum(spent):.1f} ms "
          f"({len(spent)} masks, {100 * sum(spent) / total:.1f}%)")
    res["mask_generation"] = dict(step_s=total, masks_s=sum(spent), masks=len(spent))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


def _quartiles(st, scale: float, unit: str, digits: int = 1) -> str:
    """``median unit [q25, q75] (min-max)`` of a :class:`~fastbert.bench.timing.Stats`."""
    f = f"{{:.{digits}f}}"
    q = [f.format(scale * v) for v in (st.median, st.quantile(0.25), st.quantile(0.75), min(st.samples),
                                       max(st.samples))]
    return f"{q[0]} {unit} [{q[1]}, {q[2]}] (min-max {q[3]}-{q[4]})"


# Integer-pipe SASS opcodes (address and loop arithmetic included; they are the same with and
# without dropout apart from what dropout adds).
_INT_OPS = ("IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "IMNMX", "LEA", "SEL", "PRMT",
            "IABS", "POPC", "FLO", "BFE", "BFI", "XMAD", "IMUL", "IMNMX", "VIADD", "VIMNMX", "ISCADD", "LEA.HI")


def _count_int(sass: str) -> dict:
    """Integer SASS instructions by opcode (IMAD split by its .HI / .WIDE forms: the multiplies
    of the Philox rounds)."""
    counts = {}
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)((?:\.[A-Z0-9]+)*)", line)
        if m and m.group(1) in _INT_OPS:
            op = m.group(1)
            if op == "IMAD" and (".HI" in m.group(2) or ".WIDE" in m.group(2)):
                op += ".HI" if ".HI" in m.group(2) else ".WIDE"
            counts[op] = counts.get(op, 0) + 1
    return counts


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def _kernel_sass(cubin: bytes) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def _triton_counts() -> dict:
    """Dropout's integer SASS in the Triton attention forward (fp16, head_dim 64, sm_90)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    from fastbert.backends.triton import attention as ta
    from fastbert.backends.triton._aot import compile_kernel

    from fastbert.backends.triton._aot import split_launch

    out = {}
    (kernel, kw), = [(k, kw) for kind, k, kw in ta.aot_launches(torch.float16, 64, varlen=False, allow_tf32=False)
                     if kind == "fwd"]
    sig, consts, warps, stages = split_launch(kernel, kw)
    elems_per_thread = consts["BLOCK_M"] * consts["BLOCK_N"] / (32 * warps)  # per key block
    out["triton fwd tile"] = dict(BLOCK_M=consts["BLOCK_M"], BLOCK_N=consts["BLOCK_N"], num_warps=warps)
    for dropout in (False, True):
        res = compile_kernel(kernel, sig, consts | {"HAS_DROPOUT": dropout}, num_warps=warps, num_stages=stages,
                             arch=90)
        counts = _count_int(_kernel_sass(res.compiled.asm["cubin"]))
        out[f"triton fwd dropout={dropout}"] = dict(int_instructions=sum(counts.values()), by_op=counts)
    added = out["triton fwd dropout=True"]["int_instructions"] - out["triton fwd dropout=False"]["int_instructions"]
    out["triton dropout int instructions per element"] = added / elems_per_thread
    return out


def sass(args):
    out = {} if args.skip_triton else _triton_counts()
    if args.cuda_module:
        text = subprocess.run([_cuobjdump(), "-sass", "-arch", "sm_90a", args.cuda_module], capture_output=True,
                              text=True, check=True).stdout
        for fn in re.split(r"\n\s*Function : ", text)[1:]:
            name = fn.split("\n", 1)[0].strip()
            if "attention_fwd_kernel" in name:  # dropout is a runtime flag: both paths are in the count
                counts = _count_int(fn)
                out[f"cuda sm_90a {name}"] = dict(int_instructions=sum(counts.values()), by_op=counts)
    if args.cuda_src:
        for kind in args.cuda_kernels.split(","):
            out.update(_cuda_src_counts(args.cuda_src, args.nvcc, kind, args.cuda_arch))
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


# The CUDA attention kernels whose dropout the ``--cuda-src`` counts cover: source file, the line
# that switches dropout on (replaced by ``= false`` so the compiler drops its code; in the backward
# it opens both kernels), and the kernel names.
_CUDA_SRC = {"fwd": ("attention_fwd.cu", ("attention_fwd_kernel",)),
             "bwd": ("attention_bwd.cu", ("attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel"))}
_DROPOUT_ON = "const bool dropout = p.seed != nullptr;"


def _bwd_elements_per_thread(name: str) -> int | None:
    """Score elements a thread of a backward kernel owns per walked tile (16 rows x kBlockN per
    warp over 32 lanes), from the instantiation's ``<T, DP, ...>``; mirrors ``BwdConfig::kBlockN``
    in csrc/attention_bwd.cu (tensor cores: 64 at DP <= 64, else 32; fp32: 32)."""
    m = re.search(r"_kernel<(\w+), (\d+)", name)
    if not m:
        return None
    block_n = 32 if m.group(1) == "float" else (64 if int(m.group(2)) <= 64 else 32)
    return block_n * 16 // 32


# The Philox round multipliers (M0, M1) as SASS immediates: 2 per round, 20 per call.
_PHILOX_MULTIPLIERS = re.compile(r"0xd2511f53|0xcd9e8d57", re.I)


def _src_kernels(cubin: str, names) -> dict:
    """(integer SASS instructions, instructions multiplying by a Philox constant) of each
    instantiation of the kernels ``names`` in a cubin, by demangled template name."""
    text = subprocess.run([_cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    out = {}
    for fn in re.split(r"\n\s*Function : ", text)[1:]:
        name = fn.split("\n", 1)[0].strip()
        if any(n in name for n in names):
            demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
            m = re.search(r"attention_\w+_kernel<[^>]*>", demangled)
            out[m.group(0) if m else name] = (sum(_count_int(fn).values()), len(_PHILOX_MULTIPLIERS.findall(fn)))
    return out


def _cuda_src_counts(root: str, nvcc: str, kind: str = "fwd", arch: str = "sm_90a") -> dict:
    """Dropout's integer SASS in the CUDA attention kernels (``kind`` fwd: the forward; bwd: dQ and
    dK/dV) of the csrc/ tree under ``root``: compiles the kernel file for ``arch`` as it is and
    with dropout switched off (``const bool dropout = false``, so the compiler drops its code), per
    instantiation; the difference is dropout's. Both compiles share the tile, so a ratio of two
    trees' differences is per element; for the backward the difference is also divided by the
    elements a thread owns per walked tile (static counts: the tile loop is not unrolled, so its
    body's dropout code runs once per tile). The difference also holds what switching dropout off
    changes elsewhere (register allocation, scheduling: noisy for kernels at their register cap);
    ``philox_multiplies`` (instructions multiplying by a round constant, 20 per call) counts the
    calls themselves: ``philox_calls_per_element`` = multiplies / 20 / elements per thread."""
    import shutil
    import tempfile

    file, names = _CUDA_SRC[kind]
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dropout in (True, False):
            src = os.path.join(tmp, f"csrc{int(dropout)}")
            shutil.copytree(os.path.join(root, "csrc"), src)
            path = os.path.join(src, file)
            text = open(path).read()
            if not dropout:
                assert _DROPOUT_ON in text, f"{file}: the dropout switch moved"
                open(path, "w").write(text.replace(_DROPOUT_ON, "const bool dropout = false;"))
            cubin = os.path.join(tmp, f"{kind}{int(dropout)}.cubin")
            subprocess.run([nvcc, "-std=c++17", "-O3", "-cubin", f"-arch={arch}", "-I", src, path, "-o", cubin],
                           check=True)
            res[dropout] = _src_kernels(cubin, names)
    out = {}
    for k, (v, mults) in res[True].items():
        off = res[False][k][0]
        entry = dict(int_instructions=v, without_dropout=off, dropout_int_instructions=v - off,
                     philox_multiplies=mults)
        per_thread = _bwd_elements_per_thread(k) if kind == "bwd" else None
        if per_thread:
            entry["elements_per_thread_per_tile"] = per_thread
            entry["dropout_int_instructions_per_element"] = round((v - off) / per_thread, 2)
            entry["philox_calls_per_element"] = round(mults / 20 / per_thread, 3)
        out[f"cuda src {arch} {k}"] = entry
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("masks")
    m.add_argument("--old")
    m.add_argument("--threads", default="1,2")
    m.add_argument("--rounds", type=int, default=7)
    m.add_argument("--quick", action="store_true")
    s = sub.add_parser("step")
    s.add_argument("--layers", type=int, default=12)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--rounds", type=int, default=7)
    s.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    s.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time (with --threads 1 on a loaded machine)")
    s.add_argument("--backend", default="torch")
    s.add_argument("--quick", action="store_true")
    s.add_argument("--default-malloc", action="store_true", help="leave glibc's mmap / trim thresholds alone")
    s.add_argument("--json", help="write the result here")
    a = sub.add_parser("sass")
    a.add_argument("--cuda-module")
    a.add_argument("--json")
    a.add_argument("--cuda-src", help="a tree whose csrc/attention_{fwd,bwd}.cu to compile with and without dropout")
    a.add_argument("--cuda-kernels", default="fwd", help="with --cuda-src: fwd, bwd or fwd,bwd")
    a.add_argument("--cuda-arch", default="sm_90a", help="with --cuda-src: the arch to compile for")
    a.add_argument("--skip-triton", action="store_true", help="only the CUDA counts")
    a.add_argument("--nvcc", default="nvcc")
    args = parser.parse_args()
    if args.cmd == "step":
        from fastbert.bench.timing import steady_malloc

        steady_malloc(not args.default_malloc)  # process-wide and for good: here, not in step()
    {"masks": masks, "step": step, "sass": sass}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
