"""The one exception a stage raises when it cannot run: the CLIs print it and exit."""
from __future__ import annotations


class StageError(Exception):
    """A stage (or its data, starting checkpoint or options) cannot run; the message says why.

    Library code raises it and never exits, so a caller (the benchmark, a notebook, a test) can
    handle it; `echo-train` turns it into an error message and exit status 1.
    """
