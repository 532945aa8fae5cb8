"""Engine: the offline API and the server's backend.

A background thread repeats one step: take the inbox, schedule, run the pass on the model worker
(its own process by default, see executor.py), postprocess, emit. Callers on any thread submit
with `add_request` and read the returned handle.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import fields
from pathlib import Path
from typing import Callable

from .batch import ScheduledBatch
from .config import EngineArgs
from .errors import EngineUnavailable, RequestError
from .executor import Executor, WorkerDied, start_executor
from .kv_cache import PageAllocator
from .messages import AbortRequest, AddRequest, CallWorker, FlushCache, InboxMessage
from .metrics import DecodeLog, Metrics
from .output_processor import OutputProcessor
from .radix_cache import RadixCache
from .request import Finish, GenerateOutput, Request, RequestHandle
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .worker_protocol import ModelInfo, SequenceStart, StepInput, StepOutput

log = logging.getLogger("dsserve")


class Engine:
    """Loads a model on a device and generates, batching whatever requests are in flight.

    `Engine(model_path=None, device=None, dtype="auto", **engine_args)`: every engine flag (see
    EngineArgs) is also a keyword (`max_total_tokens=...`). With no model_path it serves the
    embedded dsserve-tiny.
    """

    def __init__(self, model_path: str | None = None, device: str | None = None, dtype: str = "auto",
                 **engine_args):
        self.args = args = EngineArgs.from_kwargs(model_path=model_path, device=device, dtype=dtype, **engine_args)
        logging.basicConfig(level=args.log_level.upper(), format="[dsserve] %(message)s")
        self._wakeup = threading.Condition()
        self._stopping = False
        self._failure: str | None = None       # why the engine stopped serving, if it did (any thread sets it)
        self.executor = self._start_engine_thread(args)
        self.info: ModelInfo = self.executor.info
        try:
            self.tokenizer = _load_tokenizer(Path(args.tokenizer_path or self.info.model_path), args.trust_remote_code)
            eos_ids = set(self.info.eos_token_ids) | (self.tokenizer.eos_token_ids if self.tokenizer else set())
            self.metrics = Metrics()
            self._decode_log = DecodeLog()
            pages = PageAllocator(self.info.num_pages, self.info.page_size)
            self.tree = RadixCache(pages, pages.page_size, enabled=not args.disable_radix_cache)
            self.scheduler = Scheduler(pages, self.tree, args.max_running_requests, args.chunked_prefill_size,
                                       args.speculative_steps)
            self.outputs = OutputProcessor(self.tokenizer, eos_ids, self.metrics)
            self._inbox: deque[InboxMessage] = deque()
            self._rids = itertools.count()
            self._pending_flushes: list[threading.Event] = []
            self._on_worker: dict[str, Request] = {}  # requests whose sampling state the worker holds
        except BaseException:
            self._abandoned = True  # the engine thread, waiting on _started, exits
            raise
        finally:
            self._started.set()

    @classmethod
    def from_args(cls, args: EngineArgs) -> "Engine":
        """An engine with `args`' engine options (a ServerArgs' server options are not the engine's)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(EngineArgs)})

    def _start_engine_thread(self, args: EngineArgs) -> Executor:
        """Start the engine thread, which starts the model worker itself, and wait until it has.

        A worker on the engine thread (--model-worker thread) must be built on the thread that runs
        it: the first thread to run parallel torch ops owns the CPU's OpenMP worker team, and a
        model then driven from a second thread ran ~15-20% slower with two teams competing.
        """
        loaded: list = []
        ready = threading.Event()
        self._started = threading.Event()  # set once __init__ has built what the loop reads
        self._abandoned = False

        def run() -> None:
            try:
                loaded.append(start_executor(args, on_death=self._worker_died))
            except BaseException as e:  # handed to the caller of Engine()
                loaded.append(e)
                return
            finally:
                ready.set()
            self._started.wait()
            try:
                if not self._abandoned:
                    self._loop()
            finally:
                loaded[0].shutdown()

        self._thread = threading.Thread(target=run, name="dsserve-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if isinstance(loaded[0], BaseException):
            raise loaded[0]
        return loaded[0]

    # --------------------------------------------------------------------------- caller side
    def add_request(
        self,
        prompt: str | None = None,
        input_ids: list[int] | None = None,
        sampling_params: SamplingParams | None = None,
        rid: str | None = None,
        return_prompt_logprobs: bool = False,
        token_override: Callable[[list[int]], int | None] | None = None,
    ) -> RequestHandle:
        """Queue one request (thread-safe); read its outputs from the returned handle.

        `token_override(output_ids)` runs on the engine thread before each of its tokens is chosen;
        when it returns a token id, that token is emitted instead of the sampled one.
        """
        params = sampling_params or SamplingParams()
        ids = self._validated_prompt(prompt, input_ids, params)
        n = next(self._rids)
        rid = rid or f"req-{n}"
        seed = params.seed if params.seed is not None else self.args.seed * 1_000_003 + n
        handle = RequestHandle(rid, self)
        req = Request(rid, ids, params, seed, handle, want_prompt_logprobs=return_prompt_logprobs,
                      token_override=token_override)
        req.prompt_logprobs = [None] if return_prompt_logprobs else []
        req.prompt_top_logprobs = [None] if return_prompt_logprobs and params.top_logprobs else []
        self._send(AddRequest(req))
        return handle

    def abort(self, rid: str) -> None:
        self._send(AbortRequest(rid))

    def queue_depth(self) -> int:
        """Requests submitted and not yet running (the server's back-pressure signal)."""
        with self._wakeup:
            return sum(isinstance(m, AddRequest) for m in self._inbox) + len(self.scheduler.waiting)

    def flush_cache(self) -> None:
        """Empty the prefix cache once the engine is idle (blocks until done)."""
        done = threading.Event()
        self._send(FlushCache(done))
        done.wait()

    def run_on_worker(self, fn: Callable, *args):
        """`fn(model_runner, *args)` run where the model lives, between two steps; its result.

        With the worker in its own process, `fn` and its result travel by pickle: `fn` must be a
        module-level function (benchmarks count weight bytes and tests inspect layers this way).
        """
        call = CallWorker(fn, args, threading.Event())
        self._send(call)
        call.done.wait()
        if isinstance(call.result[0], BaseException):
            raise call.result[0]
        return call.result[0]

    @property
    def failure(self) -> str | None:
        """Why the engine stopped serving on its own (its model worker, or one of its ranks, died)."""
        return self._failure

    @property
    def alive(self) -> bool:
        """False once the engine has stopped serving (shut down, or its model worker died)."""
        return not self._stopping and self._failure is None

    def _send(self, message: InboxMessage) -> None:
        with self._wakeup:
            if not self.alive and not isinstance(message, AbortRequest):
                raise EngineUnavailable(self._failure or "the engine is shutting down")
            self._inbox.append(message)
            self._wakeup.notify()

    def generate(
        self,
        prompts: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[GenerateOutput]:
        """Submit every prompt at once and wait; one result per prompt, in order."""
        if (prompts is None) == (input_ids is None):
            raise RequestError("give exactly one of prompts or input_ids")
        if prompts is not None:
            batch = [prompts] if isinstance(prompts, str) else list(prompts)
            kind = "prompt"
        else:
            batch = [input_ids] if input_ids and isinstance(input_ids[0], int) else list(input_ids)
            kind = "input_ids"
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(batch)
        if len(params) != len(batch):
            raise RequestError(f"{len(params)} sampling params for {len(batch)} prompts")
        handles = [self.add_request(**{kind: x}, sampling_params=p) for x, p in zip(batch, params)]
        return [h.result() for h in handles]

    def shutdown(self) -> None:
        """Stop the loop (requests in flight are aborted) and release the model."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _validated_prompt(self, prompt: str | None, input_ids: list[int] | None,
                          params: SamplingParams) -> list[int]:
        """The prompt's token ids, or the RequestError that names what the client got wrong: the one
        place a request is checked against this model (the server relies on it)."""
        if prompt is not None:
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: send token ids", param="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(input_ids or [])
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        vocab = self.info.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        limit = self.info.max_context
        if len(ids) >= limit:
            raise RequestError(f"the prompt has {len(ids)} tokens, but this model's maximum context is {limit} "
                               "tokens", param="prompt", code="context_length_exceeded")
        if len(ids) + params.max_new_tokens > limit:
            raise RequestError(
                f"this model's maximum context is {limit} tokens, but the prompt ({len(ids)} tokens) plus "
                f"{{param}} ({params.max_new_tokens}) exceeds it", param="max_new_tokens",
                code="context_length_exceeded")
        return ids

    # --------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        try:
            while self._wait_for_work():
                self._step()
        except WorkerDied as e:  # found in a step: nothing can run any more
            self._worker_died(str(e))
        for message in self._take_inbox():  # what was sent before the end is answered too
            self._apply(message)
        for req in self.scheduler.abort_all():
            if self._failure:
                self.outputs.emit(req, Finish("error"), error=self._failure)
            else:
                self.outputs.emit(req, Finish("abort"), error="the engine shut down")
        for done in self._pending_flushes:
            done.set()

    def _step(self) -> None:
        """One engine step: take the inbox, schedule, run, postprocess (the scheduler's), emit."""
        for message in self._take_inbox():
            self._apply(message)
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        out = self._forward(batch) if batch is not None else None
        if out is not None:
            finished = self.scheduler.postprocess(batch, out, self.outputs.check_finish)
            self.outputs.emit_step(batch.sampling, finished)
        # after the step: a flush that waited for the last running request completes as it ends,
        # not when (if ever) the engine next wakes up
        self._complete_flushes()
        self._update_metrics()
        if out is not None and batch.kind == "decode":
            self._decode_log.observe(len(out.sampled.token_ids), time.perf_counter() - started, self.metrics)

    def _forward(self, batch: ScheduledBatch) -> StepOutput | None:
        """The batch's next tokens; None when the pass failed (its requests are then ended with an
        error: one broken batch must not take the engine down)."""
        out = self.executor.execute(self._step_input(batch))
        if out.error is not None:
            reason = out.error.strip().splitlines()[-1]   # the exception's line of the worker's traceback
            for req in batch.requests:
                self.scheduler.finish(req)
                self.outputs.emit(req, Finish("error"), error=f"internal error: {reason}")
            return None
        for req in batch.requests:
            if req.rid in out.prompt_logprobs:
                req.record_prompt_logprobs(out.prompt_logprobs[req.rid])
        return out

    def _step_input(self, batch: ScheduledBatch) -> StepInput:
        """The pass as the worker sees it: new requests' sampling state, the forced tokens (a
        caller's token_override runs here, on the engine thread), the requests it can forget."""
        live = self.scheduler.requests
        ended = [rid for rid, r in self._on_worker.items() if live.get(rid) is not r]
        for rid in ended:
            del self._on_worker[rid]
        new = [r for r in batch.requests if r.rid not in self._on_worker]
        self._on_worker.update((r.rid, r) for r in new)
        started = [SequenceStart(r.rid, r.prompt_ids, r.params, r.seed) for r in new]
        forced = [r.token_override(r.output_ids) if r.token_override else None for r in batch.sampling]
        return StepInput(batch.items, [r.rid for r in batch.requests], batch.completes, forced, started, ended)

    def _wait_for_work(self) -> bool:
        """Sleep while there is nothing to do; False once shutting down or failed."""
        with self._wakeup:
            while not self._inbox and not self.scheduler.has_work() and self.alive:
                self._wakeup.wait()
            return self.alive

    def _worker_died(self, why: str) -> None:
        """A worker process ended (seen in a step, or by the executor's watch while idle): end
        everything, refuse what comes."""
        with self._wakeup:
            if self._failure is None:
                log.error("%s; the engine stops", why)
                self._failure = why
            self._wakeup.notify()

    def _take_inbox(self) -> list[InboxMessage]:
        with self._wakeup:
            messages = list(self._inbox)
            self._inbox.clear()
            return messages

    def _apply(self, message: InboxMessage) -> None:
        if isinstance(message, AddRequest):
            self.outputs.start(message.request)
            self.scheduler.add(message.request)
        elif isinstance(message, AbortRequest):
            req = self.scheduler.abort(message.rid)
            if req is not None:
                self.outputs.emit(req, Finish("abort"))
        elif isinstance(message, CallWorker):
            self._call_worker(message)
        else:
            self._pending_flushes.append(message.done)

    def _call_worker(self, call: CallWorker) -> None:
        try:
            if self._failure:
                raise EngineUnavailable(self._failure)
            call.result.append(self.executor.call(call.fn, *call.args))
        except Exception as e:  # the caller gets it; a dead worker also stops the loop
            call.result.append(e)
            if isinstance(e, WorkerDied):
                raise
        finally:
            call.done.set()

    def _complete_flushes(self) -> None:
        """Flush the prefix cache once no request holds part of it."""
        if self._pending_flushes and not self.scheduler.has_work():
            self.tree.reset()
            for done in self._pending_flushes:
                done.set()
            self._pending_flushes.clear()

    def _update_metrics(self) -> None:
        m = self.metrics
        m.num_running, m.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        m.kv_usage = self.scheduler.kv_usage()
        m.retractions = self.scheduler.num_retractions
        m.spec_verifications, m.spec_verified_tokens = self.scheduler.num_verified, self.scheduler.num_verified_tokens


def _load_tokenizer(folder: Path, trust_remote_code: bool):
    from .tokenizer import Tokenizer

    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        log.warning("no tokenizer files in %s: only token-id prompts can be served", folder)
        return None
    return Tokenizer(folder, trust_remote_code=trust_remote_code)
