"""The OpenAI API's request and response bodies (`openai_routes.py`): pydantic models, so they are in the
OpenAPI schema, strict where OpenAI's are (a misspelt field is an error)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adaptkit.serving.schemas import _Strict

MAX_STOPS = 4  # as OpenAI's API
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: --default-max-new-tokens)

# -- request bodies ---------------------------------------------------------------------------------

class StreamOptions(_Strict):
    include_usage: bool = Field(default=False, description="A last chunk with `usage` (and no choices)")


class _Sampling(_Strict):
    """Fields of both routes. Those after `user` are accepted at their neutral values only (clients send them)."""

    model: str = Field(description="An adapter's name in the store, or the backbone's id (GET /v1/models)")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0: greedy (default 1, as OpenAI's)")
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, description="Choices per prompt")
    stop: str | list[str] | None = Field(default=None, description=f"Up to {MAX_STOPS} strings; the answer ends "
                                                                   "before the first one written")
    seed: int | None = Field(default=None, description="Seeds the sampling of the generate call the rows run in")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="Used as given (no task template), encoded by the tokenizer")
    max_tokens: int | None = Field(default=None, ge=1, description=f"Default {COMPLETION_MAX_TOKENS}")
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Strict):
    model_config = ConfigDict(extra="allow")  # other part types are refused by name, not as a schema error
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    # clients send back assistant messages as they got them (refusal, annotations, audio: null): ignored
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, ge=1, description="Default: --default-max-new-tokens")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Same as max_tokens")
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class LoadLora(_Strict):
    lora_name: str = Field(description="The name it takes in the store (and as `model`)")
    lora_path: str = Field(description="An adapter file inside the store or an --adapter-dir; a relative path is "
                                       "relative to the store")
    load_inplace: bool = Field(default=False, description="Replace an adapter of that name")


class UnloadLora(_Strict):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; names are enough here


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adaptkit"
    root: str
    parent: str | None
    method: str | None = None
    task: str | None = None
    src_lang: str | None = None
    tgt_lang: str | None = None
    domain: str | None = None
    resident: bool
    error: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
