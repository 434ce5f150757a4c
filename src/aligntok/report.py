"""Run reports: matplotlib plots and self-contained HTML pages (file helpers live in `aligntok.files`)."""

from __future__ import annotations

import html
from pathlib import Path


def plot_curves(
    series: dict[str, list[tuple[float, float]]],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    vlines: dict[str, float] | None = None,
    logy: bool = False,
) -> Path:
    """One PNG line plot of named (x, y) series; `vlines` marks named x positions (e.g. stage boundaries)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if len(series) > 10:  # the default cycle repeats after 10 colours
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, marker="o" if len(points) < 12 else None, linewidth=1.4)
    for name, x in (vlines or {}).items():
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.annotate(name, (x, 1), xycoords=("data", "axes fraction"), fontsize=8, ha="right", va="top")
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def html_table(header: list[str], rows: list[list[object]]) -> str:
    """A plain HTML table; cells are escaped unless they are `Raw` (pre-built HTML such as an <img>)."""

    def cell(value: object, tag: str) -> str:
        text = value if isinstance(value, Raw) else html.escape(str(value))
        return f"<{tag}>{text}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class Raw(str):
    """HTML that `html_table` and `html_page` insert as it is."""


PAGE_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    "img{image-rendering:pixelated;max-width:100%}pre{background:#f5f5f5;padding:1em;overflow-x:auto}"
)


def html_page(title: str, sections: list[tuple[str, str]]) -> str:
    """A self-contained page: a title and (heading, HTML body) sections; images are relative links."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{PAGE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
