"""Shared test plumbing: ``async def`` tests run under trio.run.

(pytest-trio would do this, but Debian has no package of it, and the unit
tests also run under Debian's own python3 and packages.)
"""

from __future__ import annotations

import functools
import inspect

import pytest
import trio


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    trio.run(functools.partial(pyfuncitem.obj, **kwargs))
    return True
