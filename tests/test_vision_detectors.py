"""Every registered detector builds offline and trains one step on tiny images, one of them without boxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch

from magral_core.config import Config
from magral_core.vision.detectors import DETECTORS, build_detector, detector_spec
from magral_core.vision.detectors.light_frcnn import MobileNetV2Backbone
from magral_core.vision.weights import MOBILENET_V2_FILE

WEIGHTS_DIR = Config.from_env().weights_dir  # where torchvision looks: $TORCH_HOME/hub/checkpoints


@pytest.fixture(autouse=True)
def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 48, 64, generator=gen), torch.rand(3, 40, 56, generator=gen)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 2.0, 60.0, 20.0]]),
         "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},  # no boxes
    ]
    return images, targets


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_builds_offline_and_trains_one_step(name: str, tmp_path: Path) -> None:
    model = build_detector(name, num_classes=2, image_size=64, weights_dir=tmp_path)  # no weight files there
    assert detector_spec(model).as_dict() == {"name": name, "num_classes": 2, "image_size": 64}
    model.train()
    images, targets = _batch()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and all(set(o) >= {"boxes", "scores", "labels"} for o in out)


def test_unknown_name_and_bad_class_count_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown detector 'nope'"):
        build_detector("nope", num_classes=2, image_size=64, weights_dir=tmp_path)
    with pytest.raises(ValueError, match="num_classes"):
        build_detector("frcnn_mobilenet_v2", num_classes=0, image_size=64, weights_dir=tmp_path)


def test_default_detector_loads_local_imagenet_weights_without_download() -> None:
    assert (WEIGHTS_DIR / MOBILENET_V2_FILE).is_file(), "the MobileNetV2 ImageNet file is expected here"
    model = build_detector("frcnn_mobilenet_v2", num_classes=3, image_size=64, weights_dir=WEIGHTS_DIR)
    state = torch.load(WEIGHTS_DIR / MOBILENET_V2_FILE, weights_only=True)
    backbone = model.get_submodule("backbone")
    assert isinstance(backbone, MobileNetV2Backbone)
    assert torch.equal(cast(Any, backbone).c4[0].conv[0][0].weight, state["features.7.conv.0.0.weight"])
    last = cast(Any, backbone).c5[-1].conv[-1]
    assert torch.equal(last.running_mean, state["features.17.conv.3.running_mean"])
    # the folded trunk computes what torchvision's pretrained MobileNetV2 (eval mode) computes
    from torchvision.models import mobilenet_v2

    reference = mobilenet_v2()
    reference.load_state_dict(state)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    expected = reference.eval().features[:7](x)
    assert torch.allclose(backbone.trunk_forward(x), expected, atol=1e-4)


def test_build_is_seeded_and_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=tmp_path, seed=5)
    after = torch.rand(1)
    b = build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=tmp_path, seed=5)
    assert torch.equal(before, after)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka


def test_trunk_is_frozen_and_tail_forward_matches_full_backbone(tmp_path: Path) -> None:
    model = build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=tmp_path)
    backbone = model.backbone
    assert isinstance(backbone, MobileNetV2Backbone)
    assert not any(p.requires_grad for p in backbone.trunk.parameters())
    assert all(p.requires_grad for p in backbone.c4.parameters())
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    backbone.train()  # frozen batch norm: train mode must not change the trunk's output
    full = backbone(x)
    cached = backbone.tail_forward(backbone.trunk_forward(x))
    assert list(full) == ["0", "1"]
    assert full["0"].shape == (2, 128, 4, 6) and full["1"].shape == (2, 128, 2, 3)  # strides 16 and 32
    for key in full:
        assert torch.allclose(full[key], cached[key])


def test_class_probs_are_softmax_rows_matching_scores(tmp_path: Path) -> None:
    model = build_detector("frcnn_mobilenet_v2", num_classes=3, image_size=64, weights_dir=tmp_path)
    cast(Any, model).roi_heads.score_thresh = 0.0  # random weights: keep every candidate
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(2))])[0]
    probs = out["class_probs"]
    assert len(out["scores"]) > 0 and probs.shape == (len(out["scores"]), 4)
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)))
    picked = probs.gather(1, out["labels"][:, None])[:, 0]
    assert torch.allclose(picked, out["scores"])


def test_folded_trunk_computes_what_conv_plus_frozen_batch_norm_computes() -> None:
    from torchvision.models import mobilenet_v2
    from torchvision.ops.misc import FrozenBatchNorm2d

    from magral_core.vision.detectors.light_frcnn import fold_frozen_batch_norm

    torch.manual_seed(0)
    plain = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d).features[:4]
    for module in plain.modules():  # non-trivial statistics, as pretrained ones are
        if isinstance(module, FrozenBatchNorm2d):
            module.weight.uniform_(0.5, 2.0)
            module.bias.uniform_(-1.0, 1.0)
            module.running_mean.uniform_(-1.0, 1.0)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, 32, 32)
    expected = plain(x)
    folded = fold_frozen_batch_norm(plain)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), expected, atol=1e-5)
