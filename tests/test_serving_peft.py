"""peft adapter directories in the service's store, against a real uvicorn server on 127.0.0.1.

A LoRA (and an AdaLoRA) made by peft itself on a tiny Llama — weights randomised with a seed, so not
the identity — `save_pretrained`, packed as a tar and uploaded through `POST /v1/adapters`: a greedy
`/v1/generate` through the service then answers exactly what `PeftModel.generate` answers for the same
prompt ids (the prompt the service builds for the row, from `Generator.decoding_parts`). A prefix-tuning
directory installs too (its outputs equal the library's `import_peft`, not peft's `generate`: README,
"Limitations"), and so does a directory given to `adaptkit serve --adapter`. Tars that reach outside
(`..`, absolute names, links, devices), have too many members or unpack too large, and pickled
weights are refused with a JSON error naming the fix, leaving nothing in the store.
"""

from __future__ import annotations

import io
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
peft = pytest.importorskip("peft")

import transformers  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

import adaptkit as ak  # noqa: E402
from adaptkit.serving.app import create_app  # noqa: E402
from adaptkit.serving.catalog import AdapterCatalog  # noqa: E402
from adaptkit.serving.settings import ServeSettings  # noqa: E402
from adaptkit.tasks.generate import Generator  # noqa: E402
from adaptkit.tasks.oneline import tidy  # noqa: E402
from test_serving_edges import running  # noqa: E402
from test_train import WORDS  # noqa: E402
from tiny import VOCAB, tiny_model  # noqa: E402

SETTINGS = ServeSettings(max_wait_ms=0, max_unpacked_bytes=1 << 20, max_tar_members=6)
PROMPT = "a1 a2 a3 a4"
MAX_NEW_TOKENS = 8
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def every_id_a_word() -> transformers.PreTrainedTokenizerFast:
    """test_train's word-level tokenizer, with a word for every id the tiny model can emit: a text answer then
    shows every generated token (ids past the 65 words would decode to nothing and hide differences)."""
    words = list(WORDS) + [f"c{i}" for i in range(VOCAB - len(WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


@dataclass
class Served:
    url: str
    store: Path
    backbone: Path
    dirs: Path  # peft directories, made once per module

    def files(self) -> set[str]:
        """Everything in the store, scratch files and folders included."""
        return {p.relative_to(self.store).as_posix() for p in self.store.rglob("*")}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("peft")
    backbone, store = root / "backbone", root / "store"
    model = ak.AdaptedModel(tiny_model("llama"), every_id_a_word())
    model.model.save_pretrained(backbone)
    model.tokenizer.save_pretrained(backbone)
    app = create_app(ak.load(backbone, store=store), settings=SETTINGS)
    with running(app, SETTINGS) as (_, port):
        yield Served(f"http://127.0.0.1:{port}", store, backbone, root)


def base_model(served: Served) -> torch.nn.Module:
    """The served backbone's weights, as transformers loads them (peft wraps this copy in place)."""
    return transformers.AutoModelForCausalLM.from_pretrained(served.backbone).eval()


def peft_dir(served: Served, kind: str, seed: int) -> tuple[Path, peft.PeftModel]:
    """A peft adapter made and saved by peft itself, its weights random from `seed`; and the PeftModel."""
    configs = {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS, task_type="CAUSAL_LM"),
        "adalora": peft.AdaLoraConfig(init_r=3, target_r=2, total_step=10, lora_alpha=6.0,
                                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        "prefix": peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notices about a model without a Hub id
        model = peft.get_peft_model(base_model(served), configs[kind]).eval()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name or "prompt_encoder" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        out = served.dirs / f"{kind}-{seed}"
        model.save_pretrained(str(out))
    return out, model


def tar_of(directory: Path, folder: str | None, *, gzip: bool = False) -> bytes:
    """`directory` packed as `tar c` does: in a top folder, or its files at the top."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=f"{folder}/{path.name}" if folder else path.name)
    return buffer.getvalue()


def upload(served: Served, body: bytes, name: str | None = None, **headers: str) -> httpx.Response:
    params = {"name": name} if name else {}
    return httpx.post(f"{served.url}/v1/adapters", params=params, content=body, timeout=60,
                      headers={"Content-Type": "application/octet-stream", **headers})


def served_output(served: Served, adapter: str | None) -> str:
    answer = httpx.post(f"{served.url}/v1/generate", timeout=60, json={
        "prompts": [PROMPT], "adapter": adapter, "task": "dialogue", "num_beams": 1,
        "max_new_tokens": MAX_NEW_TOKENS})
    assert answer.status_code == 200, answer.text
    return answer.json()["outputs"][0]


def generate_as_the_service_prompts(model: torch.nn.Module, served: Served) -> str:
    """`model.generate`, greedy, on the prompt ids the service builds for PROMPT, tidied as it tidies."""
    library = ak.load(served.backbone)
    ids, one_line = Generator(library).decoding_parts(PROMPT, None, "dialogue", None, None)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                             pad_token_id=library.tokenizer.pad_token_id)
    return tidy(library.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True), one_line)


@pytest.mark.parametrize("kind, seed", [("lora", 5), ("adalora", 6)])  # seeds whose answers run 7-8 tokens
def test_peft_tar_uploaded_answers_as_peft_model_generate(served, kind, seed):
    directory, reference = peft_dir(served, kind, seed)
    answer = upload(served, tar_of(directory, f"peft-{kind}", gzip=kind == "adalora"))  # named by its folder
    assert answer.status_code == 201, answer.text
    assert answer.json()["name"] == f"peft-{kind}" and answer.json()["method"] == kind
    assert f"peft-{kind}.safetensors" in served.files() and not any(".tmp" in f for f in served.files())

    expected = generate_as_the_service_prompts(reference, served)
    assert served_output(served, f"peft-{kind}") == expected
    # the adapter changes the answer (random weights, not the identity), so the equality says something
    assert expected and expected != served_output(served, None)


def test_peft_lora_file_is_checksummed_and_records_its_origin(served):
    directory, _ = peft_dir(served, "lora", seed=6)
    assert upload(served, tar_of(directory, None), name="origin/lora").status_code == 201
    info = ak.read_adapter_info(served.store / "origin" / "lora.safetensors")  # verify=True: checksum matched
    assert info["verified"] and info["method"] == "lora" and info["name"] == "origin/lora"
    assert info["training"]["imported_from"]["peft_type"] == "LORA"
    assert info["backbone"]["id"] == ak.load(served.backbone).backbone_record()["id"]


def test_prefix_dir_installs_and_answers_as_the_library_import(served, tmp_path):
    """peft's prefix sits in its KV cache and shifts positions, so in generate only the library's own import is
    the reference (README, Limitations); the service must answer exactly that."""
    directory, _ = peft_dir(served, "prefix", seed=7)
    answer = upload(served, tar_of(directory, "peft-prefix"))  # the server warns (PeftImportWarning) in its log
    assert answer.status_code == 201 and answer.json()["method"] == "prefix", answer.text
    library = ak.load(served.backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = ak.import_peft(directory, library, name="prefix")
    expected = Generator(library).generate([PROMPT], adapter=name, task="dialogue", max_new_tokens=MAX_NEW_TOKENS)
    assert served_output(served, "peft-prefix") == expected[0]


def test_serve_adapter_takes_a_peft_directory(served, tmp_path, monkeypatch):
    """`adaptkit serve --adapter DIR`: converted into the store under the directory's name, then the server runs."""
    import adaptkit.serving.server as server_module
    from adaptkit.cli import main as cli

    directory, _ = peft_dir(served, "adalora", seed=8)
    ran = []
    monkeypatch.setattr(server_module, "configure_server",
                        lambda *args, **kwargs: type("Stub", (), {"run": lambda self: ran.append(True)})())
    store = tmp_path / "store"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["serve", "--backbone", str(served.backbone), "--store", str(store),
                    "--adapter", str(directory)]) == 0
    assert ran and ak.read_adapter_info(store / f"{directory.name}.safetensors")["method"] == "adalora"


def test_pickled_peft_weights_are_refused_with_the_way_to_resave(served, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    source, _ = peft_dir(served, "lora", seed=9)
    (directory / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle, never read")
    before = served.files()
    with pytest.raises(ak.AdapterError, match=r"pickle.*safe_serialization=True"):
        AdapterCatalog(ak.AdapterStore(served.store)).install_peft_dir(ak.load(served.backbone), directory)
    answer = upload(served, tar_of(directory, "pickled"))
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_peft_tar"
    assert "adapter_model.bin, a pickle file" in answer.json()["error"]["message"]
    assert "safe_serialization=True" in answer.json()["error"]["message"]
    assert served.files() == before


def member(name: str, data: bytes = b"{}", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    return info, io.BytesIO(data) if kind == tarfile.REGTYPE else None


def pax_member(name: str, **pax: str) -> tuple:
    info, data = member(name)
    info.pax_headers = pax
    return info, data


def raw_tar(*members: tuple, gzip: bool = False, pax: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w",
                      format=tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, data)
    return buffer.getvalue()


BAD_TARS = {
    "dotdot": (raw_tar(member("lora/../x"), member("lora/adapter_model.safetensors")), 422, "climbs out"),
    "absolute": (raw_tar(member("/tmp/adapter_config.json")), 422, "absolute name"),
    "symlink": (raw_tar(member("lora/adapter_config.json"),
                        member("lora/adapter_model.safetensors", kind=tarfile.SYMTYPE, link="/etc/passwd")),
                422, "is a symbolic link"),
    "hardlink": (raw_tar(member("lora/adapter_model.safetensors", kind=tarfile.LNKTYPE, link="/etc/passwd")),
                 422, "is a hard link"),
    "device": (raw_tar(member("lora/adapter_model.safetensors", kind=tarfile.CHRTYPE)), 422, "is a device"),
    "too_many": (raw_tar(*(member(f"lora/f{i}") for i in range(7))), 422, "more than 6 members"),
    "too_large": (raw_tar(member("lora/adapter_config.json"), member("lora/README.md", bytes(2 << 20)), gzip=True),
                  413, "more than 1,048,576 bytes"),
    # a member whose PAX header record is 3 MiB of gzip-compressed text: tarfile would read it whole into memory
    "pax_bomb": (raw_tar(pax_member("lora/adapter_config.json", comment="x" * (3 << 20)), gzip=True, pax=True),
                 413, "unpacks to more than"),
    "nested": (raw_tar(member("lora/deeper/adapter_config.json")), 422, "nested too deep"),
    "two_folders": (raw_tar(member("a/adapter_config.json"), member("b/adapter_model.safetensors")), 422,
                    "several places"),
    "not_a_tar": (b"\x1f\x8b" + bytes(64), 422, "cannot be read as a tar"),
}


@pytest.mark.parametrize("case", sorted(BAD_TARS))
def test_bad_tars_are_refused_and_leave_nothing(served, case):
    body, status, message = BAD_TARS[case]
    before = served.files()
    listed = httpx.get(f"{served.url}/v1/adapters", timeout=30).json()
    answer = upload(served, body, name="bad")
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == ("unpacked_too_large" if status == 413 else "invalid_peft_tar")
    assert message in error["message"] and "nothing was written" in error["message"]
    if status == 413:
        assert error["limit"] == {"name": "max_unpacked_bytes", "value": 1 << 20}
    assert served.files() == before
    assert httpx.get(f"{served.url}/v1/adapters", timeout=30).json() == listed


def test_a_tar_without_a_folder_needs_a_name(served):
    directory, _ = peft_dir(served, "lora", seed=10)
    before = served.files()
    answer = upload(served, tar_of(directory, None), **{"Content-Type": "application/x-tar"})
    assert answer.status_code == 422 and "pass ?name=" in answer.json()["error"]["message"]
    assert served.files() == before
