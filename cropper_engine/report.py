"""An HTML contact sheet: each original with its candidates per round and the chosen crop.

Thumbnails are written next to the page; boxes are drawn as SVG over them, so the page is
light and needs no script. Pages hold `per_page` images each. Every file is written whole or not
at all (a full disk leaves no half thumbnail, card or page); a file name that is not UTF-8 is
shown as \\udcXX, as results.jsonl writes it.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

from cropper_engine.batch import JsonLines, atomic_write, shown

ROUND_COLOURS = ["#3b82f6", "#f59e0b", "#a855f7", "#14b8a6", "#ec4899"]
CHOSEN = "#ef4444"
SUBJECT = "#22c55e"
FACE = "#facc15"

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;background:#111;color:#eee}
h1{font-weight:600;font-size:20px} .legend span{margin-right:14px}
.grid{display:flex;flex-wrap:wrap;gap:18px}
.card{background:#1c1c1c;border-radius:8px;padding:10px;width:min(100%%,%(w)spx)}
.pair{display:flex;gap:8px;align-items:flex-start}
.orig{position:relative;line-height:0} .orig svg{position:absolute;left:0;top:0}
.crop img{max-width:%(cw)spx;max-height:%(ch)spx;border:2px solid %(chosen)s}
.meta{font-size:12px;color:#bbb;margin-top:6px;line-height:1.4;word-break:break-all} .meta a{color:#93c5fd}
.sw{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
"""


class HtmlReport:
    def __init__(self, out_dir: str | Path, title: str = "cropper-engine report", thumb: int = 420,
                 per_page: int = 200, resume: bool = False) -> None:
        """resume: an interrupted run goes on; the cards of the images it already cropped (kept in
        `cards.jsonl` beside the pages) come first, and new thumbnails never overwrite theirs."""
        self.dir = Path(out_dir)
        (self.dir / "thumbs").mkdir(parents=True, exist_ok=True)
        self.title, self.thumb, self.per_page = title, thumb, per_page
        self.cards: list[str] = []
        self.pages: list[Path] = []
        self.n = 0
        cards = self.dir / "cards.jsonl"
        if resume and cards.exists():
            with cards.open(encoding="utf-8", errors="surrogateescape") as fh:
                for line in fh:
                    try:
                        card = json.loads(line)
                    except ValueError:  # blank, or cut short by a run killed mid-write
                        continue
                    if isinstance(card, str):
                        self.n += 1
                        self._push(card)
        self._cards = JsonLines(cards, truncate=not resume)

    def add(self, row: dict[str, Any], image: Any) -> None:
        """One result row (a results.jsonl line) and its original image (PIL)."""
        self.n += 1
        w, h = image.size
        s = min(1.0, self.thumb / max(w, h))
        tw, th = max(1, round(w * s)), max(1, round(h * s))
        name = f"{self.n:06d}"
        thumb = image.copy()
        thumb.thumbnail((tw, th))
        _save_jpeg(thumb, self.dir / "thumbs" / f"{name}.jpg")
        x1, y1, x2, y2 = row["box"]
        crop = image.crop((x1, y1, x2, y2))
        crop.thumbnail((self.thumb // 2, self.thumb // 2))
        _save_jpeg(crop, self.dir / "thumbs" / f"{name}-crop.jpg")

        shapes = []
        for c in row.get("candidates", []):
            cx1, cy1, cx2, cy2 = c["box"]
            col = ROUND_COLOURS[c.get("round", 0) % len(ROUND_COLOURS)]
            shapes.append(f'<rect x="{cx1 * s:.1f}" y="{cy1 * s:.1f}" width="{(cx2 - cx1) * s:.1f}" '
                          f'height="{(cy2 - cy1) * s:.1f}" fill="none" stroke="{col}" stroke-width="1" '
                          f'stroke-opacity="0.7"><title>round {c.get("round", 0)} {c.get("source", "")} '
                          f'score {c.get("score", 0):.3f}</title></rect>')
        for poly in row.get("subject_outline", []) or []:  # the subject mask used (engine/subject/outlines.py)
            pts = " ".join(f"{px * s:.1f},{py * s:.1f}" for px, py in poly)
            shapes.append(f'<polygon points="{pts}" fill="{SUBJECT}" fill-opacity="0.25" stroke="{SUBJECT}" '
                          f'stroke-width="1"><title>subject: {html.escape(str(row.get("subject", "")))}</title>'
                          '</polygon>')
        for f in row.get("faces", []) or []:
            fx1, fy1, fx2, fy2 = f["box"]
            shapes.append(f'<rect x="{fx1 * s:.1f}" y="{fy1 * s:.1f}" width="{(fx2 - fx1) * s:.1f}" '
                          f'height="{(fy2 - fy1) * s:.1f}" fill="none" stroke="{FACE}" stroke-width="2">'
                          f'<title>face {f.get("score", 0):.2f}</title></rect>')
        subj = row.get("subject_box")
        if subj:
            sx1, sy1, sx2, sy2 = subj
            shapes.append(f'<rect x="{sx1 * s:.1f}" y="{sy1 * s:.1f}" width="{(sx2 - sx1) * s:.1f}" '
                          f'height="{(sy2 - sy1) * s:.1f}" fill="{SUBJECT}" fill-opacity="0.15" '
                          f'stroke="{SUBJECT}" stroke-dasharray="4 3" stroke-width="1.5"/>')
        for px, py in row.get("focal_points", []) or []:
            shapes.append(f'<circle cx="{px * s:.1f}" cy="{py * s:.1f}" r="5" fill="{SUBJECT}" stroke="#000">'
                          f'<title>focal point {px:g},{py:g}</title></circle>')
        shapes.append(f'<rect x="{x1 * s:.1f}" y="{y1 * s:.1f}" width="{(x2 - x1) * s:.1f}" '
                      f'height="{(y2 - y1) * s:.1f}" fill="none" stroke="{CHOSEN}" stroke-width="3"/>')
        meta = (f'{html.escape(shown(Path(row["image"]).name))} · {row["task"]}'
                f'{" " + html.escape(str(row["ratio"])) if row.get("ratio") else ""} · '
                f'pipeline <b>{html.escape(row["pipeline"])}</b> · score {row["score"]:.3f} · '
                f'box {row["box"]} · {len(row.get("candidates", []))} candidates')
        if row.get("subject"):
            asked = row.get("subject_requested")
            meta += f' · subject <b>{html.escape(str(row["subject"]))}</b>' + (
                f" (asked: {html.escape(str(asked))})" if asked else "")
        if row.get("faces"):
            meta += f' · {len(row["faces"])} face{"s" if len(row["faces"]) > 1 else ""}'
            meta += " kept whole" if row.get("keep_faces") else ""
        if row.get("distinct_by_round"):
            meta += " · distinct VLM boxes per round " + "/".join(str(d["distinct"]) for d in row["distinct_by_round"])
        if row.get("prompts"):  # crop --save-prompts: OUT/prompts/..., the report is in OUT/report/
            meta += "<br>prompts: " + " ".join(
                f'<a href="../{html.escape(f)}">{html.escape(Path(f).stem)}</a>' for f in row["prompts"])
        if row.get("notes"):
            meta += "<br>" + "<br>".join(html.escape(n) for n in row["notes"][:4])
        card = (f'<div class="card"><div class="pair"><div class="orig"><img src="thumbs/{name}.jpg" '
                f'width="{tw}" height="{th}"><svg width="{tw}" height="{th}">{"".join(shapes)}</svg></div>'
                f'<div class="crop"><img src="thumbs/{name}-crop.jpg"></div></div>'
                f'<div class="meta">{meta}</div></div>')
        try:
            self._cards.append(card)  # type: ignore[arg-type]
        except OSError:
            self.n -= 1  # the next card takes this one's number (and thumbnails' names) again
            raise
        self._push(card)

    def _push(self, card: str) -> None:
        self.cards.append(card)
        if len(self.cards) >= self.per_page:
            self._write_page()

    def _write_page(self) -> None:
        page = self.dir / ("index.html" if not self.pages else f"page{len(self.pages) + 1}.html")
        self.pages.append(page)
        legend = "".join(f'<span><i class="sw" style="background:{c}"></i>round {i}</span>'
                         for i, c in enumerate(ROUND_COLOURS[:3]))
        legend += (f'<span><i class="sw" style="background:{CHOSEN}"></i>chosen</span>'
                   f'<span><i class="sw" style="background:{SUBJECT}"></i>subject</span>'
                   f'<span><i class="sw" style="background:{FACE}"></i>face</span>')
        css = _CSS % {"w": self.thumb * 3 // 2 + 40, "cw": self.thumb // 2, "ch": self.thumb // 2,
                      "chosen": CHOSEN}
        nxt = f'<p><a href="page{len(self.pages) + 1}.html">next page</a></p>'
        self.cards, cards = [], self.cards
        atomic_write(page, (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(shown(self.title))}</title>"
            f"<style>{css}</style></head><body><h1>{html.escape(shown(self.title))}</h1>"
            f"<div class='legend'>{legend}</div><div class='grid'>{''.join(cards)}</div>"
            f"{{NEXT}}</body></html>").replace("{NEXT}", nxt).encode("utf-8", "backslashreplace"))

    def close(self) -> Path:
        self._cards.close()
        if self.cards or not self.pages:
            self._write_page()
        last = self.pages[-1]
        text = last.read_text(encoding="utf-8")
        atomic_write(last, text.replace(f'<p><a href="page{len(self.pages) + 1}.html">next page</a></p>', "")
                     .encode("utf-8"))
        return self.pages[0]


def _save_jpeg(image: Any, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    atomic_write(path, buf.getvalue())
