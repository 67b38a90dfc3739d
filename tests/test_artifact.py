"""The saved format is data: crafted, damaged and foreign files are refused, and nothing in them runs."""

import io
import json
import zipfile

import pytest
import torch

import qcompile
from qcompile.artifact import FORMAT_NAME, _digest
from tests.models import TinyConvNet


def batches(count=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 1, 8, 8, generator=g),) for _ in range(count)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    qm = qcompile.compile(TinyConvNet(), calibration_data=batches(), progress=False)
    return qm, qm.save(tmp_path_factory.mktemp("saved") / "tiny.qc")


class Payload:
    """Unpickling this creates ``marker``: the proof that a load ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def split(path):
    """(header dict, document dict, tensor bytes) of a .qc file."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header, json.loads(header["__metadata__"][FORMAT_NAME]), data[8 + size :]


def rewrite(path, out, edit, rehash=True):
    """Write ``out``: ``path`` with its JSON document edited and (by default) a valid hash, so the
    file gets past the hash check to the checks behind it, as a deliberate forgery would."""
    header, document, body = split(path)
    edit(document)
    if rehash:
        from safetensors.torch import load

        document.pop("sha256")
        document["sha256"] = _digest(document, load(path.read_bytes()))
    header["__metadata__"][FORMAT_NAME] = json.dumps(document)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    out.write_bytes(len(text).to_bytes(8, "little") + text + body)
    return out


def nodes(document):
    return document["program"]["graph_module"]["graph"]["nodes"]


def test_the_same_model_and_data_save_byte_identical_files(tmp_path, saved):
    qm, path = saved
    again = qcompile.compile(TinyConvNet(), calibration_data=batches(), progress=False).save(tmp_path / "b.qc")
    assert again.read_bytes() == path.read_bytes()


def test_a_loaded_model_computes_what_the_saved_one_did(saved):
    qm, path = saved
    loaded = qcompile.load(path)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(qm(x), loaded(x))
    assert loaded.report.nodes == qm.report.nodes


def test_a_torch_export_archive_with_pickled_sample_inputs_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    crafted = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(crafted, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if "sample_inputs" in item.filename:
                data = __import__("pickle").dumps(Payload(marker))
            dst.writestr(item, data)
    path = tmp_path / "crafted.qc"
    path.write_bytes(crafted.getvalue())
    with pytest.raises(qcompile.QCompileError, match="zip archive"):
        qcompile.load(path)
    assert not marker.exists()


def test_a_file_with_guard_code_is_refused_unrun(tmp_path, saved):
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path('{marker}').touch() or True"
    path = rewrite(saved[1], tmp_path / "g.qc", lambda d: d["program"].update(guards_code=[code]))
    with pytest.raises(qcompile.QCompileError, match="guard code"):
        qcompile.load(path)
    assert not marker.exists()


def test_a_shape_expression_that_is_not_arithmetic_is_refused_unrun(tmp_path, saved):
    marker = tmp_path / "ran"

    def inject(document):  # torch's deserializer hands expr_str to sympy.sympify, which is eval
        text = json.dumps(document["program"]).replace(
            "Symbol('s", f"__import__('pathlib').Path('{marker}').touch() or Symbol('s", 1)
        document["program"] = json.loads(text)

    with pytest.raises(qcompile.QCompileError, match="not plain arithmetic"):
        qcompile.load(rewrite(saved[1], tmp_path / "s.qc", inject))
    assert not marker.exists()


def test_a_call_outside_aten_prims_and_qc_is_refused(tmp_path, saved):
    def retarget(document):
        node = next(n for n in nodes(document) if n["target"].startswith("torch.ops.aten."))
        node["target"] = "torch.load"

    with pytest.raises(qcompile.QCompileError, match="calls 'torch.load'"):
        qcompile.load(rewrite(saved[1], tmp_path / "t.qc", retarget))


def test_a_flipped_byte_in_a_weight_fails_the_content_hash(tmp_path, saved):
    data = bytearray(saved[1].read_bytes())
    data[-5] ^= 0x40
    path = tmp_path / "flipped.qc"
    path.write_bytes(bytes(data))
    with pytest.raises(qcompile.QCompileError, match="content hash"):
        qcompile.load(path)


def test_an_edited_scale_without_a_new_hash_fails_the_content_hash(tmp_path, saved):
    path = rewrite(saved[1], tmp_path / "r.qc", lambda d: d.update(target="onnx-qdq"), rehash=False)
    with pytest.raises(qcompile.QCompileError, match="content hash"):
        qcompile.load(path)


def test_a_truncated_file_is_refused(tmp_path, saved):
    path = tmp_path / "cut.qc"
    path.write_bytes(saved[1].read_bytes()[:-100])
    with pytest.raises(qcompile.QCompileError, match="damaged"):
        qcompile.load(path)


@pytest.mark.parametrize("version, message", [(99, "newer qcompile"), ("2", "format version '2'"), (1, "version 1")])
def test_an_unknown_format_version_is_refused_by_number(tmp_path, saved, version, message):
    path = rewrite(saved[1], tmp_path / "v.qc", lambda d: d.update(format=version))
    with pytest.raises(qcompile.QCompileError, match=message):
        qcompile.load(path)


def test_a_report_missing_a_key_is_a_clear_error(tmp_path, saved):
    def drop(document):
        report = json.loads(document["report"])
        del report["nodes"]
        document["report"] = json.dumps(report)

    with pytest.raises(qcompile.QCompileError, match="not a qcompile report"):
        qcompile.load(rewrite(saved[1], tmp_path / "k.qc", drop))


def test_bad_json_and_foreign_files_are_clear_errors(tmp_path, saved):
    header, document, body = split(saved[1])
    header["__metadata__"][FORMAT_NAME] = "{not json"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    bad = tmp_path / "bad.qc"
    bad.write_bytes(len(text).to_bytes(8, "little") + text + body)
    with pytest.raises(qcompile.QCompileError, match="not a qcompile model"):
        qcompile.load(bad)
    foreign = tmp_path / "foreign.qc"
    foreign.write_text("hello")
    with pytest.raises(qcompile.QCompileError, match="not a qcompile model"):
        qcompile.load(foreign)


def test_tensor_names_must_be_the_ones_the_header_lists(tmp_path, saved):
    path = rewrite(saved[1], tmp_path / "n.qc", lambda d: d["tensors"].append("weight:../../etc/passwd"))
    with pytest.raises(qcompile.QCompileError, match="tensors in the file"):
        qcompile.load(path)


@pytest.mark.parametrize("member, payload_kind", [
    ("data/weights/model_weights_config.json", "use_pickle weights"),
    ("data/constants/opaque_obj_0", "an opaque pickled constant"),
    ("../../outside.qc.json", "a path outside the archive"),
])
def test_archives_with_pickled_weights_opaque_constants_or_traversal_are_refused_unread(tmp_path, member, payload_kind):
    marker = tmp_path / "ran"
    crafted = io.BytesIO()
    with zipfile.ZipFile(crafted, "w") as archive:
        archive.writestr("archive_format", "pt2")
        archive.writestr(member, __import__("pickle").dumps(Payload(marker)))
    path = tmp_path / "crafted.qc"
    path.write_bytes(crafted.getvalue())
    with pytest.raises(qcompile.QCompileError, match="zip archive"):
        qcompile.load(path)
    assert not marker.exists() and not (tmp_path.parent.parent / "outside.qc.json").exists(), payload_kind


def test_four_bit_values_are_stored_two_a_byte_and_read_back_exactly(tmp_path):
    from safetensors.torch import load_file

    from qcompile.artifact import _nibble_decode, _nibble_encode
    from tests.models import TinyBlock

    every = {"w": torch.arange(-8, 8, dtype=torch.int8).repeat(5)[:-1].reshape(79),  # odd count, all 16 values
             "wide": torch.tensor([-9, 0] * 40, dtype=torch.int8), "float": torch.zeros(80)}
    tensors = dict(every)
    shapes = _nibble_encode(tensors)
    assert shapes == {"w": [79]} and tensors["nibbles:w"].numel() == 40 and "wide" in tensors
    _nibble_decode(tmp_path, tensors, shapes)
    assert torch.equal(tensors["w"], every["w"])

    int4 = qcompile.QConfig(by_op={"linear": qcompile.OpQuantConfig(None, qcompile.QuantSpec(
        "int4", granularity=qcompile.PerGroup(1, 8)))})
    g = torch.Generator().manual_seed(0)
    qm = qcompile.compile(TinyBlock(), calibration_data=[(torch.randn(4, 16, generator=g),)], qconfig=int4,
                          progress=False)
    path = qm.save(tmp_path / "int4.qc")
    stored = load_file(path)
    packed = [name for name in stored if name.startswith("nibbles:")]
    assert len(packed) == 2 and not [n for n, t in stored.items() if t.dtype == torch.int8]
    x = torch.randn(3, 16, generator=g)
    torch.testing.assert_close(qcompile.load(path)(x), qm(x), rtol=0, atol=0)


def test_a_packed_tensor_that_does_not_match_its_shape_is_refused(tmp_path):
    from qcompile.artifact import _nibble_decode

    tensors = {"nibbles:w": torch.zeros(10, dtype=torch.uint8)}
    with pytest.raises(qcompile.ArtifactError, match=r"the packed tensor 'w' does not match its shape \[4000\]"):
        _nibble_decode(tmp_path / "m.qc", tensors, {"w": [4000]})
