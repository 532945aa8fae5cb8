"""Where the model worker runs: its own process (the default) or the engine thread.

In a process of its own, nothing the caller does can slow the model: with libgomp, any torch op on
another thread of the model's process adds a second OpenMP team, and once a process has more
OpenMP threads than cores every team stops spinning between parallel regions (decode on 2 cores
fell from 54 to 37 tok/s; benchmarks/caller_threads.py). The engine thread talks to the worker
over a socket pair; a step costs one round trip of small pickles (tens of microseconds).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from .config import EngineArgs
from .worker_protocol import ModelInfo, Shutdown, StepInput, StepOutput, WorkerCall

log = logging.getLogger("dsserve")

_SHUTDOWN_GRACE_S = 30.0


class WorkerDied(RuntimeError):
    """The worker process ended without being asked to (killed, out of memory, a crash in a kernel)."""


class ThreadExecutor:
    """The worker on the engine thread: no start-up cost, and `runner` is the model itself (tests,
    debugging); the caller's own torch threads then compete with the model's."""

    def __init__(self, args: EngineArgs):
        from .worker import ModelWorker

        self.worker = ModelWorker(args)
        self.runner = self.worker.runner
        self.info: ModelInfo = self.worker.info()

    def execute(self, step: StepInput) -> StepOutput:
        return self.worker.execute(step)

    def call(self, fn: Callable[..., Any], *args) -> Any:
        return self.worker.call(WorkerCall(fn, args))

    def shutdown(self) -> None:
        self.worker = self.runner = None


class ProcessExecutor:
    """The worker in a child process (`python -m dsserve.core.worker`) that inherits this one's
    environment and import path; its load errors are re-raised here as they were raised there."""

    def __init__(self, args: EngineArgs):
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dsserve.core.worker", "--fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=env)
        theirs.close()  # the child's end: once the child exits, reads here see EOF
        self.conn = Connection(ours.detach())
        try:
            self.conn.send(args)
            status, payload = self._receive()
        except BaseException:
            self._stop(graceful=False)
            raise
        if status == "failed":
            self._stop(graceful=False)
            raise payload
        self.info: ModelInfo = payload
        log.info("model worker: process %d", self.process.pid)

    def execute(self, step: StepInput) -> StepOutput:
        self.conn.send(step)
        return self._receive()

    def call(self, fn: Callable[..., Any], *args) -> Any:
        self.conn.send(WorkerCall(fn, args))
        status, payload = self._receive()
        if status == "failed":
            raise payload
        return payload

    def shutdown(self) -> None:
        self._stop(graceful=True)

    def _receive(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            raise WorkerDied(f"the model worker (process {self.process.pid}) exited with status {code}") from None

    def _stop(self, graceful: bool) -> None:
        if graceful and self.process.poll() is None:
            try:
                self.conn.send(Shutdown())
            except OSError:
                pass
        self.conn.close()
        deadline = time.monotonic() + (_SHUTDOWN_GRACE_S if graceful else 0)
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


Executor = ThreadExecutor | ProcessExecutor


def start_executor(args: EngineArgs) -> Executor:
    return ProcessExecutor(args) if args.model_worker == "process" else ThreadExecutor(args)
