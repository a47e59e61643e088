"""``python -m portpool.services <service-name>``: run one reference service."""

from __future__ import annotations

import importlib
import os
import sys

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


def die_of_interrupt() -> None:
    """A Ctrl-C before the service took its signals over (its imports take a second):
    end as the interrupted process it is, without the KeyboardInterrupt traceback of
    each import it cut short."""
    import signal

    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(130)  # where a signal does not end the process (Windows)


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except KeyboardInterrupt:
        die_of_interrupt()
    exit_now(code)
