"""``python -m portpool.services <service-name>``: run one reference service."""

from __future__ import annotations

import importlib
import os
import signal
import sys

# A Ctrl-C before the service takes its signals over (its imports take about a second
# on a fresh clone) ends it as the default action does: quietly, interrupted. A Python
# handler printed a KeyboardInterrupt traceback of each import it cut short, and one
# that raises inside orjson's import crashes the process (SIGSEGV).
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

from portpool.services import SERVICES

USAGE = "usage: python -m portpool.services <service-name>\n  services: " + ", ".join(SERVICES)


def main(argv: list[str]) -> int:
    """Run the service named in ``argv`` (or ``$PORTPOOL_SERVICE``) until it is stopped.

    Returns the exit status: 0 after a clean stop, 1 on an error, 2 on a usage error.
    """
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    kind = argv[0] if argv else os.environ.get("PORTPOOL_SERVICE", "")
    if len(argv) > 1 or kind not in SERVICES:
        print(f"portpool.services: unknown service {kind!r}\n{USAGE}", file=sys.stderr)
        return 2
    from portpool.services import _runtime

    module = importlib.import_module(f"portpool.services.{SERVICES[kind]}")
    return _runtime.run(kind, module.serve)


def exit_now(code: int) -> None:
    """Exit without finalizing the interpreter: after the MCP SDK's imports that takes
    ~0.8 s of CPU per process, paid by every service at once when an instance stops.
    Everything the service owns is closed by the time ``main`` returns."""
    import contextlib
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
