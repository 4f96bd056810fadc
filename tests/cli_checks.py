"""What the tests ask of a command's failure: exit status 1, one line, no traceback."""
from __future__ import annotations


def one_line_failure(result) -> str:
    """The output of a failed click invocation (CliRunner), checked to be one line with exit status 1."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output
