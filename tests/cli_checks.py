"""What the tests ask of a command's failure: exit status 1, one line, no traceback; a usage error
(exit status 2) ends with click's one "Error:" line."""
from __future__ import annotations


def one_line_failure(result) -> str:
    """The output of a failed click invocation (CliRunner), checked to be one line with exit status 1."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def usage_failure(result) -> str:
    """The "Error: ..." line of a click usage error (CliRunner), checked to be the last line, with exit status 2."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and lines[-1].startswith("Error: "), result.output
    return lines[-1]
