"""`diffrl.allocator.tune_malloc`: glibc takes the settings; DIFFRL_MALLOC=default leaves glibc's own."""

import ctypes.util
import platform

import pytest

from diffrl.allocator import tune_malloc


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_settings():
    assert ctypes.util.find_library("c") is not None
    assert tune_malloc() is True


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("DIFFRL_MALLOC", "default")
    assert tune_malloc() is False
