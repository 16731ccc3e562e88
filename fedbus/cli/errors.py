"""How the command line fails: a user's mistake is one line and exit 2, a bug a traceback.

Operators run ``fedbus`` from scripts and unit files, where a 60-line traceback hides the
one fact they need (which flag, key or file to change). Anything raised as
:class:`UserError` (and every usage error the parser finds) is printed as a single line on
stderr; ``--debug`` adds the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2
"""The conventional exit status for a command used wrongly (sysexits' EX_USAGE is 64; shells
and click use 2)."""


class UserError(Exception):
    """A mistake the user can fix: a bad flag, config key or value, a missing file, a port in
    use, a broker that is not there. The message names what to change."""


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces collapsed: a log line, not a page."""
    return " ".join(text.split())
