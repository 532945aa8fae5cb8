"""`dsserve` / `dsserve serve`: check the flags, load the model, serve HTTP until SIGTERM/SIGINT.

Order: flag values are validated (a bad one stops here, exit 2); each accepted-but-inactive flag
gets one warning line; the port is bound (so a busy port fails before a long model load, and no
client is accepted before the model is ready); the engine loads; uvicorn starts listening and one
line `dsserve ready: http://HOST:PORT (model NAME)` goes to stdout. On SIGTERM or SIGINT the
listening socket closes, running requests get up to --graceful-shutdown-timeout seconds to finish,
then the rest are aborted and the process exits 0. A second SIGINT exits at once. If the model's
worker (or one of its tensor-parallel ranks) dies, the server says which in one line, stops the
same way and exits 1.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import threading

from .args import ServerArgs

log = logging.getLogger("dsserve")

_HARD_STOP_MARGIN_S = 5.0
_WATCH_INTERVAL_S = 0.2


def register(sub) -> None:
    serve = sub.add_parser("serve", help="start the OpenAI-compatible server (the default)",
                           description="Serve a DeepSeek model over an OpenAI-compatible HTTP API. "
                                       "Flags follow SGLang's launch_server.")
    ServerArgs.add_cli_args(serve)
    serve.set_defaults(func=run)


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket; ValueError naming the address when that fails."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(app, args: ServerArgs, signals: bool):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises a caught SIGTERM after shutting down (exit status -15); dsserve exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if not signals or threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                log.info("%s: no new connections; waiting up to %g s for running requests",
                         signal.Signals(sig).name, args.graceful_shutdown_timeout)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            # At the end of the grace period the requests still running are aborted, so their clients get
            # a last chunk with finish_reason "abort" instead of a cut connection; uvicorn's own timeout,
            # a little later, only catches what still hangs.
            aborter = asyncio.ensure_future(self._abort_late())
            try:
                await super().shutdown(sockets)
            finally:
                aborter.cancel()

        async def _abort_late(self) -> None:
            await asyncio.sleep(args.graceful_shutdown_timeout)
            count = app.state.serving.abort_all()
            if count:
                log.warning("aborted %d request(s) still running after %g s", count, args.graceful_shutdown_timeout)

    debug = args.log_level == "debug"
    config = uvicorn.Config(app, log_level="info" if debug else "warning", access_log=debug, lifespan="on",
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout + _HARD_STOP_MARGIN_S,
                            timeout_keep_alive=30)
    return Server(config)


async def _serve_until_stopped(server, sock: socket.socket, ready_line: str | None,
                               started: threading.Event | None = None, engine=None) -> str | None:
    """Serve until stopped; with `engine`, also stop once it fails, and return why."""
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        if ready_line:
            print(ready_line, flush=True)
        if started is not None:
            started.set()
    while engine is not None and not task.done():
        if engine.failure and not server.should_exit:
            log.error("dsserve: %s; stopping", engine.failure)
            server.should_exit = True
        await asyncio.sleep(_WATCH_INTERVAL_S)
    await task
    return engine.failure if engine is not None else None


def run(ns: argparse.Namespace) -> int:
    args = ServerArgs.from_cli_args(ns)
    logging.basicConfig(level=args.log_level.upper(), format="[dsserve] %(message)s")
    if args.node_rank > 0:
        return serve_ranks(args)
    from dsserve.core.plugins import default_registry
    from .flag_checks import inactive_flag_warnings
    from .serving import resolve_chat_template, served_model_name

    resolve_chat_template(args.chat_template)
    device = default_registry().select_device(args.device)
    for line in inactive_flag_warnings(args, device.name):
        log.warning("warning: %s", line)
    from dsserve.models.plan import make_plan

    plan = make_plan(args)   # from config.json alone: a model that cannot fit is refused before loading
    for line in plan.lines():
        log.info("%s", line)
    if not plan.fits:
        raise ValueError(f"{plan.model} does not fit: {plan.shortfall()}")
    sock = bind_socket(args.host, args.port)
    from dsserve.core.engine import Engine
    from .app import create_app

    engine = Engine.from_args(args)
    try:
        server = _uvicorn_server(create_app(engine, args), args, signals=True)
        ready = f"dsserve ready: {url_of(args.host, sock)} (model {served_model_name(args)})"
        failure = asyncio.run(_serve_until_stopped(server, sock, ready, engine=engine))
    finally:
        engine.shutdown()
        sock.close()
    log.info("dsserve stopped")
    return 1 if failure else 0


def serve_ranks(args: ServerArgs) -> int:
    """A node other than 0 (--node-rank): start this node's ranks, which join node 0's rendezvous and
    take their orders from rank 0; no engine, no HTTP. Exits when they do (0 when node 0 shut them
    down, 1 when one failed); SIGTERM/SIGINT stop them."""
    from dsserve.core.executor import ProcessExecutor

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ranks = ProcessExecutor(args)
    log.info("dsserve node %d: ranks %d..%d of %d joined the group at %s", args.node_rank, ranks.ranks[0],
             ranks.ranks[-1], args.tp_size, args.dist_init_addr)
    while not stop.is_set() and any(p.poll() is None for p in ranks.processes):
        stop.wait(_WATCH_INTERVAL_S)
    codes = [p.poll() for p in ranks.processes]
    ranks.shutdown(graceful=not stop.is_set())   # on a signal the ranks cannot finish a step anyway
    failed = [(r, c) for r, c in zip(ranks.ranks, codes) if c not in (0, None)]
    for rank, code in failed:
        log.error("dsserve node %d: rank %d exited with status %d", args.node_rank, rank, code)
    log.info("dsserve node %d stopped", args.node_rank)
    return 1 if failed else 0


class ServerThread:
    """The HTTP server on a background thread, for tests and benchmarks:

        with ServerThread(engine) as server:     # port 0: a free port
            httpx.get(server.url + "/health")
    """

    def __init__(self, engine, args: ServerArgs | None = None, host: str = "127.0.0.1", port: int = 0):
        from .app import create_app

        args = args or ServerArgs.from_engine_args(engine.args)
        self.app = create_app(engine, args)
        self.sock = bind_socket(host, port)
        self.url = url_of(host, self.sock)
        self.server = _uvicorn_server(self.app, args, signals=False)
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="dsserve-http", daemon=True)

    def _main(self) -> None:
        asyncio.run(_serve_until_stopped(self.server, self.sock, None, self._started))

    def start(self, timeout: float = 60.0) -> ServerThread:
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("the HTTP server did not start")
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

