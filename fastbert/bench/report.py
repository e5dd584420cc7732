"""Output of a benchmark run: the printed table, the JSON record and the PNG plots."""

from __future__ import annotations

import json
import os
import zlib
from typing import Iterable

CHECK_LEGEND = ("check = ok|FAIL error/tolerance: max abs error against the fp64 reference (fp32 on a "
                "GPU) / its tolerance, max(2x (encoder 3x) PyTorch's own error in this dtype, a floor "
                "of a few eps x the magnitude), per output tensor (the rule of tests/_tolerance.py); "
                "a competitor's FAIL is reported, only fastbert's sets the exit status")


def fmt_time(s: float | None) -> str:
    """Seconds as us / ms / s with 3-4 significant digits; "-" for None."""
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def fmt_rate(value: float | None, unit: str | None) -> str:
    """A rate in its unit (tokens/s with thousands separators); "-" for None."""
    if value is None:
        return "-"
    if unit == "tokens/s":
        return f"{value:,.0f} tok/s"
    return f"{value:.3g} {unit}"


def table_lines(cases: Iterable[dict]) -> list[str]:
    """The human-readable table: one block per case, one row per implementation.

    Columns: median time, IQR (the spread), rate, fastbert's speedup over the row (the row's
    median over the default fastbert row's median, measured in the same run), the reference check
    (max abs error / tolerance, :data:`CHECK_LEGEND`) and the reason a row was not timed.
    """
    header = f"{'impl':<26} {'median':>10} {'IQR':>10} {'rate':>18} {'fastbert x':>10}  check err/tol"
    lines = []
    for case in cases:
        lines.append("")
        lines.append(f"== {case['op']} {case['direction']} | {case['label']} | {case['dtype']} | "
                     f"{case['work']['unit']} = {case['work']['formula']}")
        lines.append(header)
        for r in case["results"]:
            if r["status"] != "ok":
                lines.append(f"{r['impl']:<26} {r['status']}: {r['note']}")
                continue
            sp = r.get("fastbert_speedup")
            speed = "(base)" if r.get("default") else (f"{sp:.2f}x" if sp else "-")
            chk = r.get("check") or {}
            if chk.get("max_abs_err") is None:
                ctext = "not checked" if not chk else f"FAIL {chk.get('error', '')}"
            else:
                ctext = f"{'ok' if chk['ok'] else 'FAIL'} {chk['max_abs_err']:.1e}/{chk['tol']:.1e}"
            extra = ""
            if r.get("info"):
                extra = "  " + " ".join(f"{k}={v}" for k, v in r["info"].items())
            lines.append(f"{r['impl']:<26} {fmt_time(r['median_s']):>10} {fmt_time(r['iqr_s']):>10} "
                         f"{fmt_rate(r['rate'], r['rate_unit']):>18} {speed:>10}  {ctext}{extra}")
        for note in case.get("notes", []):
            lines.append(f"   note: {note}")
    return lines


def write_json(path: str, record: dict) -> None:
    """Write atomically (the runner rewrites the file after every case)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# A fixed colour and marker per implementation, so that a line looks the same in every plot and
# run; fastbert's rows are solid, the competitors' dashed (Hugging Face) or dotted (PyTorch).
_STYLES = {
    "fastbert[triton]": ("tab:red", "o"), "fastbert[cuda]": ("tab:purple", "s"),
    "fastbert[torch]": ("tab:orange", "D"), "fastbert[reference]": ("tab:brown", "v"),
    "fastbert-padded[triton]": ("salmon", "o"), "fastbert-padded[cuda]": ("plum", "s"),
    "fastbert-padded[torch]": ("gold", "D"), "fastbert+graph[triton]": ("darkred", "P"),
    "fastbert+graph[cuda]": ("indigo", "P"), "fastbert+graph[torch]": ("darkorange", "P"),
    "torch-eager": ("tab:gray", "^"), "torch-sdpa": ("tab:blue", "<"), "torch-compile": ("tab:cyan", ">"),
    "flash-attn": ("tab:green", "*"), "xformers": ("tab:olive", "X"),
    "hf-eager": ("tab:gray", "^"), "hf-sdpa": ("tab:blue", "<"), "hf-sdpa+graph": ("navy", "P"),
    "hf-sdpa+compile": ("tab:cyan", ">"),
}
_FALLBACK = ("tab:pink", "teal", "slategray", "darkgoldenrod", "crimson", "lime")
_MARKERS = "ovs^D<>P*Xh"


def style(impl: str) -> dict:
    """matplotlib line style of an implementation: colour, marker, linestyle (fixed per name)."""
    colour, marker = _STYLES.get(impl) or (_FALLBACK[zlib.crc32(impl.encode()) % len(_FALLBACK)],
                                           _MARKERS[zlib.crc32(impl.encode()) % len(_MARKERS)])
    linestyle = "-" if impl.startswith("fastbert") else "--" if impl.startswith("hf-") else ":"
    return {"color": colour, "marker": marker, "linestyle": linestyle}


def _panels(cases: list[dict]) -> dict:
    """``{(op, direction): {(impl, model): [point]}}`` over the timed results; a point is
    ``(x, tick, rate, rate at q75 time, rate at q25 time, x_name, unit)``."""
    panels: dict = {}
    for c in cases:
        lines = panels.setdefault((c["op"], c["direction"]), {})
        for r in c["results"]:
            if r["status"] != "ok" or r["rate"] is None:
                continue
            per_s = r["rate"] * r["median_s"]  # rate = per_s / seconds
            lines.setdefault((r["impl"], c["params"].get("model")), []).append(
                (c["x"], c.get("x_tick") or "", r["rate"], per_s / r["q75_s"], per_s / r["q25_s"],
                 c["x_name"], r["rate_unit"]))
    return {k: v for k, v in panels.items() if v}


def panel_title(key: tuple, cases: list[dict]) -> str:
    """``"<op> <direction>"``, plus the hidden size when the cases have one (GELU, LayerNorm: the
    x axis is rows, so the plot would not say the width otherwise): ``"gelu fwd, hidden 3072"``,
    ``"layer_norm bwd, hidden 768 / 1024"`` over several models."""
    hidden = sorted({c["params"]["hidden"] for c in cases
                     if (c["op"], c["direction"]) == key and c["params"].get("hidden") is not None})
    return f"{key[0]} {key[1]}" + (f", hidden {' / '.join(map(str, hidden))}" if hidden else "")


def write_plots(out_dir: str, cases: list[dict], title: str, combined: bool) -> tuple[list[str], str]:
    """PNG plots of rate vs size: one file per op (a panel per direction), or one file in all.

    Each implementation keeps its :func:`style` in every panel; error bars span the rates at the
    samples' quartiles (q25..q75 of the per-call times); the x axis is labelled with what changes
    (rows, or batch x seqlen at each point). Returns ``(written paths, why none)``: no paths when
    matplotlib is missing or nothing was timed, with the reason.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return [], (f"matplotlib is not importable ({type(exc).__name__}); pip install matplotlib, "
                    "or pip install 'fastbert[demo]'")
    panels = _panels(cases)
    if not panels:
        return [], "nothing was timed"
    models = {model for lines in panels.values() for _, model in lines}
    groups: dict = {}
    for key in panels:
        groups.setdefault("bench" if combined else key[0], []).append(key)
    written = []
    for name, keys in groups.items():
        cols = min(2, len(keys))
        rows = (len(keys) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.4 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            ticks: dict = {}
            for (impl, model), pts in sorted(panels[key].items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
                pts = sorted(pts)
                st = style(impl)
                if len(models) > 1:  # one marker per model shape, the colour stays the impl's
                    st["marker"] = _MARKERS[sorted(models, key=str).index(model) % len(_MARKERS)]
                xs, ys = [p[0] for p in pts], [p[2] for p in pts]
                err = [[y - p[3] for y, p in zip(ys, pts)], [p[4] - y for y, p in zip(ys, pts)]]
                ax.errorbar(xs, ys, yerr=err, capsize=3, markersize=5, linewidth=1.3, alpha=0.85,
                            label=impl + (f" ({model})" if len(models) > 1 else ""), **st)
                ticks.update({p[0]: p[1] for p in pts if p[1]})
            x_name, unit = next(iter(panels[key].values()))[0][5:]
            ax.set_xscale("log", base=2)
            if ticks:  # batch and seqlen both change: label each point with both
                ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
                ax.minorticks_off()
            ax.set_xlabel(x_name)
            ax.set_ylabel(f"{unit} (median; bars: IQR of the samples)")
            ax.set_title(panel_title(key, cases))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written, ""
