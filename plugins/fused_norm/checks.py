"""Build-time checks of FusedNorm inputs, and the (outer, C, inner) geometry the kernels use.

Every backend (NumPy reference, ONNX shape inference, CUDA launcher, TensorRT
plugin) calls :func:`check_inputs` before it runs anything, so bad input is a
``PluginError`` naming the field at graph-build time, never a kernel fault.

Geometry: ``X`` of shape ``[d0, ..., d(r-1)]`` with channel axis ``a`` is viewed
as a contiguous ``[outer, C, inner]`` array with ``outer = d0 * ... * d(a-1)``,
``C = d(a)`` and ``inner = d(a+1) * ... * d(r-1)`` (``inner == 1`` is channels-last).
Ghost batches split axis 0 into ``G = d0 / virtual_batch_size`` groups, i.e.
``outer`` into ``G`` contiguous runs of ``outer_per_group = outer / G`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from bnexport_plugins.fused_norm import spec

#: Largest element count the kernels index with 32-bit integers.
MAX_NUMEL = 2**31 - 1


@dataclass(frozen=True)
class Geometry:
    """Shape of one FusedNorm call as the kernels see it.

    Attributes:
        shape: Shape of ``X``.
        axis: Channel axis (non-negative).
        outer: Product of the dimensions before ``axis``.
        channels: ``C``, the size of ``axis``.
        inner: Product of the dimensions after ``axis`` (1 = channels-last).
        groups: ``G``: ghost batches (1 in affine mode or when ``virtual_batch_size == 0``).
        outer_per_group: ``outer // groups``.
    """

    shape: tuple[int, ...]
    axis: int
    outer: int
    channels: int
    inner: int
    groups: int
    outer_per_group: int

    @property
    def numel(self) -> int:
        """Number of elements of ``X``."""
        return self.outer * self.channels * self.inner

    @property
    def count_per_stat(self) -> int:
        """Elements reduced into one (group, channel) mean/variance."""
        return self.outer_per_group * self.inner


def dtype_name(dtype: object) -> str:
    """Canonical element-type name (``float32``/``float16``/``bfloat16``) of a numpy-like dtype."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    return name


def geometry(shape: tuple[int, ...] | list[int], attrs: dict) -> Geometry:
    """Validate ``shape`` against (validated) ``attrs`` and return the kernel geometry.

    Raises:
        PluginError: rank < 2, axis out of range, a non-positive dimension in
            batch_stats mode, ghost size not dividing the batch, or too many elements.
    """
    from bnexport.errors import PluginError

    shape = tuple(int(d) for d in shape)
    rank = len(shape)
    axis = int(attrs["axis"])
    if rank < 2:
        raise PluginError(f"FusedNorm: input X must have rank >= 2. Received: shape={shape}")
    if not 0 <= axis < rank:
        raise PluginError(
            f"FusedNorm: axis out of range for rank-{rank} input X. Received: axis={axis}, "
            f"shape={shape}"
        )
    if any(d < 0 for d in shape):
        raise PluginError(f"FusedNorm: input X has a negative dimension. Received: shape={shape}")
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    channels = shape[axis]
    groups = 1
    vbs = int(attrs.get("virtual_batch_size", 0))
    if attrs.get("mode") == "batch_stats":
        if any(d == 0 for d in shape):
            raise PluginError(
                f"FusedNorm: batch_stats mode needs a non-empty input X. Received: shape={shape}"
            )
        if vbs > 0:
            if axis == 0:
                raise PluginError(
                    "FusedNorm: virtual_batch_size needs a batch axis 0 distinct from the "
                    f"channel axis. Received: axis=0, virtual_batch_size={vbs}"
                )
            if shape[0] % vbs:
                raise PluginError(
                    f"FusedNorm: virtual_batch_size={vbs} does not divide the batch size "
                    f"{shape[0]} of X (shape={shape})"
                )
            groups = shape[0] // vbs
    numel = outer * channels * inner
    if numel > MAX_NUMEL:
        raise PluginError(
            f"FusedNorm: input X has {numel} elements; the kernels support at most {MAX_NUMEL}"
        )
    return Geometry(shape, axis, outer, channels, inner, groups, outer // groups if groups else 0)


def check_inputs(
    x_shape: tuple[int, ...] | list[int],
    x_dtype: object,
    scale_shape: tuple[int, ...] | list[int],
    shift_shape: tuple[int, ...] | list[int],
    attrs: dict,
    node: str | None = None,
) -> Geometry:
    """Validate one FusedNorm call and return its geometry.

    Args:
        x_shape: Shape of ``X``.
        x_dtype: Element type of ``X`` (numpy dtype or name).
        scale_shape: Shape of ``scale`` (must be ``[C]``).
        shift_shape: Shape of ``shift`` (must be ``[C]``).
        attrs: Node attributes (complete; validated here with ``spec.validate_attributes``).
        node: Node name, prefixed to error messages when given.

    Raises:
        PluginError: naming the field at fault (dtype, axis, scale/shift length, ghost size).
    """
    from bnexport.errors import PluginError

    where = f"node {node!r}: " if node else ""
    try:
        attrs = spec.validate_attributes(attrs)
        name = dtype_name(x_dtype)
        if name not in spec.DTYPES:
            raise PluginError(
                f"FusedNorm: unsupported dtype of X; expected one of {spec.DTYPES}. "
                f"Received: dtype={name}"
            )
        geo = geometry(x_shape, attrs)
        for field, shp in (("scale", scale_shape), ("shift", shift_shape)):
            if tuple(int(d) for d in shp) != (geo.channels,):
                raise PluginError(
                    f"FusedNorm: {field} must have shape [C] = [{geo.channels}] (axis {geo.axis} "
                    f"of X with shape {geo.shape}). Received: {field}.shape={tuple(shp)}"
                )
    except PluginError as exc:
        if where:
            raise PluginError(where + str(exc)) from None
        raise
    return geo
