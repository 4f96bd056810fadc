"""Query syntax: texts and images, combined as weighted sums of their embeddings (rclip style).

    "pleural effusion"                         one text
    ./case12.dcm                               one image (an existing file is an image query)
    "pleural effusion" + ./case12.dcm          sum of the two embeddings
    ./case12.dcm - "pacemaker"                 like case 12, but away from "pacemaker"
    "2:pleural effusion" + "0.5:cardiomegaly"  weights: WEIGHT:QUERY

Each term's embedding is L2-normalised, multiplied by its signed weight, summed, and the sum is
normalised again. A term that is an existing file is read as an image, anything else as text;
`force="text"` or `force="image"` reads every term that way. A token "WEIGHT:REST" is a weighted
term unless the whole token names an existing file. Words without an operator between them are
one text (`mi-search pleural effusion` is "pleural effusion"); other terms without an operator
between them are added.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import QueryError

_WEIGHTED = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*:(.*)$", re.DOTALL)
_OPERATORS = {"+": 1.0, "-": -1.0}
SYNTAX_HELP = ('QUERY [+|- QUERY ...]; a QUERY is a text or an image file, '
               'optionally weighted as "2:pleural effusion"')


@dataclass(frozen=True)
class QueryTerm:
    """One part of a query: a text or an image path, with a signed weight."""

    kind: str       # "text" or "image"
    value: str      # the text, or the image path
    weight: float = 1.0

    def __str__(self) -> str:
        weight = "" if self.weight == 1.0 else f"{self.weight:g}:"
        return f"{weight}{self.value}" if self.kind == "text" else f"{weight}<{self.value}>"


def typed_tokens(text: str) -> str | list[str]:
    """A query typed as one string (a search box, an agent's text): split into tokens where it holds
    a standalone + or - operator, else kept whole, as a shell would hand mi-search the same words."""
    words = text.split()
    return words if any(word in _OPERATORS for word in words) else text


def parse_query(tokens: str | Sequence[str], *, force: str | None = None) -> list[QueryTerm]:
    """CLI-style tokens -> terms. `tokens` is one query string or a sequence such as
    ["2:pleural effusion", "+", "case12.dcm", "-", "pacemaker"]. Raises QueryError."""
    if force not in (None, "text", "image"):
        raise ValueError(f"force must be None, 'text' or 'image', not {force!r}")
    if isinstance(tokens, (str, Path)):
        tokens = [str(tokens)]
    terms: list[QueryTerm] = []
    sign: float | None = None  # set by an operator, consumed by the next term
    for token in map(str, tokens):
        if token.strip() in _OPERATORS:
            if sign is not None:
                raise QueryError(f"two operators in a row near {token!r}; the syntax is {SYNTAX_HELP}")
            sign = _OPERATORS[token.strip()]
            continue
        term = _term(token, 1.0 if sign is None else sign, force)
        previous = terms[-1] if terms else None
        if sign is None and previous and previous.kind == term.kind == "text" and term.weight == 1.0:
            # unquoted words (mi-search pleural effusion) are one text, as llm reads its prompt
            terms[-1] = QueryTerm("text", f"{previous.value} {term.value}", previous.weight)
        else:
            terms.append(term)  # no operator between two other terms: "+"
        sign = None
    if not terms:
        raise QueryError(f"empty query; the syntax is {SYNTAX_HELP}")
    if sign is not None:
        raise QueryError(f"the query ends with an operator; the syntax is {SYNTAX_HELP}")
    return terms


def _term(token: str, sign: float, force: str | None) -> QueryTerm:
    weight, value = 1.0, token
    match = _WEIGHTED.match(token)
    if match and not (force != "text" and Path(token).is_file()):
        weight, value = float(match.group(1)), match.group(2).strip()
    if not value.strip():
        raise QueryError(f"empty query term {token!r}; the syntax is {SYNTAX_HELP}")
    if force == "image" or (force is None and Path(value).is_file()):
        kind = "image"
    else:
        kind = "text"
    return QueryTerm(kind, value, sign * weight)


def combine(embeddings: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Weighted sum of L2-normalised rows (N, D), normalised again -> (D,). Raises QueryError when
    the terms cancel out (for example "x" - "x")."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    rows = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    total = (np.asarray(weights, dtype=np.float32)[:, None] * rows).sum(axis=0)  # (N, D) -> (D,)
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise QueryError("the query terms cancel each other out; change their weights")
    return (total / norm).astype(np.float32)
