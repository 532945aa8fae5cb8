"""dsserve.server.reasoning: <think> splitting (non-streaming and streaming) and the thinking budget."""

from __future__ import annotations

import itertools
import random

import pytest
from dsserve.server.reasoning import (
    REASONING_PARSERS,
    ReasoningParser,
    ReasoningStream,
    ThinkingBudget,
    get_reasoning_parser,
    split_reasoning,
)

R1 = REASONING_PARSERS["deepseek-r1"]
V3 = REASONING_PARSERS["deepseek-v3"]

# What DeepSeek-R1 generates after the template's "<｜Assistant｜><think>\n": the thinking, then
# </think>, then the answer.
R1_TEMPLATE_STARTED = (
    "Okay, the user wants to solve 2x + 5 = 13. Subtract 5 from both sides: 2x = 8.\n"
    "Then divide by 2, so x = 4. Let me check: 2*4 + 5 = 13. Yes.\n"
    "</think>\n\n"
    "To solve \\(2x + 5 = 13\\):\n\n1. Subtract 5: \\(2x = 8\\)\n2. Divide by 2: \\(x = 4\\)\n\n"
    "**Answer:** \\(x = 4\\)"
)
# R1-0528 (or a template that does not open the thinking) writes <think> itself.
R1_SELF_OPENED = (
    "<think>\nThe user asks whether Paris is the capital of France. It is.\n</think>\n\n"
    "Yes, Paris is the capital of France."
)
R1_TRUNCATED = "Hmm, let me think about prime numbers below 20: 2, 3, 5, 7, 11, 13, 17, 19. That's <"


def _stream(text: str, chunks: list[str], parser: ReasoningParser = R1, **kw) -> tuple[str | None, str]:
    assert "".join(chunks) == text
    stream = parser.stream(**kw)
    reasoning, content = [], []
    for chunk in chunks:
        r, c = stream.feed(chunk)
        reasoning.append(r)
        content.append(c)
    r, c = stream.finish()
    reasoning.append(r)
    content.append(c)
    return ("".join(reasoning) or None), "".join(content)


def _split_at(text: str, *cuts: int) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


# -- non-streaming -------------------------------------------------------------------------------------


def test_sglang_whitespace_convention():
    assert R1.split("<think>\nabc\n</think>\n\nanswer") == ("abc", "answer")
    assert R1.split("abc\n</think>\n\nanswer") == ("abc", "answer")


def test_template_started_thinking():
    reasoning, content = R1.split(R1_TEMPLATE_STARTED)
    assert reasoning.startswith("Okay, the user wants")
    assert reasoning.endswith("Yes.")
    assert content.startswith("To solve")
    assert content.endswith("\\(x = 4\\)")
    assert "</think>" not in reasoning + content


def test_model_opens_thinking_itself():
    assert R1.split(R1_SELF_OPENED) == (
        "The user asks whether Paris is the capital of France. It is.",
        "Yes, Paris is the capital of France.",
    )
    # Leading whitespace before the model's own <think> is fine too.
    assert R1.split("\n" + R1_SELF_OPENED) == R1.split(R1_SELF_OPENED)


def test_no_closing_tag_is_all_reasoning():
    assert R1.split(R1_TRUNCATED) == (R1_TRUNCATED, "")
    assert R1.split("<think>\nstill thinking...\n") == ("still thinking...", "")


def test_empty_reasoning_is_none():
    assert R1.split("\n\n</think>\n\nHello!") == (None, "Hello!")
    assert R1.split("") == (None, "")


def test_only_first_end_tag_splits():
    reasoning, content = R1.split("a</think>b </think> c")
    assert (reasoning, content) == ("a", "b </think> c")


def test_v3_thinking_off_is_plain_content():
    text = "  Hello! I can write <think> tags in code: `</think>`."
    assert V3.split(text) == (None, text)
    assert V3.split(text, thinking=False) == (None, text)


def test_v3_thinking_on_or_self_opened():
    assert V3.split("abc\n</think>\n\nanswer", thinking=True) == ("abc", "answer")
    assert V3.split("<think>\nabc\n</think>\n\nanswer") == ("abc", "answer")
    assert V3.split("<think>abc") == ("abc", "")
    # R1 ignores the request's choice.
    assert R1.split("abc</think>x", thinking=False) == ("abc", "x")


def test_registry_and_lookup():
    assert set(REASONING_PARSERS) == {"deepseek-r1", "deepseek-v3"}
    assert get_reasoning_parser("deepseek-r1") is R1
    assert R1.starts_in_reasoning() and R1.starts_in_reasoning(False)
    assert not V3.starts_in_reasoning() and V3.starts_in_reasoning(True)
    with pytest.raises(ValueError, match="deepseek-r1"):
        get_reasoning_parser("qwen3")


# -- streaming -----------------------------------------------------------------------------------------

CASES = [
    (R1, R1_TEMPLATE_STARTED, {}),
    (R1, R1_SELF_OPENED, {}),
    (R1, R1_TRUNCATED, {}),
    (R1, "<think>\n\n</think>\n\nHi", {}),
    (R1, "  \n<thi", {}),
    (V3, "Plain answer, no thinking. a<b and </think>", {}),
    (V3, "<think>\nshort\n</think>\n\nanswer\n", {}),
    (V3, "  <thin", {}),
    (V3, "reasoning here\n</think>\nanswer", {"thinking": True}),
]


@pytest.mark.parametrize("parser,text,kw", CASES)
def test_stream_every_single_split_and_per_character(parser, text, kw):
    expected = parser.split(text, **kw)
    assert _stream(text, list(text), parser, **kw) == expected
    assert _stream(text, [text], parser, **kw) == expected
    for i in range(len(text) + 1):
        assert _stream(text, _split_at(text, i), parser, **kw) == expected, i


@pytest.mark.parametrize("text", [R1_SELF_OPENED, "x\n</think>\n\ny z", "<think>a </think> b"])
def test_stream_every_pair_of_splits(text):
    expected = R1.split(text)
    n = len(text)
    for i in range(n + 1):
        for j in range(i, n + 1):
            assert _stream(text, _split_at(text, i, j)) == expected, (i, j)


def test_stream_random_chunkings():
    rng = random.Random(0)
    for parser, text, kw in CASES:
        expected = parser.split(text, **kw)
        for _ in range(50):
            cuts = rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 12)))
            assert _stream(text, _split_at(text, *cuts), parser, **kw) == expected


def test_tags_split_across_chunks():
    chunks = ["<th", "ink>\nab", "c\n</th", "ink>\n\nans", "wer"]
    assert _stream("".join(chunks), chunks) == ("abc", "answer")
    stream = R1.stream()
    assert stream.feed("<") == ("", "")
    assert stream.feed("think") == ("", "")
    assert stream.feed(">\nStep one") == ("Step one", "")
    assert stream.feed(".</") == (".", "")  # "</" may start </think>: held back
    assert stream.feed("thi") == ("", "")
    assert stream.in_reasoning
    assert stream.feed("nk>\n\nDo") == ("", "Do")
    assert not stream.in_reasoning
    assert stream.feed("ne.") == ("", "ne.")
    assert stream.finish() == ("", "")


def test_stream_emits_promptly_and_holds_only_ambiguous_text():
    stream = R1.stream()
    # Template-started: the first words are reasoning right away.
    assert stream.feed("Let me") == ("Let me", "")
    # Trailing whitespace waits: it is dropped if </think> follows.
    assert stream.feed(" think.\n") == (" think.", "")
    assert stream.feed("More") == ("\nMore", "")
    assert stream.feed("\n</think>") == ("", "")
    assert stream.feed("\n\n") == (
        "",
        "",
    )  # leading whitespace of the answer is dropped
    assert stream.feed("Answer ") == ("", "Answer ")
    assert stream.finish() == ("", "")


def test_stream_without_closing_tag_flushes_held_text_to_reasoning():
    stream = R1.stream()
    assert stream.feed("I wonder if a </thi") == ("I wonder if a", "")
    assert stream.finish() == (" </thi", "")
    stream = R1.stream()
    assert stream.feed("thinking   ") == ("thinking", "")
    assert stream.finish() == (
        "",
        "",
    )  # trailing whitespace of the reasoning is stripped


def test_stream_content_mode_partial_open_tag_goes_to_content_at_finish():
    stream = V3.stream()
    assert stream.feed(" <thi") == ("", "")
    assert stream.in_reasoning is False
    assert stream.finish() == ("", " <thi")
    stream = V3.stream()
    assert stream.feed("<thi") == ("", "")
    assert stream.feed("s is not a tag") == ("", "<this is not a tag")
    assert not stream.entered_reasoning


def test_stream_model_opens_thinking_after_template_opened_it():
    # The prompt ended with "<think>\n" and the model still writes "<think>" first.
    text = "<think>\nDouble-open.\n</think>\n\nDone."
    assert _stream(text, list(text)) == ("Double-open.", "Done.")
    stream = ReasoningStream(starts_in_reasoning=True)
    assert stream.feed("<think>") == ("", "")
    assert stream.entered_reasoning


def test_stream_feed_after_finish_raises_and_finish_is_idempotent():
    stream = R1.stream()
    stream.feed("a")
    assert stream.finish() == ("", "")
    assert stream.finish() == ("", "")
    with pytest.raises(RuntimeError):
        stream.feed("b")


def test_split_reasoning_function_matches_parser():
    text = "x</think>y"
    assert split_reasoning(text) == R1.split(text)
    assert split_reasoning(text, starts_in_reasoning=False) == V3.split(text)


# -- thinking budget -------------------------------------------------------------------------------------

END = 128799  # an id standing for </think>


def _run_engine(
    budget: ThinkingBudget, model_tokens: list[int], starts_in_reasoning: bool = True
) -> list[int]:
    """A fake decode loop: the model would produce ``model_tokens`` in order (after a forced
    token it goes on with its next one); the budget overrides sampling while forcing."""
    state = budget.new_state(starts_in_reasoning)
    out: list[int] = []
    model = iter(model_tokens)
    while True:
        forced = state.next_forced_token()
        if forced is not None:
            token = forced
        else:
            token = next(model, None)
            if token is None:
                return out
        out.append(token)
        state.observe(token)


def test_budget_forces_end_after_exactly_budget_thinking_tokens():
    budget = ThinkingBudget(4, [END])
    out = _run_engine(budget, [1, 2, 3, 4, 5, 6, 7, 8])
    assert out == [1, 2, 3, 4, END, 5, 6, 7, 8]


def test_budget_multi_token_end_sequence():
    budget = ThinkingBudget(2, [10, END, 10])  # "\n</think>\n"
    state = budget.new_state()
    assert state.next_forced_token() is None
    state.observe(1)
    state.observe(2)
    assert state.reasoning_tokens == 2
    assert state.next_forced_token() == 10
    state.observe(10)
    assert state.forcing and state.next_forced_token() == END
    state.observe(END)
    assert state.next_forced_token() == 10
    state.observe(10)
    assert not state.in_reasoning and state.next_forced_token() is None
    state.observe(5)
    assert state.reasoning_tokens == 2


def test_budget_zero_forces_immediately():
    assert _run_engine(ThinkingBudget(0, [END]), [1, 2]) == [END, 1, 2]


def test_budget_not_reached_when_model_closes_thinking_itself():
    budget = ThinkingBudget(5, [END])
    assert _run_engine(budget, [1, 2, END, 3, 4, 5, 6, 7, 8]) == [
        1,
        2,
        END,
        3,
        4,
        5,
        6,
        7,
        8,
    ]
    state = budget.new_state()
    state.observe_many([1, 2, END])
    assert not state.in_reasoning and state.reasoning_tokens == 3


def test_budget_natural_multi_token_end_and_caller_end():
    budget = ThinkingBudget(10, [7, 8])
    state = budget.new_state()
    state.observe_many([1, 7, 2, 7, 8])
    assert not state.in_reasoning
    state = budget.new_state()
    state.observe_many([1, 2])
    state.end_reasoning()  # e.g. the text-level ReasoningStream saw </think>
    assert state.next_forced_token() is None


def test_budget_inactive_outside_reasoning():
    assert _run_engine(ThinkingBudget(0, [END]), [1, 2], starts_in_reasoning=False) == [
        1,
        2,
    ]


def test_budget_should_force_is_pure():
    budget = ThinkingBudget(3, (END,))
    assert [budget.should_force(n) for n in range(5)] == [
        False,
        False,
        False,
        True,
        True,
    ]
    assert budget.end_think_token_ids == (END,)


@pytest.mark.parametrize("args", [(-1, [END]), (3, [])])
def test_budget_rejects_bad_values(args):
    with pytest.raises(ValueError):
        ThinkingBudget(*args)


def test_budget_rejects_non_integer():
    with pytest.raises(TypeError):
        ThinkingBudget(2.5, [END])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ThinkingBudget(True, [END])  # type: ignore[arg-type]
