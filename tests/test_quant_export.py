"""Low-bit export: bit packing, the safetensors file, and a rebuilt model with the same logits."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import kdtoolkit_plugins.quantizers.hwgq as hwgq_plugin
import kdtoolkit_plugins.quantizers.lsq as lsq_plugin
from kdtoolkit.plugins import load_registry
from kdtoolkit.quant import (
    LayerOverride,
    PrequantizedWeight,
    export_quantized,
    load_exported,
    pack_bits,
    quantize_model,
    quantized_layers,
    read_export_metadata,
    unpack_bits,
)
from kdtoolkit_plugins.quantizers.hwgq import HWGQOptions, HWGQQuantizer
from kdtoolkit_plugins.quantizers.lsq import LSQOptions, LSQQuantizer


class Net(nn.Module):
    def __init__(self, width=16, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.hidden = nn.Linear(2 * width, 2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.body(F.relu(self.bn0(self.stem(x))))
        return self.head(F.relu(self.hidden(x.mean(dim=(2, 3)))))


def build(meta):
    return Net(width=meta["width"], num_classes=meta["num_classes"])


def trained(quantizer, *, steps=5, **kwargs):
    torch.manual_seed(0)
    model = Net(width=16)
    quantize_model(model, quantizer, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip_and_size(bits):
    for n in (1, 7, 8, 9, 1000, 4099):
        codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
        assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_bit_order_is_lsb_first():
    assert pack_bits(torch.tensor([0, 1, 2, 3], dtype=torch.uint8), 2).tolist() == [0b11100100]
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0b10000001, 1]
    # 3-bit codes 5, 3, 7 -> stream 101 110 111 (LSB first) -> bytes 0b11_011_101, 0b0000_0001
    assert pack_bits(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0b11011101, 0b00000001]
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)


QUANTIZERS = {
    "hwgq": lambda: HWGQQuantizer(HWGQOptions(weight_bits=2, act_bits=2)),
    "lsq": lambda: LSQQuantizer(LSQOptions(weight_bits=2, act_bits=2)),
    "lsq-per-channel": lambda: LSQQuantizer(LSQOptions(weight_bits=2, act_bits=2, per_channel=True)),
}


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_exported_2bit_model_reproduces_logits_and_is_small(name, tmp_path):
    model = trained(QUANTIZERS[name](), weight_bits=2, act_bits=2)
    meta = {"width": 16, "num_classes": 10}
    sizes = export_quantized(model, tmp_path / "m.safetensors", meta)
    assert sizes["quantized_ratio"] <= 0.1
    assert sizes["quantized_weights"] <= sizes["quantized_weights_float32"] / 10
    loaded = load_exported(tmp_path / "m.safetensors", build, quantizer=QUANTIZERS[name]())
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert (expected - got).abs().max() <= 1e-5
    for path, layer in quantized_layers(loaded).items():
        original = quantized_layers(model)[path]
        assert isinstance(layer.weight_quantizer, PrequantizedWeight)
        assert torch.equal(layer.weight, original.quantized_weight())  # bit-exact dequantization


def test_file_layout_and_metadata(tmp_path):
    model = trained(HWGQQuantizer(), weight_bits=2, act_bits=2, overrides=[LayerOverride("hidden", weight_bits=4)])
    path = tmp_path / "m.safetensors"
    export_quantized(model, path, {"width": 16, "num_classes": 10, "arch": "Net"})
    # a safetensors file: 8-byte header length, JSON header, raw little-endian tensor data (no pickle)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header["q:body.0.weight:codes"]["dtype"] == "U8"
    assert header["q:body.0.weight:codes"]["shape"] == [16 * 16 * 9 * 2 // 8]
    assert header["q:hidden.weight:codes"]["shape"] == [32 * 32 * 4 // 8]
    assert header["stem.weight"]["dtype"] == "F32" and header["head.weight"]["dtype"] == "F32"
    assert "body.0.weight" not in header  # stored as codes only
    meta = read_export_metadata(path)
    assert meta["architecture"] == {"width": 16, "num_classes": 10, "arch": "Net"}
    assert meta["quantization"]["quantizer"] == "hwgq"
    assert meta["quantization"]["layers"]["hidden"] == [4, 2]
    assert meta["quantization"]["layers"]["stem"] == [32, 32]
    assert meta["weights"]["body.0.weight"]["bits"] == 2
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "kdtoolkit.quantized"
        codes = f.get_tensor("q:body.0.weight:codes")
        scale = f.get_tensor("q:body.0.weight:scale")
    # decode by hand from the documented layout and compare with the model's quantized weight
    offset = meta["weights"]["body.0.weight"]["offset"]
    bits_lsb_first = np.unpackbits(codes.numpy(), bitorder="little").reshape(-1, 2)
    ints = bits_lsb_first[:, 0] + 2 * bits_lsb_first[:, 1]
    weight = (torch.from_numpy(ints.astype(np.float32)) + offset) * scale
    assert torch.equal(weight.view(16, 16, 3, 3), model.body[0].quantized_weight())


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_other_bit_widths_and_binary_weights_round_trip(bits, tmp_path):
    for quantizer in (
        HWGQQuantizer(HWGQOptions(binary_weights="mean_abs")),
        HWGQQuantizer(),
        LSQQuantizer(LSQOptions(per_channel=True)),
    ):
        model = trained(quantizer, steps=2, weight_bits=bits, act_bits=max(bits, 2))
        path = tmp_path / f"{bits}.safetensors"
        export_quantized(model, path, {"width": 16, "num_classes": 10})
        loaded = load_exported(path, build, quantizer=quantizer)
        x = torch.randn(8, 3, 8, 8)
        with torch.no_grad():
            assert (model(x) - loaded(x)).abs().max() <= 1e-5


def test_quantizer_rebuilt_by_name_from_a_registry_and_re_export(tmp_path):
    registry = load_registry(load_entrypoints=False, plugins=[hwgq_plugin, lsq_plugin])
    model = trained(LSQQuantizer(LSQOptions(weight_bits=2, act_bits=3)))
    export_quantized(model, tmp_path / "a.safetensors", {"width": 16, "num_classes": 10})
    loaded = load_exported(tmp_path / "a.safetensors", build, registry=registry)
    assert loaded.body[3].act_quantizer.bits == 3
    # a loaded model exports again to the same codes
    export_quantized(loaded, tmp_path / "b.safetensors", {"width": 16, "num_classes": 10})
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as a, safe_open(str(tmp_path / "b.safetensors"), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_wrong_architecture_or_unquantized_model_is_an_error(tmp_path):
    model = trained(HWGQQuantizer())
    export_quantized(model, tmp_path / "m.safetensors", {"width": 16, "num_classes": 10})
    with pytest.raises(ValueError):
        load_exported(tmp_path / "m.safetensors", lambda meta: Net(width=8), quantizer=HWGQQuantizer())
    with pytest.raises(ValueError, match="quantize_model"):
        export_quantized(Net(), tmp_path / "float.safetensors", {})
