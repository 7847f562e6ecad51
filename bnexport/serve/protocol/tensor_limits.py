"""The shape check every request tensor passes, over HTTP and gRPC alike.

A request names its tensors' shapes before their data; the shape is checked
first, so that neither codec builds an array NumPy cannot hold (rank above 64,
or a byte size above ``2**63 - 1`` even when another dimension is 0: NumPy
refuses those with a ``ValueError`` that would otherwise end the request as a
500) nor computes with sizes no body could carry. The rules::

    every dimension  0 <= d <= MAX_DIM
    rank             len(shape) <= MAX_RANK
    bytes            prod(max(d, 1) for d in shape) * itemsize <= MAX_BYTES

(zero dimensions count as 1 in the byte rule: NumPy applies its size limit to
the other dimensions of an empty array too). Each refusal is a 400 /
``INVALID_ARGUMENT`` naming the input. The element count a valid shape needs is
then compared with the data given by the codec.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bnexport.serve.protocol.errors import BadRequestError

#: most dimensions of a request tensor (NumPy allows 64; models rarely pass 8)
MAX_RANK = 32
#: largest dimension of a request tensor
MAX_DIM = 2**62
#: largest byte size a shape may describe, zero dimensions counted as 1 (NumPy's is 2**63 - 1)
MAX_BYTES = 2**62


def check_shape(name: str, shape: Sequence[int], dtype: np.dtype) -> int:
    """Check the shape of input ``name`` against the limits; its element count.

    Args:
        name: the input's name, for the message.
        shape: the shape the request gives.
        dtype: the NumPy dtype of the input's datatype (``object`` for ``BYTES``).

    Raises:
        BadRequestError: a negative or too large dimension, too many dimensions, or a
            shape larger than :data:`MAX_BYTES` (message names the input).
    """
    if len(shape) > MAX_RANK:
        raise BadRequestError(
            f"input '{name}': shape has {len(shape)} dimensions; at most {MAX_RANK} are accepted"
        )
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise BadRequestError(f"input '{name}': shape {dims} has a negative dimension")
    if any(d > MAX_DIM for d in dims):
        raise BadRequestError(f"input '{name}': shape {dims} has a dimension above {MAX_DIM}")
    if math.prod(max(d, 1) for d in dims) * max(dtype.itemsize, 1) > MAX_BYTES:
        raise BadRequestError(
            f"input '{name}': shape {dims} describes more than {MAX_BYTES} bytes "
            f"of {dtype.name} (zero dimensions counted as 1)"
        )
    return math.prod(dims)
