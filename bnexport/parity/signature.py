"""Refuse a parity run whose two models do not take the same inputs, in one line.

Without this check a mismatched pair (``parity digits.keras mobilenet.onnx``) reaches
Keras with the ONNX graph's inputs and ends in a Keras ``ValueError`` traceback. The
rule: the same number of inputs, paired by name where the names agree and by position
otherwise, each with the same rank and the same size on every axis that both models
fix. The batch axis and dynamic axes are free (parity feeds both models the same arrays).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bnexport.errors import SignatureMismatchError


def _dims(shape: Sequence[Any] | None) -> list[int | None] | None:
    if shape is None:
        return None
    return [None if d is None or (isinstance(d, int) and d < 0) else int(d) for d in shape]


def _describe(signature: Sequence[tuple[str, list[int | None] | None, str]]) -> str:
    def one(name: str, dims: list[int | None] | None, dtype: str) -> str:
        shape = "?" if dims is None else ", ".join("?" if d is None else str(d) for d in dims)
        return f"{name}: {dtype}[{shape}]"

    return "(" + "; ".join(one(*s) for s in signature) + ")"


def keras_signature(keras_model: Any) -> list[tuple[str, list[int | None] | None, str]]:
    """``[(name, shape, dtype)]`` of a Keras model's inputs (``None``: dynamic)."""
    import numpy as np

    signature = []
    for i, tensor in enumerate(getattr(keras_model, "inputs", None) or []):
        name = getattr(tensor, "name", None) or f"input_{i}"
        dtype = np.dtype(getattr(tensor.dtype, "name", tensor.dtype) or "float32").name
        signature.append((str(name).split(":")[0], _dims(tuple(tensor.shape)), dtype))
    return signature


def check_signatures(
    keras_model: Any, onnx_inputs: Sequence[Any], keras_desc: str, onnx_desc: str
) -> None:
    """Raise unless the Keras model and the ONNX graph take the same inputs.

    Args:
        keras_model: the reference model (its ``inputs``; a subclassed model without
            them is not checked).
        onnx_inputs: the graph's inputs (:class:`bnexport.runtime.io_check.TensorInfo`).
        keras_desc: how to name the Keras model (its path).
        onnx_desc: how to name the ONNX model (its path).

    Raises:
        SignatureMismatchError: the count, a rank or a fixed size differs; the message
            is one line with both signatures.
    """
    keras_sig = keras_signature(keras_model)
    if not keras_sig:
        return
    onnx_sig = [
        (t.name, _dims(t.shape), str(getattr(t.dtype, "name", t.dtype))) for t in onnx_inputs
    ]
    problem = None
    if len(keras_sig) != len(onnx_sig):
        problem = f"{len(keras_sig)} input(s) vs {len(onnx_sig)}"
    else:
        by_name = {name: (dims, dtype) for name, dims, dtype in onnx_sig}
        pairs = (
            [(k, (k[0], *by_name[k[0]])) for k in keras_sig]
            if {k[0] for k in keras_sig} == set(by_name)
            else list(zip(keras_sig, onnx_sig, strict=True))
        )
        for (k_name, k_dims, _), (o_name, o_dims, _) in pairs:
            if k_dims is None or o_dims is None:
                continue
            if len(k_dims) != len(o_dims):
                problem = f"input {k_name!r} has rank {len(k_dims)}, {o_name!r} rank {len(o_dims)}"
                break
            fixed = [
                axis
                for axis, (a, b) in enumerate(zip(k_dims, o_dims, strict=True))
                if axis and a is not None and b is not None and a != b
            ]
            if fixed:
                axis = fixed[0]
                problem = (
                    f"input {k_name!r} axis {axis} is {k_dims[axis]}, "
                    f"{o_name!r} axis {axis} is {o_dims[axis]}"
                )
                break
    if problem is not None:
        raise SignatureMismatchError(
            f"{onnx_desc} does not take the inputs of {keras_desc} ({problem}): "
            f"Keras {_describe(keras_sig)}, ONNX {_describe(onnx_sig)}"
        )
