"""Bad inputs to the CLI and the Python API: one clear error, nothing destroyed.

Every CLI case asserts: a non-zero exit, exactly one line on stderr, no traceback,
the culprit file named in that line, every input byte-identical afterwards and
nothing left at the output target. Every API case asserts a ``BnexportError``
naming the culprit. The files are what a careless user or an attacker hands over:
empty, text, random bytes, truncated, unknown ops, external-data tricks, pickled
arrays, zips of garbage, and outputs that point at inputs.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnexport
from bnexport.cli.main import main
from bnexport.errors import BnexportError

W = np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2)


def _model(*, op="MatMul", domain="", location=None, dangling=False) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    init = numpy_helper.from_array(W, "W")
    if location is not None:  # weights "stored" in an external file
        init.ClearField("raw_data")
        init.data_location = TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", location
    inputs = ["x", "nowhere" if dangling else "W"]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], domain=domain)], "g", [x], [y], [init]
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


BAD_ONNX = {
    # name -> (description of what is wrong, file writer)
    "empty": lambda d, good: (d / "empty.onnx").write_bytes(b""),
    "text": lambda d, good: (d / "text.onnx").write_text("this is not a model\n"),
    "random": lambda d, good: (d / "random.onnx").write_bytes(np.random.default_rng(1).bytes(4096)),
    "truncated": lambda d, good: (d / "truncated.onnx").write_bytes(good[: len(good) // 2]),
    "unknown_op": lambda d, good: onnx.save(_model(op="NoSuchOp"), d / "unknown_op.onnx"),
    "custom_domain": lambda d, good: onnx.save(
        _model(op="Evil", domain="com.evil"), d / "custom_domain.onnx"
    ),
    "dangling": lambda d, good: onnx.save(_model(dangling=True), d / "dangling.onnx"),
    "ext_traversal": lambda d, good: onnx.save(
        _model(location="../secret.bin"), d / "ext_traversal.onnx"
    ),
    "ext_absolute": lambda d, good: onnx.save(
        _model(location=str(d.parent / "secret.bin")), d / "ext_absolute.onnx"
    ),
    "ext_missing": lambda d, good: onnx.save(
        _model(location="missing.bin"), d / "ext_missing.onnx"
    ),
    "ext_symlink": lambda d, good: (
        os.symlink(d.parent / "secret.bin", d / "link.bin"),
        onnx.save(_model(location="link.bin"), d / "ext_symlink.onnx"),
    ),
}
#: bad files whose trouble onnx itself sees (the rest only onnxruntime sees)
DECODE_BAD = ["empty", "text", "random", "truncated"]
EXT_BAD = ["ext_traversal", "ext_absolute", "ext_missing", "ext_symlink"]
ORT_BAD = ["unknown_op", "custom_domain", "dangling"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    d = root / "files"
    d.mkdir()
    (root / "secret.bin").write_bytes(W.tobytes())  # what external-data tricks point at
    good = d / "good.onnx"
    onnx.save(_model(), good)
    out = {"good": good, "dir": d}
    for name, write in BAD_ONNX.items():
        write(d, good.read_bytes())
        out[name] = d / f"{name}.onnx"
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.save(d / "x.npy", x)
    np.savez(d / "io.npz", x=x)
    buf = io.BytesIO()
    np.save(buf, x)
    (d / "truncated.npy").write_bytes(buf.getvalue()[:-20])
    (d / "text.npy").write_text("1 2 3 4\n")
    (d / "empty.npy").write_bytes(b"")
    np.save(d / "pickled.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (d / "truncated.npz").write_bytes((d / "io.npz").read_bytes()[:-40])
    (d / "garbage.npz").write_bytes(np.random.default_rng(2).bytes(1000))
    np.savez(d / "pickled.npz", x=np.array([{"a": 1}], dtype=object))
    for name in ("x.npy", "io.npz", "truncated.npy", "text.npy", "empty.npy", "pickled.npy"):
        out[name] = d / name
    for name in ("truncated.npz", "garbage.npz", "pickled.npz"):
        out[name] = d / name
    return out


@pytest.fixture(scope="module")
def keras_files(files) -> dict[str, Path]:
    import keras

    d = files["dir"]
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
    model.save(d / "m.keras")
    (d / "text.keras").write_text("not a keras archive\n")
    with zipfile.ZipFile(d / "garbage.keras", "w") as zf:
        zf.writestr("config.json", b"\x00\xff garbage {")
        zf.writestr("model.weights.h5", np.random.default_rng(3).bytes(512))
    (d / "empty.keras").write_bytes(b"")
    (d / "random.h5").write_bytes(np.random.default_rng(4).bytes(2048))
    # pass the cheap checks, fail inside Keras / h5py / TensorFlow
    (d / "hdf5_garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + np.random.default_rng(5).bytes(3000))
    with zipfile.ZipFile(d / "unknown_class.keras", "w") as zf:
        zf.writestr("config.json", '{"class_name": "NoSuchLayer", "config": {}}')
    with zipfile.ZipFile(d / "no_weights.keras", "w") as zf:
        zf.writestr("config.json", "{}")
    (d / "not_a_savedmodel").mkdir()
    (d / "garbage_savedmodel").mkdir()
    (d / "garbage_savedmodel" / "saved_model.pb").write_bytes(np.random.default_rng(6).bytes(300))
    names = ["m.keras", "text.keras", "garbage.keras", "empty.keras", "random.h5"]
    names += ["hdf5_garbage.h5", "unknown_class.keras", "no_weights.keras"]
    folders = ["not_a_savedmodel", "garbage_savedmodel"]
    return {n: d / n for n in names + folders}


def _copy(src: Path, folder: Path) -> Path:
    """A private copy of a shared fixture file, for cases that might destroy their input."""
    dst = folder / src.name
    dst.write_bytes(src.read_bytes())
    return dst


def _snapshot(paths) -> dict[Path, bytes]:
    return {Path(p): Path(p).read_bytes() for p in paths if Path(p).is_file()}


def refused(capfd, argv, culprit, *, keep=(), absent=(), code=None) -> str:
    """Run the CLI in-process; assert the failure contract; return the error line."""
    before = _snapshot(keep)
    capfd.readouterr()
    rc = main([str(a) for a in argv])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0, f"exit 0 for {argv}"
    if code is not None:
        assert rc == code, (rc, err)
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert Path(culprit).name in lines[0], f"culprit {Path(culprit).name} not named: {lines[0]}"
    assert _snapshot(keep) == before, "an input was modified"
    for path in absent:
        assert not Path(path).exists(), f"{path} was written"
    leftovers = [p for k in keep for p in Path(k).parent.glob(".*.tmp*")]
    assert not leftovers, leftovers
    return lines[0]


# --------------------------------------------------------------------------- run


@pytest.mark.parametrize("bad", DECODE_BAD + ORT_BAD + EXT_BAD)
def test_run_bad_model(files, capfd, tmp_path, bad):
    out = tmp_path / "out.npz"
    argv = ["run", files[bad], "-i", files["x.npy"], "-o", out]
    refused(capfd, argv, files[bad], keep=[files[bad], files["x.npy"]], absent=[out])


@pytest.mark.parametrize(
    "data",
    ["truncated.npy", "text.npy", "empty.npy", "pickled.npy"]
    + ["truncated.npz", "garbage.npz", "pickled.npz"],
)
def test_run_bad_arrays(files, capfd, tmp_path, data):
    out = tmp_path / "out.npz"
    argv = ["run", files["good"], "-i", files[data], "-o", out]
    refused(capfd, argv, files[data], keep=[files[data], files["good"]], absent=[out])


def test_run_model_is_a_folder(files, capfd):
    refused(capfd, ["run", files["dir"], "-i", files["x.npy"]], files["dir"])


def test_run_output_is_the_input(files, capfd, tmp_path):
    io_npz = _copy(files["io.npz"], tmp_path)
    refused(capfd, ["run", files["good"], "-i", io_npz, "-o", io_npz], io_npz, keep=[io_npz])


def test_run_output_is_a_symlink_to_the_input(files, capfd, tmp_path):
    link = tmp_path / "link.npz"
    link.symlink_to(files["io.npz"])
    argv = ["run", files["good"], "-i", files["io.npz"], "-o", link]
    refused(capfd, argv, "link.npz", keep=[files["io.npz"]])
    assert link.is_symlink()


# --------------------------------------------------------------------------- fold


@pytest.mark.parametrize("bad", DECODE_BAD + EXT_BAD)
def test_fold_bad_model(files, capfd, tmp_path, bad):
    out = tmp_path / "out.onnx"
    refused(capfd, ["fold", files[bad], "-o", out], files[bad], keep=[files[bad]], absent=[out])


def test_fold_json_is_the_output(files, capfd, tmp_path):
    out = tmp_path / "out.onnx"
    argv = ["fold", files["good"], "-o", out, "--json", out]
    refused(capfd, argv, out, keep=[files["good"]], absent=[out], code=2)


def test_fold_json_is_the_input(files, capfd, tmp_path):
    out, good = tmp_path / "out.onnx", _copy(files["good"], tmp_path)
    argv = ["fold", good, "-o", out, "--json", good]
    refused(capfd, argv, good, keep=[good], absent=[out], code=2)


def test_fold_in_place_is_allowed(files, capfd, tmp_path):
    model = tmp_path / "inplace.onnx"
    model.write_bytes(files["good"].read_bytes())
    assert main(["fold", str(model), "-o", str(model)]) == 0
    onnx.checker.check_model(onnx.load(model), full_check=True)


def test_fold_help_says_in_place_is_allowed(capsys):
    with pytest.raises(SystemExit):
        main(["fold", "--help"])
    assert "in place" in capsys.readouterr().out


# --------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("bad", ["random", "truncated", "ext_traversal"])
def test_quantize_bad_model(files, capfd, tmp_path, bad):
    out = tmp_path / "q.onnx"
    argv = ["quantize", files[bad], "-o", out, "--calibration", files["x.npy"]]
    refused(capfd, argv, files[bad], keep=[files[bad]], absent=[out])


@pytest.mark.parametrize("data", ["pickled.npz", "truncated.npy", "text.npy"])
def test_quantize_bad_calibration(files, capfd, tmp_path, data):
    out = tmp_path / "q.onnx"
    argv = ["quantize", files["good"], "-o", out, "--calibration", files[data]]
    refused(capfd, argv, files[data], keep=[files[data], files["good"]], absent=[out])


def test_quantize_output_is_the_calibration(files, capfd, tmp_path):
    data = _copy(files["x.npy"], tmp_path)
    argv = ["quantize", files["good"], "-o", data, "--calibration", data]
    refused(capfd, argv, data, keep=[data, files["good"]], code=2)


def test_quantize_missing_output_folder_is_exit_2(files, capfd, tmp_path):
    out = tmp_path / "absent" / "q.onnx"
    argv = ["quantize", files["good"], "-o", out, "--calibration", files["x.npy"]]
    refused(capfd, argv, out.parent, keep=[files["good"]], absent=[out], code=2)


# --------------------------------------------------------------------------- triton-repo


@pytest.mark.parametrize("bad", ["empty", "text", "random", "truncated", "ext_traversal"])
def test_triton_repo_bad_model(files, capfd, tmp_path, bad):
    repo = tmp_path / "repo"
    refused(capfd, ["triton-repo", files[bad], repo], files[bad], keep=[files[bad]])
    assert not repo.exists() or not any(repo.iterdir())


# --------------------------------------------------------------------------- serve


def _serve_refused(target: Path, culprit: str) -> None:
    """A real process: a regression that served the file would hang, so it has a timeout."""
    argv = [sys.executable, "-m", "bnexport.cli.main", "serve", str(target), "--port", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert culprit in lines[0]
    assert "Serving" not in proc.stdout


@pytest.mark.parametrize("bad", ["empty", "random", "unknown_op", "ext_traversal"])
def test_serve_bad_model(files, bad):
    _serve_refused(files[bad], files[bad].name)


def test_serve_repository_with_a_corrupt_model(files, tmp_path):
    version = tmp_path / "repo" / "m" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(files["random"].read_bytes())
    _serve_refused(tmp_path / "repo", "m/1/model.onnx")


# --------------------------------------------------------------------------- export


KERAS_BAD = ["text.keras", "garbage.keras", "empty.keras", "random.h5", "hdf5_garbage.h5"]
KERAS_BAD += ["unknown_class.keras", "no_weights.keras", "not_a_savedmodel", "garbage_savedmodel"]


@pytest.mark.parametrize("bad", KERAS_BAD)
def test_export_bad_model(keras_files, capfd, tmp_path, bad):
    out = tmp_path / "out.onnx"
    keep = [keras_files[bad]] if keras_files[bad].is_file() else []
    refused(
        capfd, ["export", keras_files[bad], "-o", out], keras_files[bad], keep=keep, absent=[out]
    )


@pytest.mark.parametrize("bad", ["good", "random"])
def test_export_given_an_onnx_file_is_exit_2(files, capfd, tmp_path, bad):
    """``export m.onnx``: an ONNX file is already exported (exit 2, like a missing file)."""
    out = tmp_path / "out.onnx"
    line = refused(capfd, ["export", files[bad], "-o", out], files[bad], keep=[files[bad]], code=2)
    assert "bnexport fold" in line


def test_export_missing_output_folder_is_exit_2(keras_files, capfd, tmp_path):
    out = tmp_path / "absent" / "out.onnx"
    argv = ["export", keras_files["m.keras"], "-o", out]
    refused(capfd, argv, out.parent, keep=[keras_files["m.keras"]], absent=[out], code=2)


def test_export_output_is_the_model(keras_files, capfd, tmp_path):
    m = _copy(keras_files["m.keras"], tmp_path)
    refused(capfd, ["export", m, "-o", m], m, keep=[m], code=2)


def test_export_json_is_the_output(keras_files, capfd, tmp_path):
    out = tmp_path / "x.onnx"
    argv = ["export", keras_files["m.keras"], "-o", out, "--json", out]
    refused(capfd, argv, out, keep=[keras_files["m.keras"]], absent=[out], code=2)


def test_export_json_is_the_model(keras_files, capfd, tmp_path):
    out, m = tmp_path / "x.onnx", _copy(keras_files["m.keras"], tmp_path)
    refused(capfd, ["export", m, "-o", out, "--json", m], m, keep=[m], absent=[out], code=2)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("bad", ["empty", "random", "unknown_op", "ext_traversal"])
def test_parity_bad_onnx(keras_files, files, capfd, bad):
    argv = ["parity", keras_files["m.keras"], files[bad]]
    refused(capfd, argv, files[bad], keep=[files[bad], keras_files["m.keras"]])


@pytest.mark.parametrize(
    "bad", ["text.keras", "garbage.keras", "hdf5_garbage.h5", "garbage_savedmodel"]
)
def test_parity_bad_keras(keras_files, files, capfd, bad):
    refused(
        capfd,
        ["parity", keras_files[bad], files["good"]],
        keras_files[bad],
        keep=[keras_files[bad]],
    )


def test_parity_pickled_inputs(keras_files, files, capfd):
    argv = ["parity", keras_files["m.keras"], files["good"], "--inputs", files["pickled.npz"]]
    refused(capfd, argv, files["pickled.npz"], keep=[files["pickled.npz"]])


def test_parity_report_is_the_onnx(keras_files, files, capfd, tmp_path):
    good = _copy(files["good"], tmp_path)
    argv = ["parity", keras_files["m.keras"], good, "--report", good]
    refused(capfd, argv, good, keep=[good], code=2)


def test_parity_html_is_the_report(keras_files, files, capfd, tmp_path):
    report = tmp_path / "r.json"
    argv = ["parity", keras_files["m.keras"], files["good"], "--report", report, "--html", report]
    refused(capfd, argv, report, absent=[report], code=2)


def test_parity_report_is_the_keras_model(keras_files, files, capfd, tmp_path):
    m = _copy(keras_files["m.keras"], tmp_path)
    refused(capfd, ["parity", m, files["good"], "--report", m], m, keep=[m], code=2)


# --------------------------------------------------------------------------- Python API


@pytest.mark.parametrize("bad", DECODE_BAD + ORT_BAD + EXT_BAD)
def test_api_session_bad_model(files, bad):
    with pytest.raises(BnexportError, match=files[bad].name):
        bnexport.Session(files[bad])


@pytest.mark.parametrize("data", [b"", b"garbage bytes", bytes(range(256)) * 4])
def test_api_session_bad_bytes(data):
    with pytest.raises(BnexportError):
        bnexport.Session(data)


@pytest.mark.parametrize(
    "data", ["truncated.npy", "text.npy", "pickled.npy", "truncated.npz", "pickled.npz"]
)
def test_api_load_arrays(files, data):
    from bnexport.io.arrays import load_arrays

    with pytest.raises(BnexportError, match=data):
        load_arrays(files[data])


@pytest.mark.parametrize("bad", ["text.keras", "garbage.keras", "random.h5", "unknown_class.keras"])
def test_api_export_bad_model(keras_files, tmp_path, bad):
    with pytest.raises(BnexportError, match=bad):
        bnexport.export(keras_files[bad], tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("bad", ["random", "unknown_op"])
def test_api_check_parity_bad_onnx(keras_files, files, bad):
    with pytest.raises(BnexportError, match=files[bad].name):
        bnexport.check_parity(keras_files["m.keras"], files[bad])


@pytest.mark.parametrize("bad", ["random", "ext_traversal"])
def test_api_triton_repo_bad_onnx(files, tmp_path, bad):
    from bnexport.serve.triton.repo import write_triton_repo

    with pytest.raises(BnexportError, match=files[bad].name):
        write_triton_repo(files[bad], tmp_path / "repo")


# --------------------------------------------------------------------------- the guard itself


def test_guard_same_file_by_any_name(tmp_path, monkeypatch):
    from bnexport.atomic_write import check_output_paths
    from bnexport.errors import OutputPathError

    src = tmp_path / "m.onnx"
    src.write_bytes(b"model")
    (tmp_path / "sub").mkdir()
    os.link(src, tmp_path / "hard.onnx")
    (tmp_path / "soft.onnx").symlink_to(src)
    monkeypatch.chdir(tmp_path / "sub")
    for alias in ("../m.onnx", tmp_path / "sub" / ".." / "m.onnx", "../hard.onnx", "../soft.onnx"):
        with pytest.raises(OutputPathError, match="would destroy the input"):
            check_output_paths({"-o": alias}, {"IN": src})
    check_output_paths({"-o": "../m.onnx"}, {"IN": src}, in_place=[("-o", "IN")])
    check_output_paths({"-o": "../other.onnx", "--json": None}, {"IN": src, "--x": None})


def test_guard_outputs_collide_and_folders(tmp_path):
    from bnexport.atomic_write import check_output_paths
    from bnexport.errors import OutputPathError

    with pytest.raises(OutputPathError, match="are the same file"):
        check_output_paths({"-o": tmp_path / "a", "--json": tmp_path / "." / "a"})
    saved = tmp_path / "saved"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"pb")
    with pytest.raises(OutputPathError, match="inside the input"):  # would overwrite a part
        check_output_paths({"-o": saved / "saved_model.pb"}, {"MODEL": saved})
    check_output_paths({"-o": saved / "new.onnx"}, {"MODEL": saved})  # a new file is fine
    repo = tmp_path / "repo" / "m"
    (repo / "1").mkdir(parents=True)
    (repo / "1" / "model.onnx").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="holds the input"):
        check_output_paths({"OUT": repo}, {"MODEL": repo / "1" / "model.onnx"})


def test_api_export_refuses_to_overwrite_its_model(keras_files, tmp_path):
    m = _copy(keras_files["m.keras"], tmp_path)
    before = m.read_bytes()
    with pytest.raises(BnexportError, match="m.keras"):
        bnexport.export(m, m)
    assert m.read_bytes() == before


def test_api_session_folder(files):
    with pytest.raises(BnexportError, match="is a folder"):
        bnexport.Session(files["dir"])
