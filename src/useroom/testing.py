"""Helpers for the tests of services that use useroom."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from useroom._check import HookReport, check_hook
from useroom._hooks import OomContext

__all__ = ["assert_hook_safe"]


def assert_hook_safe(fn: Callable[[OomContext], Any], **options: Any) -> HookReport:
    """Runs :func:`useroom.check_hook` and fails (AssertionError, naming every
    problem) unless the hook did nothing a hook must not do during an OOM.
    ``options`` go to check_hook (``headroom``, ``deadline``, ``parent``)."""
    report = check_hook(fn, **options)
    if not report.ok:
        name = getattr(fn, "__qualname__", repr(fn))
        raise AssertionError(f"hook {name} is not safe during an OOM: " + "; ".join(report.problems))
    return report
