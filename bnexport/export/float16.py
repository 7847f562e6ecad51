"""Float16 conversion of an exported graph: lives in :mod:`bnexport.graph.float16`.

The converter sits below both the exporter and the runtime (the TensorRT builder converts
float32 graphs for ``precision="fp16"``); this module keeps the exporter's public path.
"""

from bnexport.graph.float16 import (
    Float16ConversionPass,
    IODtype,
    convert_initializers,
    convert_to_float16,
    convert_values,
    float32_io,
    overflowing_nodes,
    values_kept_float32,
)

__all__ = [
    "Float16ConversionPass",
    "IODtype",
    "convert_initializers",
    "convert_to_float16",
    "convert_values",
    "float32_io",
    "overflowing_nodes",
    "values_kept_float32",
]
