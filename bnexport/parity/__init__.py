"""Numeric parity of exported models: Keras (reference) vs onnxruntime / TensorRT.

``check_parity`` and the result types are imported lazily so ``import
bnexport.parity`` stays light.
"""

from __future__ import annotations

from bnexport.lazy_names import lazy_names

_LAZY = {
    "check_parity": "bnexport.parity.check",
    "ParityReport": "bnexport.parity.report",
    "compare_arrays": "bnexport.parity.compare",
    "Comparison": "bnexport.parity.compare",
    "check_training_mode": "bnexport.parity.training_mode",
    "KerasRunner": "bnexport.parity.runners",
    "OnnxrtRunner": "bnexport.parity.runners",
    "TrtRunner": "bnexport.parity.runners",
    "LayerLoss": "bnexport.parity.quantized",
    "rank_layer_losses": "bnexport.parity.quantized",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
