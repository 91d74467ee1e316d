"""TinyCLIP's image steps (mgcl.models.images) with torch and Pillow alone,
against torchvision's transforms where torchvision is installed: the same
crops, the same filters, the same random draws, so the same tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mgcl.models import images
from mgcl.models.tiny import TinyCLIP, TinyCLIPConfig

T = pytest.importorskip("torchvision.transforms")


def _pil(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("hw", [(64, 64), (50, 80), (97, 61), (20, 20)])
def test_eval_steps_match_torchvision_on_pil_and_tensors(hw):
    img = _pil(*hw)
    tens = images.as_image(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    for x in (img, tens):
        ours = images.center_crop(images.resize_shorter(x, 32), 32)
        theirs = T.CenterCrop(32)(T.Resize(32, antialias=True)(x))
        assert torch.equal(images.to_tensor(ours), T.ToTensor()(theirs) if not isinstance(x, torch.Tensor)
                           else theirs)


@pytest.mark.parametrize("hw", [(64, 64), (40, 90), (90, 30)])
@pytest.mark.parametrize("scale,ratio", [((0.8, 1.0), (0.9, 1.1)), ((0.08, 1.0), (3 / 4, 4 / 3)),
                                         ((0.99, 1.0), (5.0, 6.0))])  # the last: the central fallback
def test_random_resized_crop_draws_like_torchvision(hw, scale, ratio):
    img = _pil(*hw, seed=1)
    tens = images.as_image(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    for x in (img, tens):
        for seed in range(5):
            torch.manual_seed(seed)
            ours = images.random_resized_crop(x, 24, scale, ratio)
            after_ours = torch.rand(1)
            torch.manual_seed(seed)
            theirs = T.RandomResizedCrop(24, scale=scale, ratio=ratio, antialias=True)(x)
            assert torch.equal(after_ours, torch.rand(1))  # the same number of draws
            a = images.to_tensor(ours)
            b = theirs if isinstance(theirs, torch.Tensor) else T.ToTensor()(theirs)
            assert torch.equal(a, b)


def test_to_tensor_and_normalize_match_torchvision():
    img = _pil(17, 23, seed=2)
    assert torch.equal(images.to_tensor(img), T.ToTensor()(img))
    gray = img.convert("L")
    assert torch.equal(images.to_tensor(gray), T.ToTensor()(gray))
    x = torch.rand(3, 8, 8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    assert torch.equal(images.normalize(x, mean, std), T.Normalize(mean, std)(x.clone()))


def test_center_crop_of_a_too_small_image_is_one_clear_error():
    with pytest.raises(ValueError, match="smaller than"):
        images.center_crop(torch.zeros(3, 10, 12), 16)


@pytest.mark.parametrize("train", [False, True])
def test_tinyclip_transform_equals_the_torchvision_pipeline(train):
    """The transform TinyCLIP had with torchvision, step for step."""
    model = TinyCLIP(config=TinyCLIPConfig(image_size=32))
    s = model.config.image_size
    head = [T.RandomResizedCrop(s, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True)] if train \
        else [T.Resize(s, antialias=True), T.CenterCrop(s)]
    tv = T.Compose([images.as_image, *head, images.to_tensor, T.Normalize(model.MEAN, model.STD)])
    ours = model.transform(train)
    img = _pil(40, 48, seed=3)
    tens = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # uint8, as the demo's test split
    for x in (img, tens):
        torch.manual_seed(0)
        a = ours(x)
        torch.manual_seed(0)
        assert torch.equal(a, tv(x))
    from mgcl.cl.strategies.refdata import is_deterministic
    assert is_deterministic(ours) is (not train)
