"""Launch plans (runtime and TensorRT AOT) against the kernels' real PTX signatures."""

from __future__ import annotations

import re
import types

import pytest
from bnexport_plugins.fused_norm import launch, spec
from bnexport_plugins.fused_norm.checks import check_inputs
from bnexport_plugins.fused_norm.nvrtc_build import DTYPE_SUFFIX


@pytest.fixture(scope="module")
def signatures(compiled):
    """kernel name -> list of PTX param types (u64 pointer / u32 int)."""
    ptx = compiled("compute_80", "ptx").image.decode()
    out = {}
    for name, params in re.findall(r"\.entry\s+(\w+)\(([^)]*)\)", ptx):
        out[name] = re.findall(r"\.param\s+\.(\w+)", params)
    return out


def _check(lnch: launch.Launch, signatures):
    want = signatures[lnch.kernel]
    got = ["u64" if a.kind in ("ptr", "null") else "u32" for a in lnch.args]
    assert got == want, lnch.kernel
    assert all(1 <= g < 2**31 for g in lnch.grid) and lnch.grid[1] < 65536 and lnch.grid[2] < 65536
    assert 32 <= lnch.block[0] * lnch.block[1] * lnch.block[2] <= 1024


GEOMETRIES = [
    ((8, 64, 56, 56), 1, 0),
    ((8, 56, 56, 64), 3, 0),
    ((32, 2048), 1, 4),
    ((1, 3, 7), 1, 0),
    ((16, 5, 9, 3), 2, 4),
]


@pytest.mark.parametrize("dtype", list(DTYPE_SUFFIX))
@pytest.mark.parametrize("shape,axis,vbs", GEOMETRIES)
@pytest.mark.parametrize(
    "mode,strategy,stats",
    [
        ("affine", "split", 0),
        ("batch_stats", "split", 1),
        ("batch_stats", "split", 0),
        ("batch_stats", "fused", 1),
        ("batch_stats", "fused", 0),
    ],
)
def test_plan_matches_kernel_signatures(signatures, shape, axis, vbs, dtype, mode, strategy, stats):
    if mode == "affine":
        vbs = 0
    attrs = spec.validate_attributes(
        {
            **spec.ATTRIBUTE_DEFAULTS,
            "axis": axis,
            "mode": mode,
            "virtual_batch_size": vbs,
            "return_stats": stats,
        }
    )
    geo = check_inputs(shape, dtype, (shape[axis],), (shape[axis],), attrs)
    p = launch.plan(geo, dtype, attrs, num_sms=132, strategy=strategy)
    for lnch in p.launches:
        _check(lnch, signatures)
    if mode == "batch_stats" and strategy == "split":
        step1, step2, step3 = p.launches
        parts = step1.grid[1]  # P: (G*C, P, 1) planar, (C/32, P, G) rows
        gc = geo.groups * geo.channels
        assert p.workspace_floats == 3 * gc * parts + 3 * gc
        # the apply step reads a / beta / mean from the end of the workspace
        offsets = [a.offset for a in step3.args[1:4]]
        assert offsets == [4 * (3 * gc * parts + k * gc) for k in range(3)]
        assert step3.kernel.startswith("fused_norm_apply_")
        assert [a.value for a in step2.args if a.kind == "i32"][:3] == [gc, geo.channels, parts]
    else:
        assert p.workspace_floats == 0


def test_float_bits():
    assert launch.float_bits(1.0) == 0x3F800000
    assert launch.float_bits(-2.0) == -0x40000000


# ------------------------------------------------------------------ TensorRT AOT, with a stand-in
class _Expr(int):
    """An int that behaves like a constant tensorrt.plugin ShapeExpr."""

    is_fake = False
    is_constant = True

    def constant_value(self):
        return int(self)

    def __mul__(self, o):
        return _Expr(int(self) * int(o))

    def __floordiv__(self, o):
        return _Expr(int(self) // int(o))


def _fake_trt():
    trt = types.SimpleNamespace(float32="f32", float16="f16", bfloat16="bf16")

    class Exprs(list):
        def numel(self):
            out = 1
            for d in self:
                out *= int(d)
            return _Expr(out)

    trtp = types.SimpleNamespace(
        KernelLaunchParams=lambda: types.SimpleNamespace(
            grid_x=1, grid_y=1, grid_z=1, block_x=1, block_y=1, block_z=1
        ),
        SymInt32=int,
        SymIntExprs=types.SimpleNamespace(from_tuple=list),
        cdiv=lambda a, b: _Expr(-(-int(a) // int(b))),
        max=lambda a, b: _Expr(max(int(a), int(b))),
    )
    return trt, trtp, Exprs


@pytest.mark.parametrize("shape,axis,vbs", GEOMETRIES)
@pytest.mark.parametrize("mode,stats", [("affine", 0), ("batch_stats", 0), ("batch_stats", 1)])
def test_aot_kernel_args_match_signatures(signatures, monkeypatch, shape, axis, vbs, mode, stats):
    from bnexport_plugins.fused_norm import tensorrt_plugin

    monkeypatch.setattr(tensorrt_plugin, "ptx_for_plugin", lambda: b"ptx")
    trt, trtp, Exprs = _fake_trt()
    vbs = vbs if mode == "batch_stats" else 0
    attrs = spec.validate_attributes(
        {
            **spec.ATTRIBUTE_DEFAULTS,
            "axis": axis,
            "mode": mode,
            "virtual_batch_size": vbs,
            "return_stats": stats,
        }
    )
    x = types.SimpleNamespace(dtype="f16", shape_expr=Exprs(_Expr(d) for d in shape))
    tactic = tensorrt_plugin.Tactic.THREADS_512
    name, ptx, lp, args = tensorrt_plugin.aot_kernel(trt, trtp, x, attrs, tactic)
    sig = signatures[name]
    n_inputs, n_outputs = 3, 3 if stats else 1
    assert sig == ["u64"] * n_inputs + ["u32"] * len(args) + ["u64"] * n_outputs
    # same geometry as the runtime plan's one-kernel path
    geo = check_inputs(shape, "float16", (shape[axis],), (shape[axis],), attrs)
    if mode == "affine":
        ref = launch.affine_launch(
            geo,
            "float16",
            0,
            attrs["alpha"],
            132,
            scale=launch.Arg("ptr", "scale"),
            shift=launch.Arg("ptr", "shift"),
            groups=1,
        )
        assert args == [a.value for a in ref.args if a.kind == "i32"]
    else:
        ref = launch.fused_batch_stats_launch(geo, "float16", attrs, bool(stats))
        assert args == [a.value for a in ref.args if a.kind == "i32"]
        assert (int(lp.grid_x), int(lp.grid_y)) == ref.grid[:2]
