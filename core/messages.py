"""What callers send the engine thread: typed messages through its inbox."""
from __future__ import annotations

import threading
from dataclasses import dataclass

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


InboxMessage = AddRequest | AbortRequest | FlushCache
