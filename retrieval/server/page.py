"""The web page's filter controls, made from indexer.filters' FILTER_FIELDS: one labelled section per filter, which
the page fills with the values the index holds (GET /api/facets)."""
from __future__ import annotations

import html
from importlib import resources

from indexer.filters import FILTER_FIELDS

from ..request import GROUP_CHOICES

# The page's words for the filters (a filter not named here is shown by its name).
LABELS = {"modality": "Modality", "body_part": "Body part", "view": "View", "since": "from", "until": "to",
          "under": "Folder"}


def page_html() -> str:
    """The page (retrieval/web/index.html) with its filter controls."""
    text = resources.files("retrieval").joinpath("web/index.html").read_text(encoding="utf-8")
    return text.replace("<!-- filters -->", filter_controls()).replace("<!-- group -->", group_select())


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
