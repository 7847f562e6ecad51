"""The TensorRT plugin on a GPU: engines built from FusedNorm ONNX nodes (AOT path), and the
batch-statistics mode against TensorRT's own normalization layer over N, H, W."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from bnexport_plugins.fused_norm.reference import fused_norm
from fused_norm_graphs import fused_norm_model
from onnx import TensorProto

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.needs(
        "tensorrt",
        "cuda_gpu",
        unverified="plugin registration, AOT engine build/run and comparison with TensorRT's "
        "normalization layer",
    ),
]


def _run_engine(serialized: bytes, feeds: dict[str, np.ndarray], outputs: dict[str, tuple]) -> dict:
    import tensorrt as trt
    from bnexport_plugins.fused_norm.gpu_runtime import default_runtime

    rt = default_runtime()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(serialized)
    ctx = engine.create_execution_context()
    ptrs = {}
    try:
        for name, arr in feeds.items():
            ptrs[name] = rt.upload(arr)
            ctx.set_input_shape(name, arr.shape)
            ctx.set_tensor_address(name, ptrs[name])
        for name, (shape, dtype) in outputs.items():
            ptrs[name] = rt.alloc(int(np.prod(shape)) * np.dtype(dtype).itemsize)
            ctx.set_tensor_address(name, ptrs[name])
        assert ctx.execute_async_v3(0)
        rt.synchronize()
        return {n: rt.download(ptrs[n], s, d) for n, (s, d) in outputs.items()}
    finally:
        for p in ptrs.values():
            rt.free(p)


@pytest.mark.parametrize(
    "shape,attrs",
    [
        ((2, 16, 8, 8), {"activation": "silu"}),
        ((2, 8, 8, 16), {"axis": 3, "activation": "relu"}),
        ((8, 16, 4, 4), {"mode": "batch_stats", "virtual_batch_size": 2, "return_stats": 1}),
        ((4, 6, 5, 16), {"mode": "batch_stats", "axis": 3, "activation": "leaky_relu"}),
    ],
)
def test_engine_from_onnx_matches_reference(tmp_path, shape, attrs):
    from bnexport.runtime.trt_build import build_engine

    model = fused_norm_model(TensorProto.FLOAT, list(shape), **attrs)
    path = tmp_path / "fused_norm.onnx"
    onnx.save(model, path)
    engine = build_engine(path, tmp_path / "fused_norm.engine", prefer_aot=True)
    assert (tmp_path / "fused_norm.engine").stat().st_size == len(engine)
    rng = np.random.default_rng(0)
    c = shape[attrs.get("axis", 1)]
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    s, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    want = fused_norm(x, s, b, **attrs)
    want = want if isinstance(want, tuple) else (want,)
    names = ["y", "mean", "var"][: len(want)]
    got = _run_engine(
        engine,
        {"x": x, "scale": s, "shift": b},
        {n: (w.shape, w.dtype) for n, w in zip(names, want, strict=True)},
    )
    for n, w in zip(names, want, strict=True):
        np.testing.assert_allclose(got[n], w, rtol=1e-4, atol=1e-4)  # float32 kernel math


def test_batch_stats_plugin_vs_tensorrt_normalization_layer():
    import tensorrt as trt
    import tensorrt.plugin as trtp
    from bnexport_plugins.fused_norm import spec
    from bnexport_plugins.fused_norm.tensorrt_plugin import register_fused_norm_plugin

    register_fused_norm_plugin()
    n, c, h, w = 8, 16, 12, 12
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((n, c, h, w)) * 3 + 10).astype(np.float32)
    gamma, beta = (
        rng.standard_normal(c).astype(np.float32),
        rng.standard_normal(c).astype(np.float32),
    )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    xin = network.add_input("x", trt.float32, (n, c, h, w))
    # TensorRT's own layer: normalize over N, H, W (axes bitmask), per-channel scale/bias
    sc = network.add_constant((1, c, 1, 1), gamma.reshape(1, c, 1, 1)).get_output(0)
    bi = network.add_constant((1, c, 1, 1), beta.reshape(1, c, 1, 1)).get_output(0)
    norm = network.add_normalization(xin, sc, bi, (1 << 0) | (1 << 2) | (1 << 3))
    norm.epsilon = 1e-3
    norm.get_output(0).name = "y_trt"
    network.mark_output(norm.get_output(0))
    # the plugin (same numbers expected)
    s1 = network.add_constant((c,), gamma).get_output(0)
    b1 = network.add_constant((c,), beta).get_output(0)
    attrs = {
        k: v
        for k, v in spec.node_attributes(mode="batch_stats", epsilon=1e-3).items()
        if k != "plugin_namespace"
    }
    layer = network.add_plugin(trtp.op.bnexport.FusedNorm(xin, s1, b1, **attrs))
    layer.get_output(0).name = "y_plugin"
    network.mark_output(layer.get_output(0))
    config = builder.create_builder_config()
    engine = builder.build_serialized_network(network, config)
    assert engine is not None
    got = _run_engine(
        bytes(engine), {"x": x}, {"y_trt": (x.shape, np.float32), "y_plugin": (x.shape, np.float32)}
    )
    want = fused_norm(x, gamma, beta, mode="batch_stats", epsilon=1e-3)
    np.testing.assert_allclose(got["y_plugin"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["y_plugin"], got["y_trt"], rtol=1e-4, atol=1e-4)
