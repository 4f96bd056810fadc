"""The server's JSON responses: ASCII JSON, lossless for file names that are not UTF-8."""
from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse


class AsciiJSONResponse(JSONResponse):
    """JSON in ASCII: a file name that is not UTF-8 (a str with surrogate escapes) travels as its \\udcXX
    escapes, losslessly (json.loads and os.fsencode give its bytes back), as /api/query has always sent it;
    UTF-8 JSON cannot hold it and failed with a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
