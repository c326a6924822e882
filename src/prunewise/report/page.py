"""One report, two renderings: a self-contained HTML page (figures inlined) and a markdown summary (figures as files).

A report is a title and a list of sections; a section is a heading and blocks:
``("text", str)``, ``("table", header, rows)``, ``("figure", name, png_bytes, caption)``,
``("completions", [{"prompt", "dense", "pruned"}], pruned_label)``. The HTML page marks each figure once its
image has decoded (``data-rendered``) and counts them on ``<body>``, so a headless browser can check that
every figure really rendered.
"""

from __future__ import annotations

import base64
import html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:1.2em 2em;
     color:#1d2330;background:#fbfbfd}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #dde;padding-bottom:.2em}
.lead{color:#556;margin-top:0}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em;background:#fff}
th,td{border:1px solid #dde;padding:.25em .6em;text-align:right} th{background:#f0f1f6}
td:first-child,th:first-child{text-align:left}
figure{margin:.8em 0;background:#fff;border:1px solid #e4e6ee;padding:.6em;display:inline-block;max-width:100%}
figure img{max-width:100%;height:auto;display:block} figcaption{font-size:.85em;color:#556;margin-top:.3em}
.cmp{display:grid;grid-template-columns:1fr 1fr;gap:.6em;margin:.6em 0}
.cmp pre{white-space:pre-wrap;background:#fff;border:1px solid #e4e6ee;padding:.5em;margin:0;font-size:.82em}
.cmp .prompt{grid-column:1/3;font-weight:600;font-size:.9em}
"""

_SCRIPT = """
function prunewiseCheck(){
  var figs=document.querySelectorAll('figure[data-figure]'), ok=0;
  figs.forEach(function(f){var i=f.querySelector('img');
    var good=i&&i.complete&&i.naturalWidth>0; f.setAttribute('data-rendered',good?'yes':'no'); if(good)ok++;});
  document.body.setAttribute('data-figures-total',figs.length);
  document.body.setAttribute('data-figures-rendered',ok);
}
window.addEventListener('load',prunewiseCheck);
"""


def _table_html(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(title: str, lead: str, sections: list) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p class='lead'>{html.escape(lead)}</p>"]
    for heading, blocks in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            kind = block[0]
            if kind == "text":
                parts.append(f"<p>{html.escape(block[1])}</p>")
            elif kind == "table":
                parts.append(_table_html(block[1], block[2]))
            elif kind == "figure":
                _, name, png, caption = block
                data = base64.b64encode(png).decode()
                parts.append(f"<figure data-figure='{html.escape(name)}'><img alt='{html.escape(caption)}' "
                             f"src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}</figcaption></figure>")
            elif kind == "completions":
                _, rows, label = block
                for row in rows:
                    parts.append("<div class='cmp'>"
                                 f"<div class='prompt'>{html.escape(row['prompt'])}</div>"
                                 f"<div><b>dense</b><pre>{html.escape(row['dense'])}</pre></div>"
                                 f"<div><b>{html.escape(label)}</b><pre>{html.escape(row['pruned'])}</pre></div></div>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>"
            f"<body>{''.join(parts)}</body></html>")


def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, lead: str, sections: list, figure_dir: str = "figures") -> tuple[str, dict[str, bytes]]:
    """Markdown text and the figure files it links ({relative path: png})."""
    lines, files = [f"# {title}", "", lead, ""], {}
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            kind = block[0]
            if kind == "text":
                lines += [block[1], ""]
            elif kind == "table":
                header, rows = block[1], block[2]
                lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                lines.append("")
            elif kind == "figure":
                _, name, png, caption = block
                rel = f"{figure_dir}/{name}.png"
                files[rel] = png
                lines += [f"![{caption}]({rel})", ""]
            elif kind == "completions":
                _, rows, label = block
                lines += [f"| prompt | dense | {label} |", "|---|---|---|"]
                lines += [f"| {_md_cell(r['prompt'])} | {_md_cell(r['dense'])} | {_md_cell(r['pruned'])} |" for r in rows]
                lines.append("")
    return "\n".join(lines) + "\n", files
