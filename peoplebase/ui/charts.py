"""Small bar charts drawn server-side as SVG (no JavaScript, no external library)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape


def bar_chart(
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[int]],
    width: int = 520,
    height: int = 140,
) -> str:
    """Stacked bars, one per label; `series` maps a name to one count per label."""
    colors = ["#2f6fdf", "#d9534f", "#f0ad4e", "#5cb85c", "#8e44ad", "#16a085"]
    n = max(len(labels), 1)
    totals = [sum(values[i] for values in series.values()) for i in range(len(labels))]
    peak = max(totals, default=0) or 1
    pad_left, pad_bottom, pad_top = 36, 18, 8
    plot_w = width - pad_left - 4
    plot_h = height - pad_bottom - pad_top
    bar_w = plot_w / n
    parts = [
        f'<svg role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<text x="2" y="{pad_top + 8}" font-size="10">{peak}</text>',
        f'<text x="2" y="{pad_top + plot_h}" font-size="10">0</text>',
        f'<line x1="{pad_left}" y1="{pad_top + plot_h}" x2="{width - 4}" y2="{pad_top + plot_h}" stroke="#999"/>',
    ]
    for i in range(len(labels)):
        y: float = pad_top + plot_h
        for k, (name, values) in enumerate(series.items()):
            value = values[i]
            if not value:
                continue
            h = plot_h * value / peak
            y -= h
            parts.append(
                f'<rect x="{pad_left + i * bar_w + 1:.1f}" y="{y:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="{colors[k % len(colors)]}">'
                f"<title>{escape(labels[i])}: {value} {escape(name)}</title></rect>"
            )
    step = max(1, n // 6)
    for i in range(0, len(labels), step):
        parts.append(
            f'<text x="{pad_left + i * bar_w:.1f}" y="{height - 4}" font-size="9">{escape(labels[i])}</text>'
        )
    legend_x = pad_left + 4
    for k, name in enumerate(series):
        parts.append(
            f'<rect x="{legend_x}" y="{pad_top}" width="8" height="8" fill="{colors[k % len(colors)]}"/>'
            f'<text x="{legend_x + 11}" y="{pad_top + 8}" font-size="10">{escape(name)}</text>'
        )
        legend_x += 14 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)
