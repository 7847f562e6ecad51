"""KServe v2 (Open Inference Protocol) HTTP/REST data models.

One pydantic-2 model per protocol object. Each docstring quotes the grammar of
the object as the specification writes it, and each model carries an example
(``model_config["json_schema_extra"]``), so the OpenAPI page FastAPI serves shows
a valid request or response.

Only the JSON header of an inference request is described here. Tensor
payloads sent with Triton's binary-tensor extension are handled by
:mod:`bnexport.serve.protocol.binary`; conversion between ``$tensor_data`` and NumPy by
:mod:`bnexport.serve.protocol.codec`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: ``$parameter = $string : $string | $number | $boolean``
Parameters = dict[str, str | bool | int | float]


class ErrorResponse(BaseModel):
    """Error body of every failed request.

    Grammar::

        $inference_error_response =
        {
          "error" : <error message string>
        }
    """

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"error": "unknown model 'resnet50'"}]}
    )

    error: str


class ServerLiveResponse(BaseModel):
    """Body of ``GET v2/health/live`` (the status code carries the answer).

    Grammar::

        $live_server_response =
        {
          "live" : $bool
        }
    """

    model_config = ConfigDict(json_schema_extra={"examples": [{"live": True}]})

    live: bool


class ServerReadyResponse(BaseModel):
    """Body of ``GET v2/health/ready`` (200 when ready, 4xx otherwise).

    Grammar::

        $ready_server_response =
        {
          "ready" : $bool
        }
    """

    model_config = ConfigDict(json_schema_extra={"examples": [{"ready": True}]})

    ready: bool


class ModelReadyResponse(BaseModel):
    """Body of ``GET v2/models/${MODEL_NAME}[/versions/${MODEL_VERSION}]/ready``.

    Grammar::

        $ready_model_response =
        {
          "name" : $string,
          "ready" : $bool
        }
    """

    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "digits", "ready": True}]})

    name: str
    ready: bool


class ServerMetadataResponse(BaseModel):
    """Body of ``GET v2``.

    Grammar::

        $metadata_server_response =
        {
          "name" : $string,
          "version" : $string,
          "extensions" : [ $string, ... ]
        }
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "bnexport", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
            ]
        }
    )

    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)


class MetadataTensor(BaseModel):
    """One input or output in a model's metadata; ``-1`` marks a dynamic dimension.

    Grammar::

        $metadata_tensor =
        {
          "name" : $string,
          "datatype" : $string,
          "shape" : [ $number, ... ]
        }
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
        }
    )

    name: str
    datatype: str
    shape: list[int]


class ModelMetadataResponse(BaseModel):
    """Body of ``GET v2/models/${MODEL_NAME}[/versions/${MODEL_VERSION}]``.

    Grammar::

        $metadata_model_response =
        {
          "name" : $string,
          "versions" : [ $string, ... ] #optional,
          "platform" : $string,
          "inputs" : [ $metadata_tensor, ... ],
          "outputs" : [ $metadata_tensor, ... ]
        }
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "digits",
                    "versions": ["1"],
                    "platform": "onnxruntime_onnx",
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8, 1]}],
                    "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}],
                }
            ]
        }
    )

    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class RequestInput(BaseModel):
    """One input tensor of an inference request.

    ``data`` holds the elements in row-major order, flat or nested; it is absent
    when the tensor travels as binary data (``parameters.binary_data_size``).

    Grammar::

        $request_input =
        {
          "name" : $string,
          "shape" : [ $number, ... ],
          "datatype"  : $string,
          "parameters" : $parameters #optional,
          "data" : $tensor_data
        }
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}
            ]
        }
    )

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    """One output a client asks for (all outputs are returned when none is named).

    Grammar::

        $request_output =
        {
          "name" : $string,
          "parameters" : $parameters #optional,
        }
    """

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "probs", "parameters": {"binary_data": True}}]}
    )

    name: str
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    """Body (JSON header) of ``POST v2/models/${MODEL_NAME}[/versions/${MODEL_VERSION}]/infer``.

    Grammar::

        $inference_request =
        {
          "id" : $string #optional,
          "parameters" : $parameters #optional,
          "inputs" : [ $request_input, ... ],
          "outputs" : [ $request_output, ... ] #optional
        }
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [
                        {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}
                    ],
                    "outputs": [{"name": "y"}],
                }
            ]
        }
    )

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    """One output tensor of an inference response.

    Grammar::

        $response_output =
        {
          "name" : $string,
          "shape" : [ $number, ... ],
          "datatype"  : $string,
          "parameters" : $parameters #optional,
          "data" : $tensor_data
        }
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "y", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 0.5]}]
        }
    )

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    """Body (JSON header) of a successful inference response.

    Grammar::

        $inference_response =
        {
          "model_name" : $string,
          "model_version" : $string #optional,
          "id" : $string,
          "parameters" : $parameters #optional,
          "outputs" : [ $response_output, ... ]
        }
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "digits",
                    "model_version": "1",
                    "id": "42",
                    "outputs": [
                        {"name": "y", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 0.5]}
                    ],
                }
            ]
        }
    )

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]
