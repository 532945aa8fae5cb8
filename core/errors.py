"""RequestError: a request that cannot be served as given. Raised in one place, the engine's
`add_request` (and SamplingParams), and carried to the client by whoever called it."""
from __future__ import annotations


class RequestError(ValueError):
    """The client's mistake, with the field that holds it.

    `template` may name the field as `{param}`; `str(error)` spells it as the engine does
    (`max_new_tokens`), `message_for(name)` as the caller's API does (OpenAI's `max_tokens`), so a
    server renames the field and never rewrites the text. `code` is an OpenAI error code where one
    fits (`context_length_exceeded`).
    """

    def __init__(self, template: str, param: str | None = None, code: str | None = None):
        self.template, self.param, self.code = template, param, code
        super().__init__(self.message_for(param))

    def message_for(self, param_name: str | None) -> str:
        return self.template.format(param=param_name or self.param)


class EngineUnavailable(RuntimeError):
    """The engine no longer takes requests: it is shutting down, or its model worker died (a
    server answers 503; the message says which)."""
