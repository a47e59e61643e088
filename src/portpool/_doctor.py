"""``doctor``'s report on a layout: every pool port judged as ``acquire`` would judge it.

Each port of each admissible instance is held by a portpool holder (its record says
who), else the kernel's probe bind decides (``diagnosis``); a held port also names the
foreign listeners on it (the shield's rule: they can take its clients). Kills nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

from portpool._dataclass import dataclass
from portpool._heldlock import lock_path_problem
from portpool._layout_checks import counted
from portpool._platform import (
    LockTable,
    SocketOwners,
    TcpSocket,
    locked_inodes,
    tcp_sockets,
)
from portpool._portstatus import inspect_port
from portpool.diagnosis import (
    PortDiagnosis,
    PortHolder,
    diagnose_port,
    elsewhere_notes,
    intruder_notes,
    port_holder,
)
from portpool.errors import Refusal, RefusalReason, StateDirError
from portpool.layout import Layout, require_layout
from portpool.lock import record_path_problem
from portpool.records import SLOT_UNUSABLE, iter_instances
from portpool.statedir import StateDir

# A verdict is a refusal's reason, but "foreign" for "in use" and "free" for none.
VerdictKind = Literal[
    "free", "held", "foreign", "permission denied", "unavailable", "error", "free now"
]


@dataclass(frozen=True)
class PortVerdict:
    """``doctor``'s word on one pool port: None ``refusal`` means ``acquire`` can have it;
    otherwise the very Refusal ``acquire`` would report."""

    instance: int
    service: str
    port: int
    refusal: Refusal | None
    notes: tuple[str, ...] = ()
    diagnosis: PortDiagnosis | None = None
    # Listeners on the other loopback, which the lease does not cover (``elsewhere``).
    elsewhere: tuple[str, ...] = ()

    @property
    def kind(self) -> VerdictKind:
        """``free``, ``held`` (by portpool), ``foreign`` (in use), or the refusal's reason.
        Raises nothing."""
        if self.refusal is None:
            return "free"
        reason: RefusalReason = self.refusal.reason
        return "foreign" if reason == "in use" else reason

    @property
    def listed(self) -> bool:
        """Whether ``doctor`` lists it without ``--all``: refused, or free with a note (a
        TIME_WAIT a plain bind would meet: run warns of it, and doctor once did not).
        Raises nothing."""
        return self.refusal is not None or bool(self.notes or self.elsewhere)

    def describe(self) -> str:
        """One line for people: ``free``, the holder and notes, or the refusal and why.
        Raises nothing."""
        if self.refusal is None:
            return "; ".join(("free", *self.notes, *self.elsewhere))
        if self.refusal.reason == "held":
            # "held by instance 1 of app (pid ...)", and any foreign listener on it
            return "; ".join((self.refusal.detail, *self.notes, *self.elsewhere))
        return "; ".join((f"{self.refusal.reason} ({self.refusal.detail})", *self.elsewhere))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: the fields, ``kind``, ``text`` and the port's ``occupants`` (dicts).
        Raises nothing."""
        return {
            "instance": self.instance,
            "service": self.service,
            "port": self.port,
            "kind": self.kind,
            "text": self.describe(),
            "notes": [*self.notes, *self.elsewhere],
            "occupants": [] if self.diagnosis is None else self.diagnosis.to_dict()["occupants"],
        }


@dataclass(frozen=True)
class DoctorReport:
    """Every pool port of every admissible instance, judged as ``acquire`` would."""

    app: str
    host: str
    max_instances: int
    verdicts: tuple[PortVerdict, ...]
    # Slots no start can take ("instance 1: slot unusable: 1.lock is a directory, ..."):
    # run skipped them (or failed, pinned) while doctor called their ports free.
    unusable_slots: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        """How many ports have each ``kind``: ``free``, ``held`` and ``foreign`` always
        (0 if none), any refusal reason that occurs. Raises nothing."""
        out = {"free": 0, "held": 0, "foreign": 0}
        for v in self.verdicts:
            out[v.kind] = out.get(v.kind, 0) + 1
        return out

    def tally(self) -> str:
        """``doctor``'s count line: ``5 free, 2 held by portpool, 1 used by foreign
        processes``, then each other kind by the word its ports' lines use (``, 2 errors``;
        it summed them as "refused"). Raises nothing."""
        counts = self.counts()
        other = sorted(kind for kind in counts if kind not in ("free", "held", "foreign"))
        return (
            f"{counts['free']} free, {counts['held']} held by portpool, "
            f"{counts['foreign']} used by foreign processes"
        ) + "".join(
            f", {counted(counts[kind], kind) if kind == 'error' else f'{counts[kind]} {kind}'}"
            for kind in other
        )

    def heading(self) -> str:
        """The first line of ``doctor``'s text: ``app A: 2 instances, host H`` (it read
        "1 instances"). Raises nothing."""
        return f"app {self.app}: {counted(self.max_instances, 'instance')}, host {self.host}"

    def summary(self) -> list[str]:
        """Lines about the whole report that no single port says: a host this machine
        does not have (every port read "unavailable"), foreign listeners on held ports.
        Raises nothing."""
        out = list(self.unusable_slots)
        unavailable = self.counts().get("unavailable", 0)
        if unavailable:
            out.append(
                f"host {self.host} is not an address of this machine: every start fails "
                "until it is (check `host` in the layout)"
            )
        intruded = sum(1 for v in self.verdicts if v.kind == "held" and v.notes)
        if intruded:
            ports = "1 held port is" if intruded == 1 else f"{intruded} held ports are"
            out.append(
                f"{ports} also listened on by a foreign program, which can receive their clients"
            )
        return out

    def to_dict(self, *, show_free: bool = True) -> dict[str, object]:
        """JSON-ready; ``ports`` lists the ``listed`` ports, and with ``show_free`` the
        free ones too (``doctor --all``), while ``counts`` always counts every port.
        Raises nothing."""
        return {
            "app": self.app,
            "host": self.host,
            "max_instances": self.max_instances,
            "counts": self.counts(),
            "summary": self.summary(),
            "ports": [v.to_dict() for v in self.verdicts if show_free or v.listed],
        }


def classify_port(
    state: StateDir,
    port: int,
    host: str,
    *,
    locked: LockTable | None = None,
    sockets: Sequence[TcpSocket] | None = None,
    owners: SocketOwners | None = None,
) -> tuple[Refusal | None, tuple[str, ...], PortDiagnosis | None]:
    """Whether ``acquire`` on ``host`` would take ``port`` now, and if not the Refusal it
    would give: held by a portpool lock holder, else the kernel's probe bind. Kills and
    keeps nothing. ``locked``, ``sockets``, ``owners``: the kernel reads to share among
    many ports (None: read here). Raises InvalidPort for a value that is not a port,
    OSError if ``host`` does not resolve."""
    return _classify(state, port, host, locked=locked, sockets=sockets, owners=owners)[:3]


def _classify(
    state: StateDir,
    port: int,
    host: str,
    *,
    locked: LockTable | None,
    sockets: Sequence[TcpSocket] | None,
    owners: SocketOwners | None = None,
) -> tuple[Refusal | None, tuple[str, ...], PortDiagnosis | None, PortHolder | None]:
    """``classify_port``, and the holder of a held port (read once: doctor's other
    notes of that port need it too)."""
    seen = inspect_port(state, port, locked)
    unusable = _unusable_lock_path(state, port) if seen.is_free else seen.unusable
    if unusable is not None:
        return Refusal(port, "error", unusable), (), None, None
    if not seen.is_free:
        # Never probed (the holder's sockets are there); its listeners are still read,
        # by the host the holder's lease covers, as its shield reads them.
        holder = port_holder(state, seen, host, locked)
        found = diagnose_port(port, holder.host, probe=False, sockets=sockets, owners=owners)
        notes = intruder_notes(found.occupants, holder)
        return Refusal(port, "held", seen.describe()), notes, found, holder
    found = diagnose_port(port, host, sockets=sockets, owners=owners)
    return found.refusal(), tuple(found.notes()), found, None


def _unusable_lock_path(state: StateDir, port: int) -> str | None:
    """Why ``acquire`` cannot use the port's lock path (something that is not a regular
    file of one name sits there: portpool makes none) or its record path (a directory,
    which it cannot replace): doctor called such a port free while run refused it.
    Read-only: never opens or creates either path."""
    directory = state.find("ports")
    if directory is None:
        return None
    # Worded as acquire's error, so run and doctor say the same of one port.
    unusable = lock_path_problem(directory, f"{port}.lock")
    if unusable is not None:
        return unusable
    problem = record_path_problem(directory, f"{port}.json")
    if problem is None:
        return None
    return str(StateDirError(os.path.join(directory.path, f"{port}.json"), problem))


def examine_layout(
    layout: Layout, state: StateDir | None = None, service: str | None = None
) -> DoctorReport:
    """``doctor``: what blocks which pool port of every admissible instance (of
    ``service`` only, if given), naming foreign holders where the OS says. Kills nothing.
    Raises UnknownService (exit 2) for a ``service`` the layout lacks, StateDirError for
    an unusable state dir, OSError if the layout's host does not resolve, TypeError for
    a ``layout`` that is no Layout."""
    require_layout(layout)
    services = layout.services if service is None else (layout.service(service),)
    own = state is None
    state = state or StateDir.open(create=False)  # read-only: creates nothing
    try:
        locked = locked_inodes()
        sockets = tcp_sockets()
        owners = SocketOwners()  # who has each socket open: one scan for every port
        verdicts = []
        for number in range(1, layout.max_instances + 1):
            for svc in services:
                for port in svc.pool(number):
                    refusal, notes, found, holder = _classify(
                        state, port, layout.host, locked=locked, sockets=sockets, owners=owners
                    )
                    elsewhere = elsewhere_notes(port, layout.host, sockets, holder)
                    verdicts.append(
                        PortVerdict(number, svc.name, port, refusal, notes, found, elsewhere)
                    )
        try:
            slots = tuple(
                f"instance {info.number}: slot unusable, every start skips it: "
                + info.problem.removeprefix(SLOT_UNUSABLE)
                for info in iter_instances(layout.app, state)
                if info.problem is not None and info.problem.startswith(SLOT_UNUSABLE)
            )
        except StateDirError as e:  # every start fails on it too: said, not raised
            slots = (f"the instance slots cannot be read: {e}",)
        return DoctorReport(
            layout.app, layout.host, layout.max_instances, tuple(verdicts), unusable_slots=slots
        )
    finally:
        if own:
            state.close()
