"""ServerArgs: the engine's flags plus the HTTP server's and the OpenAI API's own."""
from __future__ import annotations

from dataclasses import dataclass, fields

from dsserve.core.config import EngineArgs, flag, flag_error

from .reasoning import REASONING_PARSERS
from .tool_calls import TOOL_CALL_PARSERS


@dataclass
class ServerArgs(EngineArgs):
    """Every option of `dsserve serve`: the engine's (see EngineArgs) and the server's below."""

    served_model_name: str | None = flag(None, "model name reported by the API (default: the folder name)")
    # HTTP server
    host: str = flag("127.0.0.1", "address to listen on (0.0.0.0: every interface)", group="http server")
    port: int = flag(30000, "port to listen on (0: any free port, printed when ready)", group="http server")
    api_key: str | None = flag(None, "require `Authorization: Bearer KEY` on every route but /health",
                               group="http server")
    max_queued_requests: int | None = flag(None, "answer 503 (with Retry-After) while this many requests wait "
                                           "to run (default: no limit)", group="http server")
    max_request_bytes: int = flag(8 * 2**20, "answer 413 to a request body larger than this many bytes (default "
                                  "8 MiB: a full context of text several times over)", group="http server")
    graceful_shutdown_timeout: float = flag(30.0, "on SIGTERM/SIGINT, seconds to let running requests finish "
                                            "before they are aborted", group="http server")
    enable_metrics: bool = flag(False, "accepted for SGLang compatibility: /metrics (Prometheus) is always served",
                                group="http server")
    # OpenAI API
    chat_template: str | None = flag(None, "chat template: a Jinja file or inline Jinja text (default: the "
                                     "tokenizer's)", group="openai api")
    reasoning_parser: str | None = flag(None, "split <think>...</think> into reasoning_content",
                                        group="openai api", choices=sorted(REASONING_PARSERS))
    tool_call_parser: str | None = flag(None, "turn the model's tool-call markup into OpenAI tool_calls",
                                        group="openai api", choices=sorted(TOOL_CALL_PARSERS))
    enable_custom_logit_processor: bool = flag(
        False, "accept SGLang's custom_logit_processor field; only its custom_params.thinking_budget is applied",
        group="openai api")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise flag_error("port", f"must be in 0..65535, got {self.port}")
        if not self.host:
            raise flag_error("host", "must not be empty")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise flag_error("max_queued_requests", f"must be >= 1, got {self.max_queued_requests}")
        if self.max_request_bytes < 1:
            raise flag_error("max_request_bytes", f"must be >= 1, got {self.max_request_bytes}")
        if self.graceful_shutdown_timeout < 0:
            raise flag_error("graceful_shutdown_timeout", f"must be >= 0, got {self.graceful_shutdown_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise flag_error("api_key", "must not be empty")

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "ServerArgs":
        """The server's defaults around an engine's options (for a server over an existing Engine)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(EngineArgs)})
