"""Exception types a caller can catch.

Every error names the layer, node, input or field at fault. The CLI turns any
``BnexportError`` into one readable line and a non-zero exit code; only
unexpected exceptions produce a traceback.
"""

from __future__ import annotations


class BnexportError(Exception):
    """Base class of every expected error raised by bnexport."""


class LayerConfigError(BnexportError, ValueError):
    """A layer argument is invalid (names the argument and the value received)."""


class ExportError(BnexportError):
    """A model could not be exported (names the layer or node at fault)."""


class FoldError(ExportError):
    """A graph pass met a node it cannot handle (names the node)."""


class VerificationError(ExportError):
    """The exported graph disagrees with the source model beyond tolerance."""


class InputError(BnexportError, ValueError):
    """An inference input is missing, unknown, or has the wrong shape/dtype."""


class BackendUnavailableError(BnexportError):
    """A requested backend (TensorRT, CUDA, ...) is not installed or has no device."""


class PluginError(BnexportError):
    """The fused-normalization op was given attributes or tensors it cannot run."""


class UsageError(BnexportError):
    """A command-line argument or file given by the user is unusable."""


class QuantizeError(BnexportError):
    """A graph could not be quantized to INT8 (names the node, input or option at fault)."""


class CalibrationError(QuantizeError, ValueError):
    """Calibration data is empty or has the wrong input name, shape or dtype (names the input)."""
