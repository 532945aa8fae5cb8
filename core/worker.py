"""The model worker: the model, its KV cache and the sampler's per-request state.

It turns each StepInput into a StepOutput. `ProcessExecutor` runs it in a process of its own
(`python -m dsserve.core.worker --fd N`, this module's `main`), so no thread of the caller's
process competes with its compute threads; `ThreadExecutor` runs it on the engine thread.
"""
from __future__ import annotations

import argparse
import logging
import pickle
import signal
import socket
import traceback
from multiprocessing.connection import Connection

import torch

from .config import EngineArgs
from .distributed import RankInfo
from .model_runner import ModelRunner
from .sampling import SequenceSampling, sample_step
from .speculative import MTPSpeculator
from .worker_protocol import ModelInfo, Shutdown, StepInput, StepOutput, WorkerCall, WorkerMessage, WorkerStart

log = logging.getLogger("dsserve")


class ModelWorker:
    """One rank's worker. Every rank samples: the logits are the same on all of them (the LM head's
    shards are gathered) and so are the generators, so every rank keeps the same token history."""

    def __init__(self, args: EngineArgs, ranks: RankInfo = RankInfo()):
        self.runner = ModelRunner(args, ranks=ranks)
        self.sequences: dict[str, SequenceSampling] = {}
        self.speculator = MTPSpeculator(self.runner, args.speculative_steps) if self.runner.mtp is not None else None

    def info(self) -> ModelInfo:
        r = self.runner
        return ModelInfo(
            model_path=str(r.model_path), vocab_size=r.config.vocab_size,
            eos_token_ids=tuple(r.config.eos_token_ids), max_context=r.max_context, page_size=r.kv.page_size,
            num_pages=r.kv.num_pages, dtype=str(r.dtype).removeprefix("torch."),
            kv_cache_dtype=str(r.kv_cache_dtype).removeprefix("torch."), device=r.device.name,
            device_description=r.device.describe(), torch_device=str(r.torch_device))

    def execute(self, step: StepInput) -> StepOutput:
        for rid in step.ended:
            self.sequences.pop(rid, None)
        for s in step.started:
            generator = torch.Generator(self.runner.torch_device).manual_seed(s.seed)
            self.sequences[s.rid] = SequenceSampling(s.params, generator, s.prompt_ids)
        try:
            if self.speculator is not None:
                return self.speculator.step(step, self.sequences)
            return sample_step(step, self.runner.forward(step.items), self.sequences)
        except Exception:  # one broken pass ends its requests, not the worker
            error = traceback.format_exc()
            log.error("forward pass failed: %s", error)
            return StepOutput(error=error)

    def call(self, message: WorkerCall):
        return message.fn(self.runner, *message.args)


def main(argv: list[str] | None = None) -> None:
    """The worker process: WorkerStart arrives first; then ("ready", ModelInfo) or ("failed", error)
    goes back, and each message after that gets its answer until Shutdown or the engine's end of
    the connection closes."""
    parser = argparse.ArgumentParser(description="dsserve model worker (started by the engine)")
    parser.add_argument("--fd", type=int, required=True, help="the socket shared with the engine")
    fd = parser.parse_args(argv).fd
    # A signal to the whole process group (Ctrl-C in a terminal, systemd stopping the unit, `timeout`)
    # would end this worker while the engine still drains its requests: the engine decides when it
    # ends (Shutdown, or its end of the socket closing).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    conn = Connection(socket.socket(fileno=fd).detach())
    start: WorkerStart = conn.recv()
    args, ranks = start.args, start.ranks
    # Rank 0 speaks for the model; the others say only what goes wrong.
    level = args.log_level.upper() if ranks.rank == 0 else max(logging.WARNING, logging.getLevelName(args.log_level.upper()))
    prefix = "[dsserve]" if ranks.world_size == 1 else f"[dsserve rank {ranks.rank}]"
    logging.basicConfig(level=level, format=f"{prefix} %(message)s")
    try:
        worker = ModelWorker(args, ranks)
    except BaseException as e:
        conn.send(("failed", _picklable(e)))
        return
    conn.send(("ready", worker.info()))
    try:
        if ranks.relayed and ranks.rank > 0:
            follow(worker, ranks)
        else:
            serve(worker, conn, ranks.relay if ranks.relayed else None)
    finally:
        ranks.leave()


def serve(worker: ModelWorker, conn: Connection, relay=None) -> None:
    """Answer the engine's messages; with `relay` (rank 0 of ranks on several nodes), pass each on to
    the other ranks first."""
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the engine is gone: so are the other ranks' orders
            message: WorkerMessage = Shutdown()
        else:
            try:
                message = pickle.loads(data)
            except Exception as e:  # a WorkerCall's function this process cannot import: the caller hears why
                conn.send(("failed", RuntimeError(f"the model worker cannot unpickle the call: {e}")))
                continue
        if relay is not None:
            relay(message)
        if isinstance(message, Shutdown):
            return
        conn.send(answer(worker, message))


def follow(worker: ModelWorker, ranks: RankInfo) -> None:
    """A rank other than 0 of ranks on several nodes: do what rank 0 relays; rank 0 answers."""
    while True:
        message = ranks.relay()
        if isinstance(message, Shutdown):
            return
        answer(worker, message)


def answer(worker: ModelWorker, message: WorkerMessage):
    if isinstance(message, StepInput):
        return worker.execute(message)
    try:
        return ("ok", worker.call(message))
    except Exception as e:
        return ("failed", _picklable(e))


def _picklable(e: BaseException) -> BaseException:
    """`e` itself when it survives pickling (the caller re-raises it as it was), else its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
