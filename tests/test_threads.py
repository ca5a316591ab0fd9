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


def _allocator_state(**env):
    import os
    import subprocess
    import sys
    clean = {k: v for k, v in os.environ.items()
             if k not in ("CNET_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", "import cnet; print(cnet.show_config()['allocator'])"],
                         env=dict(clean, **env), capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_tuning_applied_and_opt_out():
    from cnet import _malloc
    assert _allocator_state() == f"glibc keeps freed blocks up to {_malloc.KEEP_BYTES >> 20} MB for reuse"
    assert _allocator_state(CNET_MALLOC_TUNING="0") == "default (CNET_MALLOC_TUNING=0)"
    # the user's own glibc settings win
    assert _allocator_state(MALLOC_TRIM_THRESHOLD_="65536").startswith("default (the environment")


@pytest.mark.parametrize("vendor,family,flags,expected", [
    ("AuthenticAMD", "25", "fpu sse2 avx2 avx512f avx512bw", "Haswell"),   # Zen 4
    ("AuthenticAMD", "25", "fpu sse2 avx2", None),                         # Zen 3
    ("AuthenticAMD", "26", "fpu sse2 avx2 avx512f", None),                 # Zen 5
    ("GenuineIntel", "6", "fpu sse2 avx2 avx512f", None),
])
def test_openblas_coretype_choice(vendor, family, flags, expected, tmp_path):
    from cnet import _cpu
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\n"
                    f"flags\t\t: {flags}\n\nprocessor\t: 1\nvendor_id\t: other\n")
    assert _cpu.openblas_coretype(str(info)) == expected
    assert _cpu.openblas_coretype(str(tmp_path / "missing")) is None
