"""A self-contained HTML report: metrics table, training curves, and a captioned image gallery."""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; } th, td { padding: 4px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.se { color: #888; font-size: 0.85em; } .note { color: #555; font-size: 0.9em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 14px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; display: flex; gap: 10px; }
.card img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; flex: none; border: 1px solid #ccc; }
.card .gen { font-weight: 600; margin: 0 0 4px 0; } .card .variant { color: #666; font-size: 0.8em; }
.card ul { margin: 4px 0 0 1em; padding: 0; color: #555; font-size: 0.85em; }
"""


def image_data_uri(image: Any, *, scale: int = 3) -> str:
    """A PIL image as an inline PNG (images under 64 px upscaled with nearest neighbour, so small renders stay
    crisp; photos are shown as they are)."""
    from PIL import Image

    im = image.convert("RGB")
    if scale > 1 and max(im.size) < 64:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def curve_data_uri(curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> str | None:
    """Training/validation loss against step for each run, as an inline PNG (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: the report has no training curve")
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for i, (name, rows) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        tr = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
        va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if tr:
            ax.plot(*zip(*tr), color=colour, label=f"{name} (train)")
        if va:
            ax.plot(*zip(*va), color=colour, linestyle="--", marker="o", markersize=3, label=f"{name} (val, clean)")
    ax.set_xlabel("step")
    ax.set_ylabel("caption loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def metrics_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str], *,
                  descriptions: Mapping[str, str] | None = None, row_header: str = "run") -> str:
    """An HTML table of ``rows`` (name -> metric -> value), with ``METRIC_se`` shown as ± when present."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [row_header, *columns])
    body = []
    for name, row in rows.items():
        cells = [f"<td><b>{html.escape(name)}</b>"
                 + (f"<div class='note'>{html.escape(descriptions[name])}</div>" if descriptions and name in descriptions
                    else "") + "</td>"]
        for c in columns:
            v = row.get(c)
            se = row.get(f"{c}_se")
            text = "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else html.escape(str(v)))
            if se is not None:
                text += f" <span class='se'>± {se:.3f}</span>"
            cells.append(f"<td class='num'>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_report(path: str | Path, *, title: str, intro: str, tables: Sequence[tuple[str, str]],
                 curves: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 gallery: Sequence[Mapping[str, Any]] = (), footer: str = "") -> Path:
    """Write one self-contained HTML page (images and plots inline).

    ``tables``: (heading, table html); ``gallery`` items: {"image": PIL, "captions": {run: text},
    "references": [...]}.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{intro}</p>"]
    for heading, table in tables:
        parts.append(f"<h2>{html.escape(heading)}</h2>{table}")
    if curves:
        uri = curve_data_uri(curves)
        if uri:
            parts.append(f"<h2>Training curves</h2><img alt='training curves' src='{uri}'>")
    if gallery:
        parts.append("<h2>Held-out test images</h2><div class='gallery'>")
        for item in gallery:
            caps = "".join(f"<p class='gen'>{html.escape(text)} <span class='variant'>({html.escape(run)})</span></p>"
                           for run, text in item["captions"].items())
            refs = "".join(f"<li>{html.escape(r)}</li>" for r in item["references"])
            parts.append(f"<div class='card'><img alt='test image' src='{image_data_uri(item['image'])}'>"
                         f"<div>{caps}<div class='note'>references:</div><ul>{refs}</ul></div></div>")
        parts.append("</div>")
    parts.append(f"<p class='note'>{footer}</p></body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
