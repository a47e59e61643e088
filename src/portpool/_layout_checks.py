"""Pool arithmetic of a layout: the admissible instance count, overlaps and warnings.

Pure functions over services (``portpool.layout.Service``): how many instances fit
before two pools share a port or one leaves 1..65535, which services collide and
where, and which ports deserve a warning (below 1024, on the browsers' unsafe-port
list, in X11's 6000-6063, and inside an ephemeral port range the caller passes: this
module never asks the host); and every problem between services
(``cross_problems``: environment names, dependencies, overlaps, the maximum).
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Sequence
from typing import Protocol, TypeGuard

from portpool._order import dependency_problems


class Service(Protocol):
    """What these checks read of a ``portpool.layout.Service``; a protocol, so this
    module never imports ``layout`` (which imports it: no cycle between the two)."""

    @property
    def name(self) -> str: ...
    @property
    def base(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def stride(self) -> int: ...
    @property
    def env_name(self) -> str: ...
    @property
    def depends_on(self) -> tuple[str, ...]: ...
    def first_port(self, instance: int) -> int: ...


MAX_PORT = 65535
INSTANCE_LIMIT = 1000  # no machine runs more copies of one app; keeps validation bounded
MAX_SERVICES = 1000  # a lease costs ~3 file descriptors; 1,000 services is far past any app

# Ports Chromium and Firefox refuse to connect to ("ERR_UNSAFE_PORT"): the Fetch
# standard's "bad port" list (fetch.spec.whatwg.org/#port-blocking), which Chromium's
# net/base/port_util.cc kRestrictedPorts and Firefox's netwerk/base gBadPortList follow.
BROWSER_UNSAFE_PORTS = frozenset(
    {
        1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87,
        95, 101, 102, 103, 104, 109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143,
        161, 179, 389, 427, 465, 512, 513, 514, 515, 526, 530, 531, 532, 540, 548, 554, 556,
        563, 587, 601, 636, 989, 990, 993, 995, 1719, 1720, 1723, 2049, 3659, 4045, 4190,
        5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080,
    }
)  # fmt: skip
_UNSAFE_SORTED = sorted(BROWSER_UNSAFE_PORTS)
# X11's TCP ports: display :N listens on 6000+N (DESIGN.md: the default layout's MCP
# pools all fall there, only 6000 is on the browsers' list).
X11_PORTS = (6000, 6063)

_MAX_REPORTED_OVERLAPS = 20
_MAX_RUNS_SHOWN = 6
Problem = tuple[str, str]  # (dotted key, what is wrong)


def _runs(ints: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted distinct ``ints`` merged into inclusive runs of consecutive numbers."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(ints)):
        if out and out[-1][1] + 1 == i:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _compact(runs: Sequence[tuple[int, int]], sep: str = "..") -> str:
    """``[(6000, 6002), (6100, 6100)]`` -> ``"6000..6002, 6100"``; long lists are cut."""
    parts = [str(lo) if lo == hi else f"{lo}{sep}{hi}" for lo, hi in runs[:_MAX_RUNS_SHOWN]]
    if len(runs) > _MAX_RUNS_SHOWN:
        more = len(runs) - _MAX_RUNS_SHOWN
        parts.append(f"... ({counted(more, 'more range')})")
    return ", ".join(parts)


def counted(count: int, noun: str) -> str:
    """``counted(1, "instance")`` -> ``1 instance``; ``counted(2, "instance")`` ->
    ``2 instances`` (messages once read "at most 1 instances")."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}..{last}"


def _count(runs: Sequence[tuple[int, int]]) -> int:
    return sum(hi - lo + 1 for lo, hi in runs)


# --- the admissible instance count ----------------------------------------------------


def _overlap_text(a: Service, n: int, b: Service, m: int) -> str:
    a0, b0 = a.first_port(n), b.first_port(m)
    a1, b1 = a0 + a.size - 1, b0 + b.size - 1
    lo, hi = max(a0, b0), min(a1, b1)
    if n == m:
        return (
            f"in instance {n}, {a.name}'s pool {span(a0, a1)} and {b.name}'s pool "
            f"{span(b0, b1)} share port{'s' if hi > lo else ''} {span(lo, hi)}"
        )
    return (
        f"instance {n}'s {a.name} pool {span(a0, a1)} would overlap instance {m}'s {b.name} pool "
        f"{span(b0, b1)} (port{'s' if hi > lo else ''} {span(lo, hi)})"
    )


def count_admissible(services: Sequence[Service], limit: int) -> tuple[int, str]:
    """The largest instance count with disjoint in-range pools, and what stops it there.

    Each pool goes into one set of taken ports: at most 65,535 ports fit before two
    collide or one leaves the range, so the work is bounded whatever the layout.
    """
    strides = {s.stride for s in services}
    if len(strides) == 1 and 0 not in strides:
        fast = _admissible_same_stride(services, strides.pop(), limit)
        if fast is not None:
            return fast
    taken: set[int] = set()
    rules = [(s.base, s.size, s.stride) for s in services]
    for n in range(limit):
        for i, (base, size, stride) in enumerate(rules):
            first = base + stride * n
            ports = range(first, first + size)
            if first < 1 or first + size - 1 > MAX_PORT:
                s = services[i]
                return n, (
                    f"instance {n + 1}'s {s.name} pool {span(first, first + size - 1)} "
                    f"would leave the port range 1..{MAX_PORT}"
                )
            if not taken.isdisjoint(ports):
                return n, _first_collision(services, n + 1, services[i])
            taken.update(ports)
    return limit, f"portpool allows at most {counted(limit, 'instance')}"


def _admissible_same_stride(
    services: Sequence[Service], stride: int, limit: int
) -> tuple[int, str] | None:
    """``admissible`` when every service has the same stride (the usual layout).

    Instance n's pools are then instance 1's port set U shifted by stride*(n-1), so
    instance k+1 is the first to collide exactly when k*stride is the smallest
    difference of two ports of U that is a multiple of stride. Such a pair is adjacent
    among the ports of U with the same remainder mod stride, so one pass over U sorted
    finds it. (Shifting U as a bit set once per instance, up to 1,000 times, cost about
    as much as starting python, on every layout load of every command.)
    None when instance 1's pools overlap (the general path says where).
    """
    # Overlaps first, on the pools as intervals: expanding every pool to its ports before
    # asking took 10 s and 2.7 GB for 1,000 services sharing one 64,000-port pool.
    spans = sorted((s.base, s.base + s.size - 1) for s in services)
    reach = 0  # the highest port of the pools so far (disjoint so far: the last one's)
    for lo, hi in spans:
        if lo <= reach:
            return None
        reach = hi
    if sum(hi - lo + 1 for lo, hi in spans) > MAX_PORT:
        return None  # pools outside 1..65535 (the general path stops at once on those)
    # Disjoint pools inside 1..65535 hold at most 65,535 ports: walking them is bounded.
    ports = [p for lo, hi in spans for p in range(lo, hi + 1)]
    # The last instance whose pools all stay in range.
    edge = min(services, key=lambda s: (MAX_PORT - s.base - s.size + 1) // stride)
    in_range = (MAX_PORT - edge.base - edge.size + 1) // stride + 1
    below: dict[int, int] = {}  # remainder mod stride -> the highest port seen so far
    first_hit: tuple[int, int] | None = None  # (k, the upper port of the pair)
    for port in ports:  # ascending: on a tie in k the lowest upper port is kept
        lower = below.get(port % stride)
        if lower is not None:
            k = (port - lower) // stride
            if first_hit is None or k < first_hit[0]:
                first_hit = (k, port)
        below[port % stride] = port
    if first_hit is not None and first_hit[0] < min(limit, in_range):
        k, port = first_hit
        a = next(s for s in services if 0 <= port - k * stride - s.base < s.size)
        b = next(s for s in services if 0 <= port - s.base < s.size)
        return k, _overlap_text(a, k + 1, b, 1)
    if limit <= in_range:
        return limit, f"portpool allows at most {counted(limit, 'instance')}"
    first = edge.first_port(in_range + 1)
    return in_range, (
        f"instance {in_range + 1}'s {edge.name} pool {span(first, first + edge.size - 1)} "
        f"would leave the port range 1..{MAX_PORT}"
    )


def _first_collision(services: Sequence[Service], n: int, s: Service) -> str:
    """Which earlier pool the pool of ``s`` in instance ``n`` runs into (rare path)."""
    first = s.first_port(n)
    last = first + s.size - 1
    for m in range(1, n + 1):
        for t in services:
            if m == n and t is s:
                break
            t0 = t.first_port(m)
            if t0 <= last and first <= t0 + t.size - 1:
                return _overlap_text(s, n, t, m)
    return f"instance {n}'s {s.name} pool collides with another pool"


def admissible_instances(services: Sequence[Service], limit: int = INSTANCE_LIMIT) -> int:
    """The largest n such that the pools of instances 1..n are pairwise disjoint and
    inside 1..65535, at most ``limit``. 0 means not even instance 1 fits."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit}")
    return count_admissible(services, limit)[0]


def instance1_overlaps(services: Sequence[Service]) -> list[Problem]:
    """Pairs of services whose instance-1 pools share ports: the first ones in full,
    then how many more. O(n log n): the pairs are counted by bisection, never walked
    (walking 10,000 services on one port took 3 s, 40,000 took 42 s)."""
    order = sorted(services, key=lambda s: (s.base, s.base + s.size))
    bases = [s.base for s in order]
    position = {id(s): i for i, s in enumerate(services)}
    out: list[Problem] = []
    found = 0
    for i, a in enumerate(order):
        a_last = a.base + a.size - 1
        # Later services in ``order`` start at or after ``a``: those starting by a_last overlap.
        overlapping = bisect.bisect_right(bases, a_last, lo=i + 1) - (i + 1)
        for b in order[i + 1 : i + 1 + max(0, _MAX_REPORTED_OVERLAPS - found)][:overlapping]:
            first, second = sorted((a, b), key=lambda s: position[id(s)])
            out.append((f"services.{second.name}", _overlap_text(second, 1, first, 1)))
        found += overlapping
    if found > _MAX_REPORTED_OVERLAPS:
        more = found - _MAX_REPORTED_OVERLAPS
        out.append(("services", f"... and {counted(more, 'more overlap')}"))
    return out


def env_collisions(services: Sequence[Service]) -> list[Problem]:
    seen: dict[str, Service] = {}
    out: list[Problem] = []
    for s in services:
        other = seen.setdefault(s.env_name, s)
        if other is s:
            continue
        if other.name == s.name:
            out.append((f"services.{s.name}", "duplicate service name"))
        else:
            out.append(
                (
                    f"services.{s.name}",
                    f"duplicate service: its port variable {s.env_name} is also "
                    f"{other.name}'s; rename one of them",
                )
            )
    return out


# --- warnings -----------------------------------------------------------------------


def _touching(s: Service, lo: int, hi: int, instances: int) -> tuple[int, int] | None:
    """The instances (first, last) among 1..``instances`` whose pool of ``s`` has a port
    in ``lo``..``hi``. Pools only move up with the instance number, so they are a run."""
    if s.stride == 0:
        hit = s.base <= hi and lo <= s.base + s.size - 1
        return (1, instances) if hit else None
    # first(n) = base + stride*(n-1); the pool touches when first <= hi and last >= lo.
    n_first = max(1, -(-(lo - s.size + 1 - s.base) // s.stride) + 1)
    n_last = min(instances, (hi - s.base) // s.stride + 1)
    return (n_first, n_last) if n_first <= n_last else None


def _clip(s: Service, n: int, lo: int, hi: int) -> tuple[int, int]:
    first = s.first_port(n)
    return max(first, lo), min(first + s.size - 1, hi)


def _ports_in(s: Service, lo: int, hi: int, instances: int) -> str | None:
    """``ports 6000-6002 (instance 1) are`` for the ports of ``s`` in ``lo``..``hi``."""
    found = _touching(s, lo, hi, instances)
    if found is None:
        return None
    n_first, n_last = found
    first_run, last_run = _clip(s, n_first, lo, hi), _clip(s, n_last, lo, hi)
    if n_first == n_last or s.stride == 0:
        ports = _compact([first_run])
        plural = first_run[1] > first_run[0]
    else:
        gap = ", " if n_last == n_first + 1 else ", ..., "
        ports = _compact([first_run]) + gap + _compact([last_run])
        plural = True
    inst = _compact([(n_first, n_last)], "-")
    inst_word = "instances" if n_last > n_first else "instance"
    return (
        f"{'ports' if plural else 'port'} {ports} ({inst_word} {inst}) {'are' if plural else 'is'}"
    )


def _them(ports: str) -> str:
    """The pronoun for ``_ports_in``'s ``ports``: "it" for one port, else "them"."""
    return "it" if ports.endswith(" is") else "them"


def _unsafe_ports(s: Service, instances: int) -> str | None:
    """``port 6000 (instance 1) is`` for the browser-blocked ports of ``s``'s pools."""
    top = s.first_port(instances) + s.size - 1
    hits: list[tuple[int, int]] = []
    for u in _UNSAFE_SORTED[bisect.bisect_left(_UNSAFE_SORTED, s.base) :]:
        if u > top:
            break
        found = _touching(s, u, u, instances)
        if found:
            hits.append((u, found[0]))
    if not hits:
        return None
    runs = _runs(u for u, _ in hits)
    inst = _runs(n for _, n in hits)
    plural = len(hits) > 1
    inst_word = "instances" if _count(inst) > 1 else "instance"
    return (
        f"{'ports' if plural else 'port'} {_compact(runs)} ({inst_word} {_compact(inst, '-')}) "
        f"{'are' if plural else 'is'}"
    )


def port_warnings(
    source: str,
    services: Sequence[Service],
    instances: int,
    ephemeral: tuple[int, int] | None = None,
) -> list[str]:
    """Human warnings about ports of instances 1..``instances``, one per service and kind.

    ``ephemeral``: the host's ephemeral port range (first, last), or None to leave that
    kind out; a pure function, so a ``Layout``'s own warnings never depend on the host.
    """
    if instances < 1:
        return []
    out: list[str] = []
    for s in services:
        where = f"{source}: services.{s.name}"
        if 0 < s.stride < s.size:
            # Valid, but surely not meant: the layout then admits one instance, which
            # `layout` showed only as its limit and `up` as "no free instance slot".
            out.append(
                f"{where}: stride {s.stride} is smaller than size {s.size}: each "
                "instance's pool overlaps the next one's, so only 1 instance fits; make "
                f"stride at least {s.size} (stride = 0 means one instance on purpose)"
            )
        low = _ports_in(s, 1, 1023, instances)
        if low:
            out.append(
                f"{where}: {low} below 1024: binding {_them(low)} needs administrator rights "
                "on most systems"
            )
        eph = ephemeral and _ports_in(s, ephemeral[0], ephemeral[1], instances)
        if eph and ephemeral:
            # Pools that only enter the range at a later instance: a lower maximum avoids it.
            later = (_touching(s, ephemeral[0], ephemeral[1], instances) or (1, 1))[0] > 1
            out.append(
                f"{where}: {eph} inside the OS's ephemeral port range "
                f"{ephemeral[0]}-{ephemeral[1]}: any outgoing connection may take {_them(eph)}; "
                f"move the pool out of it{', or lower max_instances' if later else ''}"
            )
        unsafe = _unsafe_ports(s, instances)
        if unsafe:
            out.append(
                f"{where}: {unsafe} on browsers' unsafe-port list: Chromium and Firefox "
                "refuse to connect there"
            )
        x11 = _ports_in(s, X11_PORTS[0], X11_PORTS[1], instances)
        if x11:
            out.append(
                f"{where}: {x11} in X11's range {X11_PORTS[0]}-{X11_PORTS[1]}: an X server "
                "that listens on TCP holds 6000+N for display :N (the pool then moves on)"
            )
    return out


# --- problems between services ----------------------------------------------------


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def dependency_problems_of(
    services: Sequence[Service], names: Collection[str] | None = None
) -> list[Problem]:
    """Each dependency problem (unknown name, cycle) as a ``services.S.depends_on`` key."""
    graph = {s.name: s.depends_on for s in services}
    found = dependency_problems(graph, names)
    return [(f"services.{name}.depends_on", p) for name, p in found]


def too_many_services(count: int) -> str:
    """The problem of a layout with ``count`` (> ``MAX_SERVICES``) services."""
    return f"has {count} services; a layout may have at most {MAX_SERVICES}"


def cross_problems(
    services: Sequence[Service], max_instances: object, names: Collection[str] | None = None
) -> tuple[list[Problem], int, str]:
    """Problems between services: names, overlaps, the admissible count and the maximum."""
    out: list[Problem] = []
    if not services:
        out.append(("services", "at least one service is required, e.g. [services.api]"))
        return out, 0, "there are no services"
    if len(services) > MAX_SERVICES:
        out.append(("services", too_many_services(len(services))))
        return out, 0, "there are too many services"
    out.extend(env_collisions(services))
    out.extend(dependency_problems_of(services, names))
    out.extend(instance1_overlaps(services))
    admissible, reason = count_admissible(services, INSTANCE_LIMIT)
    if admissible == 0 and not out:
        out.append(("services", f"no instance is possible: {reason}"))
    elif admissible == INSTANCE_LIMIT and _is_int(max_instances) and max_instances > admissible:
        # Not "at most 1000 keep every pool disjoint": the pools would allow more.
        out.append(("max_instances", f"is {max_instances} but {reason}"))
    elif admissible and _is_int(max_instances) and max_instances > admissible:
        out.append(
            (
                "max_instances",
                f"is {max_instances} but at most {counted(admissible, 'instance')} keep"
                f"{'s' if admissible == 1 else ''} every pool disjoint and inside "
                f"1..{MAX_PORT}: {reason}",
            )
        )
    return out, admissible, reason
