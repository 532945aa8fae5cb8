"""dsserve.server.tool_calls: DeepSeek-V3/R1 tool-call parsing, streaming, and tool_choice."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import pytest
from dsserve.server.reasoning import REASONING_PARSERS
from dsserve.server.tool_calls import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALL_PARSERS,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
    DeepSeekV3ToolParser,
    ParsedToolCalls,
    StreamEvent,
    ToolCall,
    ToolCallStream,
    ToolChoiceError,
    build_tool_prompt_kwargs,
    forced_prefix,
    get_tool_call_parser,
    new_tool_call_id,
    normalize_tool_choice,
)

PARSER = TOOL_CALL_PARSERS["deepseekv3"]
EOS = "<｜end▁of▁sentence｜>"


def _tool(name: str, **props: str) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} tool",
            "parameters": {
                "type": "object",
                "properties": {k: {"type": v} for k, v in props.items()},
                "required": list(props),
            },
        },
    }


TOOLS = [
    _tool("query_weather", city="string"),
    _tool("get_current_time", timezone="string"),
    _tool("search_flights", origin="string", destination="string", filters="object"),
]


def _call(name: str, args: str, fence: str = "```json") -> str:
    """One call as the DeepSeek-V3/R1 chat templates write it."""
    return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n{fence}\n{args}\n```{TOOL_CALL_END}"


ONE_CALL = TOOLS_BLOCK = TOOL_CALLS_BEGIN + _call("query_weather", '{"city": "Beijing"}') + TOOL_CALLS_END
SEVERAL_CALLS = (
    TOOL_CALLS_BEGIN
    + _call("query_weather", '{"city": "Beijing"}')
    + "\n"
    + _call("get_current_time", '{"timezone": "Asia/Shanghai"}')
    + _call("query_weather", '{"city": "Paris"}')
    + TOOL_CALLS_END
    + EOS
)
TEXT_BEFORE = "I'll check the weather in Beijing for you.\n\n" + ONE_CALL
NESTED_UNICODE_ARGS = (
    '{\n  "origin": "北京",\n  "destination": "Zürich",\n'
    '  "filters": {"stops": [0, 1], "cabin": "économie", "note": "say \\"hi\\" 👋", "max": 1.5e3,'
    ' "direct": true, "via": null}\n}'
)
NESTED_UNICODE = (
    "Searching flights ✈️\n" + TOOL_CALLS_BEGIN + _call("search_flights", NESTED_UNICODE_ARGS) + TOOL_CALLS_END
)
MALFORMED_JSON = (
    "Let me look.\n" + TOOL_CALLS_BEGIN + _call("query_weather", '{"city": "Beijing"') + TOOL_CALLS_END
)
UNKNOWN_FUNCTION = TOOL_CALLS_BEGIN + _call("delete_all_files", '{"path": "/"}') + TOOL_CALLS_END
NO_CALLS = 'The weather in Beijing is usually sunny in autumn. Use a < b or {"json": 1} freely.\n'
V31_FORMAT = (
    "Sure."
    + TOOL_CALLS_BEGIN
    + f'{TOOL_CALL_BEGIN}query_weather{TOOL_SEP}{{"city": "Tokyo"}}{TOOL_CALL_END}'
    + f'{TOOL_CALL_BEGIN}get_current_time{TOOL_SEP}{{"timezone": "Asia/Tokyo"}}{TOOL_CALL_END}'
    + TOOL_CALLS_END
)
UNFENCED = (
    TOOL_CALLS_BEGIN
    + f'{TOOL_CALL_BEGIN}function{TOOL_SEP}query_weather\n{{"city": "Oslo"}}{TOOL_CALL_END}'
    + TOOL_CALLS_END
)


def _summary(parsed: ParsedToolCalls) -> tuple[str, list[tuple[str, dict]]]:
    return parsed.content, [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def _stream(text: str, chunks: list[str], tools=TOOLS, prefix: str = "") -> ParsedToolCalls:
    assert "".join(chunks) == text
    stream = ToolCallStream(tools, prefix=prefix)
    events: list[StreamEvent] = []
    for chunk in chunks:
        events.extend(stream.feed(chunk))
    events.extend(stream.finish())
    content = "".join(e.content for e in events if e.content is not None)
    calls = [e.tool_call for e in events if e.tool_call is not None]
    assert all((e.content is None) != (e.tool_call is None) for e in events)
    assert [c.index for c in calls] == list(range(len(calls)))
    assert stream.calls == calls
    return ParsedToolCalls(content=content, calls=calls)


def _same(a: ParsedToolCalls, b: ParsedToolCalls) -> bool:
    return a.content == b.content and [(c.name, c.arguments, c.index) for c in a.calls] == [
        (c.name, c.arguments, c.index) for c in b.calls
    ]


def _split_at(text: str, *cuts: int) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


# -- non-streaming -------------------------------------------------------------------------------------


def test_one_call():
    parsed = PARSER.parse(ONE_CALL, TOOLS)
    assert parsed.content == ""
    assert len(parsed.calls) == 1
    call = parsed.calls[0]
    assert (call.name, call.arguments, call.index) == (
        "query_weather",
        '{"city":"Beijing"}',
        0,
    )
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
    assert call.to_openai() == {
        "id": call.id,
        "type": "function",
        "function": {"name": "query_weather", "arguments": '{"city":"Beijing"}'},
    }


def test_several_calls_with_and_without_separator():
    parsed = PARSER.parse(SEVERAL_CALLS, TOOLS)
    assert _summary(parsed) == (
        "",
        [
            ("query_weather", {"city": "Beijing"}),
            ("get_current_time", {"timezone": "Asia/Shanghai"}),
            ("query_weather", {"city": "Paris"}),
        ],
    )
    assert [c.index for c in parsed.calls] == [0, 1, 2]
    assert len({c.id for c in parsed.calls}) == 3


def test_text_before_the_call_is_content():
    parsed = PARSER.parse(TEXT_BEFORE, TOOLS)
    assert _summary(parsed) == (
        "I'll check the weather in Beijing for you.",
        [("query_weather", {"city": "Beijing"})],
    )


def test_nested_json_and_unicode_arguments_are_reserialised_compactly():
    parsed = PARSER.parse(NESTED_UNICODE, TOOLS)
    assert parsed.content == "Searching flights ✈️"
    (call,) = parsed.calls
    assert call.name == "search_flights"
    assert json.loads(call.arguments) == json.loads(NESTED_UNICODE_ARGS)
    assert call.arguments == json.dumps(
        json.loads(NESTED_UNICODE_ARGS), ensure_ascii=False, separators=(",", ":")
    )
    assert "北京" in call.arguments and "👋" in call.arguments and "\n" not in call.arguments


@pytest.mark.parametrize(
    "text",
    [
        MALFORMED_JSON,
        UNKNOWN_FUNCTION,
        # arguments that are JSON but not an object
        TOOL_CALLS_BEGIN + _call("query_weather", '["Beijing"]') + TOOL_CALLS_END,
        # NaN is not JSON
        TOOL_CALLS_BEGIN + _call("query_weather", '{"city": NaN}') + TOOL_CALLS_END,
        # a second call is bad: nothing is a call
        TOOL_CALLS_BEGIN + _call("query_weather", '{"city": "Rome"}') + _call("nope", "{}") + TOOL_CALLS_END,
        # cut off inside a call (max_tokens)
        "Checking." + TOOL_CALLS_BEGIN + _call("query_weather", '{"city": "Rome"}')[:-20],
        # junk between calls
        TOOL_CALLS_BEGIN
        + _call("query_weather", '{"city": "Rome"}')
        + " and "
        + _call("query_weather", "{}"),
        # no call in the block
        "Hmm." + TOOL_CALLS_BEGIN + TOOL_CALLS_END,
        # no separator
        TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "query_weather" + TOOL_CALL_END + TOOL_CALLS_END,
        # fence opened and never closed
        TOOL_CALLS_BEGIN
        + f'{TOOL_CALL_BEGIN}function{TOOL_SEP}query_weather\n```json\n{{"city": "Rome"}}{TOOL_CALL_END}'
        + TOOL_CALLS_END,
        # calls block closed inside an open call
        TOOL_CALLS_BEGIN
        + f"{TOOL_CALL_BEGIN}function{TOOL_SEP}query_weather\n{TOOL_CALLS_END}{TOOL_CALL_END}",
    ],
)
def test_anything_malformed_is_returned_as_plain_content(text):
    parsed = PARSER.parse(text, TOOLS)
    assert parsed.calls == []
    assert parsed.content == text.lstrip()


def test_no_calls():
    assert _summary(PARSER.parse(NO_CALLS, TOOLS)) == (NO_CALLS, [])
    assert PARSER.parse("\n\n  Hello.\n", TOOLS).content == "Hello.\n"
    assert PARSER.parse("", TOOLS) == ParsedToolCalls("", [])


def test_without_tools_every_call_is_unknown():
    assert PARSER.parse(ONE_CALL, None) == ParsedToolCalls(ONE_CALL, [])
    assert PARSER.parse(ONE_CALL, []) == ParsedToolCalls(ONE_CALL, [])


def test_v31_and_unfenced_and_bare_fence_variants():
    assert _summary(PARSER.parse(V31_FORMAT, TOOLS)) == (
        "Sure.",
        [
            ("query_weather", {"city": "Tokyo"}),
            ("get_current_time", {"timezone": "Asia/Tokyo"}),
        ],
    )
    assert _summary(PARSER.parse(UNFENCED, TOOLS)) == (
        "",
        [("query_weather", {"city": "Oslo"})],
    )
    bare = TOOL_CALLS_BEGIN + _call("query_weather", '{"city": "Lima"}', fence="```") + TOOL_CALLS_END
    assert _summary(PARSER.parse(bare, TOOLS)) == (
        "",
        [("query_weather", {"city": "Lima"})],
    )


def test_empty_arguments_read_as_empty_object():
    text = (
        TOOL_CALLS_BEGIN
        + f"{TOOL_CALL_BEGIN}function{TOOL_SEP}get_current_time\n```json\n\n```{TOOL_CALL_END}"
    )
    assert _summary(PARSER.parse(text + TOOL_CALLS_END, TOOLS)) == (
        "",
        [("get_current_time", {})],
    )
    v31 = TOOL_CALLS_BEGIN + f"{TOOL_CALL_BEGIN}get_current_time{TOOL_SEP}{TOOL_CALL_END}" + TOOL_CALLS_END
    assert _summary(PARSER.parse(v31, TOOLS)) == ("", [("get_current_time", {})])


def test_block_ends_at_eos_or_end_of_text_and_later_text_is_dropped():
    call = _call("query_weather", '{"city": "Cairo"}')
    for tail in ["", "\n", EOS, EOS + "junk", TOOL_CALLS_END + "\n\nAnything after."]:
        parsed = PARSER.parse("Ok." + TOOL_CALLS_BEGIN + call + tail, TOOLS)
        assert _summary(parsed) == ("Ok.", [("query_weather", {"city": "Cairo"})]), tail


def test_tools_as_pydantic_like_objects_or_names():
    class Function:
        def __init__(self, name):
            self.name = name

        def model_dump(self, exclude_none=False):
            return {"name": self.name}

    class Tool:
        def __init__(self, name):
            self.function = Function(name)

        def model_dump(self, exclude_none=False):
            return {"type": "function", "function": self.function.model_dump()}

    assert [c.name for c in PARSER.parse(ONE_CALL, [Tool("query_weather")]).calls] == ["query_weather"]
    assert [c.name for c in PARSER.parse(ONE_CALL, ["query_weather"]).calls] == ["query_weather"]


def test_ids_are_random_and_well_formed():
    ids = {new_tool_call_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)


def test_registry():
    assert isinstance(PARSER, DeepSeekV3ToolParser)
    assert get_tool_call_parser("deepseekv3") is PARSER
    with pytest.raises(ValueError, match="deepseekv3"):
        get_tool_call_parser("hermes")


@pytest.mark.skipif(
    not Path("/work/shared/reference/deepseek-r1.tokenizer_config.json").is_file(),
    reason="DeepSeek-R1 reference tokenizer_config.json not available",
)
def test_round_trip_through_the_r1_chat_template():
    """What the R1 template writes for an assistant tool-call turn parses back to the same calls."""
    import jinja2

    config = json.loads(Path("/work/shared/reference/deepseek-r1.tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(config["chat_template"])
    calls = [
        {
            "type": "function",
            "function": {"name": "query_weather", "arguments": '{"city": "Beijing"}'},
        },
        {
            "type": "function",
            "function": {"name": "search_flights", "arguments": NESTED_UNICODE_ARGS},
        },
    ]
    rendered = template.render(
        messages=[
            {"role": "user", "content": "Weather in Beijing, and flights to Zürich?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
        ],
        bos_token="<｜begin▁of▁sentence｜>",
        add_generation_prompt=False,
    )
    output = rendered[rendered.index(TOOL_CALLS_BEGIN) :]
    assert output.endswith(TOOL_CALLS_END + EOS)
    parsed = PARSER.parse(output, TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
    ]
    assert _same(_stream(output, list(output)), parsed)


# -- streaming -----------------------------------------------------------------------------------------

ALL_OUTPUTS = [
    ONE_CALL,
    SEVERAL_CALLS,
    TEXT_BEFORE,
    NESTED_UNICODE,
    MALFORMED_JSON,
    UNKNOWN_FUNCTION,
    NO_CALLS,
    V31_FORMAT,
    UNFENCED,
    "  \n" + TEXT_BEFORE + EOS,
    "Checking." + TOOL_CALLS_BEGIN + _call("query_weather", '{"city": "Rome"}')[:-20],
    "Price < 5 and a <｜ lookalike <｜tool▁call",
]


@pytest.mark.parametrize("text", ALL_OUTPUTS)
def test_stream_every_single_split_and_per_character(text):
    expected = PARSER.parse(text, TOOLS)
    assert _same(_stream(text, [text]), expected)
    assert _same(_stream(text, list(text)), expected)
    for i in range(len(text) + 1):
        assert _same(_stream(text, _split_at(text, i)), expected), i


@pytest.mark.parametrize(
    "text",
    [
        TEXT_BEFORE,
        MALFORMED_JSON,
        "Hi "
        + TOOL_CALLS_BEGIN
        + f'{TOOL_CALL_BEGIN}query_weather{TOOL_SEP}{{"city": "Tokyo"}}{TOOL_CALL_END}',
    ],
)
def test_stream_every_pair_of_splits(text):
    expected = PARSER.parse(text, TOOLS)
    n = len(text)
    for i in range(n + 1):
        for j in range(i, n + 1):
            assert _same(_stream(text, _split_at(text, i, j)), expected), (i, j)


def test_stream_random_chunkings():
    rng = random.Random(1)
    for text in ALL_OUTPUTS:
        expected = PARSER.parse(text, TOOLS)
        for _ in range(40):
            cuts = rng.sample(range(len(text) + 1), k=rng.randint(1, 10))
            assert _same(_stream(text, _split_at(text, *cuts)), expected)


def test_stream_holds_back_a_possible_begin_tag_and_trailing_whitespace():
    stream = ToolCallStream(TOOLS)
    assert stream.feed("Let me check. ") == [StreamEvent(content="Let me check.")]
    assert stream.feed("<｜tool") == []
    assert stream.feed("▁calls▁begin｜>") == []
    assert stream.feed(_call("query_weather", '{"city": "Beijing"}')) == []
    events = stream.feed(TOOL_CALLS_END)
    assert [e.tool_call.name for e in events] == ["query_weather"]
    assert stream.feed(EOS) == []
    assert stream.finish() == []

    stream = ToolCallStream(TOOLS)
    assert stream.feed("a <｜tool") == [StreamEvent(content="a")]
    assert stream.feed("box｜> b") == [StreamEvent(content=" <｜toolbox｜> b")]


def test_stream_malformed_block_comes_out_as_content_as_soon_as_certain():
    stream = ToolCallStream(TOOLS)
    assert stream.feed("Hmm.\n") == [StreamEvent(content="Hmm.")]
    assert stream.feed(TOOL_CALLS_BEGIN + _call("delete_all_files", "{}")) == [
        StreamEvent(content="\n" + TOOL_CALLS_BEGIN + _call("delete_all_files", "{}"))
    ]
    assert stream.feed(" more") == [StreamEvent(content=" more")]
    assert stream.finish() == []
    assert stream.calls == []


def test_stream_truncated_block_is_content_at_finish():
    text = TOOL_CALLS_BEGIN + f'{TOOL_CALL_BEGIN}function{TOOL_SEP}query_weather\n```json\n{{"ci'
    stream = ToolCallStream(TOOLS)
    assert stream.feed(text) == []
    assert stream.finish() == [StreamEvent(content=text)]


def test_stream_event_deltas():
    call = ToolCall(
        id="call_" + "a" * 24,
        name="query_weather",
        arguments='{"city":"Beijing"}',
        index=1,
    )
    assert StreamEvent(tool_call=call).to_delta() == {
        "tool_calls": [
            {
                "index": 1,
                "id": call.id,
                "type": "function",
                "function": {
                    "name": "query_weather",
                    "arguments": '{"city":"Beijing"}',
                },
            }
        ]
    }
    assert StreamEvent(content="hi").to_delta() == {"content": "hi"}


def test_stream_feed_after_finish_raises():
    stream = PARSER.stream(TOOLS)
    stream.finish()
    assert stream.finish() == []
    with pytest.raises(RuntimeError):
        stream.feed("x")


# -- reasoning + tool calls together -----------------------------------------------------------------

R1_THINK_THEN_CALL = (
    "The user wants Beijing's weather. I should call query_weather with city Beijing.\n</think>\n\n"
    "Let me look that up."
    + TOOL_CALLS_BEGIN
    + _call("query_weather", '{"city": "Beijing"}')
    + TOOL_CALLS_END
    + EOS
)


def test_reasoning_then_tool_calls_streaming_matches_non_streaming():
    r1 = REASONING_PARSERS["deepseek-r1"]
    reasoning, content = r1.split(R1_THINK_THEN_CALL)
    expected = PARSER.parse(content, TOOLS)
    assert reasoning.endswith("city Beijing.")
    assert _summary(expected) == (
        "Let me look that up.",
        [("query_weather", {"city": "Beijing"})],
    )
    rs, ts = r1.stream(), ToolCallStream(TOOLS)
    reasoning_parts, events = [], []
    for ch in R1_THINK_THEN_CALL:
        r, c = rs.feed(ch)
        reasoning_parts.append(r)
        events.extend(ts.feed(c))
    r, c = rs.finish()
    reasoning_parts.append(r)
    events.extend(ts.feed(c))
    events.extend(ts.finish())
    assert "".join(reasoning_parts) == reasoning
    assert "".join(e.content for e in events if e.content) == expected.content
    assert [(e.tool_call.name, e.tool_call.arguments) for e in events if e.tool_call] == [
        (c.name, c.arguments) for c in expected.calls
    ]


# -- tool_choice ---------------------------------------------------------------------------------------


def test_normalize_tool_choice():
    assert normalize_tool_choice(None, TOOLS) == "auto"
    assert normalize_tool_choice(None, None) == "none"
    assert normalize_tool_choice("none", TOOLS) == "none"
    assert normalize_tool_choice("auto", TOOLS) == "auto"
    assert normalize_tool_choice("required", TOOLS) == "required"
    named = {"type": "function", "function": {"name": "get_current_time"}}
    assert normalize_tool_choice(named, TOOLS) == ("function", "get_current_time")


@pytest.mark.parametrize(
    "choice,tools",
    [
        ("sometimes", TOOLS),
        ("required", None),
        ("required", []),
        ({"type": "function", "function": {"name": "launch_rockets"}}, TOOLS),
        ({"type": "function", "function": {}}, TOOLS),
        ({"type": "retrieval"}, TOOLS),
        (42, TOOLS),
    ],
)
def test_invalid_tool_choice_is_a_client_error(choice, tools):
    with pytest.raises(ToolChoiceError) as info:
        normalize_tool_choice(choice, tools)
    assert info.value.param == "tool_choice"
    assert isinstance(info.value, ValueError)


def test_build_tool_prompt_kwargs():
    assert build_tool_prompt_kwargs(TOOLS, "none") == {"tools": None}
    assert build_tool_prompt_kwargs(None, None) == {"tools": None}
    assert build_tool_prompt_kwargs([], "auto") == {"tools": None}
    for choice in (
        None,
        "auto",
        "required",
        {"type": "function", "function": {"name": "query_weather"}},
    ):
        kwargs = build_tool_prompt_kwargs(TOOLS, choice)
        assert kwargs == {"tools": TOOLS}
        assert kwargs["tools"][0] is not TOOLS[0]  # copies, safe for the template to see
    with pytest.raises(ToolChoiceError):
        build_tool_prompt_kwargs(TOOLS, {"type": "function", "function": {"name": "nope"}})


def test_forced_prefix():
    assert forced_prefix("auto", TOOLS) is None
    assert forced_prefix("none", TOOLS) is None
    assert forced_prefix(None, TOOLS) is None
    assert forced_prefix("required", TOOLS) == TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP
    assert forced_prefix({"type": "function", "function": {"name": "query_weather"}}, TOOLS) == (
        TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "query_weather\n```json\n"
    )
    # One tool: required means that tool.
    assert forced_prefix("required", TOOLS[:1]) == forced_prefix(
        {"type": "function", "function": {"name": "query_weather"}}, TOOLS
    )
    assert PARSER.forced_prefix("required", TOOLS) == forced_prefix("required", TOOLS)


def test_parse_and_stream_continue_a_forced_prefix():
    named = forced_prefix({"type": "function", "function": {"name": "query_weather"}}, TOOLS)
    output = '{"city": "Seoul"}\n```' + TOOL_CALL_END + TOOL_CALLS_END
    parsed = PARSER.parse(output, TOOLS, prefix=named)
    assert _summary(parsed) == ("", [("query_weather", {"city": "Seoul"})])
    assert _same(_stream(output, list(output), prefix=named), parsed)

    required = forced_prefix("required", TOOLS)
    output = 'get_current_time\n```json\n{"timezone": "UTC"}\n```' + TOOL_CALL_END + TOOL_CALLS_END
    parsed = PARSER.parse(output, TOOLS, prefix=required)
    assert _summary(parsed) == ("", [("get_current_time", {"timezone": "UTC"})])
    assert _same(_stream(output, list(output), prefix=required), parsed)

    # The model wrote garbage after the forced prefix: content is the prefix plus the output.
    parsed = PARSER.parse("oops", TOOLS, prefix=required)
    assert parsed == ParsedToolCalls(required + "oops", [])
    assert _same(_stream("oops", ["o", "ops"], prefix=required), parsed)
