import io

import pytest

import cnet
from cnet import _threads


def test_build_has_openmp():
    from cnet_ext import _openmp_helpers
    assert _openmp_helpers.openmp_enabled(), "kernels were built without OpenMP"


def test_set_get_and_context_manager():
    start = cnet.get_num_threads()
    cnet.set_num_threads(1)
    assert cnet.get_num_threads() == 1
    blas = [i for i in _threads.blas_info() if i["api"] == "blas"]
    assert blas and all(i["num_threads"] == 1 for i in blas)
    with cnet.threads(2):
        assert cnet.get_num_threads() == 2
    assert cnet.get_num_threads() == 1
    cnet.set_num_threads(start)


def test_bad_thread_count():
    with pytest.raises(ValueError, match=">= 1"):
        cnet.set_num_threads(0)


def test_show_config_reports():
    buf = io.StringIO()
    info = cnet.show_config(file=buf)
    text = buf.getvalue()
    assert "OpenMP kernels:  on" in text and info["openmp"] is True
    assert info["num_threads"] == cnet.get_num_threads()
    assert any(i["api"] == "blas" for i in info["blas"])
