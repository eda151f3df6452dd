"""The OpenAI API on the same scheduler: any OpenAI client or SDK, with `model` = an adapter's name.

    GET  /v1/models                  the backbone and every adapter in the store (GET /v1/models/{id}: one)
    POST /v1/completions             prompts used as given → continuations
    POST /v1/chat/completions        messages → one reply (the prompt rule below)
    POST /v1/load_lora_adapter       vLLM's: an adapter file or peft directory, from the store or an --adapter-dir,
                                     installed in the store
    POST /v1/unload_lora_adapter     vLLM's: take an adapter out of memory (its file stays in the store)

Rows of these routes are rows of the scheduler like those of /v1/translate and /v1/generate (`work.py`, kind
"complete"): greedy ones (temperature 0) share the continuous batch's decoding steps with them, whatever their
adapters; sampled ones run in static batches of equal (temperature, top_p, seed, max_tokens).

`model` is an adapter's store name, or the backbone's id (`base_model_id`) for no adapter. A chat is prompted
by this rule, in order:
  1. an adapter whose file names a task (translate, style, dialogue), or a language pair (a translation adapter),
     gets the prompt it was trained with — exactly the prompt /v1/translate or /v1/generate gives it: the last
     user message is the text to translate or restyle (a dialogue: the user and assistant turns); system
     messages are not part of such prompts. The reply is stripped and ends at its first line, as there;
  2. otherwise (the backbone, an adapter without a task) the tokenizer's chat template, where it has one;
  3. otherwise the last user message, as a raw prompt.
An adapter trained through a chat template (`ak.train(..., chat_template=True)`) is prompted by rule 1
through the template, as in training; rule 2 does not come first because an adapter answers well only the
prompt it was trained with.

Not supported (400 `unsupported_parameter`, naming the field): logprobs, echo, best_of > 1, suffix, penalties,
logit_bias, tools and function calls, response formats other than text, content other than text, token-id
prompts; decoder-only backbones only. Errors take OpenAI's shape, {"error": {"message", "type", "code",
"param"}}, with the statuses OpenAI SDKs map to their exception classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from adaptkit.core.adapterfile import read_adapter_info
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError, SourceTooLong
from adaptkit.interop.peft import read_peft_dir
from adaptkit.serving.catalog import AdapterCatalog, AdapterExists, BadAdapterName, Entry, store_path
from adaptkit.serving.metrics import ServeMetrics
from adaptkit.serving.openai_schemas import (
    COMPLETION_MAX_TOKENS,
    MAX_STOPS,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    LoadLora,
    ModelCard,
    ModelList,
    UnloadLora,
    _Sampling,
)
from adaptkit.serving.openai_stream import Answer, stream_answer
from adaptkit.serving.routes import await_answer
from adaptkit.serving.scheduler import Scheduler
from adaptkit.serving.settings import ApiError, ServeSettings
from adaptkit.serving.uploads import scratch_file
from adaptkit.serving.work import BatchKey, Completion, Job, RequestRow
from adaptkit.tasks.generate import TASKS

# -- the routes -------------------------------------------------------------------------------------

def base_model_id(model: AdaptedModel) -> str:
    """The backbone's `model` id: its Hub id (`google/gemma-3-270m`), or for a local checkpoint its folder's name
    (a path on the server means nothing to a client). The full `backbone_id` is accepted too."""
    name = model.backbone_id
    return Path(name).name if os.path.isdir(name) else name


def add_openai_routes(app: FastAPI, model: AdaptedModel, catalog: AdapterCatalog, scheduler: Scheduler,
                      settings: ServeSettings, metrics: ServeMetrics) -> None:
    """The OpenAI-compatible routes on `app`, their rows run by `scheduler` beside the native routes' rows."""
    base = base_model_id(model)
    started = int(time.time())
    tokenizer = model.tokenizer

    # -- models ----------------------------------------------------------------------------------
    def card(entry: Entry, resident: set[str]) -> ModelCard:
        info = entry.info or {}
        return ModelCard(id=entry.name, created=entry.stamp[0] // 1_000_000_000, root=entry.name, parent=base,
                         method=info.get("method"), task=info.get("task"), src_lang=info.get("src_lang"),
                         tgt_lang=info.get("tgt_lang"), domain=info.get("domain"), resident=entry.name in resident,
                         error=entry.error)

    def base_card() -> ModelCard:
        return ModelCard(id=base, created=started, root=base, parent=None, resident=True)

    @app.get("/v1/models", response_model=ModelList, tags=["OpenAI"])
    async def list_models() -> ModelList:
        """The backbone (`parent` null) and every adapter in the store, as the store is now."""
        await asyncio.to_thread(catalog.refresh)
        resident = set(model.adapters)
        return ModelList(data=[base_card(), *(card(entry, resident) for entry in catalog.entries())])

    @app.get("/v1/models/{name:path}", response_model=ModelCard, tags=["OpenAI"])
    async def retrieve_model(name: str) -> ModelCard:
        """One model of the list."""
        if name in (base, model.backbone_id):
            return base_card()
        entry = await known_entry(name)
        return card(entry, set(model.adapters))

    async def known_entry(name: str) -> Entry:
        unknown = ApiError(404, "model_not_found", f"the model {name!r} does not exist: `model` is an adapter's "
                           f"name or {base!r} (the backbone); GET /v1/models lists them", param="model")
        try:
            store_path(catalog.store, name)
        except BadAdapterName:
            raise unknown from None
        entry = catalog.get(name) or await asyncio.to_thread(catalog.refresh_one, name)
        if entry is None:
            raise unknown
        return entry

    async def resolve(name: str) -> tuple[str | None, dict[str, Any]]:
        """The adapter `model` names (None: the backbone) and its file's header."""
        if model.family != "decoder":
            raise ApiError(400, "unsupported_backbone", f"the OpenAI routes serve decoder-only backbones; this one "
                           f"is {model.family}: use /v1/translate and /v1/generate")
        if name in (base, model.backbone_id):
            return None, {}
        entry = await known_entry(name)
        if entry.error is not None:
            raise ApiError(500, "adapter_broken", f"adapter {name!r} in the store cannot be loaded: {entry.error}")
        return name, entry.info or {}

    # -- generation --------------------------------------------------------------------------------
    def sampling_key(body: _Sampling, max_tokens: int | None, default_tokens: int) -> BatchKey:
        _refuse_unsupported(body)
        new = max_tokens or default_tokens
        if new > settings.max_new_tokens_limit:
            raise ApiError(422, "max_new_tokens_too_large", f"max_tokens={new}; the limit is "
                           f"{settings.max_new_tokens_limit} (--max-new-tokens-limit)",
                           limit=("max_new_tokens_limit", settings.max_new_tokens_limit), param="max_tokens")
        temperature = 1.0 if body.temperature is None else body.temperature
        if temperature == 0:  # greedy: top_p and seed change nothing, and every greedy row may share a step
            return BatchKey("complete", 1, new)
        return BatchKey("complete", 1, new, temperature, 1.0 if body.top_p is None else body.top_p, body.seed)

    def stops(body: _Sampling) -> tuple[str, ...]:
        given = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(given) > MAX_STOPS or any(not stop for stop in given):
            raise ApiError(422, "invalid_stop", f"stop takes up to {MAX_STOPS} non-empty strings; got {given!r}",
                           param="stop")
        return tuple(given)

    def check_count(rows: int, n: int) -> None:
        if rows * n > settings.max_texts:
            raise ApiError(422, "too_many_texts", f"{rows} prompts × n={n} is {rows * n} answers in one request; the "
                           f"limit is {settings.max_texts} (--max-texts): split the request",
                           limit=("max_texts", settings.max_texts), param="n")

    def check_chars(text: str, where: str) -> None:
        if len(text) > settings.max_text_chars:
            raise ApiError(422, "text_too_long", f"{where} has {len(text)} characters; the limit is "
                           f"{settings.max_text_chars} (--max-text-chars)",
                           limit=("max_text_chars", settings.max_text_chars), param=where.split("[")[0])

    def rows_for(request: Request, key: BatchKey, adapter: str | None, prompts: list[Completion], n: int) -> Answer:
        """Queue one row per prompt (greedy) or per answer (sampled: n rows, each its own sample)."""
        request.state.adapters = [adapter or ""]
        copies = 1 if key.temperature == 0 else n  # n greedy answers are one answer n times
        job = Job(asyncio.get_running_loop(), len(prompts) * copies)
        rows = [RequestRow(job, i * copies + j, key, adapter, "", completion=Completion(
            p.prompt, p.answer, p.stop)) for i, p in enumerate(prompts) for j in range(copies)]
        choices = [i * copies + (j if copies > 1 else 0) for i in range(len(prompts)) for j in range(n)]
        return Answer(job, rows, choices, [len(p.prompt) for p in prompts])

    def submit(answer: Answer, route: str, adapter: str | None) -> None:
        scheduler.submit(answer.job, answer.rows)
        metrics.requests.labels(route, adapter or "").inc()

    async def wait(request: Request, answer: Answer) -> list[str]:
        return await await_answer(request, answer.job, scheduler, settings.request_timeout_s)

    def usage(answer: Answer) -> dict[str, int]:
        """Prompt tokens once per prompt; completion tokens per choice, as OpenAI counts them."""
        prompt = sum(answer.prompt_tokens)
        completion = sum(answer.completions[row].completion_tokens for row in answer.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def fingerprint(answer: Answer) -> str | None:
        """The adapter file version the answer comes from (its checksum, set when its rows are admitted), as
        OpenAI's system_fingerprint: it changes when the adapter's file is replaced."""
        version = answer.rows[0].version
        return f"adaptkit-{version[:16]}" if version else None

    async def respond(request: Request, body: _Sampling, route: str, adapter: str | None, key: BatchKey,
                      prompts: list[Completion], chat: bool) -> Any:
        n = body.n or 1
        answer = rows_for(request, key, adapter, prompts, n)
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", int(time.time())
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body.model}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream_answer(request, answer, head, chat, include_usage, lambda: submit(answer, route, adapter),
                           usage, fingerprint, tokenizer, settings.request_timeout_s, scheduler)
        submit(answer, route, adapter)
        texts = await wait(request, answer)
        choices = []
        for index, row in enumerate(answer.choices):
            completion, text = answer.completions[row], texts[row]
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": completion.finish_reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": None,
                                "finish_reason": completion.finish_reason})
        return {**head, "system_fingerprint": fingerprint(answer), "choices": choices, "usage": usage(answer)}

    @app.post("/v1/completions", tags=["OpenAI"], responses={200: {"content": {"text/event-stream": {}}}})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """OpenAI's completions: each prompt continued as given (no task template) by the adapter `model` names."""
        adapter, _ = await resolve(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise ApiError(422, "no_texts", "'prompt' is an empty list; send at least one prompt", param="prompt")
        check_count(len(prompts), body.n or 1)
        for i, prompt in enumerate(prompts):
            check_chars(prompt, f"prompt[{i}]")
        key = sampling_key(body, body.max_tokens, COMPLETION_MAX_TOKENS)
        ends = stops(body)
        rows = []
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt)["input_ids"]
            if not ids:
                raise ApiError(422, "empty_prompt", f"prompt[{i}] encodes to no tokens; send some text",
                               param="prompt")
            rows.append(Completion(list(ids), "raw", ends))
        return await respond(request, body, "/v1/completions", adapter, key, rows, chat=False)

    @app.post("/v1/chat/completions", tags=["OpenAI"], responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        """OpenAI's chat completions: the adapter's task prompt, else the chat template, else the last user message
        (see the module's rule)."""
        adapter, info = await resolve(body.model)
        if not body.messages:
            raise ApiError(422, "no_texts", "'messages' is empty; send at least one user message", param="messages")
        check_count(1, body.n or 1)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(422, "invalid_request", "give max_tokens or max_completion_tokens, not both",
                           param="max_completion_tokens")
        key = sampling_key(body, body.max_completion_tokens or body.max_tokens, settings.default_max_new_tokens)
        prompt = chat_prompt(body.messages, adapter, info, stops(body))  # tokenised here, as the native routes do
        return await respond(request, body, "/v1/chat/completions", adapter, key, [prompt], chat=True)

    def chat_prompt(messages: list[ChatMessage], adapter: str | None, info: dict[str, Any],
                    ends: tuple[str, ...]) -> Completion:
        turns = [(m.role, _text(m, i)) for i, m in enumerate(messages)]
        for i, (_, text) in enumerate(turns):
            check_chars(text, f"messages[{i}].content")
        task = info.get("task") or ("translate" if info.get("src_lang") and info.get("tgt_lang") else None)
        if adapter is not None and task in TASKS:  # rule 1: the prompt the adapter was trained with
            said = [(role, text) for role, text in turns if role in ("user", "assistant")]
            if not said or said[-1][0] != "user":
                raise ApiError(422, "no_user_message", f"adapter {adapter!r} answers the last user message with its "
                               f"task ({task}); the conversation must end with a user message", param="messages")
            src = info.get("src_lang") or "en"
            tgt = info.get("tgt_lang") or src
            try:
                if task == "translate":  # as /v1/translate prompts it
                    ids, one_line = scheduler.runner.translator.decoding_parts(said[-1][1], src, tgt)
                else:  # as /v1/generate prompts it; a dialogue gets the turns so far
                    source: Any = [text for _, text in said] if task == "dialogue" else said[-1][1]
                    ids, one_line = scheduler.runner.generator.decoding_parts(source, adapter, task, src, tgt)
            except SourceTooLong as error:
                raise ApiError(422, "text_too_long", str(error), param="messages") from None
            except (AdapterError, ValueError) as error:
                raise ApiError(422, "bad_chat", f"the messages cannot be prompted for adapter {adapter!r} "
                               f"({task}): {error}", param="messages") from None
            return Completion(list(ids), "line" if one_line else "tidy", ends)
        if getattr(tokenizer, "chat_template", None):  # rule 2
            text = tokenizer.apply_chat_template([{"role": role, "content": text} for role, text in turns],
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes the special tokens
        else:  # rule 3
            users = [text for role, text in turns if role == "user"]
            if not users:
                raise ApiError(422, "no_user_message", "the tokenizer has no chat template, so the last user message "
                               "is the prompt; send one", param="messages")
            ids = tokenizer(users[-1])["input_ids"]
        if not ids:
            raise ApiError(422, "empty_prompt", "the messages encode to no tokens; send some text", param="messages")
        return Completion(list(ids), "raw", ends)

    # -- vLLM's adapter management ---------------------------------------------------------------
    def allowed_source(path_text: str) -> Path:
        """The file or peft directory `lora_path` names, if it is inside the store or an --adapter-dir once
        symlinks are resolved; never a hint about paths elsewhere (the check comes before any look at them)."""
        root = Path(os.path.realpath(catalog.store.root))
        candidate = Path(path_text)
        resolved = Path(os.path.realpath(candidate if candidate.is_absolute() else root / candidate))
        allowed = [root, *(Path(os.path.realpath(d)) for d in settings.adapter_dir)]
        if not any(resolved.is_relative_to(folder) for folder in allowed):
            raise ApiError(403, "path_not_allowed", f"lora_path {path_text!r} is outside the adapter store and the "
                           "directories the service allows (--adapter-dir; symlinks are resolved before the check): "
                           "copy it into one of them, or upload it with POST /v1/adapters", param="lora_path")
        if not resolved.exists():
            raise ApiError(404, "adapter_file_not_found", f"nothing at lora_path {path_text!r}", param="lora_path")
        return resolved

    @app.post("/v1/load_lora_adapter", tags=["OpenAI"])
    async def load_lora_adapter(body: LoadLora) -> dict[str, Any]:
        """vLLM's: the adapter at `lora_path` — an adaptkit file of any family (LoRA, AdaLoRA, prefix, bottleneck)
        or a peft adapter directory (converted) — is checked like an upload and installed in the store as
        `lora_name`; it loads into memory at its first request, like every adapter of the store. Loading the same
        adapter again under its name changes nothing (vLLM's reload after an unload)."""
        name = body.lora_name
        try:
            if name in (base, model.backbone_id):
                raise BadAdapterName(f"{name!r} is the backbone's model id")
            target = catalog.installable(name)
        except BadAdapterName as error:
            raise ApiError(400, "bad_adapter_name", str(error), param="lora_name") from None
        source = allowed_source(body.lora_path)
        if source == Path(os.path.realpath(target)):  # already the store's file of that name
            entry = await asyncio.to_thread(catalog.refresh_one, name)
            if entry is not None and entry.error is None:
                return {"status": "loaded", "lora_name": name, "model": card(entry, set(model.adapters))}
        try:
            # a scratch file of the store holding the adapter: a copy of the file, or the directory converted
            stack, scratch = await asyncio.to_thread(_scratch_copy, catalog, model, source, name)
        except BadAdapterName as error:
            raise ApiError(400, "bad_adapter_name", str(error), param="lora_name") from None
        except AdapterError as error:
            raise ApiError(422, "invalid_adapter_file", f"lora_path {body.lora_path!r} was refused, nothing was "
                           f"written: {error}", param="lora_path") from None
        with stack:
            if not body.load_inplace and target.exists() and await asyncio.to_thread(_same_adapter, scratch, target):
                entry = await asyncio.to_thread(catalog.refresh_one, name)
                if entry is not None and entry.error is None:
                    return {"status": "loaded", "lora_name": name, "model": card(entry, set(model.adapters))}
            try:
                entry = await scheduler.call_exclusive(
                    lambda: catalog.install(model, scratch, name, body.load_inplace), changes=name)
            except BadAdapterName as error:
                raise ApiError(400, "bad_adapter_name", str(error), param="lora_name") from None
            except AdapterExists:
                raise ApiError(409, "adapter_exists", f"an adapter named {name!r} is in the store, another one; "
                               "pass load_inplace=true to replace it", param="lora_name") from None
            except AdapterError as error:
                raise ApiError(422, "invalid_adapter_file", f"lora_path {body.lora_path!r} was refused, nothing "
                               f"was written: {error}", param="lora_path") from None
        return {"status": "loaded", "lora_name": name, "model": card(entry, set(model.adapters))}

    @app.post("/v1/unload_lora_adapter", tags=["OpenAI"])
    async def unload_lora_adapter(body: UnloadLora) -> dict[str, Any]:
        """vLLM's: the adapter leaves memory once its running rows finish. Its file stays in the store, so it is
        still listed and its next request loads it again; DELETE /v1/adapters/{name} removes the file."""
        name = body.lora_name
        entry = await known_entry(name)
        await scheduler.call_exclusive(lambda: None, changes=name)
        return {"status": "unloaded", "lora_name": name, "model": card(entry, set(model.adapters))}


# -- helpers ----------------------------------------------------------------------------------------

def _refuse_unsupported(body: _Sampling) -> None:
    """Fields OpenAI SDKs send at their neutral values pass; any other value is refused by name."""
    neutral: list[tuple[str, bool, str]] = [
        ("frequency_penalty", body.frequency_penalty in (None, 0), "penalties are not applied"),
        ("presence_penalty", body.presence_penalty in (None, 0), "penalties are not applied"),
        ("logit_bias", not body.logit_bias, "logits are not biased"),
    ]
    if isinstance(body, CompletionRequest):
        neutral += [("logprobs", body.logprobs is None, "the continuous batch keeps no token probabilities"),
                    ("echo", not body.echo, "send the prompt back yourself"),
                    ("best_of", body.best_of in (None, 1) or body.best_of == (body.n or 1),
                     "ask for n answers instead"),
                    ("suffix", not body.suffix, "insertion is not supported")]
    if isinstance(body, ChatRequest):
        neutral += [("logprobs", not body.logprobs, "the continuous batch keeps no token probabilities"),
                    ("top_logprobs", not body.top_logprobs, "the continuous batch keeps no token probabilities"),
                    ("tools", not body.tools, "tool calls are not supported"),
                    ("tool_choice", body.tool_choice in (None, "none"), "tool calls are not supported"),
                    ("response_format", body.response_format in (None, {"type": "text"}),
                     "only text answers are supported")]
    for field, ok, why in neutral:
        if not ok:
            raise ApiError(400, "unsupported_parameter", f"{field}={getattr(body, field)!r} is not supported by "
                           f"adaptkit's OpenAI routes ({why}); leave it out", param=field)


def _text(message: ChatMessage, index: int) -> str:
    if message.role not in ("system", "developer", "user", "assistant"):
        raise ApiError(400, "unsupported_parameter", f"messages[{index}] has role {message.role!r}; the roles are "
                       "system, developer, user and assistant (tool calls are not supported)", param="messages")
    if message.tool_calls:
        raise ApiError(400, "unsupported_parameter", f"messages[{index}] carries tool_calls; tool calls are not "
                       "supported", param="messages")
    if isinstance(message.content, list):
        other = [part.type for part in message.content if part.type != "text"]
        if other:
            raise ApiError(400, "unsupported_parameter", f"messages[{index}] holds {other[0]!r} content; only text "
                           "is supported", param="messages")
        return "".join(part.text or "" for part in message.content)
    return message.content or ""


def _same_adapter(source: Path, target: Path) -> bool:
    """Whether two adapter files hold the same adapter (the checksum in their headers), without reading them whole."""
    try:
        checksum = read_adapter_info(source, verify=False).get("sha256")
        return checksum is not None and checksum == read_adapter_info(target, verify=False).get("sha256")
    except AdapterError:
        return False


def _scratch_copy(catalog: AdapterCatalog, model: AdaptedModel, source: Path, name: str
                  ) -> tuple[contextlib.ExitStack, Path]:
    """A scratch file of the store holding the adapter at `source` (a copy of the file, or the peft directory
    converted by `catalog.converted_peft`), made in a worker thread and handed back open with the stack that removes
    it (unless `install` moved it into place meanwhile)."""
    with contextlib.ExitStack() as stack:
        if source.is_dir():
            path = stack.enter_context(catalog.converted_peft(model, read_peft_dir(source), name))
        else:
            fd, path = stack.enter_context(scratch_file(catalog.store.root))
            with open(source, "rb") as handle, os.fdopen(os.dup(fd), "wb") as out:
                shutil.copyfileobj(handle, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())  # the rename that installs it must not outlive its bytes
        return stack.pop_all(), path
