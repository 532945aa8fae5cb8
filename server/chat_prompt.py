"""Turn a chat request into the prompt the model sees: messages, tools, tool_choice and thinking.

Tools. A template that renders `tools` (DeepSeek-V3-0324's, V3.1's, or one given with
--chat-template) gets them as the `tools` variable. DeepSeek-R1's published template, which
dsserve-tiny also uses, ignores that variable, so the model would never hear of the tools: then the
tools are described in a system message of our own, in DeepSeek's tool-call format (the text of
`describe_tools`). Which case applies is found once per app by rendering a probe conversation.
This works with every checkpoint's own template, where a replacement template would
override templates that already handle tools well.

tool_choice "required" or a named function appends the start of a call (the parser's
`forced_prefix`) after the template's generation prompt, closing the thinking first when the
template left the prompt inside `<think>`, so the model's output continues a call.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import APIError, bad_request
from .protocol import ChatCompletionRequest, ChatMessage
from .reasoning import THINK_END, THINK_START
from .tool_calls import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
    ToolChoiceError,
    normalize_tool_choice,
)

_PROBE_TOOL = "dsserve_probe_tool"


@dataclass
class ChatPrompt:
    text: str
    ids: list[int]
    tools: list[dict] | None          # the tools the output is parsed against (None: no tool parsing)
    forced_prefix: str | None         # start of a call appended to the prompt ("required"/named)
    starts_in_reasoning: bool         # the output begins inside <think> (the R1 template's prompt)
    thinking: bool | None             # the request's chat_template_kwargs thinking switch


def describe_tools(tools: list[dict]) -> str:
    """A system text telling a DeepSeek model which functions it may call and how."""
    lines = ["## Tools", "", "You can call the following functions.", ""]
    for tool in tools:
        fn = tool.get("function", {})
        lines.append(f"### {fn.get('name')}")
        if fn.get("description"):
            lines.append(f"Description: {fn['description']}")
        lines.append(f"Parameters: {json.dumps(fn.get('parameters') or {}, ensure_ascii=False)}")
        lines.append("")
    lines += [
        ("To call functions, answer with this exact format, the arguments being a JSON object that fits the "
         "function's parameters (put one call block after another for several calls):"),
        f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}FUNCTION_NAME",
        "```json",
        '{"argument": "value"}',
        f"```{TOOL_CALL_END}{TOOL_CALLS_END}",
    ]
    return "\n".join(lines)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the plain dicts chat templates read."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type not in ("text", "input_text"):
                    raise bad_request(f"content parts of type '{part.type}' are not supported (text only)",
                                      param=f"messages[{i}].content[{j}].type")
                texts.append(part.text or "")
            content = "\n".join(texts)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = [{
                "id": call.id or f"call_{i}_{k}", "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments
                             if isinstance(call.function.arguments, str)
                             else json.dumps(call.function.arguments, ensure_ascii=False)},
            } for k, call in enumerate(m.tool_calls)]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def ends_in_thinking(prompt: str) -> bool:
    """The prompt left a <think> open (the R1 template ends with '<｜Assistant｜><think>\\n')."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


# Template variables the request's own fields set: chat_template_kwargs cannot replace them.
_OWN_TEMPLATE_VARIABLES = ("messages", "add_generation_prompt")


def _check_template_kwargs(kwargs: dict[str, Any]) -> None:
    for name in _OWN_TEMPLATE_VARIABLES:
        if name in kwargs:
            raise bad_request(f"chat_template_kwargs cannot set '{name}': the request itself gives it",
                              param=f"chat_template_kwargs.{name}")


class ChatPromptBuilder:
    """`build` renders and tokenizes (slow for long conversations: run it off the event loop);
    `encode(text)` gives the rendered prompt's token ids."""

    def __init__(self, tokenizer, chat_template: str | None, reasoning_parser, tool_parser,
                 encode: Callable[[str], list[int]]):
        self.tokenizer = tokenizer
        self.encode = encode
        self.chat_template = chat_template
        self.reasoning_parser = reasoning_parser
        self.tool_parser = tool_parser
        self._renders_tools: bool | None = None

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **kwargs) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                      chat_template=self.chat_template, **kwargs)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
            raise bad_request(f"the chat template could not render these messages: {e}", param="messages") from None

    @property
    def renders_tools(self) -> bool:
        if self._renders_tools is None:
            probe = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                                      "parameters": {"type": "object", "properties": {}}}}
            try:
                text = self.render([{"role": "user", "content": "hi"}], tools=[probe])
            except APIError:
                text = ""
            self._renders_tools = _PROBE_TOOL in text
        return self._renders_tools

    def build(self, req: ChatCompletionRequest) -> ChatPrompt:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer, so it cannot serve chat; use /v1/completions with "
                              "token ids")
        messages = message_dicts(req.messages)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            choice = normalize_tool_choice(req.tool_choice, tools)
        except ToolChoiceError as e:
            raise bad_request(str(e), param=e.param) from None
        forced = choice == "required" or isinstance(choice, tuple)
        if forced and self.tool_parser is None:
            raise bad_request("tool_choice 'required' or a named function needs a server started with "
                              "--tool-call-parser", param="tool_choice")
        kwargs = dict(req.chat_template_kwargs or {})
        thinking = kwargs.get("thinking", kwargs.get("enable_thinking"))
        template_tools = None
        if tools and choice != "none":
            if self.renders_tools:
                template_tools = tools
            else:
                at = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
                messages.insert(at, {"role": "system", "content": describe_tools(tools)})
        kwargs.pop("tools", None)
        _check_template_kwargs(kwargs)
        text = self.render(messages, tools=template_tools, **kwargs)
        starts = ends_in_thinking(text)
        if self.reasoning_parser is not None and self.reasoning_parser.starts_in_reasoning(thinking):
            starts = True
        prefix = self.tool_parser.forced_prefix(req.tool_choice, tools) if forced else None
        if prefix:
            if starts:
                text += THINK_END + "\n\n"
            text += prefix
            starts = False
        ids = self.encode(text)
        parse_tools = tools if self.tool_parser is not None and tools and choice != "none" else None
        return ChatPrompt(text, ids, parse_tools, prefix, starts, thinking)
