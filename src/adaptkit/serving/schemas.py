"""Request and response bodies: pydantic models, so every field is in the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds a lone surrogate (JSON lets `"\\ud800"` through; UTF-8 cannot encode it), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    @field_validator("*", mode="before")
    @classmethod
    def _encodable_text(cls, value: Any) -> Any:
        """Refuse text that UTF-8 cannot encode, here at the edge: deeper in, the tokenizer, a file name or the
        error message naming the value would fail on it. Checked before the field's type, so a field that is
        `str | list[str]` gets one error, not one per member of the union."""
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            at = lone_surrogate(item) if isinstance(item, str) else None
            if at is not None:
                where = f"item {i} holds" if isinstance(value, list) else "holds"
                raise PydanticCustomError(
                    "invalid_text", "{where} a lone surrogate ({char}) at character {at}, which is not text (UTF-8 "
                    "cannot encode it): send valid Unicode; a \\u escape of a surrogate must be one of a pair",
                    {"where": where, "char": f"\\u{ord(item[at]):04x}", "at": at})
        return value


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
    adapter_versions: list[str | None] = Field(
        description="The checksum (adaptkit.sha256) of the adapter file whose weights translated each text")
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
    adapter_versions: list[str | None] = Field(
        description="The checksum (adaptkit.sha256) of the adapter file each output came from; null: bare backbone")
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
    quantization: str | None = Field(None, description="int8 / nf4 / int8-dynamic Linear weights (--quantize), or null")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable: e.g. too_many_texts, unknown_adapter, queue_full")
    message: str = Field(description="What went wrong and how to fix it")
    limit: dict[str, Any] | None = Field(default=None, description="The limit that was hit: {name, value}")


class ErrorBody(BaseModel):
    error: ErrorDetail
