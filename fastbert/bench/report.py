"""Output of a benchmark run: the printed table, the JSON record and the PNG plots."""

from __future__ import annotations

import json
import os
from typing import Iterable


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
    (max abs error / tolerance) and the reason a row was not timed.
    """
    header = f"{'impl':<26} {'median':>10} {'IQR':>10} {'rate':>18} {'fastbert x':>10}  check"
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


def _panels(cases: list[dict]) -> dict:
    """``{(op, direction): {line label: [(x, rate)]}}`` over the timed results."""
    panels: dict = {}
    models = {c["params"].get("model") for c in cases}
    for c in cases:
        lines = panels.setdefault((c["op"], c["direction"]), {})
        for r in c["results"]:
            if r["status"] != "ok" or r["rate"] is None:
                continue
            label = r["impl"] + (f" ({c['params'].get('model')})" if len(models) > 1 else "")
            lines.setdefault(label, []).append((c["x"], r["rate"], c["x_name"], r["rate_unit"]))
    return {k: v for k, v in panels.items() if v}


def write_plots(out_dir: str, cases: list[dict], title: str, combined: bool) -> list[str]:
    """PNG plots of rate vs size: one file per op (a panel per direction), or one file in all.

    Returns the written paths ([] when matplotlib is missing or nothing was timed).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    panels = _panels(cases)
    if not panels:
        return []
    groups: dict = {}
    for key in panels:
        groups.setdefault("bench" if combined else key[0], []).append(key)
    written = []
    for name, keys in groups.items():
        cols = min(2, len(keys))
        rows = (len(keys) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            for label, pts in sorted(panels[key].items()):
                pts = sorted(pts)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            x_name, unit = next(iter(panels[key].values()))[0][2:]
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_name)
            ax.set_ylabel(unit)
            ax.set_title(f"{key[0]} {key[1]}")
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
    return written
