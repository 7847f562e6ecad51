"""Launch plans for the FusedNorm kernels: which kernels, grids, blocks and arguments.

Pure Python (no CUDA import), so the plan is unit-tested anywhere and shared by the
cuda-python launcher (:mod:`gpu_runtime`) and the TensorRT plugin's heuristics.

Strategies for ``batch_stats``:

* ``"split"`` (runtime default): step 1 reduces partial moments with ``P`` blocks per
  (group, channel) so every SM is busy even for a few channels; step 2 combines them
  (Chan) into per-(group, channel) ``a = gamma * rsqrt(var + eps)``, ``beta`` and ``mean``;
  step 3 applies ``y = act((x - mean) * a + beta)``. Needs a float32 workspace of
  ``3*G*C*P + 3*G*C`` elements. Traffic: read X twice, write Y once.
* ``"fused"``: one kernel, one block per (group, channel) -- or per 8 (fp32) / 16 (16-bit)
  channel tile when channels-last -- doing both passes. No workspace (what TensorRT's
  ahead-of-time plugin path can launch), but only ``G * C`` (or ``G * C / 8``) blocks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from bnexport_plugins.fused_norm import spec
from bnexport_plugins.fused_norm.checks import Geometry
from bnexport_plugins.fused_norm.nvrtc_build import FINALIZE_KERNEL, entry_name

AFFINE_BLOCK = 256
STATS_BLOCK = 256
FUSED_BLOCK = 512
ROWS_BLOCK_Y = 8
FINALIZE_BLOCK = 256  # 8 warps, one (group, channel) each
BLOCKS_PER_SM = 8  # target resident blocks per SM for the grid-stride / split kernels
#: CUDA's grid limits (x, y, z) for every GPU this project targets (compute capability >= 3.0)
MAX_GRID = (2**31 - 1, 65535, 65535)


def float_bits(value: float) -> int:
    """The IEEE float32 bit pattern of ``value`` as a signed int32 (kernel scalar args)."""
    return struct.unpack("<i", struct.pack("<f", float(value)))[0]


def vector_width(dtype: str) -> int:
    """Elements per 128-bit load: 4 for float32, 8 for 16-bit types."""
    return 4 if dtype == "float32" else 8


def rows_tile_width(dtype: str) -> int:
    """Channels per block of the one-kernel channels-last path: 32 bytes of a row."""
    return 32 // (4 if dtype == "float32" else 2)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Arg:
    """One kernel argument: ``("ptr", buffer, byte_offset)`` or ``("i32", value)``."""

    kind: str
    value: int | str
    offset: int = 0


@dataclass(frozen=True)
class Launch:
    """One kernel launch."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[Arg, ...]


@dataclass(frozen=True)
class Plan:
    """Kernel launches of one FusedNorm call and the float32 workspace they need."""

    launches: tuple[Launch, ...]
    workspace_floats: int

    @property
    def workspace_bytes(self) -> int:
        """Workspace size in bytes."""
        return 4 * self.workspace_floats


def check_grid(lnch: Launch) -> Launch:
    """Return ``lnch`` if its grid fits CUDA's limits (:data:`MAX_GRID`).

    Raises:
        PluginError: naming the kernel, the grid dimension and what makes it too large
            (``grid.y``/``grid.z`` count ghost batches ``G`` on the batch_stats paths).
    """
    from bnexport.errors import PluginError

    for axis, (size, limit) in zip("xyz", zip(lnch.grid, MAX_GRID, strict=True), strict=True):
        if not 1 <= size <= limit:
            raise PluginError(
                f"FusedNorm: kernel {lnch.kernel} needs grid.{axis} = {size}, outside CUDA's "
                f"1..{limit} (grid.y/z count the ghost batches N / virtual_batch_size); use a "
                "larger virtual_batch_size or a smaller batch"
            )
    return lnch


def _ptr(name: str, offset: int = 0) -> Arg:
    return Arg("ptr", name, offset)


def _i32(value: int) -> Arg:
    value = int(value)
    if not -(2**31) <= value < 2**31:
        raise OverflowError(f"kernel argument {value} does not fit int32")
    return Arg("i32", value)


def affine_launch(
    geo: Geometry,
    dtype: str,
    act: int,
    alpha: float,
    num_sms: int,
    *,
    scale: Arg,
    shift: Arg,
    groups: int,
    center: Arg | None = None,
) -> Launch:
    """The elementwise kernel over all of X (grid-stride, capped at ``4 * BLOCKS_PER_SM`` per SM).

    With ``center`` it is ``fused_norm_apply`` (``y = act((x - center) * scale + shift)``).
    """
    v = vector_width(dtype)
    blocks = max(1, min(_cdiv(_cdiv(geo.numel, v), AFFINE_BLOCK), num_sms * BLOCKS_PER_SM * 4))
    opg = geo.outer_per_group if groups > 1 else max(geo.outer, 1)
    args = (
        _ptr("x"),
        scale,
        shift,
        *((center,) if center is not None else ()),
        _i32(geo.numel),
        _i32(geo.channels),
        _i32(geo.inner),
        _i32(opg),
        _i32(groups),
        _i32(act),
        _i32(float_bits(alpha)),
        _ptr("y"),
    )
    kind = "affine" if center is None else "apply"
    return Launch(entry_name(kind, dtype), (blocks, 1, 1), (AFFINE_BLOCK, 1, 1), args)


def fused_batch_stats_launch(geo: Geometry, dtype: str, attrs: dict, with_stats: bool) -> Launch:
    """The one-kernel batch_stats launch (same as TensorRT's ahead-of-time path)."""
    rows = geo.inner == 1
    if rows:
        tw = rows_tile_width(dtype)
        grid, block = (_cdiv(geo.channels, tw), geo.groups, 1), (tw, FUSED_BLOCK // tw, 1)
    else:
        grid, block = (geo.groups * geo.channels, 1, 1), (FUSED_BLOCK, 1, 1)
    args = [
        _ptr("x"),
        _ptr("scale"),
        _ptr("shift"),
        _i32(geo.channels),
        _i32(geo.inner),
        _i32(geo.outer_per_group),
        _i32(int(rows)),
        _i32(spec.ACTIVATION_CODES[attrs["activation"]]),
        _i32(float_bits(attrs["alpha"])),
        _i32(float_bits(attrs["epsilon"])),
        _ptr("y"),
    ]
    kind = "batch_stats"
    if with_stats:
        args += [_ptr("mean"), _ptr("var")]
        kind = "batch_stats_out"
    return Launch(entry_name(kind, dtype), grid, block, tuple(args))


def plan(
    geo: Geometry, dtype: str, attrs: dict, num_sms: int = 132, strategy: str = "split"
) -> Plan:
    """Launches for one FusedNorm call.

    Args:
        geo: From :func:`checks.check_inputs` (validated).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        attrs: Validated attributes (``spec.validate_attributes``).
        num_sms: Streaming multiprocessors of the GPU (sizes grids).
        strategy: ``"split"`` or ``"fused"`` (batch_stats only; see the module docstring).

    Buffers named in the arguments: ``x``, ``scale``, ``shift``, ``y``, ``mean``, ``var``
    (the latter two only with ``return_stats=1``) and ``ws`` (the workspace).

    Raises:
        PluginError: a launch's grid exceeds CUDA's limits (:func:`check_grid`).
    """
    p = _plan(geo, dtype, attrs, num_sms, strategy)
    for lnch in p.launches:
        check_grid(lnch)
    return p


def _plan(geo: Geometry, dtype: str, attrs: dict, num_sms: int, strategy: str) -> Plan:
    """:func:`plan` before the grid checks."""
    act = spec.ACTIVATION_CODES[attrs["activation"]]
    alpha = float(attrs["alpha"])
    if attrs["mode"] == "affine":
        launch = affine_launch(
            geo, dtype, act, alpha, num_sms, scale=_ptr("scale"), shift=_ptr("shift"), groups=1
        )
        return Plan((launch,), 0)
    with_stats = bool(attrs["return_stats"])
    if strategy == "fused":
        return Plan((fused_batch_stats_launch(geo, dtype, attrs, with_stats),), 0)
    if strategy != "split":
        raise ValueError(f"strategy must be 'split' or 'fused'. Received: {strategy!r}")
    G, C = geo.groups, geo.channels
    target = num_sms * BLOCKS_PER_SM
    v = vector_width(dtype)
    if geo.inner > 1:
        # items of a slab: 128-bit vectors when inner allows it (and X is aligned), else elements
        items = geo.outer_per_group * (geo.inner // v if geo.inner % v == 0 else geo.inner)
        # enough blocks to fill the GPU, but at least ~4 items per thread in each
        P = max(1, min(_cdiv(target, G * C), _cdiv(items, 4 * STATS_BLOCK), 65535))
        step1 = Launch(
            entry_name("stats_planar", dtype),
            (G * C, P, 1),
            (STATS_BLOCK, 1, 1),
            (
                _ptr("x"),
                _i32(C),
                _i32(geo.inner),
                _i32(geo.outer_per_group),
                _ptr("ws"),
            ),
        )
    else:
        tiles = _cdiv(C, 32)
        P = max(1, min(_cdiv(target, tiles * G), _cdiv(geo.outer_per_group, ROWS_BLOCK_Y), 65535))
        step1 = Launch(
            entry_name("stats_rows", dtype),
            (tiles, P, G),
            (32, ROWS_BLOCK_Y, 1),
            (_ptr("x"), _i32(C), _i32(geo.outer_per_group), _ptr("ws")),
        )
    gc = G * C
    ab = 3 * gc * P  # float offset of [a | beta | mean] in the workspace
    step2 = Launch(
        FINALIZE_KERNEL,
        (_cdiv(gc, FINALIZE_BLOCK // 32), 1, 1),
        (FINALIZE_BLOCK, 1, 1),
        (
            _ptr("ws"),
            _ptr("scale"),
            _ptr("shift"),
            _i32(gc),
            _i32(C),
            _i32(P),
            _i32(float_bits(attrs["epsilon"])),
            _ptr("ws", 4 * ab),
            _ptr("mean") if with_stats else Arg("null", 0),
            _ptr("var") if with_stats else Arg("null", 0),
        ),
    )
    step3 = affine_launch(
        geo,
        dtype,
        act,
        alpha,
        num_sms,
        scale=_ptr("ws", 4 * ab),
        shift=_ptr("ws", 4 * (ab + gc)),
        center=_ptr("ws", 4 * (ab + 2 * gc)),
        groups=G,
    )
    return Plan((step1, step2, step3), ab + 3 * gc)
