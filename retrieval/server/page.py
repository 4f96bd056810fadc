"""The web page: retrieval/web/index.html with its filter controls, made from indexer.filters' FILTER_FIELDS (one
labelled section per filter, which the page fills with the values the index holds, GET /api/facets), and the
dataset views' scripts and styles inlined from a fixed list of files beside it (no path comes from a request)."""
from __future__ import annotations

import html
from importlib import resources

from indexer.filters import FILTER_FIELDS

from ..request import GROUP_CHOICES

# The page's words for the filters (a filter not named here is shown by its name).
LABELS = {"modality": "Modality", "body_part": "Body part", "view": "View", "since": "from", "until": "to",
          "under": "Folder"}


# The dataset views, one file each (retrieval/web/), in the order they run: views.js (tabs, the URL) first.
VIEW_SCRIPTS = ("views.js", "duplicates.js", "leakage.js", "outliers.js", "map.js")
VIEW_STYLES = ("views.css",)


def page_html() -> str:
    """The page (retrieval/web/index.html) with its filter controls and its views' scripts and styles."""
    text = _web_file("index.html")
    scripts = "\n".join(f"<script>\n{_web_file(name, closing='</script')}</script>" for name in VIEW_SCRIPTS)
    styles = "\n".join(_web_file(name, closing="</style") for name in VIEW_STYLES)
    return (text.replace("<!-- filters -->", filter_controls()).replace("<!-- group -->", group_select())
            .replace("<!-- view styles -->", styles).replace("<!-- view scripts -->", scripts))


def _web_file(name: str, closing: str | None = None) -> str:
    text = resources.files("retrieval").joinpath("web", name).read_text(encoding="utf-8")
    if closing and closing in text.lower():  # inlined: it would end its element early
        raise ValueError(f"retrieval/web/{name} holds {closing!r}")
    return text


def filter_controls() -> str:
    sections, dates = [], []
    for field in FILTER_FIELDS:
        name, label = field.name, html.escape(LABELS.get(field.name, field.name.replace("_", " ")))
        if field.compare in ("from", "to"):
            dates.append(f'<label>{label} <input type="date" name="{name}" id="f-{name}" form="search"></label>')
            continue
        placeholder = "/data/xrays" if field.compare == "under" else "any"
        sections.append(
            f'<section class="facet" data-filter="{name}"><label class="facet-name" for="f-{name}">{label}</label>'
            f'<input id="f-{name}" name="{name}" form="search" list="l-{name}" placeholder="{placeholder}" '
            f'autocomplete="off"><datalist id="l-{name}"></datalist>'
            f'<div class="values" role="group" aria-label="{label} in the index"></div></section>')
    if dates:
        sections.append('<section class="facet" data-filter="dates"><span class="facet-name" id="dates-name">'
                        'Study date</span><div class="dates">' + "".join(dates) + '</div>'
                        '<div class="values years" role="group" aria-label="study years in the index"></div>'
                        '</section>')
    return "\n".join(sections)


def group_select() -> str:
    groups = "".join(f'<option value="{choice}">one per {choice}</option>' for choice in GROUP_CHOICES)
    return f'<select name="group" aria-label="group hits"><option value="">every image</option>{groups}</select>'
