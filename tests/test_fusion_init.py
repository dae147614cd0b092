"""AG-CNN's fusion head initialised from the branch heads (agcnn.fusion_init): before any fusion
training the fusion logits are the mean of the branches' (branches), the global branch's
(global), or PyTorch's random init (random, the paper's literal head); the trainer applies it once
when the fusion stage starts fresh, not on resume."""
from __future__ import annotations

import pytest
import torch

from medattn.config import load_config
from medattn.errors import ConfigError
from medattn.methods import DataSpec, create_method
from medattn.methods.agcnn import init_fusion_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _method(how: str):
    cfg = load_config("demo", ["model.weights=none", "data.image_size=32", "data.resize=32",
                               "agcnn.crop_source=input", f"agcnn.fusion_init={how}"])
    names = tuple(f"c{i}" for i in range(5))
    return create_method(cfg, DataSpec(names, names, "multilabel", 1, 32))


@pytest.mark.parametrize("how", ["branches", "global", "random"])
def test_fusion_head_starts_from_the_branches(how):
    torch.manual_seed(0)
    meth = _method(how)
    model = meth.build_model().eval()
    before = model.fusion.weight.detach().clone()
    meth.init_stage(model, "local")  # only the fusion stage touches the head
    assert torch.equal(model.fusion.weight, before)
    meth.init_stage(model, "fusion")
    batch = {"image": torch.randn(3, 1, 32, 32), "view_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(3, 4)}
    with torch.no_grad():
        out = meth.forward(model, batch, "fusion")
    g, loc, f = out["global"], out["local"], out["fusion"]
    if how == "branches":
        torch.testing.assert_close(f, (g + loc) / 2, atol=1e-5, rtol=1e-5)
    elif how == "global":
        torch.testing.assert_close(f, g, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(model.fusion.weight, before)
        assert not torch.allclose(f, (g + loc) / 2, atol=1e-3)


def test_fusion_init_errors():
    with pytest.raises(ConfigError, match="agcnn.fusion_init"):
        _method("average")
    meth = _method("branches")
    with pytest.raises(ConfigError, match="expected random, branches or global"):
        init_fusion_head(meth.build_model(), "average")
