"""The client's book of the batched lease protocol (`teamorch.policies.leases.AskBook`), on plain data.

Which answer goes to a waiting caller, which lease goes back unused (its caller gave up: no slot may leak,
and a lease in use must never be released by mistake), and which asks go again to a restarted balancer.
"""

from __future__ import annotations

from teamorch.messages import Lease, LeaseAsk, LeaseGrant, LeaseGrants, LeaseRequest
from teamorch.policies.leases import AskBook


def _ask(n: int, key: str | None = None) -> LeaseAsk:
    return LeaseAsk(ask_id=f"c-{n}", req=LeaseRequest(model="m"), key=key)


def _grant(n: int, lease: str | None = None) -> LeaseGrant:
    return LeaseGrant(ask_id=f"c-{n}", lease=Lease(lease_id=lease or f"s-e-{n}", server="s"))


def test_grants_for_open_asks_are_delivered_and_held() -> None:
    book = AskBook(epoch="e1")
    book.ask(_ask(1))
    book.ask(_ask(2))
    refusal = LeaseGrant(ask_id="c-2", refused="no server has model 'm'")
    receipt = book.receive(LeaseGrants(epoch="e1", grants=[_grant(1), refusal]))
    assert [g.ask_id for g in receipt.deliver] == ["c-1", "c-2"]
    assert receipt.unused == [] and receipt.resend == []
    assert book.open == {} and book.held == {"s-e-1"}


def test_a_grant_after_the_caller_gave_up_goes_back_unused() -> None:
    book = AskBook(epoch="e1")
    book.ask(_ask(1))
    assert book.withdraw("c-1")  # still open: the balancer is told
    assert not book.withdraw("c-1")  # twice: nothing more to tell
    receipt = book.receive(LeaseGrants(epoch="e1", grants=[_grant(1)]))
    assert receipt.deliver == [] and [lease.lease_id for lease in receipt.unused] == ["s-e-1"]


def test_a_repeated_grant_of_a_lease_in_use_is_not_released() -> None:
    # A re-sent ask with a dispatch key gets the lease already held for that key: it is in use, not spare.
    book = AskBook(epoch="e1")
    book.ask(_ask(1, key="run/t1"))
    book.receive(LeaseGrants(epoch="e1", grants=[_grant(1, "s-e-7")]))
    again = book.receive(LeaseGrants(epoch="e1", grants=[_grant(1, "s-e-7")]))
    assert again.deliver == [] and again.unused == []
    book.release("s-e-7")
    late = book.receive(LeaseGrants(epoch="e1", grants=[_grant(1, "s-e-7")]))
    assert [lease.lease_id for lease in late.unused] == ["s-e-7"]  # released already: a stray copy goes back


def test_a_new_epoch_resends_every_ask_still_open_after_its_grants() -> None:
    book = AskBook(epoch="e1")
    for n in range(3):
        book.ask(_ask(n))
    receipt = book.receive(LeaseGrants(epoch="e2", grants=[_grant(0)]))
    assert [g.ask_id for g in receipt.deliver] == ["c-0"]
    assert [a.ask_id for a in receipt.resend] == ["c-1", "c-2"]  # granted ones are not asked again
    assert book.epoch == "e2"
    assert book.receive(LeaseGrants(epoch="e2")).resend == []  # once per incarnation


def test_the_first_answer_sets_the_epoch_without_resending() -> None:
    book = AskBook()
    book.ask(_ask(1))
    assert book.receive(LeaseGrants(epoch="e1")).resend == []
    assert book.epoch == "e1" and "c-1" in book.open
