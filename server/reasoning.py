"""Separate a DeepSeek model's thinking from its answer (``--reasoning-parser``).

DeepSeek reasoning models write their chain of thought between ``<think>`` and ``</think>``;
the OpenAI-compatible API returns it as ``message.reasoning_content`` (``delta.reasoning_content``
when streaming) and the rest as ``content``.

Two parsers are registered in :data:`REASONING_PARSERS`:

``deepseek-r1``
    The output always starts in the thinking.  The R1 chat template ends the prompt with
    ``<think>\\n``, so the model's text starts *inside* the thinking and only ``</think>`` is
    generated; R1-0528 and some custom templates make the model write ``<think>`` itself, which is
    accepted and dropped.  Text without any ``</think>`` (the model ran out of tokens while
    thinking) is all reasoning.

``deepseek-v3``
    Hybrid models (V3.1 and later): thinking only when the request turns it on (SGLang's
    ``chat_template_kwargs: {"thinking": true}``), in which case the template ends the prompt with
    ``<think>`` and the output starts inside the thinking as for R1.  With thinking off the output
    is plain content, unless it begins with ``<think>`` itself.

Whitespace follows SGLang: the reasoning is stripped at both ends (the newline after ``<think>``
and the one before ``</think>``) and the content's leading whitespace after ``</think>`` is
dropped, so ``"<think>\\nabc\\n</think>\\n\\nanswer"`` gives reasoning ``"abc"`` and content
``"answer"``.  Only a ``<think>`` at the very start of the output (after optional whitespace) opens
the thinking; ``<think>`` or ``</think>`` anywhere else in the content is ordinary text.

Non-streaming: :meth:`ReasoningParser.split`.  Streaming: :class:`ReasoningStream` (from
:meth:`ReasoningParser.stream`), which gives exactly the same final text whatever the chunking, and
holds back only what could still be the start of a tag or whitespace that may turn out to be
trailing.  Thinking budget: :class:`ThinkingBudget`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dsserve.core.tag_prefix import held_tag_prefix_len, is_tag_prefix

__all__ = [
    "REASONING_PARSERS",
    "THINK_END",
    "THINK_START",
    "ReasoningParser",
    "ReasoningStream",
    "ThinkingBudget",
    "ThinkingBudgetState",
    "get_reasoning_parser",
    "split_reasoning",
]

THINK_START = "<think>"
THINK_END = "</think>"


class ReasoningStream:
    """Incremental reasoning/content splitter for one streamed response.

    ``feed(delta)`` takes the next piece of decoded output text and returns
    ``(reasoning_delta, content_delta)``, either possibly ``""``; ``finish()`` flushes what was held
    back and must be called once when the output is complete.  Joining all the deltas gives the
    same strings as :meth:`ReasoningParser.split` on the whole text (``""`` where it gives None).

    ``starts_in_reasoning`` is True when the prompt already opened the thinking (the R1 template's
    trailing ``<think>\\n``); a ``<think>`` at the start of the output is accepted either way.
    """

    def __init__(
        self,
        starts_in_reasoning: bool = True,
        *,
        think_start: str = THINK_START,
        think_end: str = THINK_END,
    ) -> None:
        self._think_start = think_start
        self._think_end = think_end
        self._starts_in_reasoning = starts_in_reasoning
        # "start": nothing decided yet (an opening tag may still come);
        # "reasoning": inside the thinking; "content": after it, or no thinking at all.
        self._phase = "start"
        self._buf = ""  # undecided text
        self._reasoning_begun = False  # a non-whitespace reasoning character was emitted
        self._reasoning_ws = ""  # whitespace after the last emitted reasoning character
        self._strip_content_start = False  # content follows </think>: drop its leading whitespace
        self._entered_reasoning = False
        self._finished = False

    # -- state, for callers that want it ---------------------------------------------------------

    @property
    def in_reasoning(self) -> bool:
        """True while the text being generated is (or, before the first character, will be)
        reasoning; False once ``</think>`` was seen or the output turned out to be plain content."""
        if self._phase == "start":
            return self._starts_in_reasoning
        return self._phase == "reasoning"

    @property
    def entered_reasoning(self) -> bool:
        """True once the output is known to have a thinking section."""
        return self._entered_reasoning

    # -- streaming -----------------------------------------------------------------------------

    def feed(self, delta: str) -> tuple[str, str]:
        if self._finished:
            raise RuntimeError("ReasoningStream.feed() after finish()")
        self._buf += delta
        reasoning: list[str] = []
        content: list[str] = []
        self._advance(reasoning, content, final=False)
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        if self._finished:
            return "", ""
        reasoning: list[str] = []
        content: list[str] = []
        self._advance(reasoning, content, final=True)
        self._finished = True
        return "".join(reasoning), "".join(content)

    # -- internals -----------------------------------------------------------------------------

    def _emit_reasoning(self, text: str, out: list[str], *, closing: bool) -> None:
        if not self._reasoning_begun:
            text = text.lstrip()
            if not text:
                return
        text = self._reasoning_ws + text
        kept = text.rstrip()
        self._reasoning_ws = "" if closing else text[len(kept) :]
        if kept:
            self._reasoning_begun = True
            out.append(kept)

    def _advance(self, reasoning: list[str], content: list[str], *, final: bool) -> None:
        while True:
            if self._phase == "start":
                head = self._buf.lstrip()
                if head.startswith(self._think_start):
                    self._buf = head[len(self._think_start) :]
                    self._phase = "reasoning"
                    self._entered_reasoning = True
                    continue
                undecided = not head or is_tag_prefix(head, self._think_start)
                if undecided and not final:
                    return
                if self._starts_in_reasoning:
                    self._phase = "reasoning"
                    self._entered_reasoning = True
                else:
                    self._phase = "content"
                continue

            if self._phase == "reasoning":
                end = self._buf.find(self._think_end)
                if end >= 0:
                    self._emit_reasoning(self._buf[:end], reasoning, closing=True)
                    self._buf = self._buf[end + len(self._think_end) :]
                    self._phase = "content"
                    self._strip_content_start = True
                    continue
                held = 0 if final else held_tag_prefix_len(self._buf, self._think_end)
                ready = self._buf[: len(self._buf) - held]
                self._buf = self._buf[len(self._buf) - held :]
                self._emit_reasoning(ready, reasoning, closing=final)
                return

            # content
            if self._strip_content_start:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    return
                self._strip_content_start = False
            if self._buf:
                content.append(self._buf)
                self._buf = ""
            return


@dataclass(frozen=True)
class ReasoningParser:
    """One ``--reasoning-parser`` choice.

    ``always_thinks``: True for R1 (the output always starts in the thinking); False for the
    hybrid V3.1+ models, which think only when the request turns thinking on.
    """

    name: str
    always_thinks: bool
    think_start: str = THINK_START
    think_end: str = THINK_END

    def starts_in_reasoning(self, thinking: bool | None = None) -> bool:
        """Whether the generated text starts inside the thinking.  ``thinking`` is the request's
        choice (SGLang's ``chat_template_kwargs.thinking``; None when the request did not say);
        R1 ignores it."""
        if self.always_thinks:
            return True
        return bool(thinking)

    def split(self, text: str, *, thinking: bool | None = None) -> tuple[str | None, str]:
        """Non-streaming split of a complete output into ``(reasoning_content, content)``.

        ``reasoning_content`` is None when there is no (or only empty) reasoning.  Without any
        reasoning ``content`` is ``text`` unchanged.
        """
        return split_reasoning(
            text,
            starts_in_reasoning=self.starts_in_reasoning(thinking),
            think_start=self.think_start,
            think_end=self.think_end,
        )

    def stream(self, *, thinking: bool | None = None) -> ReasoningStream:
        """A fresh :class:`ReasoningStream` for one streamed choice."""
        return ReasoningStream(
            self.starts_in_reasoning(thinking),
            think_start=self.think_start,
            think_end=self.think_end,
        )


def split_reasoning(
    text: str,
    *,
    starts_in_reasoning: bool = True,
    think_start: str = THINK_START,
    think_end: str = THINK_END,
) -> tuple[str | None, str]:
    """The function behind :meth:`ReasoningParser.split`."""
    head = text.lstrip()
    if head.startswith(think_start):
        head = head[len(think_start) :]
    elif not starts_in_reasoning:
        return None, text
    end = head.find(think_end)
    if end < 0:
        reasoning, content = head.strip(), ""
    else:
        reasoning, content = head[:end].strip(), head[end + len(think_end) :].lstrip()
    return (reasoning or None), content


REASONING_PARSERS: dict[str, ReasoningParser] = {
    "deepseek-r1": ReasoningParser("deepseek-r1", always_thinks=True),
    "deepseek-v3": ReasoningParser("deepseek-v3", always_thinks=False),
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    """The registered parser called ``name``; ValueError naming the choices otherwise."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        choices = ", ".join(sorted(REASONING_PARSERS))
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of: {choices}") from None


# -- thinking budget -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThinkingBudget:
    """A request's ``thinking_budget``: at most ``budget_tokens`` tokens are generated inside the
    thinking; then ``end_think_token_ids`` (the ids of ``</think>``, or of e.g. ``"\\n</think>\\n\\n"``
    for a tidier close) are forced, one per decode step, and generation goes on with the answer.

    Pure decision: :meth:`should_force`.  Per-request bookkeeping: :meth:`new_state`.
    """

    budget_tokens: int
    end_think_token_ids: tuple[int, ...]

    def __init__(self, budget_tokens: int, end_think_token_ids: Iterable[int]) -> None:
        ids = tuple(int(i) for i in end_think_token_ids)
        if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, int):
            raise TypeError(f"thinking budget must be an integer, got {budget_tokens!r}")
        if budget_tokens < 0:
            raise ValueError(f"thinking budget must be >= 0, got {budget_tokens}")
        if not ids:
            raise ValueError("end_think_token_ids must not be empty")
        object.__setattr__(self, "budget_tokens", budget_tokens)
        object.__setattr__(self, "end_think_token_ids", ids)

    def should_force(self, reasoning_tokens: int) -> bool:
        """True when ``reasoning_tokens`` thinking tokens have been generated and the budget is
        spent, i.e. the next token must start the forced ``</think>``."""
        return reasoning_tokens >= self.budget_tokens

    def new_state(self, starts_in_reasoning: bool = True) -> ThinkingBudgetState:
        return ThinkingBudgetState(self, starts_in_reasoning)


class ThinkingBudgetState:
    """Tracks one request.  Each decode step: ``tok = state.next_forced_token()``; when it is not
    None the engine emits ``tok`` instead of sampling; then ``state.observe(emitted_token)``.

    Thinking ends by itself when the model generates ``end_think_token_ids`` (matched on ids) or
    when the caller calls :meth:`end_reasoning` (e.g. when :attr:`ReasoningStream.in_reasoning`
    turns False), and ends after the forced ids otherwise.
    """

    def __init__(self, budget: ThinkingBudget, starts_in_reasoning: bool = True) -> None:
        self.budget = budget
        self.in_reasoning = starts_in_reasoning
        self.reasoning_tokens = 0  # generated in the thinking, forced ones excluded
        self.forced = 0  # how many of the end ids have been forced so far
        self._recent: list[int] = []

    @property
    def forcing(self) -> bool:
        return self.forced > 0

    def next_forced_token(self) -> int | None:
        if not self.in_reasoning:
            return None
        if self.forced or self.budget.should_force(self.reasoning_tokens):
            return self.budget.end_think_token_ids[self.forced]
        return None

    def observe(self, token_id: int) -> None:
        if not self.in_reasoning:
            return
        end_ids = self.budget.end_think_token_ids
        if self.forced:
            self.forced += 1
            if self.forced >= len(end_ids):
                self.end_reasoning()
            return
        if self.budget.should_force(self.reasoning_tokens) and token_id == end_ids[0]:
            # The engine followed next_forced_token() for the first forced id.
            self.forced = 1
            if len(end_ids) == 1:
                self.end_reasoning()
            return
        self.reasoning_tokens += 1
        self._recent.append(int(token_id))
        del self._recent[: -len(end_ids)]
        if tuple(self._recent) == end_ids:
            self.end_reasoning()

    def end_reasoning(self) -> None:
        self.in_reasoning = False
        self.forced = 0
        self._recent.clear()

    def observe_many(self, token_ids: Sequence[int]) -> None:
        for token_id in token_ids:
            self.observe(token_id)
