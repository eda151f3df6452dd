"""The OpenAI API of the service, spoken to by the real `openai` client against a live uvicorn server.

One server for the module (in this process, in a thread: `running` of test_serving_edges) over a tiny
llama with four adapters of the four families and an API key. Every answer is compared with the library
in this process: completions with `model.generate` on the raw prompt ids (greedy), chats with what
/v1/translate answers for the same text (rule 1 of openai_routes.py) or with `generate` on the chat
template's prompt (rule 2). Errors are checked as the client raises them.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import adaptkit as ak  # noqa: E402
from adaptkit.serving.app import create_app  # noqa: E402
from adaptkit.serving.openai_routes import base_model_id  # noqa: E402
from adaptkit.serving.settings import ServeSettings  # noqa: E402
from adaptkit.tasks.translate import Translator  # noqa: E402
from test_serving import build_store  # noqa: E402
from test_serving_edges import running  # noqa: E402
from tiny import random_lora_file  # noqa: E402

KEY = "openai-test-key-0123456789"
FAMILIES = {"en-de/lora": ak.LoRA(r=4, targets="all-linear"),
            "en-de/adalora": ak.AdaLoRA(init_r=4, target_r=2, total_steps=10),
            "en-de/prefix": ak.Prefix(length=3),
            "en-de/bottleneck": ak.Bottleneck(reduction=4, placement="houlsby")}
NAMES = list(FAMILIES)
PROMPTS = ["a1 a2 a3", "a4 a5", "a6 a7 a8 a9", "a10 a11"]


class Served:
    def __init__(self, url: str, app, store: Path, backbone: Path, reference: ak.AdaptedModel, allowed: Path):
        self.url, self.app, self.store, self.backbone = url, app, store, backbone
        self.reference, self.allowed = reference, allowed
        self.base = base_model_id(app.state.model)
        self.tokenizer = reference.tokenizer

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    def completion(self, prompt: str, adapter: str | None, max_tokens: int) -> tuple[str, int, int, str]:
        """The library's answer: (text, prompt tokens, completion tokens, finish reason) of greedy `generate` on the
        raw prompt."""
        ids, out = self.generated(prompt, adapter, max_tokens)
        finish = "stop" if out[-1] == self.tokenizer.eos_token_id else "length"
        return self.continuation(ids, out), len(ids), len(out), finish

    def generated(self, prompt: str, adapter: str | None, max_tokens: int) -> tuple[list[int], list[int]]:
        ids = self.tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = self.reference.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                          dtype=torch.long), adapter=adapter, max_new_tokens=max_tokens,
                                          do_sample=False)[0, len(ids):].tolist()
        if self.tokenizer.eos_token_id in out:  # generate pads a row after its eos
            out = out[:out.index(self.tokenizer.eos_token_id) + 1]
        return ids, out

    def continuation(self, ids: list[int], out: list[int]) -> str:
        decode = lambda seq: self.tokenizer.decode(seq, skip_special_tokens=True,  # noqa: E731
                                                   clean_up_tokenization_spaces=False)
        return decode(ids + out)[len(decode(ids)):]

    def translation(self, text: str, adapter: str, max_tokens: int) -> str:
        return Translator(self.reference).translate([text], "en", "de", adapter=adapter, num_beams=1,
                                                  max_new_tokens=max_tokens)[0]

    def adapter_file(self, folder: Path, name: str, seed: int) -> Path:
        return random_lora_file(self.backbone, folder, name, seed, "added")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        with self.http() as client:
            text = client.get("/metrics").text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("openai")
    backbone, store, reference = build_store(root, NAMES, list(FAMILIES.values()))
    allowed = root / "allowed"
    allowed.mkdir()
    # max_wait_ms: rows sent together join the continuous batch together, so the steps of the concurrent test mix
    settings = ServeSettings(max_wait_ms=100, adapter_dir=(str(allowed),), request_timeout_s=60)
    app = create_app(ak.load(backbone, store=store), settings=settings, api_keys=[KEY])
    with running(app, settings) as (_, port):
        yield Served(f"http://127.0.0.1:{port}", app, store, backbone, reference, allowed)


def test_models_list_the_backbone_and_every_adapter_as_the_store_changes(served, tmp_path):
    client = served.client()
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {served.base, *NAMES}
    assert models[served.base].model_extra["parent"] is None
    for name, config in FAMILIES.items():
        extra = models[name].model_extra
        assert (extra["parent"], extra["root"], extra["method"], extra["src_lang"], extra["tgt_lang"]) == (
            served.base, name, config.method, "en", "de")
        assert models[name].object == "model" and models[name].owned_by == "adaptkit" and models[name].created > 0
    assert client.models.retrieve(NAMES[0]).id == NAMES[0]

    uploaded = served.adapter_file(tmp_path, "up/loaded", seed=5)
    loaded = served.adapter_file(served.allowed, "allowed/file", seed=6)
    with served.http() as http:
        assert http.post("/v1/adapters", params={"name": "up/loaded"}, content=uploaded.read_bytes()).status_code == 201
        answer = http.post("/v1/load_lora_adapter", json={"lora_name": "vllm/style", "lora_path": str(loaded)})
        assert answer.status_code == 200, answer.text
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "vllm/style", "lora_path": str(loaded)}
                         ).status_code == 200  # the same file again: nothing changes
        listed = {m.id: m for m in client.models.list()}
        assert {"up/loaded", "vllm/style"} <= set(listed) and listed["vllm/style"].model_extra["parent"] == served.base
        text = client.completions.create(model="vllm/style", prompt="a1 a2", temperature=0, max_tokens=4).choices[0]
        served.reference.load_adapter(loaded, name="vllm/style")
        try:
            assert text.text == served.completion("a1 a2", "vllm/style", 4)[0]
        finally:
            served.reference.remove_adapter("vllm/style")
        assert listed["vllm/style"].model_extra["resident"] is False
        assert client.models.retrieve("vllm/style").model_extra["resident"] is True  # loaded by its first request
        unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "vllm/style"})
        assert unloaded.status_code == 200 and unloaded.json()["model"]["resident"] is False
        assert http.delete("/v1/adapters/up/loaded").status_code == 200
        assert http.delete("/v1/adapters/vllm/style").status_code == 200
    assert set(m.id for m in client.models.list()) == {served.base, *NAMES}


@pytest.mark.parametrize("adapter", [*NAMES, None])
def test_completion_equals_generate_on_the_raw_prompt(served, adapter):
    client = served.client()
    for prompt, max_tokens in (("a1 a2 a3", 6), ("a7 a3 a9 a9", 3)):
        result = client.completions.create(model=adapter or served.base, prompt=prompt, temperature=0,
                                           max_tokens=max_tokens)
        text, prompt_tokens, completion_tokens, finish = served.completion(prompt, adapter, max_tokens)
        choice = result.choices[0]
        assert (choice.text, choice.finish_reason) == (text, finish)
        assert result.object == "text_completion" and result.model == (adapter or served.base)
        assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
            prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
        assert prompt_tokens == len(served.tokenizer(prompt)["input_ids"])


def test_several_prompts_and_n_choices(served):
    result = served.client().completions.create(model=NAMES[1], prompt=PROMPTS[:2], temperature=0, max_tokens=4, n=2)
    expected = [served.completion(p, NAMES[1], 4) for p in PROMPTS[:2]]
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert [c.text for c in result.choices] == [expected[0][0]] * 2 + [expected[1][0]] * 2
    assert result.usage.prompt_tokens == expected[0][1] + expected[1][1]
    assert result.usage.completion_tokens == 2 * (expected[0][2] + expected[1][2])


@pytest.mark.parametrize("adapter", [NAMES[0], NAMES[2]])
def test_chat_stream_joins_to_the_answer_which_is_the_adapters_translation(served, adapter):
    client = served.client()
    messages = [{"role": "system", "content": "a translator"}, {"role": "user", "content": "a3 a1 a4"}]
    answer = client.chat.completions.create(model=adapter, messages=messages, temperature=0, max_tokens=8)
    content = answer.choices[0].message.content
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert content == served.translation("a3 a1 a4", adapter, 8)  # rule 1: the adapter's own (translation) prompt
    chunks = list(client.chat.completions.create(model=adapter, messages=messages, temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == answer.usage.model_dump()


def test_completion_stream_joins_to_the_answer(served):
    client = served.client()
    plain = client.completions.create(model=NAMES[2], prompt="a2 a9", temperature=0, max_tokens=7)
    chunks = list(client.completions.create(model=NAMES[2], prompt="a2 a9", temperature=0, max_tokens=7, stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_chat_on_the_backbone_uses_the_chat_template_else_the_last_user_message(served):
    client = served.client()
    messages = [{"role": "user", "content": "a5 a6"}, {"role": "assistant", "content": "b5"},
                {"role": "user", "content": "a8 a2"}]
    answer = client.chat.completions.create(model=served.base, messages=messages, temperature=0, max_tokens=5)
    assert answer.choices[0].message.content == served.completion("a8 a2", None, 5)[0]  # rule 3
    tokenizer = served.app.state.model.tokenizer
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    try:
        answer = client.chat.completions.create(model=served.base, messages=messages, temperature=0, max_tokens=5)
    finally:
        tokenizer.chat_template = None
    ids = served.tokenizer("<s>a5 a6 b5 a8 a2 ", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = served.reference.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                        dtype=torch.long), adapter=None, max_new_tokens=5, do_sample=False)
    assert answer.choices[0].message.content == served.continuation(ids, out[0, len(ids):].tolist())  # rule 2
    assert answer.usage.prompt_tokens == len(ids)


def test_eight_concurrent_calls_over_four_families_share_steps_with_a_native_request(served):
    before = served.metrics()

    async def scenario() -> tuple[list, httpx.Response]:
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        calls = []
        for i, name in enumerate(NAMES):
            calls.append(client.completions.create(model=name, prompt=PROMPTS[i], temperature=0, max_tokens=8))
            calls.append(client.chat.completions.create(model=name, temperature=0, max_tokens=8,
                                                        messages=[{"role": "user", "content": PROMPTS[3 - i]}]))
        async with httpx.AsyncClient(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as http:
            native = http.post("/v1/translate", json={"texts": ["a9 a8"], "src_lang": "en", "tgt_lang": "de",
                                                      "adapter": NAMES[0], "max_new_tokens": 8})
            *answers, translated = await asyncio.gather(*calls, native)
        await client.close()
        return answers, translated

    answers, translated = asyncio.run(scenario())
    for i, name in enumerate(NAMES):
        assert answers[2 * i].choices[0].text == served.completion(PROMPTS[i], name, 8)[0], name
        assert answers[2 * i + 1].choices[0].message.content == served.translation(PROMPTS[3 - i], name, 8), name
    assert translated.json()["translations"] == [served.translation("a9 a8", NAMES[0], 8)]
    after = served.metrics()

    def mixed(samples: dict) -> float:  # steps (or generate calls) that held rows of more than one adapter
        return (samples.get(("adaptkit_batch_adapters_count", ()), 0)
                - samples.get(("adaptkit_batch_adapters_bucket", (("le", "1.0"),)), 0))
    assert mixed(after) > mixed(before)
    for name in NAMES:  # tokens per adapter counted; running and waiting rows listed per resident adapter
        assert after[("adaptkit_generated_tokens_total", (("adapter", name),))] > before.get(
            ("adaptkit_generated_tokens_total", (("adapter", name),)), 0)
        assert after[("adaptkit_running_rows", (("adapter", name),))] == 0
        assert after[("adaptkit_waiting_rows", (("adapter", name),))] == 0
    assert after[("adaptkit_time_to_first_token_seconds_count", ())] >= 9
    assert after[("adaptkit_inter_token_seconds_count", ())] > before.get(("adaptkit_inter_token_seconds_count", ()),
                                                                           0)


def test_stop_sequences_cut_the_answer_and_the_stream(served):
    client = served.client()
    full = served.completion("a1 a2 a3", NAMES[0], 8)[0]
    words = full.split()
    assert len(words) >= 3, full
    stop = f" {words[2]}"
    expected = full[:full.index(stop)]
    result = client.completions.create(model=NAMES[0], prompt="a1 a2 a3", temperature=0, max_tokens=8,
                                       stop=[stop, "never written"])
    assert result.choices[0].text == expected and result.choices[0].finish_reason == "stop"
    ids, out = served.generated("a1 a2 a3", NAMES[0], 8)
    written = next(k for k in range(1, len(out) + 1) if stop in served.continuation(ids, out[:k]))
    assert result.usage.completion_tokens == written < len(out)  # decoding ended at the token that wrote the stop
    chunks = list(client.completions.create(model=NAMES[0], prompt="a1 a2 a3", temperature=0, max_tokens=8,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_sampling_is_seeded_and_gives_n_answers(served):
    client = served.client()
    ask = dict(model=NAMES[2], prompt="a1 a2", temperature=1.5, top_p=0.9, max_tokens=6, n=3, seed=7)
    first, second = client.completions.create(**ask), client.completions.create(**ask)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # three samples, not one answer three times
    assert 3 <= first.usage.completion_tokens <= 3 * 6


def test_errors_are_the_clients_exceptions(served):
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        served.client("wrong-key-0123456789abcdef").models.list()
    assert wrong_key.value.type == "authentication_error" and wrong_key.value.code == "unauthorized"
    client = served.client()
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="en-de/nope", prompt="a1", max_tokens=2)
    assert (unknown.value.code, unknown.value.param) == ("model_not_found", "model")
    assert "GET /v1/models" in unknown.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="../etc/passwd", messages=[{"role": "user", "content": "a1"}])
    with pytest.raises(openai.BadRequestError) as logprobs:
        client.completions.create(model=NAMES[0], prompt="a1", max_tokens=2, logprobs=2)
    assert logprobs.value.param == "logprobs" and "not supported" in logprobs.value.message
    with pytest.raises(openai.UnprocessableEntityError) as too_long:
        client.completions.create(model=NAMES[0], prompt="a1", max_tokens=100_000)
    assert too_long.value.code == "max_new_tokens_too_large"
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.completions.create(model=NAMES[0], prompt="a1", temperature=9)
    assert invalid.value.param == "temperature"
    with served.http() as http:  # the native routes keep their own shape
        native = http.post("/v1/translate", json={"texts": ["a1"], "src_lang": "en", "tgt_lang": "de",
                                                  "adapter": "en-de/nope"}).json()["error"]
    assert set(native) == {"code", "message"}


def test_load_lora_adapter_takes_files_only_from_the_store_or_an_allowed_directory(served, tmp_path):
    outside = served.adapter_file(tmp_path, "outside/file", seed=8)
    link = served.allowed / "link.safetensors"
    os.symlink(outside, link)
    with served.http() as http:
        for path in (str(outside), str(link), "../" * 8 + str(outside).lstrip("/"),
                     str(served.allowed / ".." / outside.parent.name / outside.name)):
            answer = http.post("/v1/load_lora_adapter", json={"lora_name": "sneaky", "lora_path": path})
            error = answer.json()["error"]
            assert answer.status_code == 403 and error["code"] == "path_not_allowed", answer.text
            assert error["param"] == "lora_path" and "--adapter-dir" in error["message"]
        assert not (served.store / "sneaky.safetensors").exists()
        missing = http.post("/v1/load_lora_adapter", json={"lora_name": "gone", "lora_path": "no/such.safetensors"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_file_not_found"
        # a file of the store, under another name: copied
        copied = http.post("/v1/load_lora_adapter", json={"lora_name": "copy/of-lora",
                                                          "lora_path": f"{NAMES[0]}.safetensors"})
        assert copied.status_code == 200, copied.text
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "never/there"}).status_code == 404
        assert http.delete("/v1/adapters/copy/of-lora").status_code == 200


def test_greedy_rows_in_generate_calls_answer_as_in_the_continuous_batch(served):
    """--no-continuous: "complete" rows run in static generate calls, ended by the engine's rule (eos, budget, stop
    strings) by a watcher that also streams their tokens; the answers are the same."""
    settings = ServeSettings(continuous=False, max_wait_ms=50)
    app = create_app(ak.load(served.backbone, store=served.store), settings=settings)
    with running(app, settings) as (_, port):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="no-keys-here", max_retries=0,
                               timeout=60)
        for name in NAMES:
            result = client.completions.create(model=name, prompt=PROMPTS[:2], temperature=0, max_tokens=6)
            expected = [served.completion(prompt, name, 6) for prompt in PROMPTS[:2]]
            assert [(c.text, c.finish_reason) for c in result.choices] == [(e[0], e[3]) for e in expected], name
            assert result.usage.completion_tokens == sum(e[2] for e in expected)
        full = served.completion("a1 a2 a3", NAMES[0], 8)[0]
        stop = f" {full.split()[2]}"
        chunks = list(client.completions.create(model=NAMES[0], prompt="a1 a2 a3", temperature=0, max_tokens=8,
                                                stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"
        chat = client.chat.completions.create(model=NAMES[1], messages=[{"role": "user", "content": "a3 a1 a4"}],
                                              temperature=0, max_tokens=8)
        assert chat.choices[0].message.content == served.translation("a3 a1 a4", NAMES[1], 8)


def test_load_lora_adapter_takes_a_peft_directory_and_answers_as_peft(served):
    """vLLM's usual call: a peft LoRA directory saved by peft itself; the answers equal PeftModel's (greedy)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)  # init_lora_weights=False: random B, so the adapter changes the answers
    reference = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(served.backbone), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    reference.save_pretrained(str(served.allowed / "peft-lora"))
    with served.http() as http:
        loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "peft/lora",
                                                          "lora_path": str(served.allowed / "peft-lora")})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["model"]["method"] == "lora"
        again = http.post("/v1/load_lora_adapter", json={"lora_name": "peft/lora",
                                                         "lora_path": str(served.allowed / "peft-lora")})
        assert again.status_code == 200, again.text  # the same adapter again: nothing changes
        try:
            changed = False
            for prompt in PROMPTS[:3]:
                answer = served.client().completions.create(model="peft/lora", prompt=prompt, temperature=0,
                                                            max_tokens=6).choices[0].text
                ids = served.tokenizer(prompt)["input_ids"]
                with torch.no_grad():
                    out = reference.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(
                        1, len(ids), dtype=torch.long), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
                if served.tokenizer.eos_token_id in out:
                    out = out[:out.index(served.tokenizer.eos_token_id) + 1]
                assert answer == served.continuation(ids, out), prompt
                changed |= answer != served.completion(prompt, None, 6)[0]
            assert changed  # the adapter, not the bare backbone, answered
        finally:
            assert http.delete("/v1/adapters/peft/lora").status_code == 200
