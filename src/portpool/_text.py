"""Showing text portpool did not write (layout keys, file names, record labels) safely.

Usable from every layer, like ``layout`` and ``errors``: it imports nothing of portpool.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["cut", "printable", "shell_word", "toml_value"]


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


def shell_word(text: str) -> str:
    """``text`` as one word to paste into a shell: ``shlex.quote``'s, or, when it holds
    characters that are not printable (a newline, an escape), bash's ``$'...'`` with
    each of them escaped as ``printable`` shows it. Raises nothing.

    Quoted raw, a path with a newline split ``up --detach``'s "stop: portpool stop 1
    --config '...'" hint in two, and the terminal ate its escape sequences."""
    if text.isprintable():
        import shlex

        return shlex.quote(text)
    body = "".join(
        "\\" + c if c in "\\'" else c if c.isprintable() else ascii(c)[1:-1] for c in text
    )
    return f"$'{body}'"


SHOWN_MAX = 60  # characters of a value quoted in a message; a layout value can be 1 MB


def cut(text: str, limit: int = SHOWN_MAX) -> str:
    """``text``, or its first ``limit`` characters and ``...`` if longer. Raises nothing.

    A 200 KB value in a layout file made a 200 KB error line."""
    return text if len(text) <= limit else text[:limit] + "..."


def toml_value(value: object, limit: int = SHOWN_MAX) -> str:
    """``value`` (as ``tomllib`` parsed it) spelled as in a TOML file, for a message:
    ``false``, ``1979-05-27``, ``{a = 1, b = [true]}``, a string quoted; at most about
    ``limit`` characters (then ``...``). Raises nothing.

    Python's spelling (``False``, ``datetime.date(1979, 5, 27)``, ``{'a': 1}``) is not
    what the user wrote, and a huge array was rendered whole before any cut.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = repr(value[: limit + 1])
        return shown if len(value) <= limit else shown[:-1] + "..." + shown[-1]
    if isinstance(value, int | float):
        try:
            return cut(repr(value), limit)
        except ValueError:  # an int of more digits than Python converts to text
            return "a very large integer"
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):  # a TOML date, time or date-time
        text = str(isoformat())
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    # Each level spells at least one character, so a level past ``limit`` is never shown:
    # items get one less, which bounds the recursion (tomllib reads ~450 levels, and
    # spelling them back ended `layout` in a RecursionError traceback).
    if isinstance(value, dict):
        if limit <= 0:
            return "{...}"
        pairs = ((_toml_key(str(k), limit), v) for k, v in value.items())
        return _joined("{", (f"{k} = {toml_value(v, limit - 1)}" for k, v in pairs), "}", limit)
    if isinstance(value, list | tuple):
        if limit <= 0:
            return "[...]"
        return _joined("[", (toml_value(v, limit - 1) for v in value), "]", limit)
    return cut(repr(value), limit)


def _toml_key(key: str, limit: int) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return cut(key, limit) if bare else toml_value(key, limit)


def _joined(opening: str, items: Iterable[str], closing: str, limit: int) -> str:
    """``opening`` + ``items`` joined with ``, `` + ``closing``, cut at about ``limit``
    characters; the items are rendered lazily, so only what is shown is rendered."""
    text = opening
    for n, item in enumerate(items):
        if len(text) > limit:
            return text + "..." + closing
        text += (", " if n else "") + item
    return cut(text, limit) + closing if len(text) > limit else text + closing
