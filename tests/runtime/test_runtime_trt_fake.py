"""The TensorRT backend's orchestration against a functional fake of TensorRT + CUDA runtime.

What this verifies without a GPU: the build -> cache -> deserialize flow (engine and timing
cache files, cache hit on the second session), the optimization profile handed to the
builder, the FP16/TF32 flags, input shapes set per run, device buffers copied in and out
through the stream, and max_batch splitting. The fake "engine" runs the ONNX graph with
onnxruntime on the bytes behind the fake device pointers, so outputs are checked against
NumPy (fp32: rtol 1e-5, atol 1e-6). Real TensorRT numerics are tested in
test_runtime_engine_cache.py (skipped without TensorRT).
"""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import pytest
from runtime_models import dense_relu_model, dense_relu_reference

from bnexport.errors import InputError

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
    m.cudaSetDevice = lambda i: (0,)
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


def _fake_tensorrt() -> types.ModuleType:
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0-fake"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=0: None})
    trt.init_libnvinfer_plugins = lambda logger, ns: LOG.append(("init_plugins", ns))
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace()
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16", BF16="bf16", TF32="tf32")
    trt.nptype = lambda dt: np.float32

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
            return {
                n: np.frombuffer(
                    (ctypes.c_char * (int(np.prod(s)) * 4)).from_address(self.addr[n]), np.float32
                ).reshape(s)
                for n, s in self.shapes.items()
            }

        def get_tensor_shape(self, name):
            zeros = {n: np.zeros(s, np.float32) for n, s in self.shapes.items()}
            return self.engine.sess.run([name], zeros)[0].shape

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            outs = self.engine.sess.run(None, self._feed())
            for meta, arr in zip(self.engine.sess.get_outputs(), outs, strict=True):
                arr = np.ascontiguousarray(arr, np.float32)
                ctypes.memmove(self.addr[meta.name], arr.ctypes.data, arr.nbytes)
            LOG.append(("execute", stream))
            return True

    class Engine:
        def __init__(self, data):
            import pickle

            model, self.profile = pickle.loads(data)
            self.sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

        def get_tensor_dtype(self, name):
            return "float"

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
    out = sess.run(x)  # 10 samples, max_batch 4: runs of 4 + 4 + 2
    ref = dense_relu_reference(x)
    for name in ("y", "z"):
        assert out[name].shape == (10, 3)
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-6)
    assert sum(e[0] == "execute" and e[1] == 7 for e in LOG) == 3
    assert {e[1] for e in LOG if e[0] == "memcpy"} == {"H2D", "D2H"}
    names = sorted(p.name for p in fake_trt.iterdir())
    assert names == [f"{sess._impl.cache_key}.engine", "timing-10.9.0-fake-Fake_GPU.cache"]

    LOG.clear()
    again = Session(dense_relu_model(), backend="tensorrt", device="cuda", max_batch=4)
    assert again._impl.from_cache and not [e for e in LOG if e[0] == "build"]
    np.testing.assert_array_equal(again.run(x)["y"], out["y"])
    fp16 = Session(
        dense_relu_model(), backend="tensorrt", device="cuda", precision="fp16", max_batch=4
    )
    assert fp16._impl.cache_key != sess._impl.cache_key  # flags are part of the key
    build = [e for e in LOG if e[0] == "build"][-1]
    assert build[1] == ["fp16"] and ("timing_in", b"timing") in LOG  # timing cache reused


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


def test_plugin_build_engine_is_the_same_builder(fake_trt, monkeypatch, tmp_path):
    """trt_plugin.build_engine goes through trt_build: TF32 cleared, timing cache, plugin."""
    import onnx
    from bnexport_plugins.fused_norm import trt_plugin

    from bnexport.errors import UsageError

    monkeypatch.setattr(trt_plugin, "_tensorrt", lambda: (sys.modules["tensorrt"], None))
    monkeypatch.setattr(
        trt_plugin, "register_fused_norm_plugin", lambda: LOG.append(("fused_norm_plugin",))
    )
    path = tmp_path / "m.onnx"
    onnx.save(dense_relu_model(), path)
    profile = {"x": ((1, 4), (2, 4), (8, 4))}
    timing = tmp_path / "timing.cache"
    data = trt_plugin.build_engine(
        path, tmp_path / "m.engine", profiles=[profile], timing_cache=timing
    )
    assert (tmp_path / "m.engine").read_bytes() == data
    assert timing.read_bytes() == b"timing"
    assert ("fused_norm_plugin",) in LOG and ("init_plugins", "") in LOG
    (build,) = [e for e in LOG if e[0] == "build"]
    assert build[1] == [] and build[2] == profile  # TF32 cleared, as in the Session backend
    LOG.clear()
    trt_plugin.build_engine(path, bf16=True, tf32=True, profiles=[profile])
    (build,) = [e for e in LOG if e[0] == "build"]
    assert build[1] == ["bf16", "tf32"]
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
