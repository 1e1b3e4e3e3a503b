"""The report as one self-contained HTML page: the markdown report rendered (CommonMark with
tables, via markdown-it-py), every figure it links inlined as a data URI, a small stylesheet.

The page needs nothing beside itself: open it from the store, attach it to a Prefect
artifact, mail it. Raw HTML inside the markdown is escaped, not passed through.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable

STYLE = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1b1f24;
       max-width: 1100px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
h3 { font-size: 1.1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
img { max-width: 100%; height: auto; }
code { background: #f6f8fa; padding: .1em .3em; border-radius: 4px; font-size: 90%; }
em { color: #57606a; }
"""

_MIME = {"png": "image/png", "svg": "image/svg+xml", "jpg": "image/jpeg", "jpeg": "image/jpeg"}


def inline_images(body: str, read: Callable[[str], bytes | None]) -> str:
    """Replace each ``<img src="REL">`` whose bytes ``read(REL)`` returns with a data URI;
    a figure that cannot be read keeps its link."""

    def sub(m: re.Match) -> str:
        src = html.unescape(m.group(2))
        ext = src.rsplit(".", 1)[-1].lower()
        if src.startswith(("data:", "http://", "https://")) or ext not in _MIME:
            return m.group(0)
        data = read(src)
        if data is None:
            return m.group(0)
        uri = f"data:{_MIME[ext]};base64,{base64.b64encode(data).decode('ascii')}"
        return f"{m.group(1)}{uri}{m.group(3)}"

    return re.sub(r'(<img\s[^>]*?src=")([^"]+)(")', sub, body)


def render_html(markdown_text: str, title: str, read: Callable[[str], bytes | None]) -> str:
    """A complete HTML document of ``markdown_text`` with its images inlined."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    body = inline_images(md.render(markdown_text), read)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")
