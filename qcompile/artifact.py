"""The saved format: data, never code.

A ``.qc`` file is one safetensors file. Its tensors are the Q/DQ program's weights, constants
and example inputs; its header's metadata holds one JSON document:

    {"format": 4, "target": ..., "report": ..., "program": <torch.export's graph JSON>,
     "inputs": {"spec": <pytree spec JSON>, "leaves": [...]}, "tensors": [...],
     "sparse": {name: shape, ...}, "nibbles": {name: shape, ...}, "sha256": ...}

An int8 tensor that is at least half zeros (a pruned weight) is stored as its nonzero values
(``sparse:<name>:values``, in row-major order) and a bitmask of where they go
(``sparse:<name>:mask``, eight positions a byte, most significant bit first): at 50 % sparsity
62.5 % of its dense bytes. Then every int8 tensor whose values all fit in four bits (int4 and
narrower weights, the values of a sparse one) is stored two values a byte
(``nibbles:<name>``: element 2i in the low four bits, 2i+1 in the high, two's complement), half
its bytes. Both are exact, and decided by the values alone. Versions 2 and 3 (no nibbles, and
for 2 no sparse tensors) are read as before.

Loading never unpickles, never imports and never executes anything the file says:

* safetensors parses its header as JSON and reads tensors as raw bytes (no pickle anywhere);
* the format version is checked before anything else is read;
* ``sha256`` covers the JSON document (without the hash) and every tensor's name, dtype,
  shape and bytes, so flipped bits in a weight or a scale are refused, not run;
* torch.export's graph JSON has three ways to run code on load, each closed before torch
  sees it: operator names are resolved by ``getattr`` (only ``aten``, ``prims``, ``qc`` ops and
  ``operator``'s arithmetic are accepted); symbolic shape expressions go through
  ``sympy.sympify``, which is ``eval`` (each must parse, by :mod:`ast`, into calls of sympy's
  arithmetic on symbols and numbers); ``guards_code`` strings are ``exec``'d by
  ``ExportedProgram.module()`` (a file must carry none; the compiled model checks its inputs
  itself). Tensors are handed to torch's deserializer as a dict, so its pickle fallbacks for
  weights, constants and sample inputs are never reached.

Writing is deterministic: the same program, report and tensors give the same bytes (no
timings, ids or serialization ids are stored; tensors and keys are written in sorted order).
"""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import fx
from torch.utils import _pytree as pytree

from qcompile.errors import ArtifactError, QCompileError

FORMAT_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)
# An int8 tensor with at least this fraction of zeros is stored as values and a bitmask.
SPARSE_FRACTION = 0.5
FORMAT_NAME = "qcompile"
# Operator namespaces a saved Q/DQ program may call: ATen, its primitives, and qcompile's ops.
ALLOWED_OP_PREFIXES = ("torch.ops.aten.", "torch.ops.prims.", "torch.ops.qc.")
ALLOWED_PYTHON_OPS = frozenset(
    f"_operator.{name}" for name in
    ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le", "gt", "ge")
)
# What sympy's printer writes for export's shape expressions (srepr form), and nothing else.
SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Mod", "FloorDiv",
    "CeilDiv", "CleanDiv", "PythonMod", "IntTrueDiv", "FloatTrueDiv", "TruncToInt", "CeilToInt",
    "FloorToInt", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
})
SYMPY_NAMES = frozenset({"True", "False", "oo", "zoo", "nan", "int_oo"})
_SYMBOL_NAME = re.compile(r"^[a-z]+[0-9]+$")
_SAFE_NODES = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.UnaryOp, ast.USub,
               ast.UAdd, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)


@dataclass
class Artifact:
    """What a ``.qc`` file holds, decoded: the Q/DQ program and what came with it."""

    graph_module: fx.GraphModule
    target: str
    report: str
    example: tuple[tuple[Any, ...], dict[str, Any]]


def _digest(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the JSON document (without its hash) and every tensor, in name order."""
    h = hashlib.sha256(json.dumps(document, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _flat_example(example: tuple[tuple, dict]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    leaves, spec = pytree.tree_flatten(example)
    entries, tensors = [], {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors[f"input:{i}"] = leaf.detach().contiguous().clone()
            entries.append({"tensor": f"input:{i}"})
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            entries.append({"value": leaf})
        else:
            raise QCompileError(f"example input {i} is a {type(leaf).__name__}, which a saved model cannot hold")
    return {"spec": pytree.treespec_dumps(spec), "leaves": entries}, tensors


def _bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor's positions packed eight to a byte, most significant bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).reshape(-1, 8)
    return (flat << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def _unbits(packed: torch.Tensor, count: int) -> torch.Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:count].bool()


def _sparse_encode(tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Replace, in ``tensors``, each int8 tensor at least ``SPARSE_FRACTION`` zeros by its values
    and bitmask; returns the shapes of those replaced, by name."""
    shapes = {}
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype == torch.int8 and t.numel() >= 64 and float((t == 0).float().mean()) >= SPARSE_FRACTION:
            nonzero = t.reshape(-1) != 0
            tensors[f"sparse:{name}:values"] = t.reshape(-1)[nonzero].clone()
            tensors[f"sparse:{name}:mask"] = _bits(nonzero)
            shapes[name] = list(t.shape)
            del tensors[name]
    return shapes


def _sparse_decode(path: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
    for name, shape in shapes.items():
        values, packed = tensors.pop(f"sparse:{name}:values"), tensors.pop(f"sparse:{name}:mask")
        count = int(torch.Size(shape).numel())
        if packed.dtype != torch.uint8 or packed.numel() != (count + 7) // 8:  # before anything is allocated
            raise ArtifactError(f"'{path}': the sparse tensor '{name}' does not match its mask")
        nonzero = _unbits(packed, count)
        if int(nonzero.sum()) != values.numel():
            raise ArtifactError(f"'{path}': the sparse tensor '{name}' does not match its mask")
        dense = torch.zeros(count, dtype=values.dtype)
        dense[nonzero] = values
        tensors[name] = dense.reshape(shape)


def _nibble_encode(tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Replace, in ``tensors``, each int8 tensor of values in [-8, 7] by its values packed two a
    byte; returns the shapes of those replaced, by name."""
    shapes = {}
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype == torch.int8 and t.numel() >= 64 and int(t.min()) >= -8 and int(t.max()) <= 7:
            flat = t.reshape(-1).view(torch.uint8) & 0x0F
            flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)]).reshape(-1, 2)
            tensors[f"nibbles:{name}"] = flat[:, 0] | (flat[:, 1] << 4)
            shapes[name] = list(t.shape)
            del tensors[name]
    return shapes


def _nibble_decode(path: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
    for name, shape in shapes.items():
        packed = tensors.pop(f"nibbles:{name}")
        count = int(torch.Size(shape).numel())
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 1) // 2:
            raise ArtifactError(f"'{path}': the packed tensor '{name}' does not match its shape {shape}")
        pairs = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:count].view(torch.int8)
        tensors[name] = torch.where(pairs > 7, pairs - 16, pairs).reshape(shape)  # sign from bit 3


def write_artifact(path: Path, program: torch.export.ExportedProgram, target: str, report: str) -> Path:
    """Write ``program`` (a Q/DQ program from ``torch.export``) and its report to ``path``."""
    from torch._export.serde.serialize import serialize

    serialized = serialize(program, serialize_state_dict=False, serialize_constants=False,
                           serialize_example_inputs=False)
    graph = json.loads(serialized.exported_program)
    graph["guards_code"] = []  # exec'd on load; the compiled model checks its own inputs
    for node in graph["graph_module"]["graph"]["nodes"]:
        node["metadata"].pop("from_node", None)  # torch's pass history, keyed by Python id()s
    inputs, tensors = _flat_example(program.example_inputs or ((), {}))
    for kind, values in (("weight", program.state_dict), ("constant", program.constants)):
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise QCompileError(f"{kind} '{name}' is a {type(value).__name__}: only tensors are saved")
            tensors[f"{kind}:{name}"] = value.detach().contiguous().clone()
    sparse = _sparse_encode(tensors)
    nibbles = _nibble_encode(tensors)
    document = {"format": FORMAT_VERSION, "target": target, "report": report, "program": graph,
                "inputs": inputs, "tensors": sorted(tensors), "sparse": sparse, "nibbles": nibbles}
    document["sha256"] = _digest(document, tensors)
    path.write_bytes(save_safetensors(tensors, metadata={FORMAT_NAME: json.dumps(document, sort_keys=True)}))
    return path


def read_artifact(path: Path) -> Artifact:
    """Read a ``.qc`` file, refusing anything that is not exactly what :func:`write_artifact` writes."""
    data = path.read_bytes()
    if data[:2] == b"PK":
        raise ArtifactError(f"'{path}' is a zip archive (a torch.export file, or qcompile's format 1, which "
                            "could carry pickles): it is not loaded; compile and save the model again")
    try:
        tensors = load_safetensors(data)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
        document = json.loads(metadata[FORMAT_NAME])
    except (SafetensorError, ValueError, KeyError, TypeError, OverflowError) as exc:
        raise ArtifactError(f"'{path}' is not a qcompile model, or is damaged: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") not in READABLE_VERSIONS:
        version = document.get("format") if isinstance(document, dict) else None
        raise ArtifactError(f"'{path}' has format version {version!r}; this qcompile reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}" + (" (it was written by a newer qcompile)"
                                                        if isinstance(version, int) and version > FORMAT_VERSION
                                                        else ""))
    _check_digest(path, document, tensors)
    try:
        for key, decode in (("nibbles", _nibble_decode), ("sparse", _sparse_decode)):  # the reverse of writing
            decode(path, tensors, {str(k): [int(d) for d in v] for k, v in document.get(key, {}).items()})
        graph, target, report = document["program"], str(document["target"]), str(document["report"])
        check_program_json(graph)
        example = _example_from(document["inputs"], tensors)
        # No guard function: torch would build it by exec'ing text made from the file's values.
        gm = _deserialize(graph, tensors).module(check_guards=False)
    except ArtifactError:
        raise
    except Exception as exc:  # a hash-valid file torch cannot rebuild: damaged before it was hashed
        raise ArtifactError(f"'{path}' cannot be rebuilt into a program: {type(exc).__name__}: {exc}") from exc
    check_graph_targets(gm, path)
    return Artifact(gm, target, report, example)


def _check_digest(path: Path, document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    stored = document.pop("sha256", None)
    if sorted(tensors) != document.get("tensors"):
        raise ArtifactError(f"'{path}': the tensors in the file are not the ones its header lists")
    if stored != _digest(document, tensors):
        raise ArtifactError(f"'{path}' fails its content hash: the graph, a weight or a scale was changed "
                            "after saving (a damaged or tampered file is not loaded)")


def _example_from(inputs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
    leaves = [tensors[entry["tensor"]] if "tensor" in entry else entry["value"] for entry in inputs["leaves"]]
    args, kwargs = pytree.tree_unflatten(leaves, pytree.treespec_loads(inputs["spec"]))
    return tuple(args), dict(kwargs)


def _deserialize(graph: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch._export.serde.schema import ExportedProgram as SerializedProgram

    state_dict: dict[str, torch.Tensor] = {}
    is_parameter = {s["parameter"]["parameter_name"] for s in graph["graph_module"]["signature"]["input_specs"]
                    if "parameter" in s}
    constants = {}
    for name, tensor in tensors.items():
        kind, _, fqn = name.partition(":")
        if kind == "weight":
            state_dict[fqn] = torch.nn.Parameter(tensor, requires_grad=False) if fqn in is_parameter else tensor
        elif kind == "constant":
            constants[fqn] = tensor
    serialized = _dict_to_dataclass(SerializedProgram, graph)
    return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, ((), {}))


def check_program_json(graph: Any) -> None:
    """Refuse program JSON that would make torch run code while deserializing it."""
    if not isinstance(graph, dict) or graph.get("guards_code"):
        raise ArtifactError("the program carries guard code, which loading would execute")
    for key, value in _walk(graph):
        if key == "target" and isinstance(value, str):
            if not (value.startswith(ALLOWED_OP_PREFIXES) or value in ALLOWED_PYTHON_OPS):
                raise ArtifactError(f"the program calls '{value}', which is not an ATen, prims or qc operator")
        elif key == "expr_str" and isinstance(value, str):
            _check_sympy_text(value)
    for name in graph.get("range_constraints", {}):
        _check_sympy_text(name)


def _walk(value: Any, key: str | None = None):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, key)
    else:
        yield key, value


def _check_sympy_text(text: str) -> None:
    """Accept only sympy arithmetic on symbols and numbers: the text goes to ``sympify`` (eval)."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ArtifactError(f"shape expression '{text[:80]}' does not parse") from exc
    for node in ast.walk(tree):
        ok = isinstance(node, _SAFE_NODES)
        if isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in SYMPY_CALLS
        elif isinstance(node, ast.Name):
            ok = node.id in SYMPY_CALLS or node.id in SYMPY_NAMES or bool(_SYMBOL_NAME.match(node.id))
        elif isinstance(node, ast.Constant):
            ok = not isinstance(node.value, str) or bool(_SYMBOL_NAME.match(node.value))
        if not ok:
            raise ArtifactError(f"shape expression '{text[:80]}' is not plain arithmetic on shape symbols")


def check_graph_targets(gm: fx.GraphModule, path: Path) -> None:
    """What the rebuilt graph calls, checked again: operators of the allowed namespaces only."""
    allowed_python = {getattr(operator, name.split(".")[1]) for name in ALLOWED_PYTHON_OPS}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_method"):
            raise ArtifactError(f"'{path}': node {node.name} is a {node.op}, which a saved program cannot hold")
        if node.op != "call_function":
            continue
        target = node.target
        namespace = getattr(target, "namespace", None)
        if namespace not in ("aten", "prims", "qc") and target not in allowed_python:
            raise ArtifactError(f"'{path}': node {node.name} calls {target}, which is not allowed in a saved program")
