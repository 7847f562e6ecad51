"""``bnexport.BatchNormalization``: Keras 3 batch normalization with the legacy features.

A drop-in for ``keras.layers.BatchNormalization`` (same arguments, defaults and
variables) that also has what legacy ``tf.keras`` and tensorpack's ``BatchNorm`` had:
axis lists, ``data_format``, batch renormalization, ghost batches, ``adjustment``,
``ema_update``, numerically stable synchronized statistics and the fused kernel.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import constraints, initializers, regularizers

from bnexport.errors import InputError, LayerConfigError
from bnexport.layers import fused as fused_lib
from bnexport.layers.moments import bessel_corrected, local_moments, synchronized_moments
from bnexport.layers.renorm import renorm_correction, validate_renorm_clipping

EMA_UPDATE_MODES = ("internal", "skip")
_16BIT = ("float16", "bfloat16")


def _validate_axis(axis: Any, data_format: str | None) -> int | list[int]:
    """Return ``axis`` as an int or a list of ints (``None`` resolved by ``data_format``)."""
    if axis is None:
        fmt = data_format or keras.config.image_data_format()
        return 1 if fmt == "channels_first" else -1
    if isinstance(axis, bool):
        raise LayerConfigError(f"`axis` must be an int or a list of ints. Received: axis={axis!r}")
    if isinstance(axis, int):
        return axis
    if isinstance(axis, (list, tuple)) and axis:
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in axis):
            raise LayerConfigError(
                f"`axis` must be an int or a list of ints. Received: axis={axis!r}"
            )
        return list(axis)
    raise LayerConfigError(
        f"`axis` must be an int or a non-empty list of ints. Received: axis={axis!r}"
    )


def _validate_fused(fused: Any) -> None:
    """``fused`` must be ``None``, ``True`` or ``False``."""
    if fused not in (None, True, False) or not isinstance(fused, (bool, type(None))):
        raise LayerConfigError(f"`fused` must be None, True or False. Received: fused={fused!r}")


# axes tf.keras's fused kernel takes: 1/-3 (NCHW) and 3/-1 (NHWC) on rank 4, 1/-4 and
# 4/-1 on rank 5 (checked against the rank at build)
_LEGACY_FUSED_AXES = (-4, -3, -1, 1, 3, 4)


def legacy_fused_ruled_out(layer: BatchNormalization) -> str | None:
    """Why tf.keras's rule keeps ``layer`` off the fused kernel before ``build``, or ``None``.

    tf.keras (``BatchNormalizationBase._fused_can_be_used`` /
    ``_raise_if_fused_cannot_be_used``, and ``synchronized`` in ``__init__``) sets
    ``fused=False`` at construction for: ``synchronized``, ``renorm``, an axis list of
    more than one axis or an axis outside ``(-4, -3, -1, 1, 3, 4)``,
    ``virtual_batch_size``, ``adjustment``, and a compute dtype other than
    float16/bfloat16/float32. The input rank (4 or 5) is only known at ``build``.
    """
    axes = [layer._axis_arg] if isinstance(layer._axis_arg, int) else layer._axis_arg
    if layer.synchronized:
        return "synchronized=True"
    if layer.renorm:
        return "renorm=True"
    if len(axes) > 1 or axes[0] not in _LEGACY_FUSED_AXES:
        return f"axis={layer._axis_arg!r}"
    if layer.virtual_batch_size is not None:
        return f"virtual_batch_size={layer.virtual_batch_size}"
    if layer.adjustment is not None:
        return "adjustment is set"
    if layer.compute_dtype not in fused_lib.FUSED_DTYPES:
        return f"compute dtype {layer.compute_dtype}"
    return None


def _compose(
    scale: tf.Tensor | None,
    offset: tf.Tensor | None,
    then_scale: tf.Tensor | None,
    then_offset: tf.Tensor | None,
) -> tuple[tf.Tensor | None, tf.Tensor | None]:
    """Compose ``v ↦ v·scale + offset`` followed by ``v ↦ v·then_scale + then_offset``."""
    if then_scale is not None:
        scale = then_scale if scale is None else scale * then_scale
        offset = None if offset is None else offset * then_scale
    if then_offset is not None:
        offset = then_offset if offset is None else offset + then_offset
    return scale, offset


@keras.saving.register_keras_serializable(package="bnexport")
class BatchNormalization(keras.layers.Layer):
    """Batch normalization (Keras 3, TensorFlow backend) with the legacy tf.keras features.

    **During training** (``training=True`` and ``trainable=True``):
    ``y = γ · (x − μ_B) / sqrt(var_B + ε) + β`` with the mean and biased variance of the
    batch (of each ghost batch, of the global batch across replicas when synchronized);
    then ``moving = moving · momentum + batch · (1 − momentum)``, where the batch
    variance is ``var_B`` (Keras 3) or, with ``bessel_correction=True``, the unbiased
    ``var_B · n/(n − 1)`` (tf.keras's fused kernel).
    With renorm: ``y = γ · ((x − μ_B)/σ_B · r + d) + β`` (see :mod:`bnexport.layers.renorm`).

    **During inference**: ``y = γ · (x − moving_mean) / sqrt(moving_variance + ε) + β``.

    Setting ``trainable=False`` on the layer puts it in inference mode, whatever
    ``training`` says (as Keras does): its statistics and γ/β are frozen.

    Args:
        axis: int or list of ints, the feature axes (statistics are per entry of these
            axes and reduced over all the others). ``None``: ``1`` for
            ``data_format="channels_first"`` else ``-1``.
        momentum: momentum of the moving averages.
        epsilon: added to the variance.
        center: add β. scale: multiply by γ.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer, beta_regularizer, gamma_regularizer,
        beta_constraint, gamma_constraint: as in Keras.
        renorm: use batch renormalization during training.
        renorm_clipping: dict with optional ``rmax``, ``rmin``, ``dmax`` (defaults
            ``inf``, ``0``, ``inf``) clipping ``r`` to ``[rmin, rmax]``, ``d`` to
            ``[−dmax, dmax]``.
        renorm_momentum: momentum of ``renorm_mean``/``renorm_stddev``.
        synchronized: compute the statistics over the global batch of all replicas of
            the current ``tf.distribute`` strategy, combining per-replica
            ``(count, mean, M2)`` (Chan) so large means do not cancel.
        fused: ``None`` uses TensorFlow's fused kernel where it applies (rank 4/5 input,
            one feature axis that is 1 or last, float16/bfloat16/float32, no mask,
            adjustment or synchronization, ``epsilon >= 1.001e-5``); ``True`` requires it
            (:class:`LayerConfigError` naming ``fused`` where it cannot be honoured, also
            accepted for any rank >= 2, with renorm and ghost batches); ``False``
            never uses it. ``layer.fused`` reads as in legacy tf.keras: before
            ``build`` the argument, except that ``fused=None`` reads ``False`` where
            tf.keras's rule rules the kernel out (``synchronized``, ``renorm``,
            ``virtual_batch_size``, ``adjustment``, an axis list or an axis other
            than 1/3/4/−1/−3/−4, a compute dtype other than float16/bfloat16/float32);
            after ``build``, ``True``/``False``: ``fused=True``, or ``None`` not ruled
            out whose input takes the kernel (rank 4/5, the axis 1 or last,
            ``epsilon >= 1.001e-5``: where tf.keras silently raised a smaller ε to
            1.001e-5, this layer keeps ε exact on plain ops and reads ``False``).
            With ``fused=None``, renorm and ghost batches still run on the kernel
            inside this layer when the input allows (the same numbers, faster), but
            ``layer.fused`` reads ``False`` as in tf.keras.
            ``get_config()["fused"]`` stays the argument.
        virtual_batch_size: ghost batch size ``v``: during training, each of the ``N/v``
            contiguous groups of ``v`` examples (examples ``g·v … g·v+v−1``, as in Hoffer
            et al., 2017) is normalized with its own statistics; ``N`` must be a multiple
            of ``v``. The moving statistics receive the average of the groups' means and
            variances (as legacy tf.keras). Legacy tf.keras grouped example ``i`` with
            ``i mod (N/v)`` instead: the same numbers after permuting the batch.
            Inference is unchanged.
        adjustment: callable ``dynamic_shape -> (scale, bias)`` (tensors broadcastable
            to the input) applied to the normalized value before γ/β, in training only.
            It is not serialized (``get_config`` warns).
        ema_update: how the moving statistics are updated.

            - ``"internal"`` (default): by the same call that computed the batch
              statistics, also inside ``tf.function``/``tf.cond``/``tf.while_loop``.
              Use it unless the layer is applied more than once per step.
            - ``"skip"``: never updated (moving and renorm statistics stay as they are).
              For a layer shared by several branches or towers, where one update per
              call would count a step several times; recompute the statistics later
              with :func:`bnexport.recalibrate`.
        bessel_correction: ``False`` (default, Keras 3): the moving variance is updated
            with the biased batch variance ``Σ(x − μ_B)²/n``. ``True``: with the
            unbiased one ``Σ(x − μ_B)²/(n − 1)``, as tf.keras's fused path did
            (``FusedBatchNormV3`` returns it and tf.keras fed it to the moving
            average). Only the moving statistics change (``moving_variance``, and
            with renorm ``moving_stddev``; not ``renorm_stddev``, which tracks the
            biased σ_B that ``r`` is measured against); the training output is
            normalized with the biased variance either way. ``n`` is the number of
            values each statistic was computed from: elements per feature of the
            batch; of each ghost batch (``v`` × the other reduced dimensions: each
            ghost batch's variance is corrected with its own ``n``, then they are
            averaged); of the global batch across replicas when synchronized
            (``N`` over all replicas: the variance of the global batch); the sum of
            the mask weights with a mask. Where ``n <= 1`` the variance is 0 either
            way (as tf.keras). tf.keras applied the correction only where its fused
            kernel ran (``layer.fused`` True: rank 4/5 inputs, one axis 1 or last,
            no renorm, ghost batches, adjustment or synchronization); to reproduce a
            tf.keras layer set ``bessel_correction=True`` on those layers.
        data_format: ``"channels_last"``/``"channels_first"``, used only when ``axis=None``.
        **kwargs: base layer arguments (``name``, ``dtype``, ``trainable``, ...).

    Call arguments:
        inputs: tensor of any rank.
        training: Python bool (or bool tensor). ``True``: batch statistics (and EMA
            updates); ``False``/``None``: moving statistics.
        mask: tensor of shape ``inputs.shape[:-1]``; masked-out positions (``False``/0)
            are left out of the batch statistics (all positions are normalized).

    Float16/bfloat16 inputs are normalized in float32 and the output is cast to the
    layer's compute dtype; the variables are float32 for 16-bit policies. Zero-size
    batches give an empty output and leave the statistics unchanged.
    """

    def __init__(
        self,
        axis: int | Sequence[int] | None = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        fused: bool | None = None,
        virtual_batch_size: int | None = None,
        adjustment: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None = None,
        ema_update: str = "internal",
        data_format: str | None = None,
        bessel_correction: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if data_format not in (None, "channels_last", "channels_first"):
            raise LayerConfigError(
                "`data_format` must be 'channels_last', 'channels_first' or None. "
                f"Received: data_format={data_format!r}"
            )
        self.data_format = data_format
        self._axis_arg = _validate_axis(axis, data_format)
        self.axis: int | list[int] = self._axis_arg
        for arg, value in (("momentum", momentum), ("renorm_momentum", renorm_momentum)):
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise LayerConfigError(f"`{arg}` must be in [0, 1]. Received: {arg}={value!r}")
        if not isinstance(epsilon, (int, float)) or not float(epsilon) >= 0.0:
            raise LayerConfigError(f"`epsilon` must be >= 0. Received: epsilon={epsilon!r}")
        if virtual_batch_size is not None and (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, int)
            or virtual_batch_size <= 0
        ):
            raise LayerConfigError(
                "`virtual_batch_size` must be a positive int that divides the batch size. "
                f"Received: virtual_batch_size={virtual_batch_size!r}"
            )
        if ema_update not in EMA_UPDATE_MODES:
            raise LayerConfigError(
                f"`ema_update` must be one of {list(EMA_UPDATE_MODES)}. "
                f"Received: ema_update={ema_update!r}"
            )
        _validate_fused(fused)
        if not isinstance(bessel_correction, bool):
            raise LayerConfigError(
                "`bessel_correction` must be True or False. "
                f"Received: bessel_correction={bessel_correction!r}"
            )
        if adjustment is not None and not callable(adjustment):
            raise LayerConfigError(
                f"`adjustment` must be a callable. Received: adjustment={adjustment!r}"
            )
        if adjustment is not None and virtual_batch_size is not None:
            raise LayerConfigError(
                "`adjustment` cannot be combined with `virtual_batch_size`. Received: "
                f"adjustment={adjustment!r}, virtual_batch_size={virtual_batch_size}"
            )
        if fused:
            for arg, value, bad in (
                ("synchronized", synchronized, bool(synchronized)),
                ("adjustment", adjustment, adjustment is not None),
            ):
                if bad:
                    raise LayerConfigError(
                        f"`fused=True` cannot be honoured with `{arg}`: the fused kernel "
                        f"computes local statistics without adjustment. Received: "
                        f"fused=True, {arg}={value!r}"
                    )
            if float(epsilon) < fused_lib.MIN_FUSED_EPSILON:
                raise LayerConfigError(
                    "`fused=True` needs epsilon >= 1.001e-5. "
                    f"Received: fused=True, epsilon={epsilon}"
                )
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.renorm = bool(renorm)
        self.renorm_clipping = validate_renorm_clipping(renorm_clipping)
        self.renorm_momentum = float(renorm_momentum)
        self.synchronized = bool(synchronized)
        self._fused_arg = fused
        self.virtual_batch_size = virtual_batch_size
        self.adjustment = adjustment
        self.ema_update = ema_update
        self.bessel_correction = bessel_correction
        self.supports_masking = True

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self._plan: fused_lib.FusedPlan | None = None
        self._fused_resolved: bool | None = None  # set by build

    @property
    def fused(self) -> bool | None:
        """tf.keras's ``fused`` attribute: the argument, ruled out early, resolved by build.

        Before ``build``: ``True``/``False`` as given; ``None`` unless tf.keras's rule
        rules the fused kernel out for these arguments, then ``False``
        (:func:`legacy_fused_ruled_out`). ``build`` resolves it to ``True`` or
        ``False`` for the input it sees: ``True`` when unmasked inputs of the compute
        dtype take TensorFlow's fused kernel (a masked or float64 call then falls back
        to the plain ops, where tf.keras raised). ``get_config`` keeps the argument, so
        a layer re-created from its config makes the same choice for its own input.
        """
        if self._fused_resolved is not None:
            return self._fused_resolved
        if self._fused_arg is None and legacy_fused_ruled_out(self) is not None:
            return False
        return self._fused_arg

    @fused.setter
    def fused(self, value: bool | None) -> None:
        if getattr(self, "_fused_resolved", None) is not None:
            raise LayerConfigError(
                f"Layer '{self.name}': `fused` can only be set before the layer is built "
                f"(it is resolved to {self._fused_resolved} by build). Received: fused={value!r}"
            )
        _validate_fused(value)
        self._fused_arg = value

    # ------------------------------------------------------------------ build
    def _normalized_axes(self, rank: int) -> list[int]:
        """Feature axes as sorted non-negative ints for an input of ``rank``."""
        axes = [self._axis_arg] if isinstance(self._axis_arg, int) else self._axis_arg
        out = []
        for a in axes:
            if not -rank <= a < rank:
                raise LayerConfigError(
                    f"`axis` {a} is out of range for inputs of rank {rank}. "
                    f"Received: axis={self._axis_arg!r}"
                )
            out.append(a % rank)
        if len(set(out)) != len(out):
            raise LayerConfigError(
                f"`axis` has duplicate entries for rank {rank}. Received: axis={self._axis_arg!r}"
            )
        if self.virtual_batch_size is not None and 0 in out:
            raise LayerConfigError(
                "`virtual_batch_size` needs the batch axis 0 to be reduced, so `axis` cannot "
                f"include 0. Received: axis={self._axis_arg!r}, "
                f"virtual_batch_size={self.virtual_batch_size}"
            )
        return sorted(out)

    def _choose_plan(self, rank: int, axes: list[int]) -> fused_lib.FusedPlan | None:
        """The fused-kernel plan for this input, or ``None`` (raises if ``fused=True``)."""
        if self._fused_arg is False:
            return None
        reason = None
        if len(axes) != 1 or not (axes[0] == rank - 1 or axes[0] == 1):
            reason = "the kernel needs a single feature axis that is 1 or the last axis"
        elif rank < 2:
            reason = "the kernel needs inputs of rank >= 2"
        elif self.synchronized or self.adjustment is not None:
            reason = "synchronized statistics and adjustment are not fused"
        elif self.epsilon < fused_lib.MIN_FUSED_EPSILON:
            reason = "the kernel needs epsilon >= 1.001e-5"
        elif self.compute_dtype not in fused_lib.FUSED_DTYPES:
            reason = f"the kernel does not support compute dtype {self.compute_dtype}"
        if reason is not None:
            if self._fused_arg:
                raise LayerConfigError(
                    f"`fused=True` cannot be honoured for layer '{self.name}': {reason}. "
                    f"Received: fused=True, axis={self._axis_arg!r}, input rank={rank}"
                )
            return None
        if self._fused_arg is None and rank not in (4, 5):
            return None  # small tensors: the plain path is as fast and exact
        return fused_lib.FusedPlan(channels_first=axes[0] == 1 and rank > 2, rank=rank)

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Create ``gamma``, ``beta``, ``moving_mean``, ``moving_variance`` (+ renorm ones).

        Variables have the shape of the feature axes (``[C]`` for one axis), no size-1
        dimensions; float32 for 16-bit policies.
        """
        rank = len(input_shape)
        axes = self._normalized_axes(rank)
        for a in axes:
            if input_shape[a] is None:
                raise LayerConfigError(
                    f"Layer '{self.name}': feature axis {a} of the input has unknown size. "
                    f"Received: axis={self._axis_arg!r}, input_shape={tuple(input_shape)}"
                )
        self.axis = axes
        self._rank = rank
        self._param_shape = tuple(int(input_shape[a]) for a in axes)
        self._broadcast_shape = [int(input_shape[i]) if i in axes else 1 for i in range(rank)]
        self._reduction_axes = [i for i in range(rank) if i not in axes]
        self._plan = self._choose_plan(rank, axes)
        # the kernel may also run for renorm / ghost batches (fused=None), which
        # tf.keras's attribute reports as False
        self._fused_resolved = self._plan is not None and (
            self._fused_arg is True or legacy_fused_ruled_out(self) is None
        )
        dtype = self.variable_dtype
        dtype = "float32" if dtype in _16BIT else dtype
        shape = self._param_shape
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
                dtype=dtype,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
                dtype=dtype,
            )
        stat = {"trainable": False, "autocast": False, "dtype": dtype, "aggregation": "mean"}
        self.moving_mean = self.add_weight(
            shape=shape, name="moving_mean", initializer=self.moving_mean_initializer, **stat
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            **stat,
        )
        if self.renorm:
            variance_init = self.moving_variance_initializer

            def stddev_initializer(shape: Any, dtype: Any = None) -> tf.Tensor:
                init = variance_init.__class__.from_config(variance_init.get_config())
                return tf.sqrt(init(shape, dtype=dtype))

            self.moving_stddev = self.add_weight(
                shape=shape, name="moving_stddev", initializer=stddev_initializer, **stat
            )
            mean_init = self.moving_mean_initializer
            self.renorm_mean = self.add_weight(
                shape=shape,
                name="renorm_mean",
                initializer=mean_init.__class__.from_config(mean_init.get_config()),
                **stat,
            )
            self.renorm_stddev = self.add_weight(
                shape=shape, name="renorm_stddev", initializer=stddev_initializer, **stat
            )
        self.input_spec = keras.layers.InputSpec(
            ndim=rank, axes={a: int(input_shape[a]) for a in axes}
        )

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple:
        """Same as the input shape."""
        self._normalized_axes(len(input_shape))
        return tuple(input_shape)

    # ------------------------------------------------------------------ call
    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> tf.Tensor:
        """Normalize ``inputs`` (see the class docstring)."""
        inputs = tf.convert_to_tensor(inputs)
        if mask is not None:
            mask = tf.convert_to_tensor(mask)
            if mask.shape.rank != inputs.shape.rank - 1:
                raise InputError(
                    f"Layer '{self.name}': the mask must have one dimension less than the "
                    f"inputs. Received: mask.shape={mask.shape}, inputs.shape={inputs.shape}"
                )
        if not self.trainable:
            training = False
        if training is None:
            training = False
        if tf.is_tensor(training):
            static = tf.get_static_value(training)
            if static is not None:
                training = bool(static)
            elif tf.executing_eagerly():
                training = bool(training)
        if isinstance(training, tf.Tensor):
            outputs = tf.cond(
                tf.cast(training, tf.bool),
                lambda: self._train(inputs, mask),
                lambda: self._inference(inputs),
            )
        elif training:
            outputs = self._train(inputs, mask)
        else:
            outputs = self._inference(inputs)
        return tf.cast(outputs, self.compute_dtype)

    def _compute_dtype_for(self, x: tf.Tensor) -> tf.DType:
        """float64 for float64 inputs, float32 otherwise (16-bit math in float32)."""
        return tf.float64 if x.dtype == tf.float64 else tf.float32

    def _params(self, dtype: tf.DType) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        """γ and β (or ``None``) as ``dtype`` tensors of the parameter shape."""
        gamma = tf.cast(self.gamma.value, dtype) if self.scale else None
        beta = tf.cast(self.beta.value, dtype) if self.center else None
        return gamma, beta

    def _inference(self, x: tf.Tensor) -> tf.Tensor:
        """Normalize with the moving statistics."""
        dtype = self._compute_dtype_for(x)
        mean = tf.cast(self.moving_mean.value, dtype)
        variance = tf.cast(self.moving_variance.value, dtype)
        gamma, beta = self._params(dtype)
        plan = self._plan
        if plan is not None and x.dtype.name in fused_lib.FUSED_DTYPES:
            ones = tf.ones(self._param_shape, tf.float32)
            y4 = fused_lib.fused_inference(
                plan.to_4d(x),
                ones if gamma is None else gamma,
                tf.zeros_like(ones) if beta is None else beta,
                mean,
                variance,
                self.epsilon,
                plan.data_format,
            )
            return plan.from_4d(y4, x)
        x = tf.cast(x, dtype)
        b = self._broadcast
        return tf.nn.batch_normalization(x, b(mean), b(variance), b(beta), b(gamma), self.epsilon)

    def _broadcast(self, v: tf.Tensor | None, ghost: bool = False) -> tf.Tensor | None:
        """Reshape a parameter-shaped tensor to broadcast against the (ghost) input."""
        if v is None:
            return None
        shape = self._broadcast_shape
        if ghost:
            shape = [1, 1, *shape[1:]]
        if len(shape) == 1 or (len(self.axis) == 1 and self.axis[0] == self._rank - 1):
            return v  # trailing feature axis broadcasts as is
        return tf.reshape(v, shape)

    def _groups(self, x: tf.Tensor) -> tf.Tensor | int:
        """Number of ghost batches ``N / virtual_batch_size`` (checked to divide)."""
        vbs = self.virtual_batch_size
        batch = x.shape[0]
        if batch is not None:
            if batch % vbs:
                raise LayerConfigError(
                    f"Layer '{self.name}': `virtual_batch_size` must divide the batch size. "
                    f"Received: virtual_batch_size={vbs}, batch size={batch}"
                )
            return batch // vbs
        batch = tf.shape(x)[0]
        check = tf.debugging.assert_equal(
            batch % vbs,
            0,
            message=(f"Layer '{self.name}': `virtual_batch_size`={vbs} must divide the batch size"),
        )
        with tf.control_dependencies([check]):
            return tf.identity(batch // vbs)

    def _train(self, x: tf.Tensor, mask: tf.Tensor | None) -> tf.Tensor:
        """Training-mode forward pass and statistic updates."""
        use_fused = (
            self._plan is not None and mask is None and x.dtype.name in fused_lib.FUSED_DTYPES
        )
        if self._fused_arg and not use_fused:
            why = "a mask was given" if mask is not None else f"inputs are {x.dtype.name}"
            raise LayerConfigError(
                f"`fused=True` cannot be honoured for layer '{self.name}': {why}. "
                "Received: fused=True"
            )
        if use_fused:
            return self._train_fused(x)
        return self._train_general(x, mask)

    def _renorm_terms(self, mean: tf.Tensor, variance: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(r, d)`` from parameter-shaped batch moments (pre-update renorm variables)."""
        return renorm_correction(
            mean,
            variance,
            tf.cast(self.renorm_mean.value, mean.dtype),
            tf.cast(self.renorm_stddev.value, mean.dtype),
            self.epsilon,
            self.renorm_clipping,
        )

    def _train_fused(self, x: tf.Tensor) -> tf.Tensor:
        """Training with the fused kernel (plain, renorm and ghost batches)."""
        groups = 1 if self.virtual_batch_size is None else self._groups(x)
        if isinstance(groups, int) and groups > 1:
            return self._train_fused_split(x, groups)
        plan = self._plan
        vbs = self.virtual_batch_size or 1
        x4 = plan.to_4d(x, groups, vbs)
        scale, offset = self._fused_scale_offset()
        if self.renorm:
            # moments first (one kernel call): r and d must be known before normalizing
            _, mean, variance = fused_lib.fused_moments(x4, self.epsilon, plan.data_format)
            mean = self._average_groups(mean, groups)
            variance = self._average_groups(variance, groups)
            scale, offset = self._renorm_scale_offset(scale, offset, mean, variance)
        if not fused_lib.no_groups(groups):
            scale = tf.tile(scale, [groups])
            offset = tf.tile(offset, [groups])
        y4, count, mean, variance = fused_lib.fused_train(
            x4, scale, offset, self.epsilon, plan.data_format
        )
        # count: values per channel of one (ghost) batch, the n of Bessel's correction
        update_variance = self._update_variance(variance, count)
        if not fused_lib.no_groups(groups):
            count = tf.cast(count, tf.float32) * tf.cast(groups, tf.float32)
            mean = self._average_groups(mean, groups)
            variance = self._average_groups(variance, groups)
            update_variance = self._average_groups(update_variance, groups)
        self._update_statistics(count, mean, variance, update_variance)
        return plan.from_4d(y4, x, groups, vbs)

    def _train_fused_split(self, x: tf.Tensor, groups: int) -> tf.Tensor:
        """Ghost batches with a static batch size: one kernel call per slice, no transpose."""
        plan = self._plan
        slices = [plan.to_4d(s) for s in tf.split(x, groups, axis=0)]
        scale, offset = self._fused_scale_offset()
        if self.renorm:
            moments = [fused_lib.fused_moments(s, self.epsilon, plan.data_format) for s in slices]
            mean = tf.add_n([m for _, m, _ in moments]) / groups
            variance = tf.add_n([v for _, _, v in moments]) / groups
            scale, offset = self._renorm_scale_offset(scale, offset, mean, variance)
        outputs, means, variances, updates, count = [], [], [], [], 0.0
        for x4 in slices:
            y4, n, mean, variance = fused_lib.fused_train(
                x4, scale, offset, self.epsilon, plan.data_format
            )
            outputs.append(y4)
            means.append(mean)
            variances.append(variance)
            updates.append(self._update_variance(variance, n))  # n of this ghost batch
            count = count + n
        self._update_statistics(
            count,
            tf.add_n(means) / groups,
            tf.add_n(variances) / groups,
            tf.add_n(updates) / groups,
        )
        y = tf.concat(outputs, axis=0)
        return y if plan.rank == 4 else tf.reshape(y, tf.shape(x))

    def _fused_scale_offset(self) -> tuple[tf.Tensor, tf.Tensor]:
        """float32 γ and β for the kernel (ones/zeros when disabled)."""
        gamma, beta = self._params(tf.float32)
        scale = tf.ones(self._param_shape, tf.float32) if gamma is None else gamma
        offset = tf.zeros(self._param_shape, tf.float32) if beta is None else beta
        return scale, offset

    def _renorm_scale_offset(
        self, scale: tf.Tensor, offset: tf.Tensor, mean: tf.Tensor, variance: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Fold renorm into the kernel's affine: ``x̂·r·γ + (d·γ + β)``."""
        r, d = self._renorm_terms(mean, variance)
        return scale * r, offset + d * scale

    def _average_groups(self, v: tf.Tensor, groups: tf.Tensor | int) -> tf.Tensor:
        """Average a ``[G·C]`` ghost statistic over its ``G`` groups → ``[C]``."""
        if fused_lib.no_groups(groups):
            return v
        grouped = tf.reshape(v, [groups, self._param_shape[0]])
        return tf.math.divide_no_nan(
            tf.reduce_sum(grouped, 0), tf.cast(tf.shape(grouped)[0], v.dtype)
        )

    def _train_general(self, x: tf.Tensor, mask: tf.Tensor | None) -> tf.Tensor:
        """Training with TensorFlow ops (any axes, masks, sync, adjustment, float64)."""
        dtype = self._compute_dtype_for(x)
        original = x
        x = tf.cast(x, dtype)
        weights = None
        if mask is not None:
            weights = tf.broadcast_to(tf.expand_dims(tf.cast(mask, dtype), -1), tf.shape(x))
        axes = self._reduction_axes
        ghost = self.virtual_batch_size is not None
        if ghost:
            groups = self._groups(x)
            shape = tf.concat([[groups, self.virtual_batch_size], tf.shape(x)[1:]], 0)
            x = tf.reshape(x, shape)
            if weights is not None:
                weights = tf.reshape(weights, shape)
            axes = [1] + [a + 1 for a in axes if a != 0]
        moments = synchronized_moments if self.synchronized else local_moments
        count, mean, variance = moments(x, axes, weights)
        # parameter-shaped statistics for the updates and renorm
        stat_axes = [0] if ghost else []
        batch_mean = tf.reshape(self._mean_over(mean, stat_axes), self._param_shape)
        batch_var = tf.reshape(self._mean_over(variance, stat_axes), self._param_shape)
        # Bessel's correction per ghost batch (count: its n; N of all replicas if synced)
        update_var = batch_var
        if self.bessel_correction:
            update_var = tf.reshape(
                self._mean_over(bessel_corrected(variance, count), stat_axes), self._param_shape
            )
        total = tf.broadcast_to(count, tf.shape(mean))
        if ghost:
            total = tf.reduce_sum(total, 0)
        total = tf.reshape(total, self._param_shape)

        gamma, beta = self._params(dtype)
        scale, offset = self._broadcast(gamma, ghost), self._broadcast(beta, ghost)
        if self.adjustment is not None:
            adj_scale, adj_bias = self.adjustment(tf.shape(original))
            adj_scale = tf.cast(adj_scale, dtype)
            adj_bias = tf.cast(adj_bias, dtype)
            scale, offset = _compose(adj_scale, adj_bias, scale, offset)
        if self.renorm:
            r, d = self._renorm_terms(batch_mean, batch_var)
            scale, offset = _compose(
                self._broadcast(r, ghost), self._broadcast(d, ghost), scale, offset
            )
        self._update_statistics(total, batch_mean, batch_var, update_var)
        y = tf.nn.batch_normalization(x, mean, variance, offset, scale, self.epsilon)
        if ghost:
            y = tf.reshape(y, tf.shape(original))
        return y

    @staticmethod
    def _mean_over(v: tf.Tensor, axes: list[int]) -> tf.Tensor:
        """``reduce_mean`` over ``axes`` (identity for none), 0 for empty axes."""
        if not axes:
            return v
        n = tf.cast(tf.reduce_prod(tf.gather(tf.shape(v), axes)), v.dtype)
        return tf.math.divide_no_nan(tf.reduce_sum(v, axes, keepdims=True), n)

    def _update_variance(self, variance: tf.Tensor, count: tf.Tensor | float) -> tf.Tensor:
        """The batch variance the moving variance receives (Bessel-corrected if asked)."""
        return bessel_corrected(variance, count) if self.bessel_correction else variance

    def _update_statistics(
        self,
        count: tf.Tensor | float,
        mean: tf.Tensor,
        variance: tf.Tensor,
        update_variance: tf.Tensor | None = None,
    ) -> None:
        """EMA updates from parameter-shaped batch moments; skipped where ``count == 0``.

        ``variance`` is the biased batch variance (renorm's ``renorm_stddev``);
        ``update_variance`` (default ``variance``) feeds the moving variance / stddev.
        ``count`` may be a Python number (static shapes): then no guard op is built.
        """
        if update_variance is None:
            update_variance = variance
        if self.ema_update == "skip":
            return
        if isinstance(count, (int, float)):
            if count == 0:
                return
            valid = None
        else:
            valid = tf.broadcast_to(tf.cast(count, mean.dtype) > 0, tf.shape(mean))
        mean = tf.stop_gradient(mean)
        variance = tf.stop_gradient(variance)
        update_variance = tf.stop_gradient(update_variance)

        def guarded(new: tf.Tensor, old: tf.Tensor) -> tf.Tensor:
            return new if valid is None else tf.where(valid, new, old)

        def ema(var: Any, value: tf.Tensor, momentum: float) -> None:
            old = tf.cast(var.value, value.dtype)
            new = old * momentum + value * (1.0 - momentum)
            var.assign(tf.cast(guarded(new, old), var.dtype))

        if not self.renorm:
            ema(self.moving_mean, mean, self.momentum)
            ema(self.moving_variance, update_variance, self.momentum)
            return
        stddev = tf.sqrt(variance + self.epsilon)
        ema(self.renorm_mean, mean, self.renorm_momentum)
        ema(self.renorm_stddev, stddev, self.renorm_momentum)
        ema(self.moving_mean, mean, self.momentum)
        ema(self.moving_stddev, tf.sqrt(update_variance + self.epsilon), self.momentum)
        moving_stddev = tf.cast(self.moving_stddev.value, mean.dtype)
        # relu: rounding must not make the variance negative
        variance = tf.nn.relu(moving_stddev * moving_stddev - self.epsilon)
        old = tf.cast(self.moving_variance.value, mean.dtype)
        self.moving_variance.assign(tf.cast(guarded(variance, old), self.moving_variance.dtype))

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        """Every constructor argument except ``adjustment`` (warns if one is set)."""
        if self.adjustment is not None:
            warnings.warn(
                f"Layer '{self.name}': the `adjustment` callable is not serialized; the "
                "layer re-created from this config has adjustment=None.",
                stacklevel=2,
            )
        base_config = super().get_config()
        config = {
            "axis": self._axis_arg,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "renorm": self.renorm,
            "renorm_clipping": dict(self.renorm_clipping) or None,
            "renorm_momentum": self.renorm_momentum,
            "synchronized": self.synchronized,
            "fused": self._fused_arg,
            "virtual_batch_size": self.virtual_batch_size,
            "ema_update": self.ema_update,
            "data_format": self.data_format,
            "bessel_correction": self.bessel_correction,
        }
        return {**base_config, **config}


@keras.saving.register_keras_serializable(package="bnexport")
class SyncBatchNormalization(BatchNormalization):
    """:class:`BatchNormalization` with ``synchronized=True`` (legacy tf.keras name).

    The statistics are those of the global batch over all replicas of the current
    ``tf.distribute`` strategy (Chan's combination of per-replica count/mean/M2).
    Outside a strategy it behaves like :class:`BatchNormalization`.
    """

    def __init__(self, axis: int | Sequence[int] | None = -1, **kwargs: Any):
        kwargs.pop("synchronized", None)
        super().__init__(axis=axis, synchronized=True, **kwargs)
