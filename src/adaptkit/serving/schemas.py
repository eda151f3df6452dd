"""Request and response bodies: pydantic models, so every field is in the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class TranslateRequest(_Strict):
    texts: list[str] = Field(description="Source texts, one translation each")
    src_lang: str | list[str] = Field(description="Source language code (e.g. 'en'), or one per text")
    tgt_lang: str | list[str] = Field(description="Target language code, or one per text")
    domain: str | None | list[str | None] = Field(
        default=None, description="Domain (e.g. 'software'), or one per text; an adapter without a domain "
                                  "serves any domain of its pair")
    adapter: str | list[str] | None = Field(
        default=None, description="Adapter name(s) in the store; omitted: routed by the adapters' src_lang / "
                                  "tgt_lang / domain")
    num_beams: int | None = Field(default=None, ge=1, description="1 = greedy (the default)")
    max_new_tokens: int | None = Field(default=None, ge=1)


class Timings(BaseModel):
    queue_ms: float = Field(description="Arrival until the request's first row entered a batch")
    compute_ms: float = Field(description="Seconds of the generate calls that held its rows, in ms")
    total_ms: float
    batches: int = Field(description="Generate calls its rows were spread over")


class TranslateResponse(BaseModel):
    translations: list[str]
    adapters: list[str] = Field(description="The adapter each text was translated with")
    timings: Timings


class GenerateRequest(_Strict):
    prompts: list[str] = Field(description="Texts to continue: a passage to restyle, the user's turn, a source")
    adapter: str | None | list[str | None] = Field(
        description="Adapter name, one per prompt, or null for the bare backbone")
    task: str | None | list[str | None] = Field(
        default=None, description="translate | style | dialogue: the prompt the adapter was trained with; default: "
                                  "the task in the adapter's file")
    src_lang: str | None | list[str | None] = Field(default=None, description="Default: the adapter's, else 'en'")
    tgt_lang: str | None | list[str | None] = Field(default=None, description="Default: the adapter's, else src_lang")
    num_beams: int | None = Field(default=None, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    stream: bool = Field(default=False, description="One prompt, num_beams 1: the output as server-sent events, "
                                                     "`data: {\"text\": piece}` per piece, then `event: done`")


class GenerateResponse(BaseModel):
    outputs: list[str]
    adapters: list[str | None]
    timings: Timings


class AdapterInfo(BaseModel):
    name: str
    method: str | None = None
    task: str | None = None
    src_lang: str | None = None
    tgt_lang: str | None = None
    domain: str | None = None
    num_parameters: int | None = None
    file_bytes: int | None = None
    metrics: dict[str, Any] | None = None
    resident: bool = False
    error: str | None = Field(default=None, description="Why the file cannot be loaded, if it cannot")


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]
    resident: list[str]
    max_resident: int | None


class Deleted(BaseModel):
    deleted: str


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    backbone: str
    family: str
    adapters_in_store: int
    resident: int
    quantization: str | None = Field(None, description="int8 / nf4 Linear weights (--quantize), or null")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable: e.g. too_many_texts, unknown_adapter, queue_full")
    message: str = Field(description="What went wrong and how to fix it")
    limit: dict[str, Any] | None = Field(default=None, description="The limit that was hit: {name, value}")


class ErrorBody(BaseModel):
    error: ErrorDetail
