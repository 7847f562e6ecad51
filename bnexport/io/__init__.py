"""Loaders for the files users hand to bnexport, translating every failure into a typed error.

- :func:`bnexport.io.onnx_file.load_onnx`: ``.onnx`` files and bytes (protobuf decode,
  external data confined to the model's folder), plus :func:`~bnexport.io.onnx_file.
  onnxruntime_load_errors` for sessions built from them.
- :func:`bnexport.io.arrays.load_arrays`: ``.npy`` / ``.npz`` files, never unpickling.
- :func:`bnexport.io.keras_file.check_keras_source`: a cheap look at a ``.keras`` / ``.h5`` /
  SavedModel path before Keras or TensorFlow is asked to load it.

Each raises :class:`~bnexport.errors.FileMissingError` or a
:class:`~bnexport.errors.FileFormatError` subclass naming the file, so the Python API
and the CLI (one line, exit 2) report the same thing. Nothing here imports TensorFlow.
"""
