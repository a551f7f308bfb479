"""Backbones: insightface key layout (strict load), shapes, registry, image scaling."""

from __future__ import annotations

import pytest
import torch

from model.backbones import NETWORKS, get_model, normalize_images
from model.backbones.iresnet import LAYERS


def _bn(name: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (channels,), f"{name}.bias": (channels,),
            f"{name}.running_mean": (channels,), f"{name}.running_var": (channels,),
            f"{name}.num_batches_tracked": ()}


def insightface_iresnet_layout(layers: tuple[int, ...], embedding: int = 512) -> dict:
    """Key -> shape of insightface's iresnet state_dict, written out from its documented layout:
    conv1/bn1/prelu stem; layerS.B.{bn1,conv1,bn2,prelu,conv2,bn3,downsample.0/.1} blocks
    (first block of every stage strides by 2 and has a downsample); bn2, fc, features."""
    keys = {"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64), "prelu.weight": (64,)}
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}."
            cin = inplanes if block == 0 else planes
            keys |= _bn(p + "bn1", cin)
            keys[p + "conv1.weight"] = (planes, cin, 3, 3)
            keys |= _bn(p + "bn2", planes)
            keys[p + "prelu.weight"] = (planes,)
            keys[p + "conv2.weight"] = (planes, planes, 3, 3)
            keys |= _bn(p + "bn3", planes)
            if block == 0:
                keys[p + "downsample.0.weight"] = (planes, cin, 1, 1)
                keys |= _bn(p + "downsample.1", planes)
        inplanes = planes
    keys |= _bn("bn2", 512)
    keys |= {"fc.weight": (embedding, 512 * 7 * 7), "fc.bias": (embedding,)}
    keys |= _bn("features", embedding)
    return keys


def test_r18_strict_loads_insightface_layout() -> None:
    layout = insightface_iresnet_layout((2, 2, 2, 2))
    assert len(layout) == 187
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(7) if k.endswith("num_batches_tracked")
                 else torch.randn(shape, generator=generator)) for k, shape in layout.items()}
    model = get_model("r18")
    assert list(model.state_dict()) == list(layout)  # same order as insightface's module order
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.layer3[0].downsample[0].weight, state["layer3.0.downsample.0.weight"])
    assert torch.equal(model.features.running_var, state["features.running_var"])


def test_r18_forward_shape_channels_last_and_autocast() -> None:
    model = get_model("r18", embedding_size=128).eval()
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        out = model(x)
        out_cl = model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model(x)
    assert out.shape == (2, 128)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(out_bf16).all()
    assert not model.features.weight.requires_grad  # insightface freezes the embedding BN scale


def test_mbf_layout_and_shape() -> None:
    model = get_model("mbf").eval()
    state = model.state_dict()
    expected = {
        "layers.0.layers.0.weight": (128, 3, 3, 3),
        "layers.1.layers.0.weight": (128, 2, 3, 3),  # depthwise-ish conv with groups=64
        "layers.2.layers.0.layers.0.weight": (128, 128, 1, 1),
        "layers.3.layers.0.layers.2.layers.1.running_var": (128,),
        "conv_sep.layers.2.weight": (512,),
        "features.layers.0.layers.0.weight": (512, 1, 7, 7),
        "features.layers.2.weight": (512, 512),
        "features.layers.3.running_mean": (512,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    clone = get_model("mbf")
    clone.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert clone.eval()(torch.zeros(1, 3, 112, 112)).shape == (1, 512)


def test_registry() -> None:
    assert set(NETWORKS) == {"r18", "r34", "r50", "r100", "r200", "mbf"}
    assert LAYERS[100] == (3, 13, 30, 3)
    with pytest.raises(ValueError, match="unknown network"):
        get_model("r42")


def test_normalize_images() -> None:
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1)
    y = normalize_images(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
    cl = torch.zeros(2, 3, 4, 4, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    assert normalize_images(cl).is_contiguous(memory_format=torch.channels_last)
    already_float = torch.full((1, 3, 1, 1), 255.0)
    normalize_images(already_float)
    assert already_float.eq(255.0).all()  # the input is never modified


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_normalize_straight_into_the_compute_dtype_rounds_once(dtype: torch.dtype) -> None:
    """Every uint8 value comes out as the fp32 result rounded once (what autocast fed the
    first conv before), without the fp32 copy."""
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(normalize_images(x, dtype), normalize_images(x).to(dtype))
