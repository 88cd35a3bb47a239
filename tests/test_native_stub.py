"""The typed stub of the compiled core (``_core.pyi``) against the core.

The stub is what mypy checks the wrappers against; nothing checks it at run
time. These tests hold it to the compiled module (cffi describes every
function and struct it built from ``uro.h``) and to what the package calls,
and check that mypy does reject a misuse through it.
"""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import inspect
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest

import useroom
from useroom.native import _lib
from useroom.native._core import ffi, lib

PACKAGE = pathlib.Path(useroom.__file__).resolve().parent
NATIVE = PACKAGE / "native"
STUB = NATIVE / "_core.pyi"


def _stub_classes() -> dict[str, ast.ClassDef]:
    tree = ast.parse(STUB.read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _methods(cls: ast.ClassDef) -> list[ast.FunctionDef]:
    return [node for node in cls.body if isinstance(node, ast.FunctionDef)]


def _attributes(cls: ast.ClassDef) -> dict[str, str]:
    """Annotated names of a class body and their annotations, in order."""
    return {
        node.target.id: ast.unparse(node.annotation)
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def _lib_functions() -> dict[str, ast.FunctionDef]:
    return {fn.name: fn for fn in _methods(_stub_classes()["Lib"])}


def _lib_constants() -> dict[str, str]:
    return _attributes(_stub_classes()["Lib"])


def _literals(annotation: ast.expr | None) -> tuple[str, ...]:
    """The strings of a ``Literal[...]`` annotation."""
    assert isinstance(annotation, ast.Subscript), ast.dump(annotation) if annotation else None
    assert "Literal" == ast.unparse(annotation.value)
    value = ast.literal_eval(annotation.slice)
    return value if isinstance(value, tuple) else (value,)


def _called(pattern: str) -> set[str]:
    """The names matching ``pattern`` in the package's Python source."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        names.update(re.findall(pattern, path.read_text()))
    return names


def _class_name(struct: str) -> str:
    """``struct uro_event`` -> ``UroEvent``, the stub's class of the struct."""
    return "".join(part.capitalize() for part in struct.removeprefix("struct ").split("_"))


def _stub_types(ctype: Any) -> set[str]:
    """The annotations the stub may give a value of C type ``ctype``, read
    from a field, passed to a function or returned: what cffi converts it to."""
    if ctype.kind == "primitive":
        if ctype.cname in ("float", "double"):
            return {"float"}
        # A char is a bytes object of length 1; every other integer an int.
        return {"bytes"} if ctype.cname == "char" else {"int"}
    if ctype.kind == "void":
        return {"None"}
    if ctype.kind == "struct":
        return {_class_name(ctype.cname)}
    if ctype.kind == "pointer":
        item = ctype.item
        if item.kind == "void":
            return {"VoidPointer"}
        if item.kind == "primitive" and item.cname == "char":
            return {"CharPointer"}
        if item.kind == "struct":
            # One struct (its fields read through the pointer), or many.
            return {_class_name(item.cname), f"Pointer[{_class_name(item.cname)}]"}
        return {f"Pointer[{t}]" for t in _stub_types(item)}
    if ctype.kind == "array":
        return {f"Array[{t}]" for t in _stub_types(ctype.item)}
    raise AssertionError(f"no stub type for {ctype.cname} ({ctype.kind})")


def _held_protocol() -> dict[str, Any]:
    """The functions of HELD's protocol, by name."""
    return {name: fn for name, fn in inspect.getmembers(_lib._Held, inspect.isfunction) if name.startswith("uro_")}


class TestLib:
    def test_declared_functions_are_the_cores(self) -> None:
        """Every function the stub's lib declares is a uro_ function of
        uro.h and of the compiled lib."""
        header = set(re.findall(r"\b(uro_\w+)\s*\(", (NATIVE / "uro.h").read_text()))
        declared = set(_lib_functions())
        assert declared
        assert set() == declared - header
        assert set() == {name for name in declared if not hasattr(lib, name)}
        assert {"function"} == {ffi.typeof(getattr(lib, name)).kind for name in declared}

    def test_python_calls_only_declared_functions(self) -> None:
        """Every ``lib.uro_*`` function and ``lib.URO_*`` constant the package
        uses is declared in the stub."""
        functions = _called(r"\blib\.(uro_\w+)")
        constants = _called(r"\blib\.(URO_\w+)")
        assert functions and constants
        assert set() == functions - set(_lib_functions())
        assert set() == constants - set(_lib_constants())

    def test_signatures_as_cffi_converts(self) -> None:
        """Each declared function takes, positionally only (cffi accepts no
        keywords), the arguments of its C prototype typed as cffi converts
        them, and returns what cffi returns: an integer of any width is an
        int, a struct pointer the struct's class."""
        wrong = []
        for name, fn in _lib_functions().items():
            ctype = ffi.typeof(getattr(lib, name))
            params = fn.args.posonlyargs + fn.args.args
            assert "self" == params[0].arg, name
            assert ([], None, None) == (fn.args.kwonlyargs, fn.args.vararg, fn.args.kwarg), name
            if len(params) > 1:
                assert [] == fn.args.args, f"{name} takes keywords"
            stub_args = [ast.unparse(p.annotation) if p.annotation else "" for p in params[1:]]
            if len(stub_args) != len(ctype.args):
                wrong.append(f"{name}: {len(stub_args)} arguments, C has {len(ctype.args)}")
                continue
            for i, (annotation, carg) in enumerate(zip(stub_args, ctype.args, strict=True)):
                if annotation not in _stub_types(carg):
                    wrong.append(f"{name} argument {i}: {annotation}, C has {carg.cname}")
            returns = ast.unparse(fn.returns) if fn.returns else ""
            if returns not in _stub_types(ctype.result):
                wrong.append(f"{name} returns {returns}, C returns {ctype.result.cname}")
        assert [] == wrong

    def test_constants_are_final_ints(self) -> None:
        """Every declared constant is a Final int of the compiled lib."""
        constants = _lib_constants()
        assert constants
        assert {"Final[int]"} == set(constants.values())
        assert {} == {name: type(getattr(lib, name, None)).__name__ for name in constants
                      if not isinstance(getattr(lib, name, None), int)}


class TestStructs:
    def test_fields_as_the_header_declares(self) -> None:
        """Each struct class of the stub has the fields of its C struct, in
        order, typed as cffi converts them."""
        structs = {name: cls for name, cls in _stub_classes().items() if name.startswith("Uro")}
        assert structs
        for name, cls in structs.items():
            struct = "struct " + re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
            assert name == _class_name(struct)
            cfields = ffi.typeof(struct).fields
            fields = _attributes(cls)
            assert [f for f, _ in cfields] == list(fields), struct
            wrong = [f"{struct}.{f}: {fields[f]}, C has {field.type.cname}" for f, field in cfields
                     if fields[f] not in _stub_types(field.type)]
            assert [] == wrong


class TestFfi:
    def _overloads(self, method: str) -> list[ast.FunctionDef]:
        return [fn for fn in _methods(_stub_classes()["FFI"]) if fn.name == method]

    def test_new_returns_what_it_makes(self) -> None:
        """Each C type ``ffi.new`` takes is one the core knows, and the
        overload returns the stub type of what it allocates."""
        overloads = self._overloads("new")
        assert overloads
        for fn in overloads:
            (cdecl,) = _literals(fn.args.posonlyargs[1].annotation)
            assert ast.unparse(fn.returns) in _stub_types(ffi.typeof(cdecl)), cdecl

    def test_cast_returns_what_it_makes(self) -> None:
        """Each C type ``ffi.cast`` takes is one the core knows; a cast to an
        integer type is an Integer cdata (``int()`` reads it), a pointer
        cast the stub type of the pointer."""
        overloads = self._overloads("cast")
        assert overloads
        for fn in overloads:
            (cdecl,) = _literals(fn.args.posonlyargs[1].annotation)
            ctype = ffi.typeof(cdecl)
            expected = {"Integer"} if ctype.kind == "primitive" else _stub_types(ctype)
            assert ast.unparse(fn.returns) in expected, cdecl

    def test_sizeof_takes_structs_of_the_core(self) -> None:
        """``ffi.sizeof`` takes the core's structs only."""
        (fn,) = self._overloads("sizeof")
        names = _literals(fn.args.posonlyargs[1].annotation)
        assert names
        assert {"struct"} == {ffi.typeof(name).kind for name in names}

    def test_null_is_a_void_pointer(self) -> None:
        """``ffi.NULL`` is declared as the void pointer it is."""
        assert "Final[VoidPointer]" == _attributes(_stub_classes()["FFI"])["NULL"]
        assert "void *" == ffi.typeof(ffi.NULL).cname


class TestHeld:
    def test_gil_functions_only_through_held(self) -> None:
        """The functions the package calls through HELD (they need the GIL)
        are declared by its protocol and not on the stub's lib, through
        which cffi would release the GIL."""
        held = _called(r"\bHELD\.(uro_\w+)")
        assert held
        assert set() == held & set(_lib_functions())
        protocol = set(_held_protocol())
        assert set() == held - protocol

    def test_protocol_as_ctypes_declares(self) -> None:
        """Each function of HELD's protocol takes as many arguments as its
        ctypes argtypes, ints where ctypes converts an int, and returns the
        int of its restype."""
        ints = {ctypes.c_int, ctypes.c_int64, ctypes.c_size_t, ctypes.c_uint64}
        wrong = []
        for name, fn in _held_protocol().items():
            signature = inspect.signature(fn)
            params = list(signature.parameters.values())[1:]
            cfn = getattr(_lib.HELD, name)
            if len(params) != len(cfn.argtypes):
                wrong.append(f"{name}: {len(params)} arguments, ctypes has {len(cfn.argtypes)}")
                continue
            for param, argtype in zip(params, cfn.argtypes, strict=True):
                if (param.annotation == "int") != (argtype in ints):
                    wrong.append(f"{name}({param.name}): {param.annotation}, ctypes has {argtype.__name__}")
            if signature.return_annotation != "int" or cfn.restype not in ints:
                wrong.append(f"{name} returns {signature.return_annotation}, ctypes {cfn.restype}")
        assert [] == wrong


_GOOD = """\
from useroom.native._core import ffi, lib
from useroom.native._lib import HELD

text = ffi.new("struct uro_text *")
locked: int = lib.uro_lock_text(text) + text.image_size
fd: int = lib.uro_eventfd_create(0, 1)
value = ffi.new("uint64_t *")
got: int = lib.uro_eventfd_read(fd, value) + value[0]
ready = ffi.new("struct uro_ready[]", 4)
n: int = lib.uro_epoll_wait(3, ready, len(ready), -1) + ready[0].events
address: int = int(ffi.cast("uintptr_t", lib.uro_pool_alloc_fn()))
trimmed: int = HELD.uro_heap_trim(0)
"""

# Each line marked with an error code must be reported with it, and no other.
_BAD = """\
from useroom.native._core import ffi, lib
from useroom.native._lib import HELD

lib.uro_mrelease("3")  # [arg-type]: a str where an fd is expected
lib.uro_wait_readable(3, 0.5)  # [arg-type]: seconds where nanoseconds (an int) are expected
lib.uro_mrelease(pidfd=3)  # [call-arg]: cffi takes no keywords
lib.uro_hold_end(3)  # [attr-defined]: needs the GIL, only through HELD
ffi.new("struct uro_txt *")  # [call-overload]: no such C type
ffi.new("struct uro_text *").image_sz  # [attr-defined]: no such field
lib.uro_arena_map(4096, 1, ffi.new("struct uro_text *"))  # [arg-type]: the wrong struct
lib.URO_PLAN_MAX = 8  # [misc]: a constant
HELD.uro_heap_trim(0.5)  # [arg-type]: a float to a size_t
"""


class TestMypy:
    def test_rejects_misuse(self, tmp_path: pathlib.Path) -> None:
        """mypy, through the stub, accepts the core used right and reports
        each misuse: a str or a float where C takes an int, a keyword, a
        function that needs the GIL called through cffi, an unknown C type
        or field, the wrong struct, a write to a constant."""
        if importlib.util.find_spec("mypy") is None:
            pytest.skip("mypy is not installed (pip install useroom[dev])")
        (tmp_path / "good.py").write_text(_GOOD)
        (tmp_path / "bad.py").write_text(_BAD)
        (tmp_path / "mypy.ini").write_text("[mypy]\nstrict = True\nfollow_imports = silent\n")
        env = dict(os.environ)
        root = PACKAGE.parent
        # mypy refuses a site-packages on MYPYPATH; an installed useroom is
        # found there anyway, through its py.typed.
        if root.name != "site-packages":
            env["MYPYPATH"] = str(root)
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", ".mypy_cache",
             "--no-error-summary", "good.py", "bad.py"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100,
        )
        reported = {(file, int(line), code) for file, line, code
                    in re.findall(r"^(\w+)\.py:(\d+): error: .*\[([\w-]+)\]$", result.stdout, re.M)}
        expected = {("bad", i, m[1]) for i, line in enumerate(_BAD.splitlines(), 1)
                    if (m := re.search(r"# \[([\w-]+)\]", line))}
        assert 9 == len(expected)
        assert expected == reported, result.stdout + result.stderr
        assert 1 == result.returncode, result.stderr
