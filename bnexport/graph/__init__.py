"""onnx-ir graph editing below both the exporter and the runtime.

- :mod:`.utils`: constants, uses, fresh names, dtypes, rewiring (``append_to``, ``take_over``);
- :mod:`.shapes`: onnx-ir's shape inference with its failure kept;
- :mod:`.islands`: float16's range and float32 islands;
- :mod:`.float16`: float32 -> float16 graph conversion, used by the exporter
  (``dtype="float16"``) and by the TensorRT builder (``precision="fp16"``).

The exporter's passes (:mod:`bnexport.export.passes`) and the runtime
(:mod:`bnexport.runtime.trt_build`) both import from here; nothing here imports either.
"""
