"""Figures of the side-by-side suite: comparison statistics, the markdown table, the chart.

Statistics come from `sdrt.runtime.bench.summarize`, so `sdrt bench` and this suite
compute medians and percentiles the same way. A ratio is "other / sdrt" (above 1:
sdrt is faster), taken run by run: run i of sdrt is paired with run i of the other
framework (alternation puts both in the same stretch of machine noise), each pair
gives a ratio of the run's figure (its median for per-step figures), and the report
gives the median of those ratios with their min-max as the spread.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sdrt.runtime.bench import FIGURES, summarize

# Per-generation figures, summed into one bar of the chart (label, how to get seconds).
CHART_PARTS = (
    ("text encoder", "text_encoder"),
    ("U-Net (all steps)", "unet_step"),
    ("host work (all steps)", "host_step"),
    ("VAE decoder", "vae_decoder"),
    ("other", "other"),
)
FRAMEWORK_LABELS = {"sdrt": "sdrt (ONNX Runtime)", "diffusers": "diffusers (PyTorch)",
                    "openvino": "OpenVINO f32 (engines only)",
                    "openvino_bf16": "OpenVINO default bf16 (engines only)"}


def per_run(runs: Sequence[dict[str, list[float]]], figure: str) -> list[float]:
    """One value per run: the run's median for per-step figures, its value otherwise."""
    return [float(np.median(r[figure])) for r in runs if r.get(figure)]


def pooled(runs: Sequence[dict[str, list[float]]], figure: str) -> list[float]:
    return [v for r in runs for v in r.get(figure, [])]


def compare(runs: dict[str, list[dict[str, list[float]]]], figures: Sequence[str] | None = None) -> dict[str, Any]:
    """Per figure: each framework's summary, and each other framework's ratio to sdrt."""
    out: dict[str, Any] = {}
    names = list(figures or (list(FIGURES) + ["engines_total"]))
    for figure in names:
        entry: dict[str, Any] = {}
        for fw, fw_runs in runs.items():
            samples = pooled(fw_runs, figure)
            if samples:
                entry[fw] = summarize(samples)
        base = runs.get("sdrt", [])
        for fw, fw_runs in runs.items():
            if fw == "sdrt" or fw not in entry or "sdrt" not in entry or entry["sdrt"]["median_ms"] <= 0:
                continue
            paired = [o / s for s, o in zip(per_run(base, figure), per_run(fw_runs, figure)) if s > 0]
            if not paired:
                continue
            entry[f"{fw}/sdrt"] = {"ratio": float(np.median(paired)), "paired_min": min(paired),
                                   "paired_max": max(paired), "pairs": len(paired)}
        if entry:
            out[figure] = entry
    return out


def generation_parts(runs: list[dict[str, list[float]]], steps: int) -> dict[str, float]:
    """Median seconds per generation of each chart part (per-step figures x steps)."""
    parts = {}
    for label, figure in CHART_PARTS:
        samples = pooled(runs, figure)
        if samples:
            scale = steps if figure in ("unet_step", "host_step") else 1
            parts[label] = max(float(np.median(samples)) * scale, 0.0)
    return parts


# ---------------------------------------------------------------------------------
# Markdown


def _ms(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "-"
    m = summary["median_ms"]
    digits = 3 if m < 1 else 2 if m < 100 else 0
    return f"{m:.{digits}f} ({summary['p10_ms']:.{digits}f}-{summary['p90_ms']:.{digits}f})"


def _ratio(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    return f"{r['ratio']:.2f}x ({r['paired_min']:.2f}-{r['paired_max']:.2f})"


def case_table(case: dict[str, Any]) -> str:
    cmp, fws = case["comparison"], case["frameworks"]
    others = [f for f in fws if f != "sdrt"]
    head = ["figure (ms)"] + [f"{fw} median (p10-p90)" for fw in fws] + [f"{o}/sdrt (paired min-max)" for o in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for figure, entry in cmp.items():
        row = [figure] + [_ms(entry.get(fw)) for fw in fws] + [_ratio(entry.get(f"{o}/sdrt")) for o in others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [f"# sdrt side by side ({report['created']})", "",
           f"Machine: {m['cpu']}, {m['usable_cpus']} CPUs, {m['ram_bytes'] / 2**30:.0f} GiB RAM, "
           f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average'] or [])}. "
           f"Threads per framework: {report['settings']['threads']}.", "",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v), ""]
    for name, case in report["cases"].items():
        out.append(f"## {name}: {case.get('title', '')}")
        out.append("")
        if "skipped" in case:
            out += [f"Skipped: {case['skipped']}", ""]
            continue
        if "comparison" in case:
            s = case["settings"]
            out.append(f"{s['width']}x{s['height']}, {s['steps']} steps, scheduler {s['scheduler']}, "
                       f"{s['runs']} alternating runs after {s['warmup']} warm-up; ratios above 1 mean sdrt is faster.")
            out.append("")
            out.append(case_table(case))
            out.append("")
            mem = ", ".join(f"{fw} {w['peak_rss_bytes'] / 2**20:.0f} MiB" for fw, w in case["workers"].items())
            out.append(f"Peak RSS per process: {mem}.")
            if "image_difference" in case:
                d = case["image_difference"]
                out.append(f"sdrt vs diffusers image (same latents): max |diff| {d['max_abs']:.2e}, "
                           f"mean |diff| {d['mean_abs']:.2e} (pixels in [0, 1]).")
            for fw, q in case.get("image_quality", {}).items():
                out.append(f"{fw} vs sdrt image (same latents): max |diff| {q['max_abs']:.2e}, "
                           f"PSNR {q['psnr_db']:.1f} dB.")
            out.append("")
        if "import" in case:
            imp = case["import"]
            out += [f"`import sdrt.runtime` in a fresh interpreter: median {imp['median_s'] * 1e3:.0f} ms "
                    f"(min {imp['min_s'] * 1e3:.0f}, max {imp['max_s'] * 1e3:.0f}, {imp['repeats']} processes); "
                    f"heavy modules it imported: {', '.join(imp['heavy_modules']) or 'none'}.", ""]
        for model, cold in case.get("cold_start", {}).items():
            out += [f"Cold start, {model} model ({cold.get('steps', '?')} steps to the first image):", "",
                    cold_table(cold), ""]
    if "goals" in report:
        out += ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
        out += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'NO'} |" for g in report["goals"]]
        out.append("")
    return "\n".join(out)


def cold_table(cold: dict[str, Any]) -> str:
    lines = ["| cold start | new process to ready (s) | to first image (s) | breakdown |", "|---|---|---|---|"]
    for label, r in cold.items():
        if not isinstance(r, dict) or "ready_s" not in r:
            continue
        brk = ", ".join(f"{k} {v:.2f}" for k, v in r.get("breakdown", {}).items() if isinstance(v, (int, float)))
        lines.append(f"| {label} | {r['ready_s']:.2f} | {r['first_image_s']:.2f} | {brk} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------
# Chart


def chart(report: dict[str, Any], path: str) -> None:
    """Stacked horizontal bars: median seconds per generation by stage, one panel per case."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(n, c) for n, c in report["cases"].items() if "parts" in c]
    cold = report["cases"].get("cold", {}).get("cold_start", {})
    colors = {label: color for (label, _), color in
              zip(CHART_PARTS, ("#4c72b0", "#dd8452", "#c44e52", "#55a868", "#8c8c8c"))}
    panels = len(cases) + (1 if cold else 0)
    fig, axes = plt.subplots(panels, 1, figsize=(10, 1.2 + 2.0 * panels), squeeze=False)
    if cold:
        _cold_panel(axes[-1, 0], cold)
    for ax, (name, case) in zip(axes[:, 0], cases):
        fws = [fw for fw in case["frameworks"] if fw in case["parts"]][::-1]
        for y, fw in enumerate(fws):
            left = 0.0
            for label, _ in CHART_PARTS:
                w = case["parts"][fw].get(label, 0.0)
                ax.barh(y, w, left=left, color=colors[label], label=label if y == 0 else None, height=0.6)
                left += w
            ax.text(left, y, f"  {left:.3g} s", va="center", fontsize=9)
        ax.set_yticks(range(len(fws)), [FRAMEWORK_LABELS.get(f, f) for f in fws])
        s = case["settings"]
        ax.set_title(f"{name}: {case.get('title', '')} ({s['width']}x{s['height']}, {s['steps']} steps)",
                     fontsize=10, loc="left")
        ax.set_xlabel("seconds per image (medians)")
        ax.set_xlim(0, ax.get_xlim()[1] * 1.15)
        ax.spines[["top", "right"]].set_visible(False)
    handles, labels = (axes[0, 0] if cases else axes[-1, 0]).get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    if seen:
        fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=len(seen), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cold_panel(ax, cold: dict[str, Any]) -> None:
    """New process to loaded pipeline (solid) and to the first image (light), per model."""
    rows = []
    for model, runs in cold.items():
        for label, key in (("sdrt", "sdrt"), ("sdrt, first load (builds cache)",
                                               "sdrt, first load after export (builds cache)"),
                           ("diffusers", "diffusers")):
            if isinstance(runs, dict) and key in runs:
                rows.append((f"{model}: {label}", runs[key]["ready_s"], runs[key]["first_image_s"]))
    rows = rows[::-1]
    for y, (label, ready, first) in enumerate(rows):
        ax.barh(y, first, color="#d9d9d9", height=0.6)
        ax.barh(y, ready, color="#6a3d9a", height=0.6)
        ax.text(first, y, f"  ready {ready:.2f} s, image {first:.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(r[1] for r in rows) / 3, max(r[2] for r in rows) * 8)
    ax.set_title("cold start: new process to loaded pipeline (purple) and to the first image (grey)",
                 fontsize=10, loc="left")
    ax.set_xlabel("seconds (log scale)")
    ax.spines[["top", "right"]].set_visible(False)
