"""Showing text portpool did not write (layout keys, file names, record labels) safely.

Usable from every layer, like ``layout`` and ``errors``: it imports nothing of portpool.
"""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str) -> str:
    """``text`` safe to print to a terminal or to put in a one-line message: every
    character that is not printable (C0/C1 controls, so ANSI escapes; lone surrogates;
    bidi controls; line and paragraph separators) shown as a Python escape (``\\x1b``),
    the rest unchanged. Raises nothing.

    Printed raw, such text reached the terminal from the state dir, reordered what the
    user read, crashed ``status`` (a surrogate), and split one error line in two (a
    quoted key ``"a\\nb"`` in a layout file).
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
