"""Turns sampled tokens into streamed output: detokenize, check stop conditions, emit increments."""
from __future__ import annotations

import time

from .metrics import Metrics
from .request import Finish, Request, RequestOutput
from .tag_prefix import held_tag_prefix_len


class OutputProcessor:
    def __init__(self, tokenizer, eos_ids: set[int], metrics: Metrics):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.metrics = metrics

    def start(self, req: Request) -> None:
        if self.tokenizer is not None:
            req.detokenizer = self.tokenizer.incremental_detokenizer(
                skip_special_tokens=req.params.skip_special_tokens, prompt_ids=req.prompt_ids)

    def check_finish(self, req: Request) -> Finish | None:
        """Detokenize the token just appended to `req` and say whether `req` is done with it."""
        token = req.output_ids[-1]
        now = time.perf_counter()
        if req.last_token_time is None:
            self.metrics.observe_ttft(now - req.arrival)
        else:
            self.metrics.observe_itl(now - req.last_token_time)
        req.last_token_time = now
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return Finish("stop", token)
        if req.detokenizer is not None:
            req.text += req.detokenizer.step(token)
            finish = self._check_stop_strings(req)
            if finish:
                return finish
        if len(req.output_ids) >= p.max_new_tokens:
            return Finish("length")
        return None

    def _check_stop_strings(self, req: Request) -> Finish | None:
        stops = req.params.stop
        if not stops:
            return None
        # A stop string may span the previous increment's end: search from there.
        start = max(0, req.sent_text_len - max(len(s) for s in stops) + 1)
        hits = [(req.text.find(s, start), s) for s in stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        i, s = min(hits)
        req.text = req.text[:i]
        return Finish("stop", s)

    def emit_step(self, reqs: list[Request], finished: dict[Request, Finish]) -> None:
        """Stream what one step gave `reqs`: the finished ones' last output, the others' increments."""
        for req in reqs:
            self.emit(req, finished.get(req))

    def emit(self, req: Request, finish: Finish | None = None, error: str | None = None) -> None:
        """Push what is new since the last increment; on finish, everything that is left."""
        if finish and req.detokenizer is not None and not isinstance(finish.matched, str):
            req.text += req.detokenizer.finish()
        end = len(req.text) if finish else len(req.text) - self._held_back(req)
        want_lp = req.params.logprobs or req.params.top_logprobs
        out = RequestOutput(
            rid=req.rid,
            token_ids=req.output_ids[req.sent_tokens:],
            text=req.text[req.sent_text_len:end],
            logprobs=req.logprobs[req.sent_logprobs:] if want_lp else None,
            top_logprobs=req.top_logprobs[req.sent_logprobs:] if req.params.top_logprobs else None,
            prompt_logprobs=req.prompt_logprobs if req.want_prompt_logprobs and req.sent_tokens == 0 else None,
            prompt_top_logprobs=(req.prompt_top_logprobs if req.want_prompt_logprobs and req.params.top_logprobs
                                 and req.sent_tokens == 0 else None),
            finished=finish is not None,
            finish_reason=finish.reason if finish else None,
            matched_stop=finish.matched if finish else None,
            error=error,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
        )
        req.sent_tokens, req.sent_text_len, req.sent_logprobs = len(req.output_ids), end, len(req.logprobs)
        if finish:
            self.metrics.request_finished(req, finish.reason)
        req.handle.push(out)

    @staticmethod
    def _held_back(req: Request) -> int:
        """Characters at the end of the text that could be the start of a stop string."""
        return held_tag_prefix_len(req.text, *(req.params.stop or ()))
