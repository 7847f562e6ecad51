"""MLServer custom runtime serving one ONNX file with onnxruntime (the peer in serve_bench.py).

Runs inside MLServer's own venv (``mlserver==1.7.1``), never imported by bnexport.
The session is built like ``bnexport serve``'s defaults on CPU: onnxruntime's own
thread count, idle threads not spinning (``session.intra_op.allow_spinning=0``),
memory arena on. MLServer's adaptive batching (``max_batch_size`` /
``max_batch_time`` in ``model-settings.json``) merges requests before ``predict``;
``predict`` runs the merged batch and returns every output, or those requested.

``model-settings.json``::

    {"name": "digits", "implementation": "ort_runtime.OnnxRuntimeModel",
     "max_batch_size": 32, "max_batch_time": 0.002,
     "parameters": {"uri": "/abs/path/model.onnx"}}
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntimeModel(MLModel):
    """``predict``: decode inputs with ``NumpyCodec``, one ``InferenceSession.run``, encode."""

    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        uri = self.settings.parameters.uri
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {inp.name: NumpyCodec.decode_input(inp) for inp in payload.inputs}
        wanted = [o.name for o in payload.outputs] if payload.outputs else self._outputs
        values = self._session.run(wanted, feed)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(wanted, values, strict=True)],
        )
