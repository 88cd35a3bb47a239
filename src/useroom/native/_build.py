"""cffi build script for useroom's native core.

Joins the header (used as the cdef, so C and Python agree on every struct)
and the C body. Never imports the useroom package.
"""

from __future__ import annotations

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
# setuptools wants source paths relative to setup.py's directory.
ROOT = HERE.parents[2]


def _relative(path: pathlib.Path) -> str:
    try:
        return str(path.relative_to(pathlib.Path.cwd()))
    except ValueError:
        return str(path)


ffibuilder = FFI()
ffibuilder.cdef((HERE / "uro.h").read_text())
ffibuilder.set_source(
    "useroom.native._core",
    "#include <stddef.h>\n#include <stdint.h>\n#include \"uro.h\"\n",
    sources=[_relative(HERE / "uro.c")],
    include_dirs=[_relative(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
    libraries=["pthread", "dl"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
