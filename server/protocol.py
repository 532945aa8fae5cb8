"""Pydantic models of the HTTP API: OpenAI chat/completions/models, tokenize, SGLang's /generate.

Requests accept fields they do not declare (OpenAI clients send `user`, `metadata`, `store`, ...)
and ignore them. Their declared fields are strict, as OpenAI's are: `true` is no integer (it would
turn `"logprobs": false` into logprobs 0, `"thinking_budget": true` into a budget of 1) and `"yes"`
no boolean. Value ranges that OpenAI documents are checked here, so a bad value is a 400 naming its
field; checks that depend on the server (n against --max-running-requests, the context length, the
model name) are in the serving code.
"""
from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _holds_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return not value.isascii() and _LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_holds_lone_surrogate(k) or _holds_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(map(_holds_lone_surrogate, value))
    return False


def _characters_only(value: Any) -> Any:
    """JSON's "\\ud800" escape decodes to a lone surrogate, which is no character: no tokenizer,
    template or UTF-8 response can take it, so it is refused where it is read."""
    if _holds_lone_surrogate(value):
        raise ValueError("holds an unpaired UTF-16 surrogate (such as \\ud800), which is not a character")
    return value


# Every string and free-form object of a request: text the tokenizer, the chat template or an
# error message may take.
Text = Annotated[str, AfterValidator(_characters_only)]
JSONObject = Annotated[dict[str, Any], AfterValidator(_characters_only)]
# What the sampler's 64-bit generator and tensors take.
Int64 = Annotated[int, Field(ge=-2**63, le=2**63 - 1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# ------------------------------------------------------------------------------------- shared parts
class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Sampling fields shared by chat and completions (OpenAI's plus SGLang's extensions)."""

    model: Text | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Int64 | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: Int64 | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


# ------------------------------------------------------------------------------------- chat
class ContentPart(_Request):
    type: Text
    text: Text | None = None


class FunctionCallIn(_Request):
    name: Text
    arguments: Text | JSONObject = "{}"


class ToolCallIn(_Request):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: Text | None = None
    reasoning_content: Text | None = None


class FunctionDefinition(_Request):
    name: Text = Field(..., min_length=1)
    description: Text | None = None
    parameters: JSONObject | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: Text


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: JSONObject | None = None
    # SGLang extensions
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    chat_template_kwargs: JSONObject | None = None
    thinking_budget: int | None = Field(None, ge=0)
    custom_logit_processor: Text | None = None
    custom_params: JSONObject | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        """As OpenAI: top_logprobs without `logprobs: true` is an error, not silently dropped."""
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs 'logprobs': true")
        return value


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ------------------------------------------------------------------------------------- completions
class CompletionRequest(_Sampling):
    prompt: Text | list[int] | list[Text] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)
    suffix: Text | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ------------------------------------------------------------------------------------- models
class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dsserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------- tokenize
class TokenizeRequest(_Request):
    """Exactly one of `prompt` and `messages` (the other absent, not null: the OpenAPI document's
    `oneOf` then says what is accepted)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    model: Text | None = None
    prompt: Text | list[Text] = None
    messages: list[ChatMessage] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(_Response):
    tokens: list[int] | list[list[int]]
    count: int | list[int]
    max_model_len: int


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[int] | list[list[int]]
    skip_special_tokens: bool = False


class DetokenizeResponse(_Response):
    text: str | list[str]


# ------------------------------------------------------------------------------------- SGLang /generate
class GenerateSamplingParams(_Request):
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Int64 = -1
    min_p: float = Field(0.0, ge=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = Field(1, ge=1)
    seed: Int64 | None = None
    sampling_seed: Int64 | None = None


class GenerateRequest(_Request):
    """Exactly one of `text` and `input_ids` (the other absent, not null: the OpenAPI document's
    `oneOf` then says what is accepted)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["input_ids"]}]})

    text: Text | list[Text] = None
    input_ids: list[int] | list[list[int]] = None
    sampling_params: GenerateSamplingParams = Field(default_factory=GenerateSamplingParams)
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = Field(0, ge=0, le=20)
    rid: Text | None = None


class GenerateResponse(_Response):
    """One prompt's answer; a batch, or n > 1, answers a list of them (each streamed event adds `index`)."""

    text: str
    output_ids: list[int]
    meta_info: dict[str, Any]


# ------------------------------------------------------------------------------------- admin
class MessageResponse(_Response):
    message: str


class ModelInfo(_Response):
    model_path: str | None
    served_model_name: str
    tokenizer_path: str | None
    is_generation: bool
    max_context_length: int


# ------------------------------------------------------------------------------------- errors
class ErrorInfo(_Response):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    error: ErrorInfo
