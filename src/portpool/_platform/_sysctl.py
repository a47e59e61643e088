"""Kernel settings about ports (the ephemeral range), read without loading ``socket``.

Apart from the network readers of ``_net`` because every layout load asks for the range
(a pool inside it is warned about), and importing ``socket`` would cost the read-only
commands ~7 ms.
"""

from __future__ import annotations

import sys


def ephemeral_port_range() -> tuple[int, int] | None:
    """The OS's range for outgoing connections' local ports, where it can be read.

    A pool inside it can be taken at any moment by some program's outgoing connection.
    """
    if sys.platform == "linux":
        try:
            with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
                low, high = (int(x) for x in f.read().split())
            return low, high
        except (OSError, ValueError):
            return None
    if sys.platform == "darwin":
        import subprocess

        try:
            out = subprocess.run(
                ["sysctl", "-n", "net.inet.ip.portrange.first", "net.inet.ip.portrange.last"],
                capture_output=True,
                text=True,
                timeout=2,
                check=True,
            ).stdout.split()
            return int(out[0]), int(out[1])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return 49152, 65535
    if sys.platform == "win32":
        return 49152, 65535  # the documented default of `netsh int ipv4 show dynamicport`
    return None
