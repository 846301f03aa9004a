"""Per-user order for events without a Kafka key.

The scheduler runs one chain per ordering key. A keyed event's key is its chain; a keyless
event is ordered by its userId (encoded as `produce` keys, so keyed and keyless events of
one user share a chain: each keyless message was its own key, and a retried event reached
Userpilot after the same user's later ones). When a keyless event's user is not known at
intake (its schema version is being fetched), any later event of its partition may be the
same user's: those wait until it is known, and then for it when it is theirs; it waits for
its own user's chain as it stood at intake. Waiting to learn a user is bounded
(UNRESOLVED_WAIT_S): with the registry down its user stays unknown, and every later event
of the partition waited, filled the window and paused the replica.

Thread rule: event loop only (the worker's intake and the events' tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Hashable
from dataclasses import dataclass

from consumer.codec import Event as Decoded
from consumer.commits import TP
from consumer.handler import Event
from consumer.logs import RateLimit
from consumer.routing import Send
from consumer.scheduling import Barrier

__all__ = ["KeylessOrder", "UserWaits", "decided_user"]

log = logging.getLogger(__name__)
# One line per topic per 30 s (the count of the rest appended): each unresolved event warns
# once, and a registry outage leaves a whole window of them (review "registry48").
log.addFilter(RateLimit(30.0))

UNRESOLVED_WAIT_S = 5.0
"""How long a partition's later events wait to learn the user of a keyless event whose
schema is being fetched (the registry's own bound on a call): past it they go, and that
one user's order is not guaranteed while the registry does not answer."""


@dataclass
class Unresolved:
    """A keyless event whose user is not known at intake: any later event of its partition
    may be the same user's."""

    user: asyncio.Future[str | None]  # its userId once decided (None: none)
    done: asyncio.Future[None]  # its job ended
    known_by: float  # monotonic time after which others no longer wait to learn its user
    warned: bool = False


@dataclass
class UserWaits:
    """What an event waits for before it is sent, so that no event of a user overtakes an
    earlier one of the same user in another chain of the partition.

    `unresolved`: the partition's keyless events taken before it whose user was not known
    (each is waited for if it turns out to be this event's user). `chains` and `own`: when
    this event's own user is not known at intake, where each chain of the partition stood
    (its user's chain is waited for up to there), and what its followers wait on.
    """

    unresolved: list[Unresolved]
    chains: dict[Hashable, Barrier] | None = None
    own: Unresolved | None = None


def decided_user(decision: object) -> str | None:
    """The user of an event decided to be sent (debug logging decides without `screen`)."""
    if isinstance(decision, Send):
        for call in decision.calls:
            user = call.payload.get("user_id")
            if isinstance(user, str) and user:
                return user
    return None


class KeylessOrder:
    """The partitions' keyless events whose user is not known yet, and the waits they
    put on later events."""

    def __init__(self) -> None:
        self._pending: dict[TP, list[Unresolved]] = {}

    def place(self, event: Event, tp: TP, decoded: Decoded | None,
              barriers: Callable[[], dict[Hashable, Barrier]]) -> None:
        """At intake, before the event is scheduled: its ordering key when it has no Kafka
        key, and what it must wait for (`event.waits`). `barriers`: where each chain of the
        partition stands now (`Scheduler.barriers`)."""
        unresolved = self._pending.get(tp)
        if not event.key:
            user = (decoded.get("userId") if decoded is not None
                    else decided_user(event.decision))
            if isinstance(user, str) and user:
                event.ordering_key = user.encode()
            elif event.decision is None:  # its user is known once its schema is
                loop = asyncio.get_running_loop()
                own = Unresolved(loop.create_future(), loop.create_future(),
                                 time.monotonic() + UNRESOLVED_WAIT_S)
                event.waits = UserWaits(list(unresolved or ()), barriers(), own)
                self._pending.setdefault(tp, []).append(own)
                return
        if unresolved:
            event.waits = UserWaits(list(unresolved))

    async def before(self, event: Event, decided: Callable[[Event], Awaitable[None]],
                     reached: Callable[[Barrier], Awaitable[None]]) -> None:
        """Before the event is sent: its user's earlier events in other chains of the
        partition have ended. Its own user is known first (`decided`: its schema)."""
        waits = event.waits
        if not isinstance(waits, UserWaits):
            return
        await decided(event)
        user = decided_user(event.decision)
        own = waits.own
        if own is not None and not own.user.done():
            own.user.set_result(user)  # its followers learn whether they wait for it
        if user is None:
            return  # nothing of it reaches Userpilot
        for other in waits.unresolved:
            # Shielded: a cancelled wait must not cancel what the others wait on.
            if not other.user.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, other.known_by - time.monotonic())):
                        await asyncio.shield(other.user)
                if not other.user.done():
                    if not other.warned:
                        other.warned = True
                        log.warning("the user of an earlier keyless event of %s[%d] is not "
                                    "known after %.0f s (its schema is not fetched yet); "
                                    "later events go on: that user's order is not "
                                    "guaranteed", event.topic, event.partition,
                                    UNRESOLVED_WAIT_S)
                    continue  # its user is not known in time: not waited for
            if other.user.result() == user:
                await asyncio.shield(other.done)
        if waits.chains:
            barrier = waits.chains.get(user.encode())
            if barrier is not None:
                await reached(barrier)

    def after(self, event: Event) -> None:
        """The event's job ended (whatever its outcome): who waits on it goes on."""
        waits = event.waits
        if isinstance(waits, UserWaits) and waits.own is not None:
            self._resolved((event.topic, event.partition), waits.own)

    def forget(self, parts: Collection[TP]) -> None:
        """The partitions went: their unresolved events were abandoned before they ran."""
        for tp in parts:
            for own in list(self._pending.get(tp, ())):
                self._resolved(tp, own)

    def _resolved(self, tp: TP, own: Unresolved) -> None:
        for future in (own.user, own.done):
            if not future.done():
                future.set_result(None)
        waiting = self._pending.get(tp)
        if waiting is not None and own in waiting:
            waiting.remove(own)
            if not waiting:
                del self._pending[tp]
