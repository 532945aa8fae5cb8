"""What every endpoint shares: the model's names, admission (503), sampling parameters, submitting
requests to the engine, reading several requests' outputs at once, and aborting what a client left.

The HTTP side never touches tensors: it tokenizes, calls `Engine.add_request`, and reads each
`RequestHandle` with `async for`.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

from fastapi import Request

from .args import ServerArgs
from dsserve.core.engine import Engine
from dsserve.core.errors import EngineUnavailable, RequestError
from dsserve.core.request import RequestHandle, RequestOutput
from dsserve.core.sampling_params import SamplingParams
from .errors import APIError, bad_request
from .logprob_tokens import LogprobTokens
from .protocol import PromptTokensDetails, Usage

log = logging.getLogger("dsserve")

TINY_NAME = "dsserve-tiny"
DISCONNECT_POLL_S = 0.25
TEXT_WORKERS = 4
# The engine's field names as the OpenAI API spells them (chat's prompt is its "messages").
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}
CHAT_NAMES = {**OPENAI_NAMES, "prompt": "messages"}


def client_error(e: RequestError, names: dict[str, str]):
    """The engine's RequestError as the 400 the client gets, its field named in the client's terms."""
    param = names.get(e.param, e.param) if e.param else None
    return bad_request(e.message_for(param), param=param, code=e.code)


def served_model_name(args: ServerArgs) -> str:
    """--served-model-name, else --model-path as given (what SGLang reports), else dsserve-tiny."""
    return args.served_model_name or args.model_path or TINY_NAME


def resolve_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's contents, or the value itself when it is Jinja text."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r}: no such file, and not a Jinja template")


class Serving:
    """Shared state of one app: the engine, its flags, and helpers the endpoints use."""

    def __init__(self, engine: Engine, args: ServerArgs):
        self.engine = engine
        self.args = args
        self.tokenizer = engine.tokenizer
        self.model_name = served_model_name(args)
        self.model_names = {self.model_name}
        if args.model_path:
            self.model_names |= {args.model_path, Path(args.model_path).name}
        else:
            self.model_names.add(TINY_NAME)
        self.max_context = engine.info.max_context
        self.vocab_size = engine.info.vocab_size
        self.chat_template = resolve_chat_template(args.chat_template)
        self.max_n = args.max_running_requests
        self._ids = itertools.count()
        self.live: weakref.WeakSet[RequestHandle] = weakref.WeakSet()   # for abort_all at shutdown
        self.logprob_tokens = LogprobTokens(self.tokenizer)
        # Tokenizing and chat templating take time in proportion to the text: on the event loop, one
        # large prompt would stall every other client.
        self.text_pool = ThreadPoolExecutor(TEXT_WORKERS, thread_name_prefix="dsserve-text")

    def close(self) -> None:
        self.text_pool.shutdown(wait=False, cancel_futures=True)

    async def off_loop(self, fn: Callable, *args):
        """`fn(*args)` on the text pool: for tokenizing, templating and detokenizing."""
        return await asyncio.get_running_loop().run_in_executor(self.text_pool, fn, *args)

    # ------------------------------------------------------------------------------------ checks
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise bad_request(f"the model '{name}' does not exist; this server serves '{self.model_name}' "
                              "(GET /v1/models)", param="model", code="model_not_found")

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise bad_request(f"n ({n}) is larger than this server's --max-running-requests ({self.max_n})",
                              param="n")

    def max_tokens(self, prompt_len: int, requested: int | None) -> int:
        """max_new_tokens of a request: as asked, else the rest of the context (the engine checks
        that it fits)."""
        return requested if requested is not None else max(1, self.max_context - prompt_len)

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send token ids")
        return self.tokenizer

    @cached_property
    def longest_token_chars(self) -> int:
        """The most characters of text one token stands for: its vocabulary piece's length (a
        byte-level piece has a character per byte, and a text's characters are at most its bytes;
        a SentencePiece `<0xNN>` piece is longer than its byte; an added token is its text)."""
        return max(map(len, self.require_tokenizer().hf_tokenizer.get_vocab()), default=1)

    def check_prompt(self, prompt: str | list[int], param: str) -> None:
        """Refuses a prompt that cannot be served before time or memory goes into it (tokenizing,
        decoding): token ids that are too many or outside the vocabulary, a text too long for the
        context, since a token stands for at most `longest_token_chars` characters. The engine checks
        the token count of what passes."""
        limit = self.max_context
        if isinstance(prompt, str):
            if len(prompt) > limit * self.longest_token_chars:
                raise bad_request(f"the prompt has {len(prompt)} characters: more than this model's maximum context "
                                  f"of {limit} tokens can hold", param=param, code="context_length_exceeded")
        elif len(prompt) >= limit:
            raise bad_request(f"the prompt has {len(prompt)} tokens, but this model's maximum context is {limit} "
                              "tokens", param=param, code="context_length_exceeded")
        elif any(not 0 <= t < self.vocab_size for t in prompt):
            raise bad_request(f"token ids must be in [0, {self.vocab_size})", param=param)

    def encode_prompt(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """A prompt's token ids, once it passed `check_prompt` (call it through `off_loop`)."""
        tokenizer = self.require_tokenizer()
        self.check_prompt(text, param)
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def admit(self, count: int) -> None:
        """503 with Retry-After when `count` more requests would push the queue over the limit."""
        limit = self.args.max_queued_requests
        if limit is None:
            return
        queued = self.engine.queue_depth()
        if queued + count > limit:
            raise APIError(503, f"the server is busy: {queued} requests are waiting (limit "
                                f"--max-queued-requests {limit}); retry later",
                           code="server_overloaded", headers={"Retry-After": "1"})

    # ------------------------------------------------------------------------------------ engine
    def choice_params(self, req, *, max_new_tokens: int, logprobs: bool, top_logprobs: int,
                      skip_special_tokens: bool) -> list[SamplingParams]:
        """SamplingParams for each of the `req.n` choices of an OpenAI chat or completions request
        (their sampling fields share names); choice i is seeded with seed + i."""
        return [self.sampling_params(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=req.min_p or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop=req.stop, stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
            seed=choice_seed(req.seed, i),
            logprobs=logprobs, top_logprobs=top_logprobs, skip_special_tokens=skip_special_tokens,
        ) for i in range(req.n)]

    def sampling_params(self, names: dict[str, str] = OPENAI_NAMES, **kwargs) -> SamplingParams:
        try:
            return SamplingParams(**kwargs)
        except RequestError as e:
            raise client_error(e, names) from None

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{int(time.time() * 1000):x}{next(self._ids):04x}"

    def submit(self, ids: list[int], params: list[SamplingParams], rid: str, names: dict[str, str] = OPENAI_NAMES,
               prompt_logprobs: bool = False,
               overrides: list[Callable[[list[int]], int | None] | None] | None = None) -> list[RequestHandle]:
        """One engine request per SamplingParams (the choices of one prompt); all or none are queued.
        The engine checks each; `names` spells its fields as the client's API does."""
        handles: list[RequestHandle] = []
        try:
            for i, p in enumerate(params):
                handles.append(self.engine.add_request(
                    input_ids=ids, sampling_params=p, rid=f"{rid}-{i}", return_prompt_logprobs=prompt_logprobs,
                    token_override=overrides[i] if overrides else None))
        except RequestError as e:
            abort_unfinished(handles)
            raise client_error(e, names) from None
        except EngineUnavailable as e:
            abort_unfinished(handles)
            raise APIError(503, str(e), type="server_error") from None
        self.live.update(handles)
        return handles

    def abort_all(self) -> int:
        """Abort every request still running (the shutdown's grace period is over); how many."""
        handles = [h for h in list(self.live) if not h.finished]
        abort_unfinished(handles)
        return len(handles)

    # ------------------------------------------------------------------------------------ reading
    async def merged(self, handles: list[RequestHandle]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(index, output) from every handle as they come, until all have finished."""
        if len(handles) == 1:
            async for out in handles[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle: RequestHandle) -> None:
            async for out in handle:
                queue.put_nowait((i, out))

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
        left = len(handles)
        try:
            while left:
                i, out = await queue.get()
                if out.finished:
                    left -= 1
                yield i, out
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self, handles: list[RequestHandle], request: Request) -> list[list[RequestOutput]]:
        """Every output of every handle; aborts them all if the client goes away first."""
        results: list[list[RequestOutput]] = [[] for _ in handles]
        watcher = asyncio.ensure_future(watch_disconnect(request, handles))
        try:
            async for i, out in self.merged(handles):
                results[i].append(out)
        finally:
            watcher.cancel()
            abort_unfinished(handles)
        return results


def choice_seed(seed: int | None, i: int) -> int | None:
    """Choice i's seed: seed + i, wrapped around within the 64 bits the sampler's generator takes
    (so any 64-bit seed works with any n)."""
    return None if seed is None else (seed + i + 2**63) % 2**64 - 2**63


def abort_unfinished(handles: list[RequestHandle]) -> None:
    for handle in handles:
        if not handle.finished:
            handle.abort()


async def watch_disconnect(request: Request, handles: list[RequestHandle]) -> None:
    while True:
        await asyncio.sleep(DISCONNECT_POLL_S)
        if await request.is_disconnected():
            log.info("client went away: aborting %s", ", ".join(h.rid for h in handles))
            abort_unfinished(handles)
            return


def engine_error(outputs: list[RequestOutput]) -> APIError | None:
    """A 500 for a request the engine could not finish (its forward pass failed)."""
    for out in outputs:
        if out.finished and out.finish_reason == "error":
            return APIError(500, out.error or "internal error", type="server_error")
    return None


def response_usage(prompt_lens: list[int], finals: list[RequestOutput], n: int) -> Usage:
    """The OpenAI `usage` of a response giving `n` choices per prompt; `finals` holds each choice's
    last output, choice i answering prompt i // n.  A prompt counts once in `cached_tokens`, with
    the fewest tokens any of its choices found cached, as it counts once in `prompt_tokens`."""
    prompt_tokens = sum(prompt_lens)
    completion = sum(f.completion_tokens for f in finals)
    cached = sum(min((f.cached_tokens for f in finals[k * n:(k + 1) * n]), default=0)
                 for k in range(len(prompt_lens)))
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"
