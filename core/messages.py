"""What callers send the engine thread: typed messages through its inbox."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .request import Request


@dataclass(frozen=True)
class AddRequest:
    request: Request


@dataclass(frozen=True)
class AbortRequest:
    rid: str


@dataclass(frozen=True)
class FlushCache:
    """Empty the prefix cache once no request runs; `done` is set then."""

    done: threading.Event


@dataclass(frozen=True)
class CallWorker:
    """Run `fn(model_runner, *args)` on the model worker between two steps; its result (or the
    exception it raised) goes into `result`, then `done` is set."""

    fn: Callable[..., Any]
    args: tuple
    done: threading.Event
    result: list = field(default_factory=list)


InboxMessage = AddRequest | AbortRequest | FlushCache | CallWorker
