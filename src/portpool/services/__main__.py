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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
