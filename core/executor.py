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
import pickle
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from .config import EngineArgs
from .distributed import DEFAULT_TIMEOUT_S, RankInfo, free_local_address
from .worker_protocol import ModelInfo, Shutdown, StepInput, StepOutput, WorkerCall, WorkerStart

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
    """The worker in child processes (`python -m dsserve.core.worker`), one per tensor-parallel rank
    of this node, that inherit this one's environment and import path. On one node every rank gets
    every step and call; across nodes (--nnodes) rank 0 gets them and relays them to the others.
    Rank 0's answer is the model's (the ranks' sampled tokens are the same). A load error is
    re-raised here as the first rank to fail raised it; a rank that dies stops this node's ranks,
    and the error names it."""

    def __init__(self, args: EngineArgs, on_death: Callable[[str], None] | None = None):
        world, per_node = args.tp_size, args.tp_size // args.nnodes
        first = args.node_rank * per_node
        self.relayed = args.nnodes > 1
        self._stopping, self._first, self._world = False, first, world
        init = (f"tcp://{args.dist_init_addr}" if self.relayed
                else free_local_address() if world > 1 else None)
        timeout = args.dist_timeout or DEFAULT_TIMEOUT_S
        self.processes: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            for local in range(per_node):
                ours, theirs = socket.socketpair()
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "dsserve.core.worker", "--fd", str(theirs.fileno())],
                    pass_fds=[theirs.fileno()], env=env))
                theirs.close()  # the child's end: once the child exits, reads here see EOF
                self.conns.append(Connection(ours.detach()))
                self.conns[-1].send(WorkerStart(args, RankInfo(first + local, world, local, per_node, init, timeout,
                                                               self.relayed)))
            replies = self._gather(range(per_node))
        except BaseException:
            self._stop(graceful=False)
            raise
        failed = next((payload for status, payload in replies if status == "failed"), None)
        if failed is not None:
            self._stop(graceful=False)
            raise failed
        self.info: ModelInfo = replies[0][1]
        self.process = self.processes[0]
        self.ranks = range(first, first + per_node)
        if on_death is not None:  # an idle engine reads no socket: a thread per rank waits for its end
            for local in range(per_node):
                threading.Thread(target=self._watch, args=(local, on_death), name=f"dsserve-watch-{local}",
                                 daemon=True).start()
        log.info("model worker%s: process%s %s", "s" if per_node > 1 else "", "es" if per_node > 1 else "",
                 ", ".join(str(p.pid) for p in self.processes))

    def execute(self, step: StepInput) -> StepOutput:
        outputs = self._broadcast(step)
        return next((out for out in outputs if out.error is not None), outputs[0])

    def call(self, fn: Callable[..., Any], *args) -> Any:
        replies = self._broadcast(WorkerCall(fn, args))
        failed = next((payload for status, payload in replies if status == "failed"), None)
        if failed is not None:
            raise failed
        return replies[0][1]

    def shutdown(self, graceful: bool = True) -> None:
        self._stop(graceful)

    def _broadcast(self, message) -> list:
        """Send `message` to the ranks that take orders from the engine; their replies."""
        data = pickle.dumps(message)   # once, whatever the number of ranks
        told = range(1) if self.relayed else range(len(self.conns))
        for local in told:
            try:
                self.conns[local].send_bytes(data)
            except OSError:
                raise self._died(local) from None
        return self._gather(told)

    def _gather(self, expected) -> list:
        """The replies of the local ranks in `expected`, in order; WorkerDied as soon as any local
        rank's process ends (a rank waiting in a collective for a dead peer would wait for the
        group's whole timeout): the others' sockets turn readable only at their end."""
        replies: dict[int, object] = {}
        index = {conn: local for local, conn in enumerate(self.conns)}
        while len(replies) < len(expected):
            for conn in wait([c for c, local in index.items() if local not in replies]):
                local = index[conn]
                try:
                    if local not in expected:
                        raise EOFError
                    replies[local] = conn.recv()
                except (EOFError, OSError):
                    raise self._died(local) from None
        return [replies[local] for local in expected]

    def _watch(self, local: int, on_death: Callable[[str], None]) -> None:
        self.processes[local].wait()
        if not self._stopping:
            on_death(self._exit_line(local))

    def _died(self, local: int) -> WorkerDied:
        error = WorkerDied(self._exit_line(local))
        self._stop(graceful=False)
        return error

    def _exit_line(self, local: int) -> str:
        code = self.processes[local].wait()
        who = f"rank {self._first + local} of {self._world} " if self._world > 1 else ""
        return f"the model worker {who}(process {self.processes[local].pid}) exited with status {code}"

    def _stop(self, graceful: bool) -> None:
        self._stopping = True
        for process, conn in zip(self.processes, self.conns):
            if graceful and process.poll() is None:
                try:
                    conn.send(Shutdown())
                except OSError:
                    pass
            conn.close()
        deadline = time.monotonic() + (_SHUTDOWN_GRACE_S if graceful else 0)
        for process in self.processes:
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if process.poll() is None:
                process.kill()
                process.wait()


Executor = ThreadExecutor | ProcessExecutor


def start_executor(args: EngineArgs, on_death: Callable[[str], None] | None = None) -> Executor:
    """The executor `args` ask for; `on_death(why)` is called (from another thread) if a worker
    process ends on its own."""
    if args.model_worker == "process":
        return ProcessExecutor(args, on_death)
    if args.tp_size > 1:
        raise ValueError(f"--tp-size {args.tp_size} needs a worker process per rank: drop --model-worker thread")
    return ThreadExecutor(args)
