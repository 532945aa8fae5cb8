"""Is the text streamed so far possibly cut in the middle of a tag?

Streamed text arrives a piece at a time, so a stop string or a marker such as ``</think>`` can be
split across two pieces.  Whoever streams text on must hold back what may still turn out to be such
a tag instead of sending it as plain text: the engine for stop strings, the server's reasoning and
tool-call parsers for their markers.  Finding a *whole* tag is each caller's own search.
"""
from __future__ import annotations


def held_tag_prefix_len(text: str, *tags: str) -> int:
    """How many characters at the end of `text` begin (without completing) one of `tags`: the
    longest such run, 0 if there is none.  These characters must wait for the next piece."""
    longest = 0
    for tag in tags:
        # only runs longer than the best so far matter; the longest one that fits is tried first
        for n in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:n]):
                longest = n
                break
    return longest


def is_tag_prefix(text: str, *tags: str) -> bool:
    """True when the whole of `text` begins (without completing) one of `tags`: more text may still
    make it that tag."""
    return any(len(text) < len(tag) and tag.startswith(text) for tag in tags)
