"""bnexport plugins: custom ops with a CUDA kernel, a TensorRT plugin and a NumPy reference.

Installed as the ``bnexport_plugins`` package (see ``pyproject.toml``).
"""
