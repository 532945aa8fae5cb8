"""Turn a DeepSeek model's tool-call text into OpenAI ``tool_calls`` (``--tool-call-parser``).

DeepSeek-V3 / R1 (and V3-0324, R1-0528, whose chat templates write the same thing) emit, after
optional ordinary text::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {ARGS}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME2 ...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

(the ``\\n`` between calls is optional).  Forms accepted inside one ``<｜tool▁call▁begin｜>`` ...
``<｜tool▁call▁end｜>``:

* ``function<｜tool▁sep｜>NAME\\n```json\\n{ARGS}\\n``` `` — the V3/R1 templates' form (a
  bare ```` ``` ```` fence is accepted too);
* ``function<｜tool▁sep｜>NAME\\n{ARGS}`` — the same without the fence, which R1-family models
  are seen to produce; not in any template, accepted leniently;
* ``NAME<｜tool▁sep｜>{ARGS}`` — the DeepSeek-V3.1 template's form (SGLang's ``deepseekv31``).

Rules shared by :meth:`DeepSeekV3ToolParser.parse` and :class:`ToolCallStream`:

* Content is the text before ``<｜tool▁calls▁begin｜>``, stripped.  Without any calls the content
  is the whole text with its leading whitespace removed (trailing kept).
* Each call's name must be one of ``tools`` and its arguments a JSON object; arguments are
  re-serialised as compact JSON (``ensure_ascii=False``).  Empty arguments read as ``{}``.
* Anything wrong — unknown function, malformed JSON, non-object arguments, junk between calls, a
  call left open at the end of the text, a block with no call — and the *whole* text is returned
  as plain content with no calls.  Nothing here raises on model output.
* The block ends at ``<｜tool▁calls▁end｜>`` (or ``<｜end▁of▁sentence｜>``, or the end of the text
  after at least one complete call); text after it is dropped.

The tool tokens are special tokens in DeepSeek tokenizers: the server must detokenize with
``skip_special_tokens=False`` for them to reach the parser.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsserve.core.tag_prefix import held_tag_prefix_len, is_tag_prefix

__all__ = [
    "END_OF_SENTENCE",
    "TOOL_CALLS_BEGIN",
    "TOOL_CALLS_END",
    "TOOL_CALL_BEGIN",
    "TOOL_CALL_END",
    "TOOL_CALL_PARSERS",
    "TOOL_SEP",
    "DeepSeekV3ToolParser",
    "ParsedToolCalls",
    "StreamEvent",
    "ToolCall",
    "ToolCallStream",
    "ToolChoiceError",
    "build_tool_prompt_kwargs",
    "forced_prefix",
    "get_tool_call_parser",
    "new_tool_call_id",
    "normalize_tool_choice",
]

TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
END_OF_SENTENCE = "<｜end▁of▁sentence｜>"

_BLOCK_TERMINATORS = (TOOL_CALLS_END, END_OF_SENTENCE)
_MARKERS = (
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    END_OF_SENTENCE,
)

_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    """``"call_"`` followed by 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; ``arguments`` is a compact JSON object string."""

    id: str
    name: str
    arguments: str
    index: int = 0

    def to_openai(self) -> dict[str, Any]:
        """The ``message.tool_calls[i]`` object of a chat completion."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ParsedToolCalls:
    """``content``: the text to return as ``message.content`` (``""`` when there is none; OpenAI
    sends null then).  ``calls``: empty when the output had no (valid) tool calls."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class StreamEvent:
    """One piece of a streamed answer: either a content text delta (``content``) or one complete
    tool call (``tool_call``, carrying its index, id, name and whole arguments)."""

    content: str | None = None
    tool_call: ToolCall | None = None

    def to_delta(self) -> dict[str, Any]:
        """The ``choices[i].delta`` object of a ``chat.completion.chunk``."""
        if self.tool_call is not None:
            call = self.tool_call
            return {
                "tool_calls": [
                    {
                        "index": call.index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ]
            }
        return {"content": self.content or ""}


# -- tools and tool_choice ------------------------------------------------------------------------


class ToolChoiceError(ValueError):
    """An invalid ``tools`` / ``tool_choice`` combination (an HTTP 400; ``param`` names the field)."""

    def __init__(self, message: str, param: str = "tool_choice") -> None:
        super().__init__(message)
        self.param = param


def _as_plain(obj: Any) -> Any:
    """A pydantic model (v2 or v1) as a dict; anything else unchanged."""
    if isinstance(obj, Mapping) or obj is None or isinstance(obj, str):
        return obj
    dump = getattr(obj, "model_dump", None) or getattr(obj, "dict", None)
    if callable(dump):
        try:
            return dump(exclude_none=True)
        except TypeError:
            return dump()
    return obj


def _tool_name(tool: Any) -> str | None:
    tool = _as_plain(tool)
    if isinstance(tool, str):
        return tool
    if isinstance(tool, Mapping):
        function = _as_plain(tool.get("function"))
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            return function["name"]
        if isinstance(tool.get("name"), str):
            return tool["name"]
    return None


def _tool_names(tools: Iterable[Any] | None) -> frozenset[str]:
    """Names of the request's tools: OpenAI tool dicts, pydantic tool models, or bare names."""
    names = set()
    for tool in tools or ():
        name = _tool_name(tool)
        if name:
            names.add(name)
    return frozenset(names)


def normalize_tool_choice(tool_choice: Any, tools: Sequence[Any] | None) -> str | tuple[str, str]:
    """``"none"``, ``"auto"``, ``"required"`` or ``("function", NAME)``.

    ``tool_choice`` may be None (OpenAI's default: ``"auto"`` with tools, ``"none"`` without), one
    of those strings, or ``{"type": "function", "function": {"name": NAME}}`` (dict or pydantic).
    Raises :class:`ToolChoiceError` for an unknown value, ``"required"`` without tools, or a named
    function that is not among ``tools``.
    """
    names = _tool_names(tools)
    if tool_choice is None:
        return "auto" if names else "none"
    choice = _as_plain(tool_choice)
    if isinstance(choice, str):
        if choice in ("none", "auto"):
            return choice
        if choice == "required":
            if not names:
                raise ToolChoiceError("tool_choice 'required' needs at least one tool in 'tools'")
            return choice
        raise ToolChoiceError(
            f"invalid tool_choice {choice!r}: expected 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}"
        )
    if isinstance(choice, Mapping) and choice.get("type", "function") == "function":
        name = _tool_name(choice)
        if not name:
            raise ToolChoiceError("tool_choice of type 'function' needs function.name")
        if name not in names:
            raise ToolChoiceError(f"tool_choice names function {name!r}, which is not in 'tools'")
        return ("function", name)
    raise ToolChoiceError(f"invalid tool_choice {tool_choice!r}")


def build_tool_prompt_kwargs(tools: Sequence[Any] | None, tool_choice: Any = None) -> dict[str, Any]:
    """Keyword arguments for ``Tokenizer.apply_chat_template``: ``{"tools": [...]}`` with the tools
    as plain OpenAI dicts, or ``{"tools": None}`` when there are none or ``tool_choice`` is
    ``"none"`` (the model is then not told about any tool).  A named or required choice still shows
    every tool, as OpenAI does; the call itself is forced with :func:`forced_prefix`.  Raises
    :class:`ToolChoiceError` like :func:`normalize_tool_choice`.
    """
    choice = normalize_tool_choice(tool_choice, tools)
    if choice == "none" or not tools:
        return {"tools": None}
    return {"tools": [dict(_as_plain(tool)) for tool in tools]}


def forced_prefix(tool_choice: Any, tools: Sequence[Any] | None) -> str | None:
    """Text to append to the prompt (the start of the assistant turn) so the model must call a
    tool: for ``"required"`` the opening of a V3/R1 call up to the function name (up to the JSON
    fence, as for a named function, when there is only one tool), for a named function the opening
    up to and including ``NAME\n```json\n``; None for ``"auto"`` / ``"none"``.

    The model's output then *continues* that text: pass the same string as ``prefix=`` to
    :meth:`DeepSeekV3ToolParser.parse` / :meth:`DeepSeekV3ToolParser.stream`.  With a reasoning
    model whose prompt ends inside ``<think>``, close the thinking first (put ``"</think>\\n\\n"``
    before this prefix in the prompt) or the call would be read as reasoning.
    """
    choice = normalize_tool_choice(tool_choice, tools)
    opening = TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP
    if choice == "required":
        names = _tool_names(tools)
        if len(names) == 1:  # only one function can be called: name it
            return opening + next(iter(names)) + "\n```json\n"
        return opening
    if isinstance(choice, tuple):
        return opening + choice[1] + "\n```json\n"
    return None


# -- parsing ----------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _strip_fence(raw: str) -> str | None:
    raw = raw.strip()
    if not raw.startswith("```"):
        return raw
    raw = raw[3:]
    raw = raw.removeprefix("json")
    raw = raw.rstrip()
    if not raw.endswith("```"):
        return None
    return raw[:-3].strip()


def _parse_call(inner: str, names: frozenset[str]) -> tuple[str, str] | None:
    """``(name, compact_arguments)`` from the text between a call's begin and end markers, or
    None when it is not a valid call of one of ``names``."""
    if any(marker in inner for marker in _MARKERS):
        return None
    sep = inner.find(TOOL_SEP)
    if sep < 0:
        return None
    left, right = inner[:sep].strip(), inner[sep + len(TOOL_SEP) :]
    if TOOL_SEP in right:
        return None
    if left == "function" and not right.lstrip().startswith("{"):
        # V3 / R1: function<sep>NAME\n[```json\n]{...}[\n```]
        newline = right.find("\n")
        if newline < 0:
            return None
        name, raw = right[:newline].strip(), right[newline + 1 :]
    else:
        # V3.1: NAME<sep>{...}
        name, raw = left, right
    if not name or name not in names:
        return None
    text = _strip_fence(raw)
    if text is None:
        return None
    if not text:
        text = "{}"
    try:
        args = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False, separators=(",", ":"))


_MORE, _DONE, _BAD = "more", "done", "bad"


def _scan_block(
    body: str, pos: int, names: frozenset[str], have: int, final: bool
) -> tuple[str, list[tuple[str, str]], int]:
    """Scan the text after ``<｜tool▁calls▁begin｜>`` from ``pos`` (just after the last call already
    accepted; ``have`` calls were).  Returns ``(status, new_calls, pos)``: ``_DONE`` when the block
    is complete and valid (``pos`` after its terminator, or the end of the text), ``_MORE`` when
    more text is needed (``final`` False only), ``_BAD`` when it cannot become valid whatever
    follows.  ``new_calls`` are the calls completed in this scan, ``pos`` is just after the last."""
    calls: list[tuple[str, str]] = []
    while True:
        p = pos
        while p < len(body) and body[p].isspace():
            p += 1
        rest = body[p:]
        if rest.startswith(TOOL_CALL_BEGIN):
            start = p + len(TOOL_CALL_BEGIN)
            end = body.find(TOOL_CALL_END, start)
            if end < 0:
                unfinished = body[start:]
                if final or any(m in unfinished for m in (TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALLS_BEGIN)):
                    return _BAD, calls, pos
                return _MORE, calls, pos
            call = _parse_call(body[start:end], names)
            if call is None:
                return _BAD, calls, pos
            calls.append(call)
            pos = end + len(TOOL_CALL_END)
            continue
        count = have + len(calls)
        for terminator in _BLOCK_TERMINATORS:
            if rest.startswith(terminator):
                return (_DONE if count else _BAD), calls, p + len(terminator)
        if not rest:
            if final:
                return (_DONE if count else _BAD), calls, p
            return _MORE, calls, pos
        if not final and is_tag_prefix(rest, TOOL_CALL_BEGIN, *_BLOCK_TERMINATORS):
            return _MORE, calls, pos
        return _BAD, calls, pos


class DeepSeekV3ToolParser:
    """``--tool-call-parser deepseekv3``.  Stateless; streaming state lives in :class:`ToolCallStream`."""

    name = "deepseekv3"

    def parse(self, text: str, tools: Sequence[Any] | None, *, prefix: str = "") -> ParsedToolCalls:
        """Parse a complete output.  ``prefix`` is text forced into the prompt before the output
        (:func:`forced_prefix`); it is parsed as if the model had written it."""
        text = (prefix + text).lstrip()
        begin = text.find(TOOL_CALLS_BEGIN)
        if begin < 0:
            return ParsedToolCalls(content=text, calls=[])
        names = _tool_names(tools)
        status, found, _ = _scan_block(text[begin + len(TOOL_CALLS_BEGIN) :], 0, names, 0, final=True)
        if status != _DONE:
            return ParsedToolCalls(content=text, calls=[])
        calls = [
            ToolCall(id=new_tool_call_id(), name=name, arguments=args, index=i)
            for i, (name, args) in enumerate(found)
        ]
        return ParsedToolCalls(content=text[:begin].strip(), calls=calls)

    def stream(self, tools: Sequence[Any] | None, *, prefix: str = "") -> ToolCallStream:
        return ToolCallStream(tools, prefix=prefix)

    def forced_prefix(self, tool_choice: Any, tools: Sequence[Any] | None) -> str | None:
        return forced_prefix(tool_choice, tools)

    def build_tool_prompt_kwargs(
        self, tools: Sequence[Any] | None, tool_choice: Any = None
    ) -> dict[str, Any]:
        return build_tool_prompt_kwargs(tools, tool_choice)


class ToolCallStream:
    """Incremental tool-call parsing of one streamed choice.

    ``feed(delta)`` takes the next piece of content text (after any reasoning has been split off)
    and returns a list of :class:`StreamEvent`; ``finish()`` returns the last ones.  Content is
    streamed as it comes, except for text that may still turn out to be the start of
    ``<｜tool▁calls▁begin｜>`` and whitespace that may turn out to be trailing.  The calls are
    buffered and emitted together, each as one event with its whole arguments, once the block is
    known to be valid (at ``<｜tool▁calls▁end｜>`` or at ``finish()``); if it turns out malformed,
    its text is emitted as content instead (as soon as that is certain).  Concatenating the events
    gives exactly what :meth:`DeepSeekV3ToolParser.parse` returns for the whole text.
    """

    def __init__(self, tools: Sequence[Any] | None, *, prefix: str = "") -> None:
        self._names = _tool_names(tools)
        self._phase = "content"  # "content" | "calls" | "plain" (malformed: all content) | "done"
        self._buf = ""
        self._started = False  # a non-whitespace character was seen (leading whitespace dropped)
        self._ws_before_block = ""  # whitespace between the content and the block
        self._block = ""  # the text after <｜tool▁calls▁begin｜>
        self._scan_pos = 0
        self._found: list[tuple[str, str]] = []
        self._calls: list[ToolCall] = []
        self._finished = False
        self._pending: list[StreamEvent] = self._process(prefix, final=False) if prefix else []

    @property
    def calls(self) -> list[ToolCall]:
        """The calls emitted so far (for ``finish_reason: "tool_calls"`` and usage)."""
        return list(self._calls)

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("ToolCallStream.feed() after finish()")
        events, self._pending = self._pending, []
        events.extend(self._process(delta, final=False))
        return events

    def finish(self) -> list[StreamEvent]:
        if self._finished:
            return []
        events, self._pending = self._pending, []
        events.extend(self._process("", final=True))
        self._finished = True
        return events

    # -- internals -------------------------------------------------------------------------------

    def _process(self, delta: str, *, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if self._phase == "done":
            return events
        if self._phase == "plain":
            if delta:
                events.append(StreamEvent(content=delta))
            return events
        if self._phase == "content":
            self._buf += delta
            if not self._started:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    return events
                self._started = True
            begin = self._buf.find(TOOL_CALLS_BEGIN)
            if begin < 0:
                if final:
                    ready, self._buf = self._buf, ""
                else:
                    held = held_tag_prefix_len(self._buf, TOOL_CALLS_BEGIN)
                    ready = self._buf[: len(self._buf) - held].rstrip()
                    self._buf = self._buf[len(ready) :]
                if ready:
                    events.append(StreamEvent(content=ready))
                return events
            before = self._buf[:begin]
            ready = before.rstrip()
            if ready:
                events.append(StreamEvent(content=ready))
            self._ws_before_block = before[len(ready) :]
            self._block = self._buf[begin + len(TOOL_CALLS_BEGIN) :]
            self._buf = ""
            self._phase = "calls"
        else:
            self._block += delta

        status, found, self._scan_pos = _scan_block(
            self._block, self._scan_pos, self._names, len(self._found), final
        )
        self._found.extend(found)
        if status == _MORE:
            return events
        if status == _BAD:
            self._phase = "plain"
            events.append(StreamEvent(content=self._ws_before_block + TOOL_CALLS_BEGIN + self._block))
            self._block = ""
            return events
        self._phase = "done"
        for index, (name, args) in enumerate(self._found):
            call = ToolCall(id=new_tool_call_id(), name=name, arguments=args, index=index)
            self._calls.append(call)
            events.append(StreamEvent(tool_call=call))
        self._block = ""
        return events


TOOL_CALL_PARSERS: dict[str, DeepSeekV3ToolParser] = {
    "deepseekv3": DeepSeekV3ToolParser(),
}


def get_tool_call_parser(name: str) -> DeepSeekV3ToolParser:
    """The registered parser called ``name``; ValueError naming the choices otherwise."""
    try:
        return TOOL_CALL_PARSERS[name]
    except KeyError:
        choices = ", ".join(sorted(TOOL_CALL_PARSERS))
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of: {choices}") from None
