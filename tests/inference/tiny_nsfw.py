"""A tiny NSFW classifier with Open-NSFW's interface, built in the test run (no weights to ship).

It "flags" red images: P(NSFW) = softmax of (0, 0.1 * (mean R - mean G) - 5.6) over the
mean-subtracted BGR input, so a solid red image scores ~1.0 and blue, white or grey ones ~0.004.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT, OUTPUT = "input_0", "probs"


def build_tiny_nsfw_model(path: Path, batch: int | str = "batch") -> Path:
    """Write the model to ``path`` and return it (``batch``: the input's first dimension, a name
    for any batch size or a fixed number)."""
    # (N, 224, 224, 3) BGR-mean -> mean over H, W -> (N, 3) -> logits (N, 2) -> softmax
    weight = np.array([[0.0, 0.0], [0.0, -0.1], [0.0, 0.1]], dtype=np.float32)  # rows: B, G, R
    # The means differ (G 117, R 123): undo them so the logit is 0.1 * (R - G) - 5.6.
    bias = np.array([0.0, 0.1 * (123.0 - 117.0) - 5.6], dtype=np.float32)
    axes = np.array([1, 2], dtype=np.int64)
    nodes = [
        helper.make_node("ReduceMean", [INPUT, "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "weight"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [OUTPUT], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_nsfw",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [batch, 224, 224, 3])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [batch, 2])],
        initializer=[numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias"),
                     numpy_helper.from_array(axes, "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="dallebot-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
