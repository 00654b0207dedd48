"""The evaluation report: one self-contained HTML file (images embedded as base64 PNG, curves as inline SVG).

Sections: the metrics table (rewards with 95% CI, FID with its extractor, world ground truth), reward versus
images sampled for each training run, and one image grid per prompt (rows: seeds; columns: base | adapters).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import torch

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f4f4f4; }
td.name { text-align: left; font-weight: bold; }
section.grid table td { padding: 2px; border: none; }
section.grid img { width: 128px; height: 128px; image-rendering: pixelated; }
.note { color: #666; font-size: 90%; }
"""


def read_curve(path: Path) -> list[dict]:
    """The (images_seen, reward_mean, wall_time_s) points of a training run's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "images_seen": r.get("images_seen", r["step"]), "reward_mean": r["reward_mean"],
             "wall_time_s": r.get("wall_time_s")} for r in rows if "reward_mean" in r]


def png_base64(image_u8: torch.Tensor) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_u8.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def metrics_table(metrics: dict) -> str:
    models = metrics["models"]
    rewards = list(next(iter(models.values()))["rewards"])
    has_fid = any("fid" in m for m in models.values())
    has_world = any("world" in m for m in models.values())
    head = ["model", *(f"{r} (mean ± std, 95% CI)" for r in rewards)]
    if has_fid:
        head += ["FID", "FID drift"]
    if has_world:
        head += ["count accuracy", "colour accuracy", "count MAE"]
    rows = []
    for name, m in models.items():
        cells = [f'<td class="name">{html.escape(name)}</td>']
        for r in rewards:
            s = m["rewards"][r]
            cells.append(f"<td>{_fmt(s['mean'])} ± {_fmt(s['std'], 3)} [{_fmt(s['ci95'][0])}, {_fmt(s['ci95'][1])}]</td>")
        if has_fid:
            cells += [f"<td>{_fmt(m.get('fid'))}</td>", f"<td>{_fmt(m.get('fid_drift'))}</td>"]
        if has_world:
            w = m.get("world", {})
            cells += [f"<td>{_fmt(w.get('count_accuracy'), 3)}</td>", f"<td>{_fmt(w.get('color_accuracy'), 3)}</td>",
                      f"<td>{_fmt(w.get('count_mae'), 3)}</td>"]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    note = ""
    if has_fid:
        note = (f'<p class="note">FID against {html.escape(str(metrics.get("fid_reference")))} with '
                f'{html.escape(str(metrics.get("fid_extractor")))}; values from different extractors are not '
                "comparable. Drift = FID minus the base model's FID.</p>")
    return f'<table id="metrics"><tr>{header}</tr>{"".join(rows)}</table>{note}'


def curves_svg(curves: dict[str, list[dict]], width: int = 640, height: int = 320) -> str:
    """Reward (training batch mean) against cumulative images sampled, one polyline per run."""
    points = [(p["images_seen"], p["reward_mean"]) for c in curves.values() for p in c]
    if not points:
        return ""
    xs, ys = np.array(points, dtype=float).T
    x0, x1 = 0.0, max(xs.max(), 1.0)
    y0, y1 = ys.min(), ys.max()
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 50

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [f'<svg id="curves" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">images sampled</text>',
             f'<text x="{pad}" y="{height - pad + 15}" text-anchor="middle" font-size="11">0</text>',
             f'<text x="{width - pad}" y="{height - pad + 15}" text-anchor="middle" font-size="11">{x1:.0f}</text>',
             f'<text x="{pad - 5}" y="{sy(y0)}" text-anchor="end" font-size="11">{y0:.4g}</text>',
             f'<text x="{pad - 5}" y="{sy(y1) + 4}" text-anchor="end" font-size="11">{y1:.4g}</text>',
             f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" text-anchor="middle">'
             "training reward (batch mean)</text>"]
    for k, (name, curve) in enumerate(curves.items()):
        color = COLORS[k % len(COLORS)]
        line = " ".join(f"{sx(p['images_seen']):.1f},{sy(p['reward_mean']):.1f}" for p in curve)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{line}"/>')
        parts.append(f'<text x="{width - pad - 5}" y="{pad + 15 * k}" text-anchor="end" fill="{color}">'
                     f"{html.escape(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def image_grids(metrics: dict, grids: dict[str, torch.Tensor], max_prompts: int) -> str:
    """One grid per prompt: a row per seed, a column per model. Images are stored seed-major."""
    prompts, seeds = metrics["prompts"], metrics["seeds"]
    names = list(grids)
    sections = []
    for p, prompt in enumerate(prompts[:max_prompts]):
        header = "".join(f"<th>{html.escape(n)}{_world_note(metrics, n, prompt)}</th>" for n in names)
        rows = []
        for s_index, seed in enumerate(seeds):
            k = s_index * len(prompts) + p
            cells = "".join(f'<td><img alt="{html.escape(n)} seed {seed}" src="data:image/png;base64,'
                            f'{png_base64(grids[n][k])}"/></td>' for n in names)
            rows.append(f'<tr><th>seed {seed}</th>{cells}</tr>')
        sections.append(f'<section class="grid"><h3>{html.escape(prompt)}</h3><table><tr><th></th>{header}</tr>'
                        f'{"".join(rows)}</table></section>')
    if len(prompts) > max_prompts:
        sections.append(f'<p class="note">{len(prompts) - max_prompts} more prompts not shown '
                        "(report_max_prompts).</p>")
    return "".join(sections)


def _world_note(metrics: dict, name: str, prompt: str) -> str:
    per_prompt = metrics["models"][name].get("world", {}).get("per_prompt", {})
    if prompt not in per_prompt:
        return ""
    return f'<br><span class="note">count acc. {per_prompt[prompt]["count_accuracy"]:.2f}</span>'


def write_report(path: Path, metrics: dict, grids: dict[str, torch.Tensor], curves: dict[str, list[dict]],
                 max_prompts: int = 32) -> Path:
    body = [f"<h1>Evaluation of {html.escape(str(metrics.get('base_model')))}</h1>",
            f'<p class="note">{len(metrics["prompts"])} held-out prompts x {len(metrics["seeds"])} seeds = '
            f"{metrics['images_per_model']} images per model, identical initial noise for every model.</p>",
            "<h2>Metrics</h2>", metrics_table(metrics)]
    if curves:
        body += ["<h2>Training reward vs images sampled</h2>", curves_svg(curves)]
    body += ["<h2>Samples</h2>", image_grids(metrics, grids, max_prompts)]
    text = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>alignprop evaluation</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    Path(path).write_text(text)
    return Path(path)
