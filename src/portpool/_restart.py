"""When a supervised service that exited is started again: the restart policy and backoff.

A pure state machine (time is passed in), so the rules are tested without waiting.
A crash loop is a service that fails without making progress: a run counts toward the
limit only if it exited before it became ready through a real probe (tcp, http, log),
or, for ``ready = "none"``, ran less than 1 s (``made_progress``). The delay before the
k-th counted restart is 0.1 s * 2**(k-1), capped at 30 s, and more than 5 counted
restarts within 60 s give up (restarting it forever hides the failure and burns the
CPU, the crash loop systemd's StartLimitBurst stops). A run that made progress clears
the count, so the next restart waits 0.1 s again: a service that serves and exits now
and then (every 20th request, under steady load) is never given up, the case a plain
"N restarts in T seconds" rule got wrong.
"""

from __future__ import annotations

from collections import deque

from portpool._dataclass import dataclass, field
from portpool._layout_fields import RESTART_POLICIES  # the layout file's words for them

__all__ = [
    "BACKOFF_CAP_S",
    "BACKOFF_FIRST_S",
    "NONE_PROGRESS_S",
    "RESTART_BURST",
    "RESTART_POLICIES",
    "RESTART_WINDOW_S",
    "Decision",
    "RestartTracker",
    "backoff_delay_s",
    "backoff_s",
    "made_progress",
    "wants_restart",
]

BACKOFF_FIRST_S = 0.1
BACKOFF_CAP_S = 30.0
RESTART_BURST = 5  # restarts allowed within RESTART_WINDOW_S; one more gives up
RESTART_WINDOW_S = 60.0
NONE_PROGRESS_S = 1.0  # ready = "none": a run this long made progress


def made_progress(ready_kind: str, became_ready: bool, ran_s: float) -> bool:
    """Whether a run of a service made progress (does not count toward the crash-loop
    limit): it became ready through a real probe (``ready_kind`` tcp, http or log), or,
    with ``ready_kind`` "none" (ready at once, so readiness proves nothing), it ran at
    least ``NONE_PROGRESS_S`` seconds (``ran_s``)."""
    if ready_kind == "none":
        return ran_s >= NONE_PROGRESS_S
    return became_ready


def wants_restart(policy: str, returncode: int) -> bool:
    """Whether ``policy`` restarts a service that exited with ``returncode`` (negative:
    killed by that signal, which counts as a failure)."""
    if policy == "always":
        return True
    if policy == "on-failure":
        return returncode != 0
    return False


def backoff_delay_s(recent_restarts: int) -> float:
    """The wait before a restart when ``recent_restarts`` happened within the window
    already: 0.1, 0.2, 0.4, ... seconds, never more than 30."""
    return float(min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2.0 ** min(recent_restarts, 20)))


@dataclass(frozen=True)
class Decision:
    """What to do about one exit: restart after ``delay_s``, or not (``give_up`` says
    whether that is the crash-loop limit rather than the policy)."""

    restart: bool
    delay_s: float = 0.0
    give_up: bool = False


@dataclass
class RestartTracker:
    """One service's restart history; ``on_exit`` decides, ``count`` is the total."""

    policy: str = "no"
    count: int = 0
    _recent: deque[float] = field(default_factory=deque)

    def on_exit(self, returncode: int, now: float, *, progressed: bool = False) -> Decision:
        """The decision for an exit at monotonic time ``now`` (seconds); a restart it
        grants is counted in ``count`` at once. ``progressed`` (``made_progress``): the
        run does not count toward the crash-loop limit and the backoff starts again."""
        if not wants_restart(self.policy, returncode):
            return Decision(False)
        if progressed:
            self._recent.clear()
            self.count += 1
            return Decision(True, BACKOFF_FIRST_S)
        while self._recent and now - self._recent[0] > RESTART_WINDOW_S:
            self._recent.popleft()
        if len(self._recent) >= RESTART_BURST:
            return Decision(False, give_up=True)
        delay = backoff_delay_s(len(self._recent))
        self._recent.append(now)
        self.count += 1
        return Decision(True, delay)


def backoff_s(first_s: float, cap_s: float, attempt: int) -> float:
    """``first_s`` doubled ``attempt`` times (0, 1, ...), at most ``cap_s``: seconds.
    The exponent is capped: 2**1075 is past a float, and a readiness wait or a stop
    of 52 s or more ended in OverflowError (a service never SIGKILLed). Raises nothing."""
    return min(cap_s, first_s * 2.0 ** min(attempt, 60))
