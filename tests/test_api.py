"""The public API: ``useroom.__all__``, the API reference, and the command."""

from __future__ import annotations

import importlib
import pathlib
import re
import subprocess
import sys

import useroom

API_PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md"
# ".. autoclass:: useroom.Group" (any autodoc directive), at any indentation.
_DIRECTIVE = re.compile(r"^\s*\.\. auto\w+:: useroom\.(\w+)\s*$", re.MULTILINE)
# "### `Group`": a heading that is exactly one public name.
_HEADING = re.compile(r"^#+ `(\w+)`\s*$", re.MULTILINE)


def _isort_key(name: str) -> tuple[int, str]:
    if name.isupper():
        return (0, name)  # UNLIMITED
    if name[:1].isupper():
        return (1, name)  # Group
    return (2, name)  # parse_size


def _api_page() -> str:
    return API_PAGE.read_text(encoding="utf-8")


class TestAll:
    def test_sorted(self) -> None:
        """__all__ is sorted the isort way: constants, then classes, then
        functions, each group alphabetically."""
        assert sorted(useroom.__all__, key=_isort_key) == useroom.__all__

    def test_no_duplicates(self) -> None:
        """Each public name is listed once."""
        assert len(set(useroom.__all__)) == len(useroom.__all__)

    def test_no_private_names(self) -> None:
        """No name in __all__ starts with an underscore."""
        assert [] == [name for name in useroom.__all__ if name.startswith("_")]

    def test_every_name_importable(self) -> None:
        """Every name in __all__ exists on the package and can be imported from it."""
        module = importlib.import_module("useroom")
        missing = [name for name in useroom.__all__ if not hasattr(module, name)]
        assert [] == missing
        namespace: dict[str, object] = {}
        exec("from useroom import *", namespace)
        assert set(useroom.__all__) == set(namespace) - {"__builtins__"}


class TestApiPage:
    def test_directives_match_all(self) -> None:
        """docs/api.md has an autodoc directive for exactly the names in __all__."""
        assert set(useroom.__all__) == set(_DIRECTIVE.findall(_api_page()))

    def test_headings_match_all(self) -> None:
        """docs/api.md has a heading for exactly the names in __all__."""
        assert set(useroom.__all__) == set(_HEADING.findall(_api_page()))

    def test_each_name_documented_once(self) -> None:
        """No name has two directives, which Sphinx would report as a duplicate."""
        names = _DIRECTIVE.findall(_api_page())
        assert sorted(set(names)) == sorted(names)


class TestCommand:
    def test_module_help(self) -> None:
        """``python -m useroom --help`` exits 0 and lists the subcommands."""
        result = subprocess.run(
            [sys.executable, "-m", "useroom", "--help"], capture_output=True, text=True, timeout=60
        )
        assert (0, "") == (result.returncode, result.stderr)
        assert result.stdout.startswith("usage: useroom")
        for command in ("handle", "watchdog", "demo", "doctor"):
            assert command in result.stdout

    def test_subcommand_help(self) -> None:
        """Each subcommand's --help exits 0."""
        for command in ("handle", "watchdog", "demo", "doctor"):
            result = subprocess.run(
                [sys.executable, "-m", "useroom", command, "--help"], capture_output=True, text=True, timeout=60
            )
            assert (0, "") == (result.returncode, result.stderr)
            assert result.stdout.startswith(f"usage: useroom {command}")

    def test_version(self) -> None:
        """``useroom --version`` prints the installed distribution's version, which is the package's."""
        import importlib.metadata

        import useroom

        result = subprocess.run([sys.executable, "-m", "useroom", "--version"], capture_output=True, text=True,
                                timeout=60)
        assert (0, "") == (result.returncode, result.stderr)
        assert f"useroom {importlib.metadata.version('useroom')}\n" == result.stdout
        assert importlib.metadata.version("useroom") == useroom.__version__

    def test_missing_command_is_an_error(self) -> None:
        """Without a subcommand, the command fails with usage on stderr."""
        result = subprocess.run([sys.executable, "-m", "useroom"], capture_output=True, text=True, timeout=60)
        assert 2 == result.returncode
        assert "usage: useroom" in result.stderr
