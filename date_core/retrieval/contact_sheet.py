"""Contact sheets of search results: one row per query, its hits as thumbnails with the product's
box drawn, as a PNG and as a self-contained HTML page (images inlined as data URIs).

Sizes are fixed so that a sheet is predictable: ``THUMB`` pixel square thumbnails (letterboxed),
a ``LABEL_W`` wide query column and a ``CAPTION_H`` high caption under each thumbnail; a sheet of
Q queries and k hits is ``(LABEL_W + k * THUMB) x Q * (THUMB + CAPTION_H)`` pixels.
"""
from __future__ import annotations

import base64
import html
import io
import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

THUMB = 192
LABEL_W = 220
CAPTION_H = 36
BOX_COLOUR = (255, 0, 64)
BACKGROUND = (248, 248, 248)


def sheet_size(n_queries: int, k: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG sheet for ``n_queries`` rows of ``k`` hits."""
    return LABEL_W + k * THUMB, n_queries * (THUMB + CAPTION_H)


def thumbnail(image: Image.Image, box: Sequence[float] | None, size: int = THUMB) -> Image.Image:
    """``image`` letterboxed into a ``size`` square with ``box`` (x1, y1, x2, y2 in its pixels) drawn."""
    img = image.convert("RGB")
    scale = size / max(img.width, img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    ox, oy = (size - w) // 2, (size - h) // 2
    canvas.paste(img.resize((w, h), Image.BILINEAR), (ox, oy))
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
        rect = [ox + x1 * scale, oy + y1 * scale, ox + x2 * scale, oy + y2 * scale]
        ImageDraw.Draw(canvas).rectangle(rect, outline=BOX_COLOUR, width=max(2, size // 64))
    return canvas


def _caption(hit) -> str:
    return f"#{hit.rank}  score {hit.score:.3f}  conf {hit.confidence:.2f}"


def write_png(queries: Sequence[str], hits: Sequence[Sequence], path: str | Path) -> Path:
    """One row per query: the query text, then its hits (:class:`date_core.retrieval.seek.Hit`, with
    ``image``) with boxes, rank, score and grounding confidence. Returns ``path``."""
    k = max((len(h) for h in hits), default=0)
    if not queries or k == 0:
        raise ValueError("a contact sheet needs at least one query with one hit")
    sheet = Image.new("RGB", sheet_size(len(queries), k), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    row_h = THUMB + CAPTION_H
    for qi, (query, row) in enumerate(zip(queries, hits)):
        top = qi * row_h
        draw.multiline_text((8, top + 8), "\n".join(textwrap.wrap(query, 30)[:8]), fill=(0, 0, 0), font=font)
        for hi, hit in enumerate(row):
            left = LABEL_W + hi * THUMB
            sheet.paste(thumbnail(hit.image, hit.box), (left, top))
            draw.text((left + 4, top + THUMB + 4), _caption(hit), fill=(0, 0, 0), font=font)
            draw.text((left + 4, top + THUMB + 18), str(hit.image_id)[:28], fill=(90, 90, 90), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_STYLE = """body{font-family:sans-serif;margin:16px;background:#fff}
section{margin-bottom:20px}h2{font-size:16px;margin:4px 0}
.hits{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:%dpx}
figure img{display:block;width:%dpx;height:%dpx;border:1px solid #ddd}
figcaption{font-size:12px;color:#333}""" % (THUMB, THUMB, THUMB)

# marks each figure once its image has decoded, so a browser test can tell that every hit shows
_SCRIPT = """for (const img of document.querySelectorAll('figure img')) {
  const mark = () => { if (img.naturalWidth > 0) img.closest('figure').dataset.shown = '1';
    document.body.dataset.shown = document.querySelectorAll('figure[data-shown]').length; };
  if (img.complete) mark(); else img.addEventListener('load', mark);
}"""


def write_html(queries: Sequence[str], hits: Sequence[Sequence], path: str | Path, title: str = "DATE seek") -> Path:
    """A self-contained HTML page: per query its text and its hits, each a thumbnail with the box
    drawn and a caption (rank, score, confidence, image and item id, box). Returns ``path``."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body data-hits='{sum(len(h) for h in hits)}'>"
             f"<h1>{html.escape(title)}</h1>"]
    for qi, (query, row) in enumerate(zip(queries, hits)):
        parts.append(f"<section class='query' id='q{qi}'><h2>{html.escape(query)}</h2><div class='hits'>")
        for hit in row:
            box = ", ".join(f"{v:.0f}" for v in hit.box)
            parts.append(
                f"<figure class='hit' data-image-id='{html.escape(str(hit.image_id))}'>"
                f"<img alt='{html.escape(str(hit.image_id))}' src='{_data_uri(thumbnail(hit.image, hit.box))}'>"
                f"<figcaption>{html.escape(_caption(hit))}<br>{html.escape(str(hit.image_id))} "
                f"(item {html.escape(str(hit.item_id))})<br>box [{box}]</figcaption></figure>")
        parts.append("</div></section>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path
