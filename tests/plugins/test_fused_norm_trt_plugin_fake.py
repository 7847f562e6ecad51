"""The TensorRT plugin's Python side against a stand-in ``tensorrt.plugin`` (no TensorRT here).

What this verifies without TensorRT: the functions registered for both namespaces accept
the attributes as TensorRT's ONNX parser hands them (string fields with a trailing NUL,
onnx/onnx-tensorrt#921), the build-time launch limits (int32 element count, grid size) on
static shapes and on an optimization profile's largest shape at autotune, and that the JIT
implementation launches on the calling thread's current device. The stand-in defines only
names the real ``tensorrt.plugin`` (10.9+) has. Not verified here: TensorRT calling these
functions (tests/plugins/test_fused_norm_trt_plugin.py, skipped without TensorRT and a GPU).
"""

from __future__ import annotations

import types

import pytest
from bnexport_plugins.fused_norm import launch, spec, tensorrt_plugin
from bnexport_plugins.fused_norm.checks import check_inputs

from bnexport.errors import PluginError


class _Expr(int):
    """A constant ``tensorrt.plugin.ShapeExpr`` stand-in."""

    is_fake = False
    is_constant = True

    def constant_value(self) -> int:
        return int(self)

    def __mul__(self, o):
        return _Expr(int(self) * int(o))

    def __floordiv__(self, o):
        return _Expr(int(self) // int(o))


class _Exprs(list):
    def numel(self):
        out = 1
        for d in self:
            out *= int(d)
        return _Expr(out)


def _desc(shape, dtype="f32", max_shape=None):
    """A TensorDesc stand-in; ``max_shape`` gives it autotune's concrete (dynamic) Shape."""
    desc = types.SimpleNamespace(
        dtype=dtype, ndim=len(shape), shape_expr=_Exprs(_Expr(d) for d in shape)
    )
    desc.like = lambda: desc
    desc.has_shape = max_shape is not None
    if max_shape is not None:
        desc.shape = types.SimpleNamespace(is_dynamic=True, max=tuple(max_shape))
    return desc


def _fake_modules():
    registered: dict[tuple[str, str], object] = {}

    def decorator(kind):
        def outer(plugin_id):
            def inner(fn):
                registered[kind, plugin_id] = fn
                return fn

            return inner

        return outer

    trt = types.SimpleNamespace(float32="f32", float16="f16", bfloat16="bf16")
    trtp = types.SimpleNamespace(
        register=decorator("register"),
        autotune=decorator("autotune"),
        aot_impl=decorator("aot_impl"),
        impl=decorator("impl"),
        TensorDesc=object,
        KernelLaunchParams=lambda: types.SimpleNamespace(
            grid_x=1, grid_y=1, grid_z=1, block_x=1, block_y=1, block_z=1
        ),
        SymIntExprs=types.SimpleNamespace(from_tuple=list),
        SymInt32=int,
        AutoTuneCombination=lambda io, fmt, tactics: (io, fmt, tactics),
        from_shape_expr=lambda shape, dtype: ("desc", tuple(shape), dtype),
        cdiv=lambda a, b: _Expr(-(-int(a) // int(b))),
        max=lambda a, b: _Expr(max(int(a), int(b))),
    )
    return trt, trtp, registered


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.setattr(tensorrt_plugin, "ptx_for_plugin", lambda: b"ptx")
    trt, trtp, registered = _fake_modules()
    tensorrt_plugin._register(trt, trtp, spec.PLUGIN_NAMESPACE, with_stats=False)
    tensorrt_plugin._register(trt, trtp, spec.PLUGIN_NAMESPACE_STATS, with_stats=True)
    return trt, trtp, registered


def _parser_attrs(**overrides):
    """Attributes as TensorRT's ONNX parser passes them: strings NUL-terminated."""
    attrs = {k: v for k, v in spec.node_attributes(**overrides).items() if k != "plugin_namespace"}
    return {k: (v + "\x00" if isinstance(v, str) else v) for k, v in attrs.items()}


def test_validate_attributes_strips_the_parsers_nul():
    attrs = {**spec.ATTRIBUTE_DEFAULTS, "mode": "batch_stats\x00", "activation": b"relu\x00"}
    out = spec.validate_attributes(attrs)
    assert out["mode"] == "batch_stats" and out["activation"] == "relu"


@pytest.mark.parametrize(
    "namespace,overrides",
    [
        (spec.PLUGIN_NAMESPACE, {"activation": "silu"}),
        (spec.PLUGIN_NAMESPACE_STATS, {"mode": "batch_stats", "return_stats": 1}),
    ],
)
def test_registered_functions_accept_nul_terminated_strings(plugin, namespace, overrides):
    _, _, registered = plugin
    plugin_id = f"{namespace}::{spec.OP_TYPE}"
    x, c = _desc((2, 8, 4, 4)), _desc((8,))
    attrs = _parser_attrs(**overrides)
    out = registered["register", plugin_id](x, c, c, **attrs)
    assert (out if isinstance(out, tuple) else (out,))[0] is x
    combos = registered["autotune", plugin_id](x, c, c, **attrs, outputs=())
    assert combos[0][2] == [int(t) for t in tensorrt_plugin.Tactic]
    name, ptx, _, args = registered["aot_impl", plugin_id](
        x, c, c, **attrs, outputs=(), tactic=int(tensorrt_plugin.Tactic.THREADS_256)
    )
    assert name.startswith("fused_norm_") and ptx == b"ptx" and args


def test_static_shape_beyond_int32_elements_is_refused_at_build(plugin):
    _, _, registered = plugin
    c = _desc((64,))
    x = _desc((1 << 16, 64, 32, 32))  # 2**32 elements
    with pytest.raises(PluginError, match="at most 2147483647"):
        registered["register", f"{spec.PLUGIN_NAMESPACE}::FusedNorm"](x, c, c, **_parser_attrs())


def test_profile_max_beyond_limits_is_refused_at_autotune(plugin):
    """Dynamic batch: the profile's largest shape decides (element count, ghost-batch grid)."""
    _, _, registered = plugin
    plugin_id = f"{spec.PLUGIN_NAMESPACE_STATS}::FusedNorm"
    stats = _parser_attrs(mode="batch_stats", return_stats=1, virtual_batch_size=1)
    c = _desc((16,))
    ok = _desc((8, 16), max_shape=(4096, 16))
    registered["autotune", plugin_id](ok, c, c, **stats, outputs=())
    too_many_groups = _desc((8, 16), max_shape=(70000, 16))  # grid.y = N / vbs = 70000
    with pytest.raises(PluginError, match=r"grid\.y = 70000"):
        registered["autotune", plugin_id](too_many_groups, c, c, **stats, outputs=())
    big = _desc((8, 16, 4, 4), max_shape=(1 << 23, 16, 4, 4))  # 2**31 elements
    with pytest.raises(PluginError, match="at most 2147483647"):
        registered["autotune", f"{spec.PLUGIN_NAMESPACE}::FusedNorm"](
            big, c, c, **_parser_attrs(), outputs=()
        )


def test_aot_kernel_refuses_a_static_ghost_grid_beyond_cuda_limits():
    trt, trtp, _ = _fake_modules()
    attrs = spec.validate_attributes(
        {**spec.ATTRIBUTE_DEFAULTS, "mode": "batch_stats", "virtual_batch_size": 1}
    )
    x = _desc((70000, 8))  # channels-last rows path: grid (C/8, G = 70000)
    with pytest.raises(PluginError, match=r"grid\.y = 70000"):
        tensorrt_plugin.aot_kernel(trt, trtp, x, attrs, tensorrt_plugin.Tactic.THREADS_256)


def test_runtime_plan_checks_grid_limits():
    attrs = spec.validate_attributes(
        {**spec.ATTRIBUTE_DEFAULTS, "mode": "batch_stats", "virtual_batch_size": 1}
    )
    geo = check_inputs((70000, 8), "float32", (8,), (8,), attrs)
    for strategy, axis in (("split", "z"), ("fused", "y")):
        with pytest.raises(PluginError, match=rf"grid\.{axis} = 70000"):
            launch.plan(geo, "float32", attrs, 132, strategy)
    geo = check_inputs((65535, 8), "float32", (8,), (8,), attrs)
    assert launch.plan(geo, "float32", attrs, 132, "fused")  # the largest grid that fits


def test_jit_launch_runs_on_the_current_device(monkeypatch):
    """The JIT impl launches on the device TensorRT made current, not on device 0."""
    from bnexport_plugins.fused_norm import gpu_runtime

    import bnexport.cuda_api as cuda_api

    launched = []

    class FakeCuda:
        num_sms = 4

        def __init__(self, device):
            self.device = device

        def launch(self, p, bufs, stream):
            launched.append((self.device, stream, sorted(bufs)))

    monkeypatch.setattr(gpu_runtime, "FusedNormCuda", FakeCuda)
    monkeypatch.setattr(gpu_runtime, "_RUNTIMES", {}, raising=False)
    monkeypatch.setattr(
        cuda_api, "runtime", lambda: types.SimpleNamespace(cudaGetDevice=lambda: (0, 1))
    )
    monkeypatch.setattr(cuda_api, "driver", lambda: types.SimpleNamespace())
    trt = types.SimpleNamespace(float32="f32", float16="f16", bfloat16="bf16")
    tensor = lambda shape, ptr: types.SimpleNamespace(  # noqa: E731
        shape=shape, dtype="f32", data_ptr=ptr
    )
    attrs = spec.validate_attributes(dict(spec.ATTRIBUTE_DEFAULTS))  # affine: no workspace
    x = tensor((2, 8, 4, 4), 100)
    tensorrt_plugin.jit_launch(
        trt, x, tensor((8,), 200), tensor((8,), 300), [tensor((2, 8, 4, 4), 400)], attrs, 7
    )
    assert launched == [(1, 7, ["scale", "shift", "ws", "x", "y"])]


def test_registered_descriptors_declare_their_output_count(plugin):
    """``tensorrt.plugin`` counts a plugin's outputs from the return annotation of the
    registered function: one ``TensorDesc`` for ``bnexport``, three for ``bnexport_stats``;
    a node under the other namespace is refused naming the right one."""
    import inspect
    import typing

    _, trtp, registered = plugin
    one = registered["register", f"{spec.PLUGIN_NAMESPACE}::{spec.OP_TYPE}"]
    three = registered["register", f"{spec.PLUGIN_NAMESPACE_STATS}::{spec.OP_TYPE}"]
    assert inspect.signature(one).return_annotation is trtp.TensorDesc
    assert typing.get_args(inspect.signature(three).return_annotation) == (trtp.TensorDesc,) * 3
    x, c = _desc((4, 8, 2, 2)), _desc((8,))
    stats = _parser_attrs(mode="batch_stats", return_stats=1)
    with pytest.raises(PluginError, match=f"needs namespace {spec.PLUGIN_NAMESPACE_STATS}"):
        one(x, c, c, **stats)
    with pytest.raises(PluginError, match=f"use namespace {spec.PLUGIN_NAMESPACE}"):
        three(x, c, c, **_parser_attrs(mode="batch_stats"))
