"""The relay's command line as a test gives it: arguments and an environment of its own.

Kept apart from the other builders so that only the tests of options import the
runtime layer.
"""

from __future__ import annotations

from esmtpfa.runtime.options import Options


def parse_options(*args: str, **environ: str) -> Options:
    """``args`` parsed as ``twistd esmtpfa`` would, with ``environ`` as the whole
    environment (nothing leaks in from the test runner's)."""
    options = Options(environ=environ)
    options.parseOptions(list(args))
    return options


__all__ = ["parse_options"]
