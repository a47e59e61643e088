"""``Outcome``: why a supervised run (``run``, ``up``) ended, and the exit it maps to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from portpool._dataclass import dataclass, field

__all__ = ["Outcome"]

if TYPE_CHECKING:
    from portpool._keeper import Failure
    from portpool.errors import ShieldTripped


@dataclass
class Outcome:
    """Why a supervised run ended: the exit code it maps to, a message, and the signal
    the caller should die of after releasing (None: exit with ``code``)."""

    code: int
    message: str = ""
    signum: int | None = None
    returncode: int | None = None  # ``run``: the command's Popen returncode
    lingering: list[str] = field(default_factory=list)  # ports still held, for people
    failure: Failure | None = None  # ``up``: the service's failure behind code 5
    tripped: ShieldTripped | None = None  # the shield's trip behind code 4

    def raise_if_tripped(self) -> None:
        """Raise the shield's trip behind this outcome (ShieldTripped, with what still
        held a port as ``lingering``), if the shield ended the run."""
        if self.tripped is not None:
            self.tripped.lingering = self.lingering
            raise self.tripped
