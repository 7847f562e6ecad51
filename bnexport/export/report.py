"""What became of each batch normalization during export or folding."""

from __future__ import annotations

import dataclasses
from typing import Literal

Action = Literal["folded_forward", "folded_backward", "fused", "kept"]


@dataclasses.dataclass
class FoldRecord:
    """The fate of one BN (a Keras layer, or an ONNX BatchNormalization / Mul-Add chain).

    Attributes:
        name: the Keras layer name, or the ONNX node name when no layer is known.
        action: ``folded_forward`` (into the producing linear op), ``folded_backward``
            (into the consuming linear op), ``fused`` (became one node), or ``kept``.
        target: the ONNX node it was folded into or that replaced it; ``None`` if kept.
        reason: why this action (for ``fused``/``kept``: why folding was refused).
    """

    name: str
    action: Action
    target: str | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, str | None]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)
