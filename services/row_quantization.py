"""Make a dynamically quantized ONNX model safe to batch: activations quantized per batch row.

Int8 models made with onnxruntime's dynamic quantization (Moonshine's shipped files are) pick the
scale of each activation tensor from its minimum and maximum over the *whole* tensor: batch rows
then change each other's rounding. With Moonshine's decoder, one in ten transcripts changed
when decoded in a batch of eight. This rewrite computes the same quantization parameters per
batch row instead (``DynamicQuantizeLinear``'s formulas, row by row), multiplies in integers as
before, and corrects for the row's zero point, so a row's result no longer depends on the other
rows: measured bit-identical to the original model on a single row, and a batched row
bit-identical to the same row decoded alone.

It costs ~20 small operators per quantized product, so the original model stays the faster choice
for a batch of one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import InvalidArgument, NotFound

_ROW_AXES = "rowq/axes"
_ZERO = "rowq/zero"
_QMAX = "rowq/qmax"
_ONE = "rowq/one"


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise NotFound(f"batched decoding needs the onnx package ({exc}); pip install onnx") from exc
    return onnx


def load_as_onnx(path: Path) -> Any:
    """``path`` (ONNX or ORT format) as an ``onnx.ModelProto``: onnxruntime loads it without
    optimising and writes it back out as ONNX (the only way to edit an .ort file)."""
    import onnxruntime as ort

    onnx = _onnx()
    with tempfile.TemporaryDirectory(prefix="rowq-") as tmp:
        out = Path(tmp) / "model.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(str(out))


def per_row_quantization(model: Any) -> int:
    """Rewrite ``model`` in place: every ``DynamicQuantizeLinear`` (and the one inside each
    ``DynamicQuantizeMatMul``) quantizes each batch row on its own. Activations must be 3-D
    ([batch, positions, features]) and weights quantized per tensor. Returns how many
    quantizations were rewritten (0: nothing to do)."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    top = model.graph
    initializers: dict[str, Any] = {}

    def index(graph: Any) -> None:
        for init in graph.initializer:
            initializers[init.name] = init
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    index(attr.g)

    index(top)
    for name, value in ((_ROW_AXES, np.array([1, 2], np.int64)), (_ZERO, np.array(0.0, np.float32)),
                        (_QMAX, np.array(255.0, np.float32)), (_ONE, np.array(1.0, np.float32))):
        top.initializer.append(numpy_helper.from_array(value, name))
    quantized: dict[str, tuple[str, str, str]] = {}  # original quantized output -> row versions
    count = [0]  # for unique names
    rewritten = [0]

    def quantize(x: str) -> tuple[list[Any], str, str, str]:
        """DynamicQuantizeLinear per row: uint8 values, float scale and int32 zero point per row."""
        count[0] += 1
        rewritten[0] += 1
        p = f"rowq/{count[0]}/"
        n = helper.make_node
        nodes = [
            n("ReduceMin", [x, _ROW_AXES], [p + "min"], keepdims=1),
            n("ReduceMax", [x, _ROW_AXES], [p + "max"], keepdims=1),
            n("Min", [p + "min", _ZERO], [p + "lo"]),  # the range always includes 0
            n("Max", [p + "max", _ZERO], [p + "hi"]),
            n("Sub", [p + "hi", p + "lo"], [p + "range"]),
            n("Div", [p + "range", _QMAX], [p + "step"]),
            n("Equal", [p + "hi", p + "lo"], [p + "flat"]),
            n("Where", [p + "flat", _ONE, p + "step"], [p + "scale"]),  # all zeros: scale 1
            n("Div", [p + "lo", p + "scale"], [p + "lo_steps"]),
            n("Neg", [p + "lo_steps"], [p + "zp_float"]),
            n("Clip", [p + "zp_float", _ZERO, _QMAX], [p + "zp_clipped"]),
            n("Round", [p + "zp_clipped"], [p + "zp"]),
            n("Div", [x, p + "scale"], [p + "scaled"]),
            n("Round", [p + "scaled"], [p + "rounded"]),
            n("Add", [p + "rounded", p + "zp"], [p + "shifted"]),
            n("Clip", [p + "shifted", _ZERO, _QMAX], [p + "clipped"]),
            n("Cast", [p + "clipped"], [p + "q"], to=TensorProto.UINT8),
            n("Cast", [p + "zp"], [p + "zp_int"], to=TensorProto.INT32),
        ]
        return nodes, p + "q", p + "scale", p + "zp_int"

    def matmul(graph: Any, row: tuple[str, str, str], weight: str, w_scale: str, w_zero: str,
               bias: str, out: str) -> list[Any]:
        """(q - zp) @ (W - w_zp) * scale * w_scale (+ bias), with the row's zero point applied as
        a correction (MatMulInteger takes one zero point for a whole 3-D input)."""
        q, scale, zp = row
        if weight not in initializers or w_zero not in initializers:
            raise InvalidArgument(f"quantized weight {weight} is not a constant: cannot batch this model")
        w = numpy_helper.to_array(initializers[weight]).astype(np.int64)
        w_zp = numpy_helper.to_array(initializers[w_zero]).astype(np.int64)
        if w.ndim != 2 or w_zp.size != 1:
            raise InvalidArgument(f"weight {weight} is not quantized per tensor: cannot batch this model")
        count[0] += 1
        p = f"rowq/{count[0]}/"
        colsum = p + "colsum"
        graph.initializer.append(numpy_helper.from_array((w - w_zp).sum(axis=0).astype(np.int32), colsum))
        n = helper.make_node
        nodes = [
            n("MatMulInteger", [q, weight, "", w_zero], [p + "acc"]),
            n("Mul", [zp, colsum], [p + "zp_part"]),
            n("Sub", [p + "acc", p + "zp_part"], [p + "exact"]),
            n("Cast", [p + "exact"], [p + "float"], to=TensorProto.FLOAT),
            n("Mul", [scale, w_scale], [p + "scale"]),
        ]
        if bias:
            nodes += [n("Mul", [p + "float", p + "scale"], [p + "product"]),
                      n("Add", [p + "product", bias], [out])]
        else:
            nodes.append(n("Mul", [p + "float", p + "scale"], [out]))
        return nodes

    def rewrite(graph: Any) -> None:
        nodes: list[Any] = []
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    attr.g.name = attr.g.name or f"{node.name}/{attr.name}"  # ONNX requires one
                    rewrite(attr.g)
            ins = list(node.input)
            if node.op_type == "DynamicQuantizeLinear":
                new, q, scale, zp = quantize(ins[0])
                nodes += new
                quantized[node.output[0]] = (q, scale, zp)
            elif node.op_type == "MatMulIntegerToFloat":
                if ins[0] not in quantized:
                    raise InvalidArgument(f"{node.name}: input not from DynamicQuantizeLinear: cannot batch")
                bias = ins[6] if len(ins) > 6 else ""
                nodes += matmul(graph, quantized[ins[0]], ins[1], ins[3], ins[5], bias, node.output[0])
            elif node.op_type == "DynamicQuantizeMatMul":
                new, q, scale, zp = quantize(ins[0])
                bias = ins[4] if len(ins) > 4 else ""
                nodes += new + matmul(graph, (q, scale, zp), ins[1], ins[2], ins[3], bias, node.output[0])
            else:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)

    rewrite(top)
    return rewritten[0]
