"""The process-wide settings of engine/runtime.py that are not about precision."""

from __future__ import annotations

import platform

import pytest

from engine.runtime import MALLOC_ENV, keep_freed_memory, release_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_glibc_takes_the_allocator_settings():
    assert keep_freed_memory() is True
    release_freed_memory()  # and gives the memory back when told


def test_the_allocator_is_left_alone_when_asked(monkeypatch):
    monkeypatch.setenv(MALLOC_ENV, "1")
    assert keep_freed_memory() is False
