"""Our EfficientNet-Lite0 against timm's, and what loading a model imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from anomaly_dask.backbones import build_backbone, resolve_weights
from anomaly_dask.efficientnet_lite import EfficientNetLite0

from .conftest import REPO


def _timm_lite0() -> torch.nn.Module:
    import timm  # a test dependency only: the package builds the network itself

    return timm.create_model("efficientnet_lite0", pretrained=False)


@pytest.mark.parametrize("seed", [0, 7])
def test_names_shapes_and_seeded_weights_are_timms(seed):
    torch.manual_seed(seed)
    ours = EfficientNetLite0().state_dict()
    torch.manual_seed(seed)
    theirs = _timm_lite0().state_dict()
    assert list(ours) == list(theirs)
    assert len(ours) == 296
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        assert torch.equal(ours[name], theirs[name]), name


def test_imagenet_outputs_equal_timms():
    _, state = resolve_weights("efficientnet_lite0", "imagenet")
    ours, theirs = EfficientNetLite0().eval(), _timm_lite0().eval()
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    x = torch.randn(2, 3, 75, 97, generator=torch.Generator().manual_seed(1))  # odd sizes: padding
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        stages_ours = ours.blocks[:5](ours.bn1(ours.conv_stem(x)))
        stages_theirs = theirs.blocks[:5](theirs.bn1(theirs.conv_stem(x)))
    assert torch.equal(stages_ours, stages_theirs)
    # and the dense backbone built from it gives the stages of the full network
    backbone = build_backbone("efficientnet_lite0", state)
    with torch.no_grad():
        _, deepest = backbone.forward_dense(x)
    assert torch.equal(deepest, stages_ours)


def test_loading_a_lite0_backbone_imports_neither_timm_nor_torchvision_nor_sklearn():
    code = (
        "import sys\n"
        "from anomaly_dask import AnomalyDetector\n"
        "from anomaly_dask.backbones import build_backbone, resolve_weights\n"
        "build_backbone('efficientnet_lite0', resolve_weights('efficientnet_lite0', 'imagenet')[1])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'timm', 'torchvision', 'sklearn'}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
