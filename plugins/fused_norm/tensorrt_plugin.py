"""TensorRT plugin for ``bnexport::FusedNorm`` (Python plugin API, ``tensorrt.plugin``).

ONNX node -> plugin mapping (TensorRT's ONNX parser, plugin fallback for unknown ops):

=====================  =========================================================
ONNX node              TensorRT plugin
=====================  =========================================================
``op_type``            plugin name ``FusedNorm``
``plugin_namespace``   ``bnexport`` (outputs ``[Y]``) or ``bnexport_stats``
                       (``return_stats=1``: outputs ``[Y, batch_mean, batch_var]``).
                       A plugin's output count is fixed and the parser requires the
                       node's non-empty outputs to match it, hence two namespaces.
``plugin_version``     optional, ``"1"``
attributes             ``activation`` (str), ``alpha`` (float), ``axis`` (int),
                       ``epsilon`` (float), ``mode`` (str), ``return_stats`` (int),
                       ``virtual_batch_size`` (int): all required (the plugin API has
                       no defaults), declared in this sorted order, which is the
                       order ``onnx.helper.make_node`` writes them
inputs                 ``X`` (FP32/FP16/BF16, LINEAR), ``scale``, ``shift`` (FP32 ``[C]``)
=====================  =========================================================

:func:`bnexport_plugins.fused_norm.onnx_node.make_node` writes such a node.

Versions: TensorRT >= 10.9 (``tensorrt.plugin`` with ``aot_impl``; 10.x-11.x). The
ahead-of-time implementation returns PTX of ``fused_norm.cu`` (compiled with NVRTC,
``.version`` capped to ``BNEXPORT_PTX_ISA``, default 8.0, so drivers >= CUDA 12.0 load
it) with its launch parameters and int32 arguments as symbolic shape expressions;
engines then run without Python (trtexec, Triton, C++). Building the engine needs
this module (the plugin creator is Python): the project's one builder,
:mod:`bnexport.runtime.trt_build`, calls :func:`register_fused_norm_plugin` for graphs
with FusedNorm nodes (the runtime uses the plugin; this module never imports the
runtime). Batch-statistics mode (what TensorRT's
parser refuses as ``BatchNormalization(training_mode=1)``) runs as one kernel, one
block per (ghost batch, channel) -- or per 8/16-channel tile for channels-last input --
because an ahead-of-time plugin launches exactly one kernel and gets no workspace.
The JIT implementation (``@trtp.impl``, Python at run time) uses the faster
split-reduction path with a stream-ordered workspace.

Tactics (:class:`Tactic`) are thread-block sizes; TensorRT times them at build time.

Limits checked at build time (:func:`check_launch_limits`), because an ahead-of-time
kernel runs without Python and cannot refuse a shape when it is launched: X has at most
``2**31 - 1`` elements (the kernels index with int32), and the batch-statistics grid's
``y`` dimension (ghost batches ``N / virtual_batch_size``) is at most 65535. Static shapes
are checked when the plugin's output shapes are described; dynamic ones at autotune,
against the optimization profile's largest shape.

String attributes come from TensorRT's ONNX parser with a trailing NUL
(onnx/onnx-tensorrt#921); :func:`spec.validate_attributes` strips it.
"""

import os
from enum import IntEnum
from typing import Tuple  # noqa: UP035 - tensorrt.plugin's samples annotate with typing.Tuple

from bnexport_plugins.fused_norm import spec
from bnexport_plugins.fused_norm.launch import float_bits, rows_tile_width, vector_width

TRT_MIN_VERSION = (10, 9)
DEFAULT_PTX_ISA = "8.0"
_REGISTERED = False


class Tactic(IntEnum):
    """Threads per block of the plugin's kernel (a custom tactic must be > 0)."""

    THREADS_256 = 1
    THREADS_512 = 2
    THREADS_1024 = 3

    @property
    def threads(self) -> int:
        """Threads per block."""
        return {1: 256, 2: 512, 3: 1024}[int(self)]


def _tensorrt():
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        from bnexport.errors import BackendUnavailableError

        raise BackendUnavailableError(
            "the FusedNorm TensorRT plugin needs tensorrt >= 10.9 (pip install tensorrt)"
        ) from exc
    version = tuple(int(v) for v in trt.__version__.split(".")[:2])
    if version < TRT_MIN_VERSION:
        from bnexport.errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"the FusedNorm TensorRT plugin needs tensorrt >= 10.9. Found: {trt.__version__}"
        )
    return trt, trtp


def _dtype_name(trt, dtype) -> str:
    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}
    if dtype not in names:
        from bnexport.errors import PluginError

        raise PluginError(
            f"FusedNorm plugin: unsupported dtype of X; expected one of {spec.DTYPES}. "
            f"Received: {dtype}"
        )
    return names[dtype]


def _attrs(**kw) -> dict:
    return spec.validate_attributes({k: kw[k] for k in spec.ATTRIBUTE_DEFAULTS})


def _check_static(x, scale, shift, attrs: dict) -> None:
    """Build-time checks on (possibly symbolic) shapes: rank, axis, C, ghost size."""
    from bnexport.errors import PluginError

    rank, axis = x.ndim, int(attrs["axis"])
    if rank < 2 or axis >= rank:
        raise PluginError(
            f"FusedNorm plugin: axis out of range for rank-{rank} input X. Received: axis={axis}"
        )
    if x.shape_expr[axis].is_fake:
        return
    c = x.shape_expr[axis]
    for name, p in (("scale", scale), ("shift", shift)):
        if p.ndim != 1:
            raise PluginError(f"FusedNorm plugin: {name} must be 1-D [C]. Received: rank {p.ndim}")
        d = p.shape_expr[0]
        if c.is_constant and d.is_constant and c.constant_value() != d.constant_value():
            raise PluginError(
                f"FusedNorm plugin: {name} must have shape [C] = [{c.constant_value()}]. "
                f"Received: [{d.constant_value()}]"
            )
    vbs = int(attrs["virtual_batch_size"])
    n = x.shape_expr[0]
    if vbs and n.is_constant and n.constant_value() % vbs:
        raise PluginError(
            f"FusedNorm plugin: virtual_batch_size={vbs} does not divide the batch size "
            f"{n.constant_value()}"
        )


def _constant_shape(x) -> "tuple[int, ...] | None":
    """X's shape when every dimension is a build-time constant, else ``None``."""
    dims = []
    for d in x.shape_expr:
        if d.is_fake or not d.is_constant:
            return None
        dims.append(int(d.constant_value()))
    return tuple(dims)


def profile_max_shape(x) -> "tuple[int, ...] | None":
    """The largest shape X takes (autotune's ``TensorDesc.shape``), or ``None`` if unknown.

    In ``@trtp.autotune`` a descriptor has a concrete :class:`tensorrt.plugin.Shape`; for a
    dynamic tensor its ``max`` is the optimization profile's upper bound.
    """
    if not getattr(x, "has_shape", False):
        return None
    shape = x.shape
    dims = shape.max if shape.is_dynamic else tuple(shape)
    return tuple(int(d) for d in dims)


def check_launch_limits(shape: "tuple[int, ...]", dtype: str, attrs: dict) -> None:
    """Refuse a shape of X the kernels cannot launch on (int32 element count, grid size).

    Args:
        shape: a concrete shape of X (a static shape, or a profile's largest one).
        dtype: element type name of X.
        attrs: validated node attributes.

    Raises:
        PluginError: naming the limit, the shape and what to change.
    """
    from bnexport_plugins.fused_norm.checks import geometry
    from bnexport_plugins.fused_norm.launch import check_grid, fused_batch_stats_launch

    shape = tuple(int(d) for d in shape)
    vbs = int(attrs["virtual_batch_size"])
    if vbs and shape and shape[0] % vbs:  # a profile bound need not be a ghost-batch multiple
        shape = (max(vbs, shape[0] - shape[0] % vbs), *shape[1:])
    geo = geometry(shape, attrs)  # PluginError beyond 2**31 - 1 elements
    if attrs["mode"] == "batch_stats" and geo.numel:
        check_grid(fused_batch_stats_launch(geo, dtype, attrs, bool(attrs["return_stats"])))


def _prod(dims):
    """Product of shape expressions / ints (1 for none), without building constants."""
    out = 1
    for d in dims:
        out = d if isinstance(out, int) and out == 1 else out * d
    return out


def _namespace_mismatch(plugin_id: str, with_stats: bool) -> str:
    """Why a node's ``return_stats`` does not fit the namespace it was parsed under."""
    if with_stats:
        return f"{plugin_id} needs return_stats=1 (use namespace {spec.PLUGIN_NAMESPACE})"
    return (
        f"{plugin_id} has one output; return_stats=1 needs namespace {spec.PLUGIN_NAMESPACE_STATS}"
    )


def _register(trt, trtp, namespace: str, with_stats: bool) -> None:
    """Register, autotune and implement one plugin id (``namespace::FusedNorm``).

    ``tensorrt.plugin`` reads the output count from the return annotation of the
    registered function (one ``TensorDesc``, or a ``Tuple`` of three with statistics) and
    matches the parameters of the other functions against its parameters by name.
    """
    plugin_id = f"{namespace}::{spec.OP_TYPE}"
    f32 = trt.float32

    def _outputs(x, attrs):
        y = x.like()
        if not with_stats:
            return y
        c = x.shape_expr[int(attrs["axis"])]
        vbs = int(attrs["virtual_batch_size"])
        shape = (c,) if vbs == 0 else (x.shape_expr[0] // vbs, c)
        return y, trtp.from_shape_expr(shape, dtype=f32), trtp.from_shape_expr(shape, dtype=f32)

    def _desc(
        x: trtp.TensorDesc,
        scale: trtp.TensorDesc,
        shift: trtp.TensorDesc,
        activation: str,
        alpha: float,
        axis: int,
        epsilon: float,
        mode: str,
        return_stats: int,
        virtual_batch_size: int,
    ):
        attrs = _attrs(**locals())
        if bool(attrs["return_stats"]) != with_stats:
            from bnexport.errors import PluginError

            raise PluginError(_namespace_mismatch(plugin_id, with_stats))
        dtype = _dtype_name(trt, x.dtype)
        _check_static(x, scale, shift, attrs)
        _check_constant_limits(x, dtype, attrs)
        return _outputs(x, attrs)

    desc = trtp.TensorDesc
    _desc.__annotations__["return"] = Tuple[desc, desc, desc] if with_stats else desc  # noqa: UP006
    trtp.register(plugin_id)(_desc)

    @trtp.autotune(plugin_id)
    def _autotune(
        x,
        scale,
        shift,
        activation,
        alpha,
        axis,
        epsilon,
        mode,
        return_stats,
        virtual_batch_size,
        outputs,
    ):
        largest = profile_max_shape(x)
        if largest is not None:
            check_launch_limits(largest, _dtype_name(trt, x.dtype), _attrs(**locals()))
        io = "FP32|FP16|BF16, FP32, FP32, FP32|FP16|BF16" + (", FP32, FP32" if with_stats else "")
        return [trtp.AutoTuneCombination(io, "LINEAR", [int(t) for t in Tactic])]

    @trtp.aot_impl(plugin_id)
    def _aot_impl(
        x,
        scale,
        shift,
        activation,
        alpha,
        axis,
        epsilon,
        mode,
        return_stats,
        virtual_batch_size,
        outputs,
        tactic,
    ) -> Tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:  # noqa: UP006
        tactic = Tactic(int(tactic)) if int(tactic) else Tactic.THREADS_256
        return aot_kernel(trt, trtp, x, _attrs(**locals()), tactic)

    @trtp.impl(plugin_id)
    def _impl(
        x,
        scale,
        shift,
        activation,
        alpha,
        axis,
        epsilon,
        mode,
        return_stats,
        virtual_batch_size,
        outputs,
        stream,
        tactic,
    ):
        jit_launch(trt, x, scale, shift, outputs, _attrs(**locals()), int(stream))


def _check_constant_limits(x, dtype: str, attrs: dict) -> None:
    shape = _constant_shape(x) if x.ndim > int(attrs["axis"]) else None
    if shape is not None:
        check_launch_limits(shape, dtype, attrs)


def ptx_for_plugin() -> bytes:
    """PTX of the kernels for TensorRT (compute_80, runs on every GPU >= sm_80)."""
    from bnexport_plugins.fused_norm.nvrtc_build import compile_kernels

    isa = os.environ.get("BNEXPORT_PTX_ISA", DEFAULT_PTX_ISA)
    return compile_kernels("compute_80", kind="ptx", ptx_isa=isa).image


def aot_kernel(trt, trtp, x, attrs: dict, tactic: "Tactic"):
    """``(kernel_name, ptx, KernelLaunchParams, SymIntExprs)`` for one plugin instance.

    All scalars are int32 symbolic expressions of X's shape (floats as bit patterns),
    placed between the input and output pointers, as the kernel entry points expect.
    """
    from bnexport_plugins.fused_norm.nvrtc_build import entry_name

    dtype = _dtype_name(trt, x.dtype)
    static = _constant_shape(x)
    if static is not None:
        check_launch_limits(static, dtype, attrs)
    shape = list(x.shape_expr)
    axis = int(attrs["axis"])
    c = shape[axis]
    outer = _prod(shape[:axis])
    inner = _prod(shape[axis + 1 :])
    act = spec.ACTIVATION_CODES[attrs["activation"]]
    threads = tactic.threads
    launch = trtp.KernelLaunchParams()
    sym = trtp.SymInt32
    if attrs["mode"] == "affine":
        numel = x.shape_expr.numel()
        launch.grid_x = trtp.max(trtp.cdiv(numel, threads * vector_width(dtype)), 1)
        launch.block_x = threads
        # (n, C, inner, opg, groups, act, alpha_bits) of fused_norm_affine_*
        args = [numel, c, inner, outer, 1, act, float_bits(attrs["alpha"])]
        kernel = entry_name("affine", dtype)
    else:
        vbs = int(attrs["virtual_batch_size"])
        groups = shape[0] // vbs if vbs else 1
        # ShapeExpr on the left: tensorrt.plugin defines no reflected operators
        opg = (_prod(shape[1:axis]) * vbs) if vbs else outer
        trailing = shape[axis + 1 :]
        rows = all(not d.is_fake and d.is_constant and d.constant_value() == 1 for d in trailing)
        if rows:
            tw = rows_tile_width(dtype)
            launch.grid_x = trtp.cdiv(c, tw)
            launch.grid_y = groups
            launch.block_x = tw
            launch.block_y = threads // tw
        else:
            launch.grid_x = c * groups if vbs else c
            launch.block_x = threads
        args = [
            c,
            inner,
            opg,
            int(rows),
            act,
            float_bits(attrs["alpha"]),
            float_bits(attrs["epsilon"]),
        ]
        kernel = entry_name("batch_stats_out" if attrs["return_stats"] else "batch_stats", dtype)
    launch.shared_mem = 0
    extra = trtp.SymIntExprs.from_tuple([sym(a) for a in args])
    return kernel, ptx_for_plugin(), launch, extra


def jit_launch(trt, x, scale, shift, outputs, attrs: dict, stream: int) -> None:
    """``@trtp.impl`` body: the split batch_stats path (or affine) via cuda-python."""
    from bnexport_plugins.fused_norm.checks import check_inputs
    from bnexport_plugins.fused_norm.gpu_runtime import current_device_runtime
    from bnexport_plugins.fused_norm.launch import plan

    from bnexport.cuda_api import check, driver, handle_value

    rt = current_device_runtime()  # the engine's device, which TensorRT made current
    dtype = _dtype_name(trt, x.dtype)
    geo = check_inputs(tuple(x.shape), dtype, tuple(scale.shape), tuple(shift.shape), attrs)
    p = plan(geo, dtype, attrs, rt.num_sms, "split")
    bufs = {
        "x": x.data_ptr,
        "scale": scale.data_ptr,
        "shift": shift.data_ptr,
        "y": outputs[0].data_ptr,
    }
    if attrs["return_stats"]:
        bufs["mean"], bufs["var"] = outputs[1].data_ptr, outputs[2].data_ptr
    drv = driver()
    ws = (
        handle_value(
            check(drv.cuMemAllocAsync(p.workspace_bytes, drv.CUstream(stream)), "cuMemAllocAsync")
        )
        if p.workspace_bytes
        else 0
    )
    bufs["ws"] = ws
    try:
        rt.launch(p, bufs, stream)
    finally:
        if ws:
            check(drv.cuMemFreeAsync(ws, drv.CUstream(stream)), "cuMemFreeAsync")


def register_fused_norm_plugin() -> None:
    """Register both FusedNorm plugins (``bnexport`` and ``bnexport_stats``) with TensorRT.

    Idempotent. Call before parsing an ONNX model with FusedNorm nodes.

    Raises:
        BackendUnavailableError: TensorRT (>= 10.9) is not installed.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    trt, trtp = _tensorrt()
    _register(trt, trtp, spec.PLUGIN_NAMESPACE, with_stats=False)
    _register(trt, trtp, spec.PLUGIN_NAMESPACE_STATS, with_stats=True)
    _REGISTERED = True
