"""The TensorRT backend's orchestration against a functional fake of TensorRT + CUDA runtime.

What this verifies without a GPU: the build -> cache -> deserialize flow (engine and timing
cache files, cache hit on the second session), the optimization profile handed to the
builder, strongly typed fp16 from a float16 graph (TensorRT 11 has no BuilderFlag.FP16/BF16;
the fake defines only what the real module of its version has), the TF32 flag, bfloat16
I/O, input shapes set per run, the engine's device made current on every run, device
buffers copied in and out through the stream, and max_batch splitting. The fake "engine"
runs the parsed ONNX graph with onnx.reference on the bytes behind the fake device
pointers, so outputs are checked against NumPy (fp32: rtol 1e-5, atol 1e-6; fp16 graph:
rtol 2e-3, atol 2e-3; bfloat16 I/O: rtol 1e-2, one bfloat16 rounding of each value). Real
TensorRT numerics are tested in test_runtime_engine_cache.py (skipped without TensorRT).
"""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import onnx
import pytest
from runtime_models import dense_relu_model, dense_relu_reference, fused_norm_dense_model

from bnexport.errors import InputError, UsageError

LOG: list[tuple] = []


def _fake_cudart() -> types.ModuleType:
    m = types.ModuleType("fake_cudart")
    buffers: dict[int, ctypes.Array] = {}

    def malloc(n):
        buf = ctypes.create_string_buffer(n)
        buffers[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def memcpy(dst, src, n, kind, stream):
        LOG.append(("memcpy", kind, n))
        ctypes.memmove(dst, src, n)
        return (0,)

    m.cudaGetDeviceCount = lambda: (0, 1)
    m.cudaGetDeviceProperties = lambda i: (0, types.SimpleNamespace(name=b"Fake GPU\0\0"))
    m.cudaSetDevice = lambda i: (LOG.append(("set_device", i)), 0)[1:]
    m.cudaMalloc = malloc
    m.cudaFree = lambda p: (buffers.pop(p, None), 0)[1:]
    m.cudaStreamCreate = lambda: (0, 7)
    m.cudaStreamDestroy = lambda s: (0,)
    m.cudaStreamSynchronize = lambda s: (0,)
    m.cudaMemcpyAsync = memcpy
    m.cudaMemcpyKind = types.SimpleNamespace(
        cudaMemcpyHostToDevice="H2D", cudaMemcpyDeviceToHost="D2H"
    )
    return m


class _DataType:
    """A ``trt.DataType`` member (compared by identity, as TensorRT's enum values are)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"DataType.{self.name}"


def _fake_tensorrt(major: int = 11) -> types.ModuleType:
    """TensorRT ``major`` (11: strongly typed only, no ``BuilderFlag.FP16``/``BF16``; 10: both).

    Defines only names the real module of that version has. The engine runs the parsed
    ONNX graph with ``onnx.reference`` (which, unlike onnxruntime's Python API, takes
    ``ml_dtypes.bfloat16`` arrays) on the bytes behind the fake device pointers.
    """
    import onnx
    from onnx.reference import ReferenceEvaluator

    trt = types.ModuleType("tensorrt")
    trt.__version__ = f"{major}.0.0-fake"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=0: None})
    trt.init_libnvinfer_plugins = lambda logger, ns: LOG.append(("init_plugins", ns))
    # STRONGLY_TYPED: opt-in on 10.x, kept (ignored) on 11.x
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    flags = {"TF32": "tf32"} if major >= 11 else {"FP16": "fp16", "BF16": "bf16", "TF32": "tf32"}
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.float32, trt.float16, trt.bfloat16 = (_DataType(n) for n in ("FLOAT", "HALF", "BF16"))
    onnx_types = {
        onnx.TensorProto.FLOAT: trt.float32,
        onnx.TensorProto.FLOAT16: trt.float16,
        onnx.TensorProto.BFLOAT16: trt.bfloat16,
    }

    def nptype(dt):
        # as tensorrt.nptype: no NumPy equivalent for bfloat16
        mapping = {id(trt.float32): np.float32, id(trt.float16): np.float16}
        if id(dt) not in mapping:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return mapping[id(dt)]

    trt.nptype = nptype

    def np_of(dt):
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16) if dt is trt.bfloat16 else np.dtype(nptype(dt))

    class Network:
        model = None

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse(self, data, path=None):
            self.network.model = data
            return True

    class Profile(dict):
        def set_shape(self, name, lo, opt, hi):
            self[name] = (tuple(lo), tuple(opt), tuple(hi))

    class TimingCache:
        def serialize(self):
            return b"timing"

    class Config:
        def __init__(self):
            # TensorRT enables TF32 by default: the builder must clear it for fp32 engines
            self.flags, self.profiles = {"tf32"}, []

        def set_memory_pool_limit(self, pool, n):
            LOG.append(("pool", pool, n))

        def set_flag(self, f):
            self.flags.add(f)

        def clear_flag(self, f):
            self.flags.discard(f)

        def add_optimization_profile(self, p):
            self.profiles.append(p)

        def create_timing_cache(self, data):
            LOG.append(("timing_in", bytes(data)))
            return TimingCache()

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            LOG.append(("network_flags", flags))
            return Network()

        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            LOG.append(("build", sorted(config.flags), dict(config.profiles[0])))
            import pickle

            return pickle.dumps((network.model, dict(config.profiles[0])))

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addr = engine, {}, {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profile[name]
            ok = all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True))
            self.shapes[name] = tuple(shape)
            return ok

        def _feed(self):
            feed = {}
            for n, s in self.shapes.items():
                dt = np_of(self.engine.get_tensor_dtype(n))
                raw = (ctypes.c_char * (int(np.prod(s)) * dt.itemsize)).from_address(self.addr[n])
                feed[n] = np.frombuffer(raw, dt).reshape(s)
            return feed

        def get_tensor_shape(self, name):
            zeros = {
                n: np.zeros(s, np_of(self.engine.get_tensor_dtype(n)))
                for n, s in self.shapes.items()
            }
            return self.engine.run(zeros)[name].shape

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            for name, arr in self.engine.run(self._feed()).items():
                arr = np.ascontiguousarray(arr, np_of(self.engine.get_tensor_dtype(name)))
                ctypes.memmove(self.addr[name], arr.ctypes.data, arr.nbytes)
            LOG.append(("execute", stream))
            return True

    class Engine:
        def __init__(self, data):
            import pickle

            model, self.profile = pickle.loads(data)
            self.model = onnx.load_from_string(model)
            self.evaluator = ReferenceEvaluator(self.model)
            self.dtypes = {
                v.name: onnx_types[v.type.tensor_type.elem_type]
                for v in (*self.model.graph.input, *self.model.graph.output)
            }

        def run(self, feed):
            names = [o.name for o in self.model.graph.output]
            return dict(zip(names, self.evaluator.run(names, feed), strict=True))

        def get_tensor_dtype(self, name):
            return self.dtypes[name]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(data)

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    import bnexport.runtime.trt_backend as tb

    LOG.clear()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    monkeypatch.setattr(tb, "import_cudart", _fake_cudart)  # cuda_api.runtime() in production
    monkeypatch.setenv("BNEXPORT_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_build_run_split_and_cache(fake_trt):
    from bnexport.runtime import Session

    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    sess = Session(dense_relu_model(), backend="tensorrt", device="cuda", max_batch=4)
    assert sess.backend == "tensorrt" and sess._impl.device == "Fake GPU"
    assert not sess._impl.from_cache
    (build,) = [e for e in LOG if e[0] == "build"]
    assert build[1] == [] and build[2] == {"x": ((1, 4), (4, 4), (4, 4))}  # fp32: TF32 cleared
    assert [e[1] for e in LOG if e[0] == "network_flags"] == [1 << 1]  # STRONGLY_TYPED
    out = sess.run(x)  # 10 samples, max_batch 4: runs of 4 + 4 + 2
    ref = dense_relu_reference(x)
    for name in ("y", "z"):
        assert out[name].shape == (10, 3)
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-6)
    assert sum(e[0] == "execute" and e[1] == 7 for e in LOG) == 3
    assert {e[1] for e in LOG if e[0] == "memcpy"} == {"H2D", "D2H"}
    names = sorted(p.name for p in fake_trt.iterdir())
    assert names == [f"{sess._impl.cache_key}.engine", "timing-11.0.0-fake-Fake_GPU.cache"]

    LOG.clear()
    again = Session(dense_relu_model(), backend="tensorrt", device="cuda", max_batch=4)
    assert again._impl.from_cache and not [e for e in LOG if e[0] == "build"]
    np.testing.assert_array_equal(again.run(x)["y"], out["y"])
    fp16 = Session(
        dense_relu_model(), backend="tensorrt", device="cuda", precision="fp16", max_batch=4
    )
    assert fp16._impl.cache_key != sess._impl.cache_key  # flags are part of the key
    build = [e for e in LOG if e[0] == "build"][-1]
    assert build[1] == [] and ("timing_in", b"timing") in LOG  # no FP16 flag; timing reused
    # TensorRT 11: fp16 lives in the graph -- float16 weights, float32 inputs/outputs kept
    graph = fp16._impl.engine.model.graph
    assert {i.data_type for i in graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)} == {
        onnx.TensorProto.FLOAT
    }
    half = fp16.run(x)
    for name in ("y", "z"):
        assert half[name].dtype == np.float32
        np.testing.assert_allclose(half[name], ref[name], rtol=2e-3, atol=2e-3)


def test_profile_violation_is_an_input_error(fake_trt):
    from bnexport.runtime.io_check import tensor_infos_from_onnx
    from bnexport.runtime.trt_backend import TrtBackend

    model = dense_relu_model()
    backend = TrtBackend(
        model.SerializeToString(),
        tensor_infos_from_onnx(model.graph.input),
        tensor_infos_from_onnx(model.graph.output),
        max_batch=2,
    )
    with pytest.raises(InputError, match=r"outside the engine's profile"):
        backend.run({"x": np.zeros((3, 4), np.float32)})  # Session would split; raw backend refuses
    backend.close()


def test_plugin_build_engine_is_a_deprecated_alias_of_the_one_builder(
    fake_trt, monkeypatch, tmp_path
):
    """trt_plugin.build_engine warns and goes through trt_build: TF32 cleared, timing cache,
    the plugin registered for a FusedNorm graph (and only for one)."""
    import onnx
    from bnexport_plugins.fused_norm import tensorrt_plugin, trt_plugin

    from bnexport.runtime import trt_build

    monkeypatch.setattr(
        tensorrt_plugin, "register_fused_norm_plugin", lambda: LOG.append(("fused_norm_plugin",))
    )
    path, plain = tmp_path / "m.onnx", tmp_path / "plain.onnx"
    onnx.save(fused_norm_dense_model(), path)
    onnx.save(dense_relu_model(), plain)
    profile = {"x": ((1, 4), (2, 4), (8, 4))}
    timing = tmp_path / "timing.cache"
    with pytest.warns(DeprecationWarning, match=r"trt_build\.build_engine"):
        data = trt_plugin.build_engine(
            path, tmp_path / "m.engine", profiles=[profile], timing_cache=timing
        )
    assert (tmp_path / "m.engine").read_bytes() == data
    assert timing.read_bytes() == b"timing"
    assert ("fused_norm_plugin",) in LOG and ("init_plugins", "") in LOG
    (build,) = [e for e in LOG if e[0] == "build"]
    assert build[1] == [] and build[2] == profile  # TF32 cleared, as in the Session backend
    LOG.clear()
    trt_build.build_engine(plain, profiles=[profile])  # the one builder, called directly
    assert ("fused_norm_plugin",) not in LOG  # no FusedNorm node: no plugin needed
    LOG.clear()
    trt_plugin.build_engine(path, fp16=True, profiles=[profile])
    (build,) = [e for e in LOG if e[0] == "build"]
    assert build[1] == []  # strongly typed float16 graph, no BuilderFlag.FP16
    with pytest.raises(UsageError, match=r"bf16.*strongly typed"):
        trt_plugin.build_engine(path, bf16=True, profiles=[profile])  # TensorRT 11, fp32 graph
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(10))
    LOG.clear()
    trt_plugin.build_engine(path, bf16=True, tf32=True, profiles=[profile])
    (build,) = [e for e in LOG if e[0] == "build"]
    assert build[1] == ["bf16", "tf32"]  # TensorRT 10: BuilderFlag.BF16, weakly typed
    assert [e[1] for e in LOG if e[0] == "network_flags"] == [0]
    with pytest.raises(UsageError, match="fp16 or bf16"):
        trt_plugin.build_engine(path, fp16=True, bf16=True)


def test_parse_failure_names_the_source(fake_trt, monkeypatch, tmp_path):
    import onnx

    from bnexport.errors import ExportError
    from bnexport.runtime.trt_build import build_serialized_engine

    trt = sys.modules["tensorrt"]

    class BadParser:
        num_errors = 1

        def __init__(self, network, logger):
            pass

        def parse(self, data, path=None):
            return False

        def get_error(self, i):
            return "node 3: unsupported op"

    monkeypatch.setattr(trt, "OnnxParser", BadParser)
    path = tmp_path / "bad.onnx"
    onnx.save(dense_relu_model(), path)
    with pytest.raises(ExportError, match=r"could not parse '.*bad\.onnx': node 3: unsupported"):
        build_serialized_engine(path)


def _bf16_model() -> onnx.ModelProto:
    """``y = relu(x)·2`` with bfloat16 input and output (computed in float32 inside)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 4])
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Relu", ["xf"], ["r"]),
        helper.make_node("Add", ["r", "r"], ["r2"]),
        helper.make_node("Cast", ["r2"], ["y"], to=TensorProto.BFLOAT16),
    ]
    graph = helper.make_graph(nodes, "bf16_io", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_bfloat16_io(fake_trt):
    """bfloat16 engine tensors: trt.nptype has no NumPy type for them; ml_dtypes does."""
    import ml_dtypes

    from bnexport.runtime.io_check import tensor_infos_from_onnx
    from bnexport.runtime.trt_backend import TrtBackend

    model = _bf16_model()
    backend = TrtBackend(
        model.SerializeToString(),
        tensor_infos_from_onnx(model.graph.input),
        tensor_infos_from_onnx(model.graph.output),
        max_batch=4,
    )
    x = np.array([[1.5, -2.0, 3.25, 0.1], [-0.5, 7.0, 0.0, 2.0]], np.float32)
    out = backend.run({"x": x.astype(ml_dtypes.bfloat16)})["y"]
    assert out.dtype == ml_dtypes.bfloat16 and out.shape == (2, 4)
    np.testing.assert_allclose(out.astype(np.float32), 2 * np.maximum(x, 0), rtol=1e-2)
    backend.close()


def test_run_makes_the_engines_device_current(fake_trt):
    """cudaSetDevice is per thread: run() selects the engine's device before any copy."""
    import threading

    from bnexport.runtime.io_check import tensor_infos_from_onnx
    from bnexport.runtime.trt_backend import TrtBackend

    model = dense_relu_model()
    backend = TrtBackend(
        model.SerializeToString(),
        tensor_infos_from_onnx(model.graph.input),
        tensor_infos_from_onnx(model.graph.output),
        max_batch=4,
        device_id=0,
    )
    LOG.clear()
    x = np.ones((2, 4), np.float32)
    worker = threading.Thread(target=lambda: backend.run({"x": x}))
    worker.start()
    worker.join()
    first = [e[0] for e in LOG if e[0] in ("set_device", "memcpy")][:1]
    assert first == ["set_device"] and ("set_device", 0) in LOG
    backend.close()


def test_plugin_code_is_part_of_the_engine_key(fake_trt, monkeypatch):
    """An edited kernel or plugin must rebuild the engine, not load the stale one."""
    import bnexport.runtime.trt_backend as tb
    from bnexport.runtime.io_check import tensor_infos_from_onnx

    monkeypatch.setattr(tb, "register_plugins", lambda *a: None)
    monkeypatch.setattr("bnexport.runtime.trt_build.register_plugins", lambda *a: None)
    model = dense_relu_model()
    args = (
        model.SerializeToString(),
        tensor_infos_from_onnx(model.graph.input),
        tensor_infos_from_onnx(model.graph.output),
    )
    keys = []
    for digest in ("kernel-v1", "kernel-v2"):
        monkeypatch.setattr(tb, "plugin_digest", lambda d=digest: d)
        keys.append(tb.TrtBackend(*args, max_batch=2, needs_fused_norm=True).cache_key)
    plain = tb.TrtBackend(*args, max_batch=2).cache_key
    assert len({*keys, plain}) == 3


def test_graph_for_precision_keeps_what_must_stay_float32():
    """fp16 for a strongly typed build: FusedNorm's scale/shift stay float32, I/O float32;
    a float16 graph and a Q/DQ graph are built as they are."""
    from bnexport_plugins.fused_norm import onnx_node
    from onnx import TensorProto, helper

    from bnexport.runtime.trt_build import graph_for_precision

    onnx_node.register_onnx_schema()
    node = onnx_node.make_node(["x", "scale", "shift"], ["y"], name="fn", activation="relu")
    graph = helper.make_graph(
        [node],
        "fn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4, 4]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [8]),
            helper.make_tensor_value_info("shift", TensorProto.FLOAT, [8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), onnx_node.opset_import()]
    )
    typed, note = graph_for_precision(model, "fp16")
    assert note.startswith("converted to float16")
    (fused,) = [n for n in typed.graph.node if n.op_type == "FusedNorm"]
    casts = {n.output[0]: n for n in typed.graph.node if n.op_type == "Cast"}
    assert fused.input[0] in casts and fused.input[1:] == ["scale", "shift"]
    assert {v.type.tensor_type.elem_type for v in (*typed.graph.input, *typed.graph.output)} == {
        TensorProto.FLOAT
    }
    half, note = graph_for_precision(typed, "fp16")  # float16 inside already: as is
    assert half is typed and note is None
    qdq = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) {
            s = Constant <value = float {0.1}> ()
            z = Constant <value = int8 {0}> ()
            q = QuantizeLinear(x, s, z)
            y = DequantizeLinear(q, s, z)
        }"""
    )
    assert graph_for_precision(qdq, "fp16") == (qdq, None)
    assert graph_for_precision(model, "fp32") == (model, None)
