"""The API's request models, derived from retrieval.request: one field per filter and option, with its limits."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, create_model

from indexer.filters import FILTER_FIELDS

from ..request import MAX_K, MAX_TERMS, OPTIONS, Option

PAGE_K = 24  # hits the page's searches (/api/search) give unless asked


class TermIn(BaseModel):
    """One parsed query term, as `mi-search` sends it: a text, or an image file's bytes (read
    by the client: the server never opens a path it is sent)."""

    kind: Literal["text", "image"]
    text: str | None = None
    data: str | None = Field(None, description="the image file, base64")
    name: str = Field("", description="the image file's name (its suffix helps decoding)")
    weight: float = 1.0


def _blank_is_none(value: Any) -> Any:
    return None if value == "" else value  # an empty form field or query parameter: not given


def _field(option: Option, k_default: int) -> tuple[Any, Any]:
    kind: Any = Literal[option.choices] if option.choices else option.kind
    if option.name == "k":
        return kind, Field(k_default, ge=1, le=MAX_K, description=option.help)
    if option.default is None:
        kind = Annotated[kind | None, BeforeValidator(_blank_is_none)]
    return kind, Field(option.default, description=option.help)


def _options_model(name: str, k_default: int, **more: Any) -> type[BaseModel]:
    """A model with every filter (as text: SearchFilters.make reads it) and option of a search request."""
    filters = {field.name: (str | None, Field(None, description=field.help)) for field in FILTER_FIELDS}
    options = {option.name: _field(option, k_default) for option in OPTIONS}
    return create_model(name, **more, **filters, **options)


# GET /api/search (query parameters) and POST /api/search (form fields, beside the image): the page's searches.
PageSearch = _options_model("PageSearch", PAGE_K)
# POST /api/query: the search of `mi-search` QUERY... [options], its terms parsed by the client.
QueryIn = _options_model("QueryIn", OPTIONS[0].default,
                         terms=(list[TermIn], Field(min_length=1, max_length=MAX_TERMS)))


def options_of(model: BaseModel) -> dict[str, Any]:
    """The filters and options a request model holds, as SearchRequest.make takes them."""
    return {name: value for name, value in model.model_dump().items() if name != "terms"}
