"""The client's side of the batched lease protocol, as plain data: which asks are open, and what each answer means.

A client (`teamorch.actors.leases.LeaseClient`) sends its asks one way and
collects grants with one long poll (`LoadBalancer.granted`); the answers can
arrive late, twice or to a new balancer incarnation. `AskBook.receive` decides,
per answer, whether a waiting caller gets it, whether a lease nobody waits for
goes back (its caller gave up: the slot must not leak), and which asks to send
again (the balancer restarted and never saw them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from teamorch.messages import Lease, LeaseAsk, LeaseGrant, LeaseGrants


@dataclass
class Receipt:
    """What one poll answer asks of the client: grants and refusals to hand to their callers, leases to release
    unused, asks to send again."""

    deliver: list[LeaseGrant] = field(default_factory=list)
    unused: list[Lease] = field(default_factory=list)
    resend: list[LeaseAsk] = field(default_factory=list)


@dataclass
class AskBook:
    """Open asks by id, leases handed out and not yet released, and the balancer incarnation last heard from.

    `held` is why a repeated grant is not released by mistake: asked again
    for a dispatch key whose lease is held (a re-sent ask), the balancer
    answers with that same lease, which is in use and must stay so.
    """

    epoch: str | None = None
    open: dict[str, LeaseAsk] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)

    def ask(self, ask: LeaseAsk) -> None:
        self.open[ask.ask_id] = ask

    def withdraw(self, ask_id: str) -> bool:
        """The caller stopped waiting; True if the ask was still open (the balancer must be told)."""
        return self.open.pop(ask_id, None) is not None

    def release(self, lease_id: str) -> None:
        self.held.discard(lease_id)

    def receive(self, answer: LeaseGrants) -> Receipt:
        """Sort one poll answer. A grant for an ask that is no longer open is released unless its lease is in use;
        a new epoch means every ask still open is sent again (the balancer drops those it already has)."""
        out = Receipt()
        for grant in answer.grants:
            if self.open.pop(grant.ask_id, None) is not None:
                if grant.lease is not None:
                    self.held.add(grant.lease.lease_id)
                out.deliver.append(grant)
            elif grant.lease is not None and grant.lease.lease_id not in self.held:
                out.unused.append(grant.lease)
        if answer.epoch != self.epoch:
            if self.epoch is not None:
                out.resend = list(self.open.values())
            self.epoch = answer.epoch
        return out
