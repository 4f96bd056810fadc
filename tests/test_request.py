"""One search request: mi-search's options, the API's fields, the page's filter inputs and Searcher.search's
keywords all come from retrieval.request and indexer.filters, and share one set of limits."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from indexer.filters import FILTER_NAMES
from retrieval.cli import main as mi_search
from retrieval.errors import QueryError
from retrieval.query import QueryTerm
from retrieval.request import MAX_K, MAX_LABELS, MAX_TERMS, OPTION_NAMES, SearchRequest
from retrieval.server import create_app
from retrieval.server.models import PageSearch, QueryIn


def test_every_front_end_spells_the_same_request():
    names = set(OPTION_NAMES) | set(FILTER_NAMES)
    assert set(QueryIn.model_fields) - {"terms"} == names and set(PageSearch.model_fields) == names
    assert {param.name for param in mi_search.params} >= names
    request = SearchRequest.make(k=3, modality="CR", since="2020-01-02", labels="a, b", group="study")
    assert SearchRequest.make(**request.to_json()) == request  # what the client sends, the server reads back


def test_the_limits_hold_wherever_a_request_comes_from(tmp_path):
    for asked in ({"k": 0}, {"labels": ",".join(map(str, range(MAX_LABELS + 1)))},
                  {"group": "hospital"}, {"labels": "only-one"}):
        with pytest.raises(QueryError):
            SearchRequest.make(**asked)
    with pytest.raises(QueryError):
        SearchRequest.make([QueryTerm("text", "x")] * (MAX_TERMS + 1))
    with pytest.raises(QueryError):
        SearchRequest.make([QueryTerm("text", "x" * 20_000)])
    client = TestClient(create_app(tmp_path / "no-index"))
    assert client.get("/api/search", params={"q": "x", "k": MAX_K + 1}).status_code == 422
    body = {"terms": [{"kind": "text", "text": "x"}], "k": MAX_K + 1}
    assert client.post("/api/query", json=body).status_code == 422
    assert CliRunner().invoke(mi_search, ["x", "-k", str(MAX_K + 1), "--no-server"]).exit_code == 2


def test_the_page_has_one_input_per_filter(tmp_path):
    page = TestClient(create_app(tmp_path / "no-index")).get("/").text
    assert all(f'name="{name}"' in page for name in FILTER_NAMES) and 'name="group"' in page


def test_the_flag_hint_is_the_command_line_s(tmp_path):
    with pytest.raises(QueryError) as raised:
        SearchRequest.make(labels=" , ")
    assert "--" not in str(raised.value) and raised.value.option == "labels"
    result = CliRunner().invoke(mi_search, ["x", "--labels", " , ", "--index", str(tmp_path / "none")])
    assert result.exit_code == 1 and "(--labels)" in result.output and len(result.output.strip().splitlines()) == 1
