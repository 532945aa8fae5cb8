"""POST /v1/chat/completions: engine requests in, chat completions and SSE chunks out.

Per choice the decoded text goes through the reasoning parser first (reasoning_content vs
content), then the tool-call parser on the content (tool_calls). A thinking budget is a
`token_override` on the engine request that forces `</think>` once the budget is spent.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from functools import partial

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from dsserve.core.request import RequestHandle, RequestOutput
from .chat_prompt import ChatPrompt, ChatPromptBuilder
from .errors import bad_request, error_body
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
)
from .reasoning import THINK_END, ReasoningStream, ThinkingBudget, split_reasoning
from .serving import CHAT_NAMES, SSE_DONE, Serving, abort_unfinished, engine_error, response_usage, sse


class _ChoiceStream:
    """The parsers' streaming state for one choice: text deltas in, DeltaMessages out."""

    def __init__(self, index: int, prompt: ChatPrompt, separate: bool, stream_reasoning: bool, tool_parser):
        self.index = index
        self.reasoning = ReasoningStream(prompt.starts_in_reasoning) if separate else None
        self.stream_reasoning = stream_reasoning
        self.tools = tool_parser.stream(prompt.tools, prefix=prompt.forced_prefix or "") \
            if prompt.tools is not None else None
        self.held_reasoning = ""
        self.called = False

    def step(self, text: str, final: bool) -> list[DeltaMessage]:
        if self.reasoning is not None:
            r, c = self.reasoning.feed(text)
            if final:
                r2, c2 = self.reasoning.finish()
                r, c = r + r2, c + c2
        else:
            r, c = "", text
        out: list[DeltaMessage] = []
        if self.stream_reasoning:
            if r:
                out.append(DeltaMessage(reasoning_content=r))
        else:
            self.held_reasoning += r
            if self.held_reasoning and (c or final):
                out.append(DeltaMessage(reasoning_content=self.held_reasoning))
                self.held_reasoning = ""
        if self.tools is None:
            if c:
                out.append(DeltaMessage(content=c))
            return out
        events = self.tools.feed(c) if c else []
        if final:
            events += self.tools.finish()
        for ev in events:
            if ev.tool_call is not None:
                call = ev.tool_call
                self.called = True
                out.append(DeltaMessage(tool_calls=[DeltaToolCall(
                    index=call.index, id=call.id, type="function",
                    function=DeltaFunctionCall(name=call.name, arguments=call.arguments))]))
            elif ev.content:
                out.append(DeltaMessage(content=ev.content))
        return out


def _finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason in ("stop", "length") else reason


def _budget_override(budget: ThinkingBudget, starts_in_reasoning: bool):
    state = budget.new_state(starts_in_reasoning)
    seen = 0

    def override(output_ids: list[int]) -> int | None:
        nonlocal seen
        state.observe_many(output_ids[seen:])
        seen = len(output_ids)
        return state.next_forced_token()

    return override


class ChatServing:
    def __init__(self, serving: Serving, reasoning_parser, tool_parser):
        self.s = serving
        self.reasoning_parser = reasoning_parser
        self.tool_parser = tool_parser
        self.prompts = ChatPromptBuilder(serving.tokenizer, serving.chat_template, reasoning_parser, tool_parser,
                                         encode=partial(serving.encode_prompt, param="messages",
                                                        add_special_tokens=False))

    # ------------------------------------------------------------------------------------ request
    async def create(self, req: ChatCompletionRequest, raw: Request):
        s = self.s
        s.check_model(req.model)
        s.check_n(req.n)
        _check_unsupported(req)
        prompt = await s.off_loop(self.prompts.build, req)
        max_tokens = s.max_tokens(len(prompt.ids), req.max_completion_tokens or req.max_tokens)
        budget = self._thinking_budget(req)
        params = s.choice_params(
            req, max_new_tokens=max_tokens, logprobs=req.logprobs,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
            # the tool-call markers are special tokens: the parser must see them
            skip_special_tokens=req.skip_special_tokens and prompt.tools is None)
        overrides = [_budget_override(budget, prompt.starts_in_reasoning) for _ in range(req.n)] if budget else None
        s.admit(req.n)
        rid = s.new_id("chatcmpl")
        handles = s.submit(prompt.ids, params, rid, names=CHAT_NAMES, overrides=overrides)
        if req.stream:
            return StreamingResponse(self._stream(req, prompt, handles, rid), media_type="text/event-stream",
                                     background=BackgroundTask(abort_unfinished, handles))
        return await self._full(req, prompt, handles, rid, raw)

    def _thinking_budget(self, req: ChatCompletionRequest) -> ThinkingBudget | None:
        budget = req.thinking_budget
        if req.custom_logit_processor is not None and not self.s.args.enable_custom_logit_processor:
            raise bad_request("custom_logit_processor needs a server started with --enable-custom-logit-processor",
                              param="custom_logit_processor")
        if budget is None and req.custom_params and "thinking_budget" in req.custom_params:
            budget = req.custom_params["thinking_budget"]
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
                raise bad_request("custom_params.thinking_budget must be an integer >= 0",
                                  param="custom_params.thinking_budget")
        if budget is None:
            return None
        end_ids = self.s.require_tokenizer().encode(THINK_END, add_special_tokens=False)
        return ThinkingBudget(budget, end_ids)

    # ------------------------------------------------------------------------------------ whole
    async def _full(self, req: ChatCompletionRequest, prompt: ChatPrompt, handles: list[RequestHandle], rid: str,
                    raw: Request) -> JSONResponse:
        results = await self.s.collect(handles, raw)
        error = next((e for e in map(engine_error, results) if e), None)
        if error:
            raise error
        choices = [self._choice(i, req, prompt, outs) for i, outs in enumerate(results)]
        usage = response_usage([len(prompt.ids)], [outs[-1] for outs in results], req.n)
        resp = ChatCompletionResponse(id=rid, model=self.s.model_name, choices=choices, usage=usage)
        return JSONResponse(resp.model_dump(mode="json"))

    def _choice(self, index: int, req: ChatCompletionRequest, prompt: ChatPrompt,
                outs: list[RequestOutput]) -> ChatChoice:
        text = "".join(o.text for o in outs)
        last = outs[-1]
        reasoning = None
        if self.reasoning_parser is not None and req.separate_reasoning:
            reasoning, text = split_reasoning(text, starts_in_reasoning=prompt.starts_in_reasoning)
        calls = []
        if prompt.tools is not None:
            parsed = self.tool_parser.parse(text, prompt.tools, prefix=prompt.forced_prefix or "")
            text, calls = parsed.content, parsed.calls
        message = ChatResponseMessage(
            content=text if text or not calls else None, reasoning_content=reasoning,
            tool_calls=[ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                        for c in calls] or None)
        logprobs = self._logprobs(outs) if req.logprobs else None
        return ChatChoice(index=index, message=message, logprobs=logprobs,
                          finish_reason=_finish_reason(last.finish_reason, bool(calls)),
                          matched_stop=last.matched_stop)

    def _logprobs(self, outs: list[RequestOutput]) -> ChatLogprobs:
        """Each token with its raw bytes (see logprob_tokens), so that a client can rebuild the
        characters that span several tokens; streamed chunks carry the same entries."""
        tokens = self.s.logprob_tokens

        def entry(token_id: int, lp: float) -> dict:
            return {"token": tokens.string(token_id), "logprob": lp, "bytes": list(tokens.raw_bytes(token_id))}

        content = []
        for out in outs:
            tops = out.top_logprobs or [[] for _ in out.token_ids]
            for token_id, lp, top in zip(out.token_ids, out.logprobs or [], tops):
                content.append(TokenLogprob(**entry(token_id, lp),
                                            top_logprobs=[TopLogprob(**entry(t, v)) for t, v in top]))
        return ChatLogprobs(content=content)

    # ------------------------------------------------------------------------------------ streamed
    async def _stream(self, req: ChatCompletionRequest, prompt: ChatPrompt, handles: list[RequestHandle],
                      rid: str) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.s.model_name
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index: int, delta: DeltaMessage, logprobs: ChatLogprobs | None = None,
                  finish_reason: str | None = None, matched_stop=None) -> str:
            c = ChatCompletionChunk(id=rid, created=created, model=model, choices=[ChatChunkChoice(
                index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason, matched_stop=matched_stop)])
            return sse(_chunk_json(c))

        streams = [_ChoiceStream(i, prompt, self.reasoning_parser is not None and req.separate_reasoning,
                                 req.stream_reasoning, self.tool_parser) for i in range(len(handles))]
        finals: list[RequestOutput | None] = [None] * len(handles)
        try:
            for i in range(len(handles)):
                yield chunk(i, DeltaMessage(role="assistant", content=""))
            async for i, out in self.s.merged(handles):
                if out.finished and out.finish_reason == "error":
                    yield sse(json.dumps(error_body(out.error or "internal error", "server_error")))
                    return
                deltas = streams[i].step(out.text, final=out.finished)
                logprobs = self._logprobs([out]) if req.logprobs and out.token_ids else None
                if logprobs and not deltas:
                    deltas = [DeltaMessage()]
                for k, delta in enumerate(deltas):
                    yield chunk(i, delta, logprobs if k == 0 else None)
                if out.finished:
                    finals[i] = out
                    yield chunk(i, DeltaMessage(), finish_reason=_finish_reason(out.finish_reason, streams[i].called),
                                matched_stop=out.matched_stop)
            if include_usage:
                usage = response_usage([len(prompt.ids)], [f for f in finals if f is not None], req.n)
                usage_chunk = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)
                yield sse(usage_chunk.model_dump_json(exclude_none=True))
            yield SSE_DONE
        finally:
            abort_unfinished(handles)


def _chunk_json(chunk: ChatCompletionChunk) -> str:
    data = chunk.model_dump(mode="json", exclude_none=True)
    for choice in data["choices"]:
        choice.setdefault("finish_reason", None)   # OpenAI sends it as null until the end
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _check_unsupported(req: ChatCompletionRequest) -> None:
    """Fields that would change the output and that this server cannot honour: a 400, not silence."""
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise bad_request(f"response_format type '{fmt}' is not supported (structured output is not built yet)",
                          param="response_format")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", param="logit_bias")

