"""Engine: the offline API and the server's backend.

A background thread owns the model and the KV cache and repeats one step: schedule, run, process
results. Callers on any thread submit with `add_request` and read the returned handle.
"""
from __future__ import annotations

import itertools
import logging
import threading
import traceback
from collections import deque
from dataclasses import fields
from pathlib import Path
from typing import Callable

import torch

from .config import EngineArgs
from .metrics import Metrics
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .radix_cache import RadixCache
from .request import GenerateOutput, Request, RequestHandle
from .sampling import SamplingParams, sample
from .scheduler import ScheduledBatch, Scheduler

log = logging.getLogger("dsserve")


class RequestError(ValueError):
    """A request that cannot be served as given (too long, empty); the message is for the client."""


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
        self.runner = self._start_engine_thread(args)
        try:
            self.tokenizer = _load_tokenizer(Path(args.tokenizer_path or self.runner.model_path), args.trust_remote_code)
            eos_ids = set(self.runner.config.eos_token_ids) | (self.tokenizer.eos_token_ids if self.tokenizer else set())
            self.metrics = Metrics()
            kv = self.runner.kv
            self.tree = RadixCache(kv.allocator, kv.page_size, enabled=not args.disable_radix_cache)
            self.scheduler = Scheduler(kv, self.tree, args.max_running_requests, args.chunked_prefill_size)
            self.outputs = OutputProcessor(self.tokenizer, eos_ids, self.metrics)
            self._requests: dict[str, Request] = {}
            self._inbox: deque = deque()
            self._wakeup = threading.Condition()
            self._rids = itertools.count()
            self._stopping = False
            self._pending_flush: list[threading.Event] = []
        except BaseException:
            self._abandoned = True  # the engine thread, waiting on _started, exits
            raise
        finally:
            self._started.set()

    @classmethod
    def from_args(cls, args: EngineArgs) -> "Engine":
        """An engine with `args`' engine options (a ServerArgs' server options are not the engine's)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(EngineArgs)})

    def _start_engine_thread(self, args: EngineArgs) -> ModelRunner:
        """Start the engine thread, which loads the model itself, and wait until it has.

        The model must be built on the thread that runs it: the first thread to run parallel torch
        ops owns the CPU's OpenMP worker team, and a model then driven from a second thread ran
        ~15-20% slower on the bench model with two teams competing for the cores.
        """
        loaded: list = []
        ready = threading.Event()
        self._started = threading.Event()  # set once __init__ has built what the loop reads
        self._abandoned = False

        def run() -> None:
            try:
                loaded.append(ModelRunner(args))
            except BaseException as e:  # handed to the caller of Engine()
                loaded.append(e)
                return
            finally:
                ready.set()
            self._started.wait()
            if not self._abandoned:
                self._loop()

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
        ids = self._prompt_ids(prompt, input_ids)
        limit = self.runner.max_context
        if len(ids) + params.max_new_tokens > limit:
            raise RequestError(
                f"prompt ({len(ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"maximum context of {limit} tokens"
            )
        n = next(self._rids)
        rid = rid or f"req-{n}"
        seed = params.seed if params.seed is not None else self.args.seed * 1_000_003 + n
        handle = RequestHandle(rid, self)
        req = Request(rid, ids, params, torch.Generator(self.runner.torch_device).manual_seed(seed), handle,
                      want_prompt_logprobs=return_prompt_logprobs, token_override=token_override)
        req.prompt_logprobs = [None] if return_prompt_logprobs else []
        req.prompt_top_logprobs = [None] if return_prompt_logprobs and params.top_logprobs else []
        with self._wakeup:
            if self._stopping:
                raise RequestError("the engine is shutting down")
            self._inbox.append(("add", req))
            self._wakeup.notify()
        return handle

    def abort(self, rid: str) -> None:
        with self._wakeup:
            self._inbox.append(("abort", rid))
            self._wakeup.notify()

    def queue_depth(self) -> int:
        """Requests submitted and not yet running (the server's back-pressure signal)."""
        with self._wakeup:
            return sum(1 for kind, _ in self._inbox if kind == "add") + len(self.scheduler.waiting)

    def flush_cache(self) -> None:
        """Empty the prefix cache once the engine is idle (blocks until done)."""
        done = threading.Event()
        with self._wakeup:
            self._inbox.append(("flush", done))
            self._wakeup.notify()
        done.wait()

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

    def _prompt_ids(self, prompt: str | None, input_ids: list[int] | None) -> list[int]:
        if prompt is not None:
            if self.tokenizer is None:
                raise RequestError("this checkpoint has no tokenizer; send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(input_ids or [])
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.runner.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        return ids

    # --------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while self._take_inbox():
            batch = self.scheduler.schedule()
            if batch is None:
                self._update_metrics()  # aborts and flushes change the counts without a forward pass
                continue
            try:
                logits = self.runner.forward(self.runner.make_batch(batch.items))
                self._process(batch, logits)
            except Exception as e:  # one broken batch must not take the engine down
                log.error("forward pass failed: %s", traceback.format_exc())
                for req in batch.requests:
                    self._end(req, ("error", None), error=f"internal error: {e}")
            self._update_metrics()
        for req in list(self._requests.values()):
            self._end(req, ("abort", None), error="the engine shut down")

    def _take_inbox(self) -> bool:
        """Apply queued adds and aborts; sleep while idle. False once shutting down."""
        with self._wakeup:
            while not self._inbox and not self.scheduler.has_work() and not self._stopping:
                self._wakeup.wait()
            items = list(self._inbox)
            self._inbox.clear()
            stopping = self._stopping
        for kind, x in items:
            if kind == "add":
                self._requests[x.rid] = x
                self.outputs.start(x)
                self.scheduler.add(x)
            elif kind == "flush":
                self._pending_flush.append(x)
            elif x in self._requests:
                self._end(self._requests[x], ("abort", None))
        if self._pending_flush and not self.scheduler.has_work():
            self.tree.reset()
            for done in self._pending_flush:
                done.set()
            self._pending_flush.clear()
        return not stopping

    def _process(self, batch: ScheduledBatch, logits: torch.Tensor) -> None:
        row = 0
        sampling, sample_rows = [], []
        for i, (req, item) in enumerate(zip(batch.requests, batch.items)):
            n_rows = {"all": len(item.new_token_ids), "last": 1, "none": 0}[item.logits]
            if item.logits == "all":
                self._record_prompt_logprobs(req, logits[row: row + n_rows])
            if batch.samples(i):
                sampling.append(req)
                sample_rows.append(row + n_rows - 1)
            req.num_computed += batch.chunks[i]
            row += n_rows
        if not sampling:
            return
        forced = [r.token_override(r.output_ids) if r.token_override else None for r in sampling]
        sampled = sample(logits[sample_rows], [r.params for r in sampling], [r.generator for r in sampling],
                         [(r.prompt_ids, r.output_ids) for r in sampling], forced)
        for j, req in enumerate(sampling):
            finish = self.outputs.add_token(req, sampled, j)
            if finish:
                self._end(req, finish)
            else:
                self.outputs.emit(req)

    def _record_prompt_logprobs(self, req: Request, rows: torch.Tensor) -> None:
        """Row j scores the token after position num_computed + j (kept once, even after a retraction);
        with top_logprobs, the k most likely tokens at each prompt position too."""
        logp = torch.log_softmax(rows.float(), dim=-1)
        k = req.params.top_logprobs
        top = logp.topk(k, dim=-1) if k else None
        for j in range(rows.shape[0]):
            target = req.num_computed + j + 1
            if target == len(req.prompt_logprobs) and target < len(req.prompt_ids):
                req.prompt_logprobs.append(float(logp[j, req.prompt_ids[target]]))
                if top is not None:
                    req.prompt_top_logprobs.append(list(zip(top.indices[j].tolist(), top.values[j].tolist())))

    def _end(self, req: Request, finish: tuple[str, int | str | None], error: str | None = None) -> None:
        self.scheduler.finish(req)
        self._requests.pop(req.rid, None)
        self.outputs.emit(req, finish, error)

    def _update_metrics(self) -> None:
        m = self.metrics
        m.num_running, m.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        m.kv_usage = self.scheduler.kv_usage()
        m.retractions = self.scheduler.num_retractions


def _load_tokenizer(folder: Path, trust_remote_code: bool):
    from .tokenizer import Tokenizer

    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        log.warning("no tokenizer files in %s: only token-id prompts can be served", folder)
        return None
    return Tokenizer(folder, trust_remote_code=trust_remote_code)
