import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import tiny.py and numerics.py


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it or was selected with -k.

    tiny_model() seeds its own construction, but adapters (LoRA's kaiming init, prefix and AdaLoRA's
    normal init) draw from the global generator; without this their weights would depend on test order.
    """
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def float64():
    """Models and adapters built inside the test are float64: for tests that call two computations the same.

    Rounding differences then sit ~1e-12 below the logits (numerics.py), so a bound derived from the
    computation can be tight and still never be reached by chance, on any CPU.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
