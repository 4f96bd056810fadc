"""`mi mcp`: the index served over the Model Context Protocol, tested with the SDK's own client
over stdio against a real `mi mcp` process (tiny fixture model, a small archive of real DICOM
and PNG files): the tools and their schemas, each tool's answers against `Searcher` in this
process, and the refusals (bad ids, oversized images, paths) as one-line tool errors."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import threading
from importlib import metadata
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402

from servers import FIXTURE, PYDICOM_FILES, command_env  # noqa: E402

TOOLS = {"search_text", "search_image", "search_like", "image_info", "image_thumbnail", "classify",
         "index_status"}


class McpProcess:
    """A real `mi mcp` process and a `ClientSession` to it, on an event loop in a thread of its own
    (one process for the module: starting PyTorch once). `call` is synchronous."""

    def __init__(self, index: Path, errlog: Path) -> None:
        self.index, self.errlog_path = index, errlog
        self.loop = asyncio.new_event_loop()
        self.ready, self.failed = threading.Event(), None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stop: asyncio.Event | None = None
        self.main = asyncio.run_coroutine_threadsafe(self._hold(), self.loop)
        if not self.ready.wait(120) or self.failed:
            raise AssertionError(f"mi mcp did not start: {self.failed}; stderr: {self.stderr()}")

    async def _hold(self) -> None:
        self.stop = asyncio.Event()
        parameters = StdioServerParameters(
            command=sys.executable,
            args=["-c", "from retrieval.commands import entry; entry()", "mcp", "--index", str(self.index),
                  "--model", str(FIXTURE), "--device", "cpu"],
            env=command_env())
        try:
            with open(self.errlog_path, "w") as errlog:
                async with stdio_client(parameters, errlog=errlog) as (read, write):
                    async with ClientSession(read, write) as session:
                        self.initialized = await session.initialize()
                        self.session = session
                        self.ready.set()
                        await self.stop.wait()
        except BaseException as error:  # noqa: BLE001 (reported by __init__)
            self.failed = repr(error)
            self.ready.set()
            raise

    def run(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, name: str, arguments: dict | None = None):
        return self.run(self.session.call_tool(name, arguments or {}))

    def stderr(self) -> str:
        return self.errlog_path.read_text(errors="replace") if self.errlog_path.exists() else ""

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        try:
            self.main.result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def mcp(archive, tmp_path_factory):
    process = McpProcess(archive["index"], tmp_path_factory.mktemp("mcp") / "stderr.txt")
    yield process
    process.close()


@pytest.fixture(scope="module")
def searcher(archive):
    from retrieval import Searcher

    with Searcher(archive["index"], model=archive["model"]) as searcher:
        yield searcher


def answer(result) -> dict:
    """The structured answer of a successful call (and its text block says the same)."""
    assert not result.is_error, result.content
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content


def error_text(result) -> str:
    """The one line of a tool error."""
    assert result.is_error, result
    assert len(result.content) == 1 and result.content[0].type == "text"
    text = result.content[0].text
    assert "\n" not in text and "Traceback" not in text, text
    return text


def indexed_id(searcher, name: str) -> int:
    hits = searcher.search("x", k=len(searcher), duplicates=True)
    return next(hit.id for hit in hits if Path(hit.path).name == name)


def same_hits(got: dict, expected: list) -> None:
    assert [row["id"] for row in got["hits"]] == [hit.id for hit in expected]
    assert [row["rank"] for row in got["hits"]] == list(range(1, len(expected) + 1))
    for row, hit in zip(got["hits"], expected):
        assert row["score"] == pytest.approx(hit.score, abs=1e-4)
        assert row["path"] == hit.path


# ---------------------------------------------------------------------------- the tools

def test_the_tools_and_their_schemas(mcp):
    assert mcp.initialized.server_info.name == "medimageinsight-search"
    assert mcp.initialized.server_info.version == metadata.version("medimageinsight-search")
    tools = {tool.name: tool for tool in mcp.run(mcp.session.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and tool.annotations.read_only_hint is True
        # no tool takes a file path: no parameter named like one, every string is bounded
        for name, schema in tool.input_schema.get("properties", {}).items():
            assert not any(word in name for word in ("path", "file", "folder", "dir", "under")), (tool.name, name)
            for option in schema.get("anyOf", [schema]):
                if option.get("type") == "string":
                    assert option.get("maxLength") or "enum" in option, (tool.name, name)
    search_text = tools["search_text"].input_schema
    assert search_text["required"] == ["query"]
    assert search_text["properties"]["k"]["maximum"] == 100 and search_text["properties"]["k"]["minimum"] == 1
    assert {"modality", "body_part", "view", "since", "until"} <= set(search_text["properties"])
    assert tools["search_image"].input_schema["required"] == ["image_base64"]
    assert tools["search_like"].input_schema["required"] == ["image_id"]
    labels = tools["classify"].input_schema["properties"]["labels"]
    assert labels["type"] == "array" and labels["maxItems"] == 32
    assert tools["index_status"].input_schema.get("required", []) == []


def test_search_text_is_the_searchers(mcp, searcher):
    got = answer(mcp.call("search_text", {"query": "chest x-ray", "k": 5}))
    assert got["count"] == 5
    same_hits(got, searcher.search("chest x-ray", k=5))
    # the query syntax of mi-search: weighted and subtracted terms
    query = "2:pleural effusion + cardiomegaly - pacemaker"
    same_hits(answer(mcp.call("search_text", {"query": query, "k": 4})),
              searcher.search(query.split(), force="text", k=4))
    # ... which is not the whole string read as one text
    as_one_text = [hit.score for hit in searcher.search(query, force="text", k=4)]
    assert [hit.score for hit in searcher.search(query.split(), force="text", k=4)] != \
        pytest.approx(as_one_text, abs=1e-4)


def test_search_text_filters(mcp, searcher):
    got = answer(mcp.call("search_text", {"query": "scan", "k": 10, "modality": "ct"}))
    assert got["count"] == 1 and got["hits"][0]["modality"] == "CT"
    same_hits(got, searcher.search("scan", k=10, modality="ct"))
    dated = answer(mcp.call("search_text", {"query": "scan", "k": 10, "since": "2000-01-01"}))
    same_hits(dated, searcher.search("scan", k=10, since="2000-01-01"))
    assert "YYYY-MM-DD" in error_text(mcp.call("search_text", {"query": "scan", "since": "last week"}))
    assert "no image in the index matches modality XA" in error_text(
        mcp.call("search_text", {"query": "scan", "modality": "XA"}))


@pytest.mark.parametrize("name", ["CT_small.dcm", "png2.png"])
def test_search_image_by_its_bytes(mcp, searcher, archive, name):
    path = archive["data"] / name
    got = answer(mcp.call("search_image", {"image_base64": base64.b64encode(path.read_bytes()).decode(), "k": 3}))
    expected = searcher.search(image=str(path), k=3)
    same_hits(got, expected)
    assert got["hits"][0]["id"] == indexed_id(searcher, name) and got["hits"][0]["score"] > 0.999
    # a data: URL is taken as well
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    same_hits(answer(mcp.call("search_image", {"image_base64": data_url, "k": 3})), expected)


def test_search_like_leaves_the_image_out(mcp, searcher):
    image_id = indexed_id(searcher, "MR_small.dcm")
    got = answer(mcp.call("search_like", {"image_id": image_id, "k": 3}))
    expected = [hit for hit in searcher.search(vector=searcher.vector_of(image_id), k=4) if hit.id != image_id][:3]
    assert image_id not in [row["id"] for row in got["hits"]]
    same_hits(got, expected)


def test_image_info_holds_no_patient_identifier(mcp, searcher, archive):
    import pydicom

    image_id = indexed_id(searcher, "CT_small.dcm")
    info = answer(mcp.call("image_info", {"image_id": image_id}))
    assert info["id"] == image_id and info["modality"] == "CT" and Path(info["path"]).name == "CT_small.dcm"
    assert info["sop_instance_uid"] == searcher.image(image_id)["sop_instance_uid"]
    header = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    text = json.dumps(info)
    for identifier in (str(header.PatientName), str(header.PatientID)):
        assert identifier and identifier not in text
    assert not {"patient_name", "patient_id", "patient_birth_date"} & set(info)


def test_image_thumbnail_is_a_png(mcp, searcher):
    from PIL import Image

    result = mcp.call("image_thumbnail", {"image_id": indexed_id(searcher, "MR_small.dcm")})
    assert not result.is_error, result.content
    [image] = result.content
    assert image.type == "image" and image.mime_type == "image/png"
    picture = Image.open(io.BytesIO(base64.b64decode(image.data)))
    assert picture.format == "PNG" and max(picture.size) <= 256 and picture.size == (64, 64)


def test_classify_is_the_searchers(mcp, searcher):
    image_id = indexed_id(searcher, "png0.png")
    labels = ["normal", "pneumothorax", "fracture"]
    got = answer(mcp.call("classify", {"image_id": image_id, "labels": labels}))
    expected = searcher.classify(image_id, labels)
    assert list(got["labels"]) == labels and sum(got["labels"].values()) == pytest.approx(1, abs=1e-5)
    assert got["labels"] == pytest.approx(expected, abs=1e-5)
    multi = answer(mcp.call("classify", {"image_id": image_id, "labels": ["normal"], "multilabel": True}))
    assert multi["labels"] == pytest.approx(searcher.classify(image_id, ["normal"], multilabel=True), abs=1e-5)
    assert "at least two labels" in error_text(mcp.call("classify", {"image_id": image_id, "labels": ["normal"]}))
    too_many = [f"label {i}" for i in range(33)]
    assert "labels" in error_text(mcp.call("classify", {"image_id": image_id, "labels": too_many}))


def test_index_status(mcp, searcher):
    status = answer(mcp.call("index_status"))
    stats = searcher.stats()
    assert status["ready"] is True and status["images"] == stats["images"] == len(searcher)
    assert status["modalities"] == stats["modalities"] and status["modalities"]["CT"] == 1
    assert status["model"]["fingerprint"] == searcher.model_info["fingerprint"]


# ---------------------------------------------------------------------------- refusals

def test_bad_ids_are_one_line_errors(mcp):
    for tool, arguments in [("image_info", {"image_id": 999999}), ("image_thumbnail", {"image_id": 999999}),
                            ("search_like", {"image_id": 999999}),
                            ("classify", {"image_id": 999999, "labels": ["a", "b"]})]:
        assert "no image with id 999999 in the index" in error_text(mcp.call(tool, arguments)), tool
    assert "image_id" in error_text(mcp.call("image_info", {"image_id": "seven"}))
    assert "image_id" in error_text(mcp.call("image_info", {"image_id": -1}))
    assert "image_id" in error_text(mcp.call("image_info", {}))


def test_limits_are_one_line_errors(mcp):
    assert "k: Input should be less than or equal to 100" in error_text(
        mcp.call("search_text", {"query": "chest", "k": 101}))
    assert "k" in error_text(mcp.call("search_text", {"query": "chest", "k": 0}))
    assert "query" in error_text(mcp.call("search_text", {"query": "x" * 2001}))
    assert "query" in error_text(mcp.call("search_text", {"query": ""}))
    assert "operator" in error_text(mcp.call("search_text", {"query": "chest +"}))
    assert "labels.0" in error_text(mcp.call("classify", {"image_id": 1, "labels": ["x" * 201, "y"]}))


def test_images_that_are_not_images_are_refused(mcp):
    just_over = base64.b64encode(b"\0" * ((16 << 20) + 3)).decode()
    assert error_text(mcp.call("search_image", {"image_base64": just_over})) == \
        "Error executing tool search_image: the image is over 16 MB"
    far_over = "A" * (24 << 20)  # refused by the schema, and the message does not quote it
    message = error_text(mcp.call("search_image", {"image_base64": far_over}))
    assert message.startswith("Error executing tool search_image: image_base64: String should have at most") \
        and len(message) < 200
    assert "not base64" in error_text(mcp.call("search_image", {"image_base64": "this is not base64!"}))
    assert "not an image or DICOM file" in error_text(
        mcp.call("search_image", {"image_base64": base64.b64encode(b"plain text, no image").decode()}))
    truncated = (Path(PYDICOM_FILES) / "CT_small.dcm").read_bytes()[:1000]
    assert "cannot read the query image" in error_text(
        mcp.call("search_image", {"image_base64": base64.b64encode(truncated).decode()}))


def test_a_decompression_bomb_is_refused_before_decoding(mcp):
    """A 100-byte PNG claiming 40,000 x 40,000 pixels (1.6 gigapixels, 1.6 GB decoded): the
    indexer's size guard refuses it from its header."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    message = error_text(mcp.call("search_image", {"image_base64": base64.b64encode(bomb).decode()}))
    assert "cannot read the query image: too big" in message


def test_no_tool_reads_a_file_outside_the_index(mcp, searcher, tmp_path):
    """A path given anywhere is a text, an error or nothing, never a file read: neither the
    content of /etc/passwd nor that of an image beside the index comes back."""
    secret = Path("/etc/passwd").read_text().splitlines()[0]
    outside = tmp_path / "outside.png"
    from PIL import Image
    Image.new("L", (32, 32), 200).save(outside)
    paths = ["/etc/passwd", str(outside), "../../../../etc/passwd", "file:///etc/passwd"]
    for path in paths:
        calls = [("search_text", {"query": path}), ("search_text", {"query": f"2:{path} + chest"}),
                 ("search_text", {"query": "chest", "modality": path, "body_part": path, "view": path}),
                 ("search_image", {"image_base64": path}), ("image_info", {"image_id": path}),
                 ("image_thumbnail", {"image_id": path}), ("search_like", {"image_id": path}),
                 ("classify", {"image_id": path, "labels": [path, "normal"]}),
                 ("search_text", {"query": "chest", "path": path}), ("index_status", {"index": path})]
        for tool, arguments in calls:
            result = mcp.call(tool, arguments)
            text = " ".join(getattr(block, "text", "") or getattr(block, "data", "") for block in result.content)
            assert secret not in text and "root:" not in text, (tool, arguments)
    # a text that is a path stays a text: the same hits as the text, not as the image file
    got = answer(mcp.call("search_text", {"query": str(outside), "k": 3}))
    same_hits(got, searcher.search(str(outside), force="text", k=3))
    assert got["hits"] != answer(mcp.call("search_image", {
        "image_base64": base64.b64encode(outside.read_bytes()).decode(), "k": 3}))["hits"]
    assert "Traceback" not in mcp.stderr()


def test_a_missing_index_is_reported_by_the_tools(tmp_path):
    process = McpProcess(tmp_path / "no-index", tmp_path / "stderr.txt")
    try:
        status = answer(process.call("index_status"))
        assert status["ready"] is False and "mi-index" in status["reason"]
        assert "mi-index" in error_text(process.call("search_text", {"query": "chest"}))
    finally:
        process.close()
    assert not (tmp_path / "no-index").exists()  # looked at, not made


# ---------------------------------------------------------------------------- the command

def test_mi_mcp_command_line(monkeypatch):
    from click.testing import CliRunner

    from retrieval.commands import mi

    shown = CliRunner().invoke(mi, ["mcp", "--help"])
    assert shown.exit_code == 0 and all(option in shown.output for option in ("--index", "--model", "--device"))
    assert "mcp" in CliRunner().invoke(mi, ["--help"]).output
    wrong = CliRunner().invoke(mi, ["mcp", "--device", "tpu"])
    assert wrong.exit_code == 2 and "'tpu' is not a device" in wrong.output
    # without the SDK: one line saying which extra to install, not an ImportError's traceback
    monkeypatch.delitem(sys.modules, "retrieval.mcp_server", raising=False)
    monkeypatch.setitem(sys.modules, "mcp.server.mcpserver", None)
    missing = CliRunner().invoke(mi, ["mcp"])
    assert missing.exit_code == 1 and missing.exception.__class__ is SystemExit
    assert "pip install 'medimageinsight-search[mcp]'" in missing.output and "Traceback" not in missing.output
