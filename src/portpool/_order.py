"""Start order: the services of a layout sorted so that each comes after what it depends on.

Pure functions over names, usable from ``layout`` (which reports unknown names and
cycles as layout errors) and from the supervisor (which starts services in this order).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from portpool._text import cut, toml_value

__all__ = ["dependency_problems", "start_order"]

_MAX_UNKNOWN_SHOWN = 20  # unknown names reported in full, then counted
_MAX_NAMES_SHOWN = 20  # known names listed in each of those reports


def dependency_problems(
    depends_on: Mapping[str, Sequence[str]], known: Collection[str] | None = None
) -> list[tuple[str, str]]:
    """``(service, problem)`` for every unknown name, self-dependency and cycle.

    ``depends_on`` maps each service name (in layout order) to the names it depends on;
    ``known`` (default: its keys) are the names that exist, when some services were left
    out because they have problems of their own. A cycle is reported once, on its first
    service in layout order, as ``a -> b -> a``.
    """
    names = list(depends_on) if known is None else list(known)
    known_set = set(names)  # a list made 1,000 services x 1,000 names quadratic
    shown = names[:_MAX_NAMES_SHOWN]
    more = len(names) - len(shown)
    known_text = ", ".join(map(cut, shown)) + (f", ... ({more} more)" if more > 0 else "")
    out: list[tuple[str, str]] = []
    unknown = 0
    first_unshown = ""  # the service of the first unknown name only counted
    for name, deps in depends_on.items():
        for dep in deps:
            if dep == name:
                out.append((name, "a service cannot depend on itself"))
            elif dep not in known_set:
                unknown += 1
                if unknown <= _MAX_UNKNOWN_SHOWN:
                    problem = (
                        f"depends on {toml_value(dep)}, which is not a service; known: {known_text}"
                    )
                    out.append((name, problem))
                elif not first_unshown:
                    first_unshown = name
    if first_unshown:
        # Each line once named every service: 1,000 services depending on names that do
        # not exist filled a gigabyte with the same list.
        extra = unknown - _MAX_UNKNOWN_SHOWN
        out.append((first_unshown, f"... and {extra} more names that are not services"))
    if out:
        return out
    cycle = _find_cycle(depends_on)
    if cycle:
        out.append((cycle[0], "dependency cycle: " + " -> ".join(cycle)))
    return out


def _find_cycle(depends_on: Mapping[str, Sequence[str]]) -> list[str] | None:
    """One cycle as a closed path of names, or None (iterative DFS: no recursion limit)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for root in depends_on:
        if state.get(root):
            continue
        path: list[str] = [root]
        stack = [iter(depends_on[root])]
        state[root] = 1
        while stack:
            dep = next(stack[-1], None)
            if dep is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            if dep not in depends_on:
                continue
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if not state.get(dep):
                state[dep] = 1
                path.append(dep)
                stack.append(iter(depends_on[dep]))
    return None


def start_order(depends_on: Mapping[str, Sequence[str]]) -> list[str]:
    """The names in an order where each follows everything it depends on; ties keep the
    layout's order. Raises ValueError on an unknown name or a cycle (a layout that was
    validated has neither)."""
    problems = dependency_problems(depends_on)
    if problems:
        raise ValueError(f"{problems[0][0]}: {problems[0][1]}")
    done: list[str] = []
    placed: set[str] = set()
    remaining = list(depends_on)
    while remaining:
        # The first service, in layout order, whose dependencies are all placed.
        for name in remaining:
            if all(dep in placed for dep in depends_on[name]):
                break
        remaining.remove(name)
        placed.add(name)
        done.append(name)
    return done
