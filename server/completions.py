"""POST /v1/completions: prompts as text, token ids, or lists of either; `n` choices each; echo and
log-probabilities in OpenAI's legacy shape (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`), including the prompt's own log-probabilities with `echo` (what evaluation harnesses
score)."""
from __future__ import annotations

import codecs
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from dsserve.core.request import RequestHandle, RequestOutput
from .errors import bad_request, error_body
from .logprob_tokens import LogprobTokens
from .protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from .serving import SSE_DONE, Serving, abort_unfinished, engine_error, response_usage, sse


@dataclass
class _Prompt:
    ids: list[int]
    text: str           # what echo returns
    shown: list[bool]   # per id, whether its text is part of `text`


class _TextOffsets:
    """`text_offset`: where each token starts in the returned text, in characters.

    A token takes room for the characters its bytes complete: a character split across tokens counts
    at the token that completes it (where the detokenizer emits it), so the tokens before that one
    span "", and text[offset[i]:offset[i + 1]] == tokens[i] for every token that is whole UTF-8 and
    part of the text.  Counting from the tokens' bytes rather than from the text keeps streamed
    pieces, whose text may hold a split character back, equal to the whole response.  A token whose
    text is not in the returned text (a BOS the tokenizer added, special tokens skipped, the token
    that stopped the request) takes no room; the tokens of a matched stop string, which the text is
    cut before, keep the offsets they would have had.
    """

    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def place(self, shown: bytes) -> int:
        """The offset of the next token, whose bytes in the returned text are `shown`; moves past them."""
        offset = self._chars
        self._chars += len(self._utf8.decode(shown))
        return offset


class _Logprobs:
    """Builds one choice's CompletionLogprobs piece by piece (text_offset runs on across pieces)."""

    def __init__(self, serving: Serving, top: int):
        self.tokens = serving.logprob_tokens
        self.top = top
        self.offsets = _TextOffsets()

    def piece(self, ids: list[int], lps: list[float | None], tops: list | None,
              shown: list[bool]) -> CompletionLogprobs:
        out = CompletionLogprobs(top_logprobs=[] if self.top else None)
        for k, (token_id, lp, in_text) in enumerate(zip(ids, lps, shown)):
            out.tokens.append(self.tokens.string(token_id))
            out.token_logprobs.append(lp)
            out.text_offset.append(self.offsets.place(self.tokens.raw_bytes(token_id) if in_text else b""))
            if self.top:
                alternatives = tops[k] if tops and k < len(tops) else None
                out.top_logprobs.append(None if alternatives is None else
                                        {self.tokens.string(t): v for t, v in alternatives})
        return out


def _shown_in_text(out: RequestOutput, skip_special_tokens: bool, tokens: LogprobTokens) -> list[bool]:
    """Per generated token, whether its text is in the completion's text: skip_special_tokens leaves
    special tokens out, and the engine never detokenizes the token that stopped the request (EOS or
    a stop_token_ids entry)."""
    shown = [not (skip_special_tokens and tokens.is_special(t)) for t in out.token_ids]
    if shown and out.finished and isinstance(out.matched_stop, int):
        shown[-1] = False
    return shown


def _join(pieces: list[CompletionLogprobs]) -> CompletionLogprobs:
    out = CompletionLogprobs(top_logprobs=None if pieces and pieces[0].top_logprobs is None else [])
    for p in pieces:
        out.tokens += p.tokens
        out.token_logprobs += p.token_logprobs
        out.text_offset += p.text_offset
        if out.top_logprobs is not None:
            out.top_logprobs += p.top_logprobs or []
    return out


class CompletionServing:
    def __init__(self, serving: Serving):
        self.s = serving

    async def create(self, req: CompletionRequest, raw: Request):
        s = self.s
        s.check_model(req.model)
        s.check_n(req.n)
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of must equal n (choices are not ranked)", param="best_of")
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias")
        prompts = await s.off_loop(self._prompts, req.prompt)
        want_lp = req.logprobs is not None
        s.admit(len(prompts) * req.n)
        rid = s.new_id("cmpl")
        handles: list[RequestHandle] = []
        try:
            for k, p in enumerate(prompts):
                params = s.choice_params(req, max_new_tokens=s.max_tokens(len(p.ids), req.max_tokens),
                                         logprobs=want_lp, top_logprobs=req.logprobs or 0,
                                         skip_special_tokens=req.skip_special_tokens)
                handles += s.submit(p.ids, params, f"{rid}-{k}", prompt_logprobs=req.echo and want_lp)
        except BaseException:
            abort_unfinished(handles)
            raise
        if req.stream:
            return StreamingResponse(self._stream(req, prompts, handles, rid), media_type="text/event-stream",
                                     background=BackgroundTask(abort_unfinished, handles))
        return await self._full(req, prompts, handles, rid, raw)

    def _prompts(self, prompt) -> list[_Prompt]:
        if isinstance(prompt, str) or prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise bad_request("the prompt is empty", param="prompt")
        out = []
        for p in prompt:
            self.s.check_prompt(p, "prompt")
            if isinstance(p, str):
                # Echo returns a text prompt as sent, without the BOS the tokenizer adds: clients cut
                # the completion off the echo by the prompt's length, or by the first text_offset at
                # or past it.  The BOS still gets its entry (with a null logprob and no room in the
                # text), since scorers such as lm-eval-harness pick tokens by position in the ids.
                ids, added = self.s.require_tokenizer().encode_marking_added(p)
                out.append(_Prompt(ids, p, [not a for a in added]))
            else:
                ids = list(p)
                text = self.s.tokenizer.decode(ids, skip_special_tokens=False) if self.s.tokenizer else ""
                out.append(_Prompt(ids, text, [True] * len(ids)))
        return out

    # ------------------------------------------------------------------------------------ whole
    async def _full(self, req: CompletionRequest, prompts: list[_Prompt], handles: list[RequestHandle], rid: str,
                    raw: Request) -> JSONResponse:
        results = await self.s.collect(handles, raw)
        error = next((e for e in map(engine_error, results) if e), None)
        if error:
            raise error
        choices = []
        for index, outs in enumerate(results):
            prompt = prompts[index // req.n]
            lp = _Logprobs(self.s, req.logprobs or 0) if req.logprobs is not None else None
            pieces = [self._piece(lp, req, prompt, out, first=k == 0) for k, out in enumerate(outs)] if lp else []
            text = "".join(o.text for o in outs)
            last = outs[-1]
            choices.append(CompletionChoice(index=index, text=(prompt.text if req.echo else "") + text,
                                            logprobs=_join(pieces) if lp else None,
                                            finish_reason=last.finish_reason, matched_stop=last.matched_stop))
        usage = response_usage([len(p.ids) for p in prompts], [outs[-1] for outs in results], req.n)
        resp = CompletionResponse(id=rid, model=self.s.model_name, choices=choices, usage=usage)
        return JSONResponse(resp.model_dump(mode="json"))

    def _piece(self, lp: _Logprobs, req: CompletionRequest, prompt: _Prompt, out: RequestOutput,
               first: bool) -> CompletionLogprobs:
        ids, lps, tops = list(out.token_ids), list(out.logprobs or []), list(out.top_logprobs or [])
        shown = _shown_in_text(out, req.skip_special_tokens, self.s.logprob_tokens)
        if first and req.echo:
            prompt_lps = out.prompt_logprobs or [None] * len(prompt.ids)
            prompt_tops = out.prompt_top_logprobs or [None] * len(prompt.ids)
            ids, lps = prompt.ids + ids, list(prompt_lps) + lps
            tops = list(prompt_tops) + tops if tops or prompt_tops else None
            shown = prompt.shown + shown
        return lp.piece(ids, lps, tops, shown)

    # ------------------------------------------------------------------------------------ streamed
    async def _stream(self, req: CompletionRequest, prompts: list[_Prompt], handles: list[RequestHandle],
                      rid: str) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.s.model_name
        lps = [_Logprobs(self.s, req.logprobs or 0) if req.logprobs is not None else None for _ in handles]
        started = [False] * len(handles)
        finals: list[RequestOutput | None] = [None] * len(handles)
        try:
            async for i, out in self.s.merged(handles):
                if out.finished and out.finish_reason == "error":
                    yield sse(json.dumps(error_body(out.error or "internal error", "server_error")))
                    return
                prompt = prompts[i // req.n]
                first = not started[i]
                started[i] = True
                text = (prompt.text if req.echo and first else "") + out.text
                logprobs = self._piece(lps[i], req, prompt, out, first) if lps[i] else None
                if out.finished:
                    finals[i] = out
                if not text and not out.finished and not (logprobs and logprobs.tokens):
                    continue
                choice = CompletionChoice(index=i, text=text, logprobs=logprobs,
                                          finish_reason=out.finish_reason if out.finished else None,
                                          matched_stop=out.matched_stop if out.finished else None)
                data = CompletionResponse(id=rid, created=created, model=model, choices=[choice])
                yield sse(data.model_dump_json(exclude_none=True))
            if req.stream_options and req.stream_options.include_usage:
                usage = response_usage([len(p.ids) for p in prompts], [f for f in finals if f is not None], req.n)
                data = CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage)
                yield sse(data.model_dump_json(exclude_none=True))
            yield SSE_DONE
        finally:
            abort_unfinished(handles)

