"""Render a :class:`~visattn.bench.runner.BenchResult`: a text table, a JSON document, a PNG plot."""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict
from typing import Optional

from ..console import render_table
from .problem import GRAD_TOLERANCE, TOLERANCE
from .runner import BenchResult, Row

__all__ = ["format_cells", "format_table", "format_zoo_table", "plot", "plot_zoo", "to_json", "zoo_to_json"]

COLUMNS = ("implementation", "correct (max err)", "median ms", "GFLOP/s", "% peak", "best visattn is",
           "peak extra MB", "notes")


def _correct_cell(row: Row) -> str:
    if not row.checked:
        return "n/a (not NA)"
    if row.correct is None:
        return "-" if row.status != "ok" else "unchecked"
    err = "inf" if row.max_err is None or not math.isfinite(row.max_err) else f"{row.max_err:.1e}"
    return f"{'yes' if row.correct else 'NO'} ({err})"


def _notes(row: Row) -> str:
    notes = []
    if row.status != "ok":
        notes.append(f"{row.status}: {row.reason}")
    if row.compile_s is not None:
        notes.append(f"compile {row.compile_s:.1f} s (not in median)")
    if row.setup_s >= 0.05:
        notes.append(f"setup {row.setup_s:.2f} s")
    if len(row.times_s) > 2:
        spread = (max(row.times_s) - min(row.times_s)) / (row.median_ms / 1e3)
        if spread > 0.5:
            notes.append(f"noisy: spread {spread:.0%}")
    if row.timed and len(row.times_s) < 3:
        notes.append(f"{len(row.times_s)} timed call{'s' if len(row.times_s) > 1 else ''}")
    return "; ".join(notes)


def _relative(ratio: float) -> str:
    """``row / best`` as "N.NNx faster" (the best visattn is faster) or "N.NNx slower"."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def format_cells(result: BenchResult) -> list[list[str]]:
    """One list of cell strings per row, in ``COLUMNS`` order."""
    best = result.best_visattn()
    cells = []
    for row in result.rows:
        if row.timed and best is not None:
            rel = "best" if row is best else _relative(row.median_ms / best.median_ms)
        else:
            rel = "-"
        cells.append([
            row.name,
            _correct_cell(row),
            f"{row.median_ms:.2f}" if row.timed else "-",
            f"{row.gflops:.1f}" if row.gflops is not None else "-",
            f"{row.pct_peak:.1f}%" if row.pct_peak is not None else "-",
            rel,
            f"{row.peak_extra_mb:.1f}" if row.peak_extra_mb is not None else "-",
            _notes(row),
        ])
    return cells


def format_table(result: BenchResult) -> str:
    """The human report: header (problem, machine, peak), the table, a speed-up summary, footnotes."""
    p, m = result.problem, result.machine
    dt = str(p.dtype).replace("torch.", "")
    lines = [
        f"problem: {p.describe()}",
        f"machine: {m.get('gpu', m['cpu'])}, {m['threads']} torch threads, torch {m['torch']}, "
        f"visattn {m.get('visattn', '?')}",
        f"measured matmul peak{'' if dt in ('float32', 'float64') else f' (best of {dt}, float32)'}: "
        f"{result.matmul_peak_gflops:.1f} GFLOP/s; useful work per call: "
        f"{p.flops / 1e9:.3f} GFLOP",
        "oracle: " + (f"reference backend in float64 ({result.oracle_s:.1f} s)" if not result.oracle_skipped
                      else f"skipped ({result.oracle_skipped})"),
        "",
    ]
    lines.append(render_table(COLUMNS, format_cells(result), right={2, 3, 4, 6}))
    best = result.best_visattn()
    if best is not None:
        others = [f"{name} {x:.2f}x" for name, x in best.speedup_vs.items()
                  if not name.startswith("visattn ")]
        if others:
            lines += ["", f"speed-up of {best.name} ({best.median_ms:.2f} ms) over: " + ", ".join(others)]
    lines += ["", *(textwrap.fill(f, 110, subsequent_indent="  ") for f in footnotes(result))]
    return "\n".join(lines)


def footnotes(result: BenchResult) -> list[str]:
    p = result.problem
    atol, rtol = TOLERANCE[p.dtype]
    tol = f"|err| <= {atol:g} + {rtol:g}*|oracle| for the output"
    if p.backward:
        ga, gr = GRAD_TOLERANCE[p.dtype]
        tol += f", {ga:g} + {gr:g}*|oracle| for dq, dk, dv"
    mode = "forward + backward (the backward counted as 2x the forward)" if p.backward else "forward"
    return [
        f"* correct: every element of the {'output and gradients' if p.backward else 'output'} vs the float64 "
        f"oracle, {tol}; max err is the largest absolute difference. Dense SDPA computes global attention "
        f"(every token sees every token), so it is shown for scale, not checked.",
        f"* median ms: wall clock of one {mode} call, median of the calls that fit a {result.budget_s:g} s budget "
        f"per implementation after warm-up, taken in 4 rounds that visit every implementation in turn (so all "
        f"see the same spells of machine load; each turn starts with an untimed call); one-off compilation and mask building are reported in notes "
        f"(Inductor's on-disk cache makes repeated compilations shorter). "
        f"Other processes share this machine: compare ratios within one run.",
        "* GFLOP/s: useful NA FLOPs (4 * tokens * prod(kernel) * head_dim * heads per forward, "
        "visattn.spec.na_flops) / median time, the same numerator for every row (dense SDPA does "
        "N / prod(kernel) times more arithmetic); % peak: of the measured matmul peak above.",
        "* best visattn is: this row's median / the fastest correct visattn backend's median.",
        "* peak extra MB: the peak of memory allocated during one call above what was live before it (inputs "
        "excluded; output, gradients and temporaries included): torch.profiler allocation events on CPU, "
        "torch.cuda.max_memory_allocated on CUDA. Memory allocated outside torch (e.g. the C kernels' per-thread "
        "scratch) is not seen.",
        "* visattn reference is the oracle (explicit neighbour gather, O(tokens * K * H * D) memory): it runs once "
        "in float64 to check the others and is not timed unless named in --only (then in the input dtype, "
        "refused past --max-gb).",
    ]


def _finite(x):
    """JSON has no inf/nan: map them to None (recursively)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def to_json(result: BenchResult) -> str:
    """Everything in the table, machine-readable; times in milliseconds."""
    best = result.best_visattn()
    rows = []
    for row in result.rows:
        d = asdict(row)
        d["times_ms"] = [t * 1e3 for t in d.pop("times_s")]
        rows.append(d)
    doc = dict(problem=result.problem.as_dict(), machine=result.machine,
               matmul_peak_gflops=result.matmul_peak_gflops, oracle_s=result.oracle_s,
               oracle_skipped=result.oracle_skipped, budget_s=result.budget_s,
               best_visattn=best.name if best else None, rows=rows, footnotes=footnotes(result))
    return json.dumps(_finite(doc), indent=2)


def plot(result: BenchResult, path: str, title: Optional[str] = None) -> None:
    """Horizontal bars of median ms (log scale), one per implementation; refusals are written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    colors = {"visattn": "#1f77b4", "peer": "#ff7f0e", "dense": "#7f7f7f"}
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 2.2))
    y = list(range(len(rows)))[::-1]
    timed = [r.median_ms for r in rows if r.timed]
    lo, hi = (min(timed), max(timed)) if timed else (1.0, 10.0)
    best = result.best_visattn()
    for yi, row in zip(y, rows, strict=True):
        if row.timed:
            wrong = row.correct is False
            ax.barh(yi, row.median_ms, color="#d62728" if wrong else colors.get(row.kind, "#333333"),
                    hatch="//" if wrong else None, edgecolor="black", linewidth=0.5)
            label = f" {_ms(row.median_ms)} ms"
            if best is not None and row is not best:
                label += f"  (best visattn is {_relative(row.median_ms / best.median_ms)})"
            if wrong:
                label += "  WRONG"
            if row.compile_s is not None:
                label += f"  (+{row.compile_s:.1f} s compile)"
            ax.text(row.median_ms, yi, label, va="center", fontsize=8)
        else:
            ax.text(lo / 1.8, yi, f"{row.status}: {textwrap.shorten(row.reason, 90)}", va="center",
                    fontsize=8, color="#555555", style="italic")
    ax.set_yticks(y)
    ax.set_yticklabels([r.name for r in rows])
    ax.set_xscale("log")
    ax.set_xlim(lo / 2, hi * 15)  # the right-hand room holds the bar labels
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("median ms per call (log scale; shorter is faster)")
    p = result.problem
    ax.set_title(title or textwrap.fill(f"{p.describe()}\n{result.machine.get('gpu', result.machine['cpu'])}, "
                                        f"{result.machine['threads']} threads; matmul peak "
                                        f"{result.matmul_peak_gflops:.0f} GFLOP/s", 110), fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colors["visattn"], label="visattn"), Patch(color=colors["peer"], label="peer (NA)"),
                       Patch(color=colors["dense"], label="dense global attention (not NA)"),
                       Patch(facecolor="#d62728", hatch="//", label="wrong vs oracle")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


ZOO_COLUMNS = ("module", "layout", "input", "params", "fwd GFLOP", "fwd ms", "fwd+bwd ms", "peak fwd MB",
               "peak fwd+bwd MB", "notes")


def format_zoo_table(rows: list, machine: dict) -> str:
    """The ``--zoo`` report: one line per registered module, failures included."""
    from .zoo import fmt_params, zoo_flops_note

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    cells = []
    for r in rows:
        kw = ", ".join(f"{k}={v}" for k, v in r.kwargs.items())
        notes = "; ".join(([f"failed: {r.reason}"] if r.status != "ok" else [kw]) + r.notes)
        cells.append([r.name, "mixer" if r.layout == "channels_last" else "plug-in",
                      "x".join(map(str, r.input_shape)) or "-", fmt_params(r.params), num(r.fwd_gflop, ".3f"),
                      num(r.fwd_ms, ".2f"), num(r.fwd_bwd_ms, ".2f"), num(r.peak_fwd_mb, ".1f"),
                      num(r.peak_fwd_bwd_mb, ".1f"), notes])
    lines = [f"machine: {machine.get('gpu', machine['cpu'])}, {machine['threads']} torch threads, "
             f"torch {machine['torch']}", ""]
    lines.append(render_table(ZOO_COLUMNS, cells, right={3, 4, 5, 6, 7, 8}))
    lines += ["", textwrap.fill("* " + zoo_flops_note(), 110, subsequent_indent="  "),
              textwrap.fill("* ms: median over a time budget after warm-up, in eval mode (dropout off, norms on "
                            "running statistics, so batch 1 works everywhere); forward under no_grad, "
                            "forward+backward computing the gradients of all parameters and the input. peak MB: memory "
                            "allocated during one call above what was live before it (see visattn bench's "
                            "footnote).", 110, subsequent_indent="  ")]
    return "\n".join(lines)


def zoo_to_json(rows: list, machine: dict) -> str:
    from .zoo import zoo_flops_note

    return json.dumps(_finite(dict(machine=machine, rows=[asdict(r) for r in rows], flops_note=zoo_flops_note())),
                      indent=2, default=str)


def plot_zoo(rows: list, path: str) -> None:
    """Grouped horizontal bars: forward and forward+backward ms per module (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 2))
    y = list(range(len(rows)))[::-1]
    for yi, r in zip(y, rows, strict=True):
        if r.status == "ok":
            ax.barh(yi + 0.2, r.fwd_ms, height=0.4, color="#1f77b4")
            ax.barh(yi - 0.2, r.fwd_bwd_ms, height=0.4, color="#ff7f0e")
            ax.text(r.fwd_bwd_ms, yi - 0.2, f" {r.fwd_bwd_ms:.3g}", va="center", fontsize=7)
            ax.text(r.fwd_ms, yi + 0.2, f" {r.fwd_ms:.3g}", va="center", fontsize=7)
        else:
            ax.text(0.0, yi, f"  failed: {textwrap.shorten(r.reason, 80)}", va="center", fontsize=8,
                    color="#555555", style="italic", transform=ax.get_yaxis_transform())
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r.name} ({'mixer' if r.layout == 'channels_last' else 'plug-in'})" for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("median ms (log scale)")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#1f77b4", label="forward"), Patch(color="#ff7f0e", label="forward + backward")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    times = [t for r in rows if r.status == "ok" for t in (r.fwd_ms, r.fwd_bwd_ms)]
    if times:
        ax.set_xlim(min(times) / 3, max(times) * 4)  # room on the left for short bars, on the right for labels
    ax.set_title("visattn bench --zoo: mixers at 1x56x56x96 (3 heads), plug-ins at 1x64x56x56", fontsize=9)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
