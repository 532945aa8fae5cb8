"""SGLang's native POST /generate, and /v1/tokenize and /v1/detokenize.

/generate answers `{"text", "output_ids", "meta_info"}` per prompt (a list for a batch or n > 1);
streamed, every event carries the text and ids so far, as SGLang's does, and the stream ends with
`data: [DONE]`. Log-probabilities come as SGLang's `[logprob, token_id, null]` triples.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from dsserve.core.request import RequestHandle, RequestOutput
from .chat_prompt import message_dicts
from .errors import bad_request, error_body
from .protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from .serving import SSE_DONE, Serving, abort_unfinished, choice_seed, engine_error, sse


class _Accumulated:
    """One request's output so far, in SGLang's response shape."""

    def __init__(self, rid: str, want_lp: bool, prompt_ids: list[int], start: int):
        self.rid = rid
        self.want_lp = want_lp
        self.prompt_ids = prompt_ids
        self.start = start
        self.text = ""
        self.ids: list[int] = []
        self.lps: list[list] = []
        self.tops: list[list] = []
        self.input_lps: list[list] | None = None
        self.last: RequestOutput | None = None
        self.t0 = time.perf_counter()

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.ids += out.token_ids
        self.last = out
        if self.want_lp:
            self.lps += [[lp, t, None] for lp, t in zip(out.logprobs or [], out.token_ids)]
            self.tops += [[[v, t, None] for t, v in top] for top in (out.top_logprobs or [])]
            if out.prompt_logprobs is not None:
                self.input_lps = [[lp, t, None] for lp, t in
                                  zip(out.prompt_logprobs[self.start:], self.prompt_ids[self.start:])]

    def body(self) -> dict[str, Any]:
        out = self.last
        finish = None
        if out is not None and out.finished:
            if out.finish_reason == "length":
                finish = {"type": "length", "length": out.completion_tokens}
            elif out.finish_reason == "stop":
                finish = {"type": "stop", "matched": out.matched_stop}
            else:
                finish = {"type": out.finish_reason, "message": out.error}
        meta: dict[str, Any] = {
            "id": self.rid, "finish_reason": finish,
            "prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.ids),
            "cached_tokens": out.cached_tokens if out else 0,
            "e2e_latency": time.perf_counter() - self.t0,
        }
        if self.want_lp:
            meta["output_token_logprobs"] = self.lps
            if self.tops:
                meta["output_top_logprobs"] = self.tops
            if self.input_lps is not None:
                meta["input_token_logprobs"] = self.input_lps
        return {"text": self.text, "output_ids": self.ids, "meta_info": meta}


class NativeServing:
    def __init__(self, serving: Serving, prompts):
        self.s = serving
        self.prompts = prompts     # ChatPromptBuilder, for /v1/tokenize with messages

    async def generate(self, req: GenerateRequest, raw: Request):
        s = self.s
        if (req.text is None) == (req.input_ids is None):
            raise bad_request("give exactly one of 'text' and 'input_ids'", param="text")
        if req.text is not None:
            single = isinstance(req.text, str)
            batch = [await s.off_loop(s.encode_prompt, t, "text") for t in ([req.text] if single else req.text)]
            param = "text"
        else:
            single = bool(req.input_ids) and isinstance(req.input_ids[0], int)
            batch = [list(x) for x in ([req.input_ids] if single else req.input_ids)]
            param = "input_ids"
            for ids in batch:
                s.check_prompt(ids, param)
        if not batch:
            raise bad_request(f"'{param}' is empty", param=param)
        sp = req.sampling_params
        s.check_n(sp.n)
        names = {"prompt": param}  # SGLang's own field names otherwise
        prompt_lp = req.return_logprob and req.logprob_start_len >= 0
        s.admit(len(batch) * sp.n)
        rid = req.rid or s.new_id("gen")
        seed = sp.seed if sp.seed is not None else sp.sampling_seed
        handles: list[RequestHandle] = []
        accs: list[_Accumulated] = []
        try:
            for k, ids in enumerate(batch):
                params = [s.sampling_params(
                    names, max_new_tokens=sp.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                    min_p=sp.min_p, frequency_penalty=sp.frequency_penalty, presence_penalty=sp.presence_penalty,
                    repetition_penalty=sp.repetition_penalty, stop=sp.stop, stop_token_ids=list(sp.stop_token_ids or []),
                    ignore_eos=sp.ignore_eos, skip_special_tokens=sp.skip_special_tokens,
                    seed=choice_seed(seed, j), logprobs=req.return_logprob,
                    top_logprobs=req.top_logprobs_num if req.return_logprob else 0,
                ) for j in range(sp.n)]
                handles += s.submit(ids, params, s.new_id("gen"), names=names, prompt_logprobs=prompt_lp)
                accs += [_Accumulated(rid if single and sp.n == 1 else f"{rid}-{k * sp.n + j}", req.return_logprob,
                                      ids, max(req.logprob_start_len, 0)) for j in range(sp.n)]
        except BaseException:
            abort_unfinished(handles)
            raise
        one = single and sp.n == 1
        if req.stream:
            return StreamingResponse(self._stream(handles, accs, one), media_type="text/event-stream",
                                     background=BackgroundTask(abort_unfinished, handles))
        results = await s.collect(handles, raw)
        error = next((e for e in map(engine_error, results) if e), None)
        if error:
            raise error
        for acc, outs in zip(accs, results):
            for out in outs:
                acc.add(out)
        bodies = [acc.body() for acc in accs]
        return JSONResponse(bodies[0] if one else bodies)

    async def _stream(self, handles: list[RequestHandle], accs: list[_Accumulated], one: bool) -> AsyncIterator[str]:
        try:
            async for i, out in self.s.merged(handles):
                if out.finished and out.finish_reason == "error":
                    yield sse(json.dumps(error_body(out.error or "internal error", "server_error")))
                    return
                accs[i].add(out)
                body = accs[i].body()
                if not one:
                    body["index"] = i
                yield sse(json.dumps(body, ensure_ascii=False))
            yield SSE_DONE
        finally:
            abort_unfinished(handles)

    # ------------------------------------------------------------------------------------ tokenize
    async def tokenize(self, req: TokenizeRequest) -> Response:
        return await self.s.off_loop(_answer, self._tokenize, req)

    async def detokenize(self, req: DetokenizeRequest) -> Response:
        return await self.s.off_loop(_answer, self._detokenize, req)

    def _tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        s = self.s
        s.check_model(req.model)
        tok = s.require_tokenizer()
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of 'prompt' and 'messages'", param="prompt")
        if req.messages is not None:
            text = self.prompts.render(message_dicts(req.messages), add_generation_prompt=req.add_generation_prompt)
            ids = tok.encode(text, add_special_tokens=False)
            return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=s.max_context)
        if isinstance(req.prompt, str):
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=s.max_context)
        batch = [tok.encode(p, add_special_tokens=req.add_special_tokens) for p in req.prompt]
        return TokenizeResponse(tokens=batch, count=[len(x) for x in batch], max_model_len=s.max_context)

    def _detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        s = self.s
        s.check_model(req.model)
        tok = s.require_tokenizer()
        single = not req.tokens or isinstance(req.tokens[0], int)
        batch = [req.tokens] if single else req.tokens
        for ids in batch:
            if any(not 0 <= t < s.vocab_size for t in ids):
                raise bad_request(f"token ids must be in [0, {s.vocab_size})", param="tokens")
        texts = [tok.decode(ids, skip_special_tokens=req.skip_special_tokens) for ids in batch]
        return DetokenizeResponse(text=texts[0] if single else texts)


def _answer(build, req) -> Response:
    """`build(req)` as a JSON response, serialized where it is built (off the event loop, and by
    pydantic, several times faster than json.dumps): a long text tokenizes to a long answer."""
    return Response(build(req).model_dump_json(), media_type="application/json")
