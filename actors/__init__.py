"""Ray actors: thin state + messaging; decisions live in `teamorch.policies`."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from ray import ObjectRef

T = TypeVar("T")


async def await_ref(ref: ObjectRef[T]) -> T:
    """Wrap an ObjectRef in a coroutine so asyncio.wait_for / create_task accept it."""
    return await ref
