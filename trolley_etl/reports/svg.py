"""Small inline SVG charts: no script, no font or file from anywhere, readable offline.

Two kinds are enough for a report: labelled horizontal bars (counts by category) and a line
over time (bytes stored during a run). Every text is escaped; sizes are fixed so that the
page lays out before anything is measured.
"""

from __future__ import annotations

from html import escape

BAR_HEIGHT = 22
LABEL_WIDTH = 110
CHART_WIDTH = 520
_COLOR = "#3b6ea5"


def bars(title: str, values: list[tuple[str, int | None]], *, unit: str = "") -> str:
    """Horizontal bars, one per (label, value); None is drawn as an empty bar "unknown"."""
    if not values:
        return f'<p class="empty">{escape(title)}: nothing to show</p>'
    top = max((v for _, v in values if v), default=0) or 1
    span = CHART_WIDTH - LABEL_WIDTH - 70
    height = BAR_HEIGHT * len(values) + 8
    parts = [
        f'<svg class="chart" role="img" width="{CHART_WIDTH}" height="{height}" '
        f'viewBox="0 0 {CHART_WIDTH} {height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for index, (label, value) in enumerate(values):
        y = 4 + index * BAR_HEIGHT
        width = 0 if not value else max(1, round(span * value / top))
        text = "unknown" if value is None else f"{value}{unit}"
        parts.append(
            f'<text x="{LABEL_WIDTH - 6}" y="{y + 15}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{LABEL_WIDTH}" y="{y + 3}" width="{width}" height="{BAR_HEIGHT - 6}" '
            f'fill="{_COLOR}"><title>{escape(label)}: {escape(text)}</title></rect>'
            f'<text x="{LABEL_WIDTH + width + 6}" y="{y + 15}" class="value" '
            f'data-label="{escape(label)}">{escape(text)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def line(title: str, points: list[tuple[float, int]], *, height: int = 140) -> str:
    """Cumulative MiB stored over seconds since the run started, with the average rate."""
    if len(points) < 2:
        return f'<p class="empty">{escape(title)}: too few files to draw</p>'
    left, bottom, width = 50, height - 24, CHART_WIDTH - 60
    max_x = max(p[0] for p in points) or 1.0
    max_y = max(p[1] for p in points) or 1
    coords = " ".join(
        f"{left + width * x / max_x:.1f},{bottom - (bottom - 8) * y / max_y:.1f}" for x, y in points
    )
    rate = max_y / 2**20 / max_x if max_x else 0.0
    return (
        f'<svg class="chart" role="img" width="{CHART_WIDTH}" height="{height}" '
        f'viewBox="0 0 {CHART_WIDTH} {height}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>"
        f'<line x1="{left}" y1="{bottom}" x2="{left + width}" y2="{bottom}" stroke="#888"/>'
        f'<line x1="{left}" y1="8" x2="{left}" y2="{bottom}" stroke="#888"/>'
        f'<polyline fill="none" stroke="{_COLOR}" stroke-width="2" points="{coords}"/>'
        f'<text x="{left - 4}" y="16" text-anchor="end">{max_y / 2**20:.1f}</text>'
        f'<text x="{left - 4}" y="{bottom}" text-anchor="end">0</text>'
        f'<text x="{left + width}" y="{bottom + 16}" text-anchor="end">{max_x:.1f} s</text>'
        f'<text x="{left + 6}" y="{bottom + 16}">MiB stored over time, '
        f"average {rate:.2f} MiB/s</text></svg>"
    )
