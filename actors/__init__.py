"""Ray actors: thin state + messaging; decisions live in `policies`."""

from __future__ import annotations

from typing import Any


async def await_ref(ref: Any) -> Any:
    """Wrap an ObjectRef in a coroutine so asyncio.wait_for / create_task accept it."""
    return await ref
