"""Write a (quantized or float) image classifier as an ONNX model that onnxruntime runs on the CPU.

The model is traced with ``torch.fx`` (quantized ``QConv2d``/``QLinear`` layers are leaves) and each
node is written as ONNX operators by the small table below: conv, linear, batch norm (eval
statistics), ReLU, pooling, flatten, add/mul/cat, dropout/identity. Anything else is refused with a
message naming the node, never exported wrong. Quantized layers get their low-bit weights and
activation ``QuantizeLinear``/``DequantizeLinear`` pairs from :mod:`kdtoolkit.onnx_quant`; float
layers (the first and last by default) stay float.

Opset 25 (the first with ``INT2``/``UINT2``). Linear layers are written as ``Gemm(transB=1)`` on
the dequantized weight, never ``MatMul``: onnxruntime 1.31's default graph optimisations turn
``DequantizeLinear(INT2/INT4 weight) -> MatMul`` into a kernel that returns wrong values (measured:
errors up to 0.09 on a 16x8 layer; exact with optimisations off or with ``Gemm``). A quantized
layer's bias is a separate ``Add``: given to ``Gemm``/``Conv`` between ``DequantizeLinear`` inputs,
onnxruntime's QDQ bias transformer (even at the basic level) requantizes it to int32 with scale
``act_scale·weight_scale``, which at 2 bits moved logits by 0.02.
"""

from __future__ import annotations

import operator
import os
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from kdtoolkit.onnx_quant import OnnxExportError, emit_act_quant, emit_weight

OPSET = 25
IR_VERSION = 11
INPUT = "input"
OUTPUT = "logits"


def require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise OnnxExportError("ONNX export needs the onnx package: pip install 'kdtoolkit[onnx]'") from None


class GraphBuilder:
    """Collects ONNX nodes and initializers with unique names."""

    def __init__(self):
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.names: set[str] = set()

    def unique(self, base: str) -> str:
        name, i = base or "t", 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def add_initializer(self, tensor) -> str:
        self.initializers.append(tensor)
        return tensor.name

    def const(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        return self.add_initializer(numpy_helper.from_array(np.ascontiguousarray(value), self.unique(base)))

    def param(self, base: str, tensor: torch.Tensor) -> str:
        return self.const(base, tensor.detach().to(torch.float32).cpu().numpy())

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        from onnx import helper

        out = self.unique(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.unique(f"{base}/{op}"), **attrs))
        return out


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from kdtoolkit.quant.layers import QuantLayer

        return isinstance(m, QuantLayer) or super().is_leaf_module(m, qualname)


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _conv(g: GraphBuilder, x: str, m: nn.Conv2d, path: str, weight: str, bias: list[str]) -> str:
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise OnnxExportError(f"{path}: conv padding {m.padding!r}/{m.padding_mode!r} is not supported by the ONNX exporter")
    pads = _pair(m.padding)
    return g.node("Conv", [x, weight] + bias, path, strides=_pair(m.stride), pads=pads + pads, dilations=_pair(m.dilation),
                  group=m.groups, kernel_shape=list(m.kernel_size))


def _linear(g: GraphBuilder, x: str, m: nn.Linear, path: str, weight: str, bias: list[str]) -> str:
    return g.node("Gemm", [x, weight] + bias, path, transB=1)  # not MatMul: see the module docstring


def _layer(g: GraphBuilder, x: str, m: nn.Module, path: str, sizes: dict[str, int]) -> str:
    """A conv/linear layer, quantized or float."""
    act_q = getattr(m, "act_quantizer", None)
    weight_q = getattr(m, "weight_quantizer", None)
    if act_q is not None:
        x = emit_act_quant(g, x, act_q, path)
    if weight_q is not None:
        weight, s = emit_weight(g, m, path)
        for k, v in s.items():
            sizes[k] = sizes.get(k, 0) + v
    else:
        weight = g.param(f"{path}.weight", m.weight)
    emit = _conv if isinstance(m, nn.Conv2d) else _linear
    if m.bias is None:
        return emit(g, x, m, path, weight, [])
    if act_q is None and weight_q is None:
        return emit(g, x, m, path, weight, [g.param(f"{path}.bias", m.bias)])
    # a quantized layer's bias is a separate Add: inside the op, onnxruntime's QDQ transformers
    # would requantize it to int32 on the grid act_scale·weight_scale (coarse at 2 bits)
    out = emit(g, x, m, path, weight, [])
    bias = m.bias.detach().view(-1, 1, 1) if isinstance(m, nn.Conv2d) else m.bias.detach()
    return g.node("Add", [out, g.param(f"{path}.bias", bias)], f"{path}.bias_add")


def _module(g: GraphBuilder, x: str, m: nn.Module, path: str, sizes: dict[str, int]) -> str:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        return _layer(g, x, m, path, sizes)
    if isinstance(m, nn.BatchNorm2d):
        if m.running_mean is None:
            raise OnnxExportError(f"{path}: batch norm without running statistics cannot be exported")
        scale = m.weight if m.weight is not None else torch.ones_like(m.running_mean)
        bias = m.bias if m.bias is not None else torch.zeros_like(m.running_mean)
        inputs = [x, g.param(f"{path}.weight", scale), g.param(f"{path}.bias", bias),
                  g.param(f"{path}.running_mean", m.running_mean), g.param(f"{path}.running_var", m.running_var)]
        return g.node("BatchNormalization", inputs, path, epsilon=float(m.eps))
    if isinstance(m, nn.ReLU):
        return g.node("Relu", [x], path)
    if isinstance(m, (nn.Dropout, nn.Identity)):
        return x  # eval mode
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != [1, 1]:
            raise OnnxExportError(f"{path}: only AdaptiveAvgPool2d(1) is supported by the ONNX exporter")
        return g.node("GlobalAveragePool", [x], path)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        if getattr(m, "ceil_mode", False) or _pair(getattr(m, "dilation", 1)) != [1, 1]:
            raise OnnxExportError(f"{path}: pooling with ceil_mode or dilation is not supported by the ONNX exporter")
        pads = _pair(m.padding)
        stride = _pair(m.stride if m.stride is not None else m.kernel_size)
        attrs = {"kernel_shape": _pair(m.kernel_size), "strides": stride, "pads": pads + pads}
        if isinstance(m, nn.AvgPool2d):
            attrs["count_include_pad"] = int(m.count_include_pad)
            if m.divisor_override:
                raise OnnxExportError(f"{path}: AvgPool2d divisor_override is not supported by the ONNX exporter")
        return g.node("MaxPool" if isinstance(m, nn.MaxPool2d) else "AveragePool", [x], path, **attrs)
    if isinstance(m, nn.Flatten):
        if m.end_dim != -1:
            raise OnnxExportError(f"{path}: Flatten(end_dim={m.end_dim}) is not supported by the ONNX exporter")
        return g.node("Flatten", [x], path, axis=m.start_dim)
    raise OnnxExportError(f"{path}: module {type(m).__name__} has no ONNX translation in kdtoolkit's exporter")


_BINARY = {operator.add: "Add", operator.iadd: "Add", torch.add: "Add", operator.mul: "Mul", torch.mul: "Mul"}
_RELU = (torch.relu, torch.nn.functional.relu, torch.relu_)


def _function(g: GraphBuilder, node: torch.fx.Node, env: dict[str, str]) -> str:
    target = node.target
    where = node.name

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return env[a.name]
        raise OnnxExportError(f"{where}: constant operand {a!r} of {getattr(target, '__name__', target)} is not supported by the ONNX exporter")

    if target in _BINARY:
        return g.node(_BINARY[target], [arg(node.args[0]), arg(node.args[1])], where)
    if target in _RELU:
        return g.node("Relu", [arg(node.args[0])], where)
    if target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if end != -1:
            raise OnnxExportError(f"{where}: torch.flatten(end_dim={end}) is not supported by the ONNX exporter")
        return g.node("Flatten", [arg(node.args[0])], where, axis=start)
    if target is torch.cat:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return g.node("Concat", [arg(a) for a in node.args[0]], where, axis=dim)
    if target is torch.nn.functional.adaptive_avg_pool2d and _pair(node.args[1]) == [1, 1]:
        return g.node("GlobalAveragePool", [arg(node.args[0])], where)
    name = getattr(target, "__name__", str(target))
    raise OnnxExportError(f"{where}: {name} has no ONNX translation in kdtoolkit's exporter (supported: conv, linear, "
                          "batch norm, relu, pooling, flatten, add, mul, cat, dropout)")


def build_onnx(model: nn.Module, *, in_channels: int | None = None, producer: str = "kdtoolkit"):
    """The ``onnx.ModelProto`` of ``model`` (put in eval mode), input ``input`` ``(N, C, H, W)``
    float32, output ``logits``. Returns ``(model_proto, sizes)``."""
    require_onnx()
    import onnx
    from onnx import TensorProto, helper

    from kdtoolkit.quant.model import _unwrap

    model = _unwrap(model).eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx cannot trace data-dependent control flow
        raise OnnxExportError(f"{type(model).__name__}: cannot be traced for ONNX export ({exc})") from None
    modules = dict(model.named_modules())
    if in_channels is None:
        first = next((m for m in modules.values() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise OnnxExportError("cannot tell the input's channel count (no conv layer): pass in_channels")
        in_channels = first.in_channels
    g = GraphBuilder()
    g.names.update({INPUT, OUTPUT})
    env: dict[str, str] = {}
    sizes: dict[str, int] = {}
    output = None
    with torch.no_grad():
        for node in graph.nodes:
            if node.op == "placeholder":
                if env:
                    raise OnnxExportError(f"{type(model).__name__}.forward takes more than one input")
                env[node.name] = INPUT
            elif node.op == "call_module":
                env[node.name] = _module(g, env[node.args[0].name], modules[node.target], node.target, sizes)
            elif node.op == "call_function":
                env[node.name] = _function(g, node, env)
            elif node.op == "call_method" and node.target in ("relu", "relu_"):
                env[node.name] = g.node("Relu", [env[node.args[0].name]], node.name)
            elif node.op == "call_method" and node.target == "flatten":
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                env[node.name] = g.node("Flatten", [env[node.args[0].name]], node.name, axis=start)
            elif node.op == "output":
                out = node.args[0]
                if not isinstance(out, torch.fx.Node):
                    raise OnnxExportError(f"{type(model).__name__}.forward must return one tensor (the logits)")
                output = env[out.name]
            else:
                raise OnnxExportError(f"{node.name}: {node.op} {node.target!r} has no ONNX translation in kdtoolkit's exporter")
    g.nodes.append(helper.make_node("Identity", [output], [OUTPUT], name="logits/Identity"))
    graph_proto = helper.make_graph(
        g.nodes, type(model).__name__,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", in_channels, "H", "W"])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", None])],
        g.initializers,
    )
    proto = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer)
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return proto, sizes


def export_onnx(model: nn.Module, path: str | os.PathLike, *, in_channels: int | None = None, metadata: dict[str, str] | None = None) -> dict[str, int]:
    """Write ``model`` to ``path`` as ONNX; returns sizes in bytes (``file``, and for quantized
    models ``quantized_weight_bytes`` / ``float32_weight_bytes`` of the quantized layers)."""
    import onnx

    proto, sizes = build_onnx(model, in_channels=in_channels)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, os.fspath(path))
    return {"file": os.path.getsize(path), **sizes}
