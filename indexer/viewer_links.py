"""Links that open a PACS hit in a viewer: the index's viewer URL template (`mi-index --viewer-url`),
checked once, and filled for one instance key. Imports nothing heavy, as `pacs_keys`, so that every
front end (a thin mi-search client too) can fill it.

    template  http://ohif.example/viewer?StudyInstanceUIDs={study}
    key       dicomweb+http://pacs/dicom-web/studies/1.2/series/1.2.3/instances/1.2.3.4
    link      http://ohif.example/viewer?StudyInstanceUIDs=1.2

Placeholders: {study}, {series}, {instance} (the UIDs) and {wado} (the instance's WADO-RS URL,
DICOMweb only), each URL-quoted so that a value can never add a query parameter or a path part.
"""
from __future__ import annotations

import string
from urllib.parse import quote

from .errors import MIError
from .pacs_keys import instance_uids, wado_url

META_KEY = "viewer_url"  # the template's key in the index's `meta` table
PLACEHOLDERS = ("study", "series", "instance", "wado")


class ViewerTemplateError(MIError, ValueError):
    """A viewer URL template that cannot make links: not http(s), or an unknown placeholder."""


def checked_template(template: str) -> str:
    """`template` when it can make links, else ViewerTemplateError naming what is wrong; '' (no
    viewer) is accepted as it is."""
    template = template.strip()
    if not template:
        return ""
    if not template.startswith(("http://", "https://")):
        raise ViewerTemplateError(f"the viewer URL {template!r} must start with http:// or https://")
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:  # a lone { or }
        raise ViewerTemplateError(f"the viewer URL {template!r} is not a template ({e}): write {{{{ and }}}} "
                                  f"for literal braces") from None
    for name, spec, conversion in fields:
        if name not in PLACEHOLDERS or spec or conversion:
            raise ViewerTemplateError(f"the viewer URL {template!r} has the placeholder {{{name}}}: use "
                                      + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
    return template


def viewer_url(template: str | None, key: str) -> str | None:
    """The link that opens the instance `key` names in the viewer; None for a file, without a
    template, or for a DIMSE instance when the template needs its {wado} URL."""
    uids = instance_uids(key) if template else None
    if uids is None:
        return None
    wado = wado_url(key)
    if wado is None and "{wado}" in template:
        return None
    values = dict(zip(("study", "series", "instance"), uids), wado=wado or "")
    try:
        return template.format_map({name: quote(value, safe="") for name, value in values.items()})
    except (KeyError, ValueError, IndexError):  # a template stored by hand, never checked: no links
        return None
