"""Everything that crosses an actor boundary is a pydantic model (or a scalar): checked on every actor method.

Loose dicts and ten-argument calls are where actor interfaces rot first: a
caller that passes `{"lease_id": ...}` compiles, runs and breaks at a
distance. Walking the actor classes keeps the rule from depending on review.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import pydantic
import pytest

# (module, class) of every Ray actor: their public methods are what other actors and clients call.
ACTORS = [
    ("teamorch.actors.coordinator", "Coordinator"),
    ("teamorch.actors.balancer", "LoadBalancer"),
    ("teamorch.actors.specialist", "Specialist"),
    ("teamorch.actors.server", "ModelServer"),
]


def _untyped(hint: Any) -> str | None:
    """Why `hint` is not an actor message (None when it is one)."""
    if hint is Any:
        return "Any"
    origin = typing.get_origin(hint)
    if hint is dict or origin is dict:
        return "dict"
    if origin is typing.Literal:
        return None
    if origin is Callable or hint is Callable:  # a user's custom synthesis function, passed through opaque
        return None
    for arg in typing.get_args(hint):
        reason = _untyped(arg)
        if reason:
            return reason
    allowed = (str, int, float, bool, bytes, type(None), list, tuple, set, frozenset, types.UnionType)
    if origin is not None or hint in allowed or hint is typing.Union:
        return None
    if inspect.isclass(hint) and issubclass(hint, pydantic.BaseModel):
        return None
    return f"{hint!r} (not a pydantic model or scalar)"


def _actor_methods() -> list[tuple[str, Callable[..., Any]]]:
    out = []
    for module, cls_name in ACTORS:
        cls = getattr(__import__(module, fromlist=[cls_name]), cls_name)
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if not name.startswith("_"):
                out.append((f"{cls_name}.{name}", fn))
    return out


@pytest.mark.parametrize(("name", "fn"), _actor_methods(), ids=lambda v: v if isinstance(v, str) else "")
def test_actor_methods_take_and_return_messages(name: str, fn: Callable[..., Any]) -> None:
    hints = typing.get_type_hints(fn)
    # Ray's tracing adds `_ray_trace_ctx` to actor methods once a class has been wrapped by ray.remote.
    params = [p for p in inspect.signature(fn).parameters if p != "self" and not p.startswith("_ray")]
    missing = [p for p in [*params, "return"] if p not in hints]
    assert not missing, f"{name}: no type for {missing}"
    bad = {p: why for p in [*params, "return"] if (why := _untyped(hints[p]))}
    assert not bad, f"{name}: {bad}"
