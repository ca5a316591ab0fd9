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
    assert "small GEMMs:" in text and isinstance(info["cblas_from_kernels"], bool)


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


def test_run_tasks_runs_every_task_once_on_the_team():
    from cnet_ext import _openmp_helpers
    for n_tasks, n_threads in [(0, 2), (1, 2), (7, 2), (64, 3), (5, 1)]:
        seen = []
        _openmp_helpers.run_tasks(lambda t, w: seen.append((t, w)), n_tasks, n_threads)
        assert sorted(t for t, _ in seen) == list(range(n_tasks))
        assert all(0 <= w < n_threads for _, w in seen)
    with pytest.raises(ValueError, match="n_threads"):
        _openmp_helpers.run_tasks(lambda t, w: None, 3, 0)


def test_run_tasks_raises_the_first_error_and_starts_no_more_tasks():
    from cnet_ext import _openmp_helpers
    started = []

    def fn(t, w):
        started.append(t)
        if t == 2:
            raise KeyError("task 2")

    with pytest.raises(KeyError, match="task 2"):
        _openmp_helpers.run_tasks(fn, 1000, 2)
    assert 2 in started and len(started) < 1000


def _run_child(code, **env):
    """Run code in a fresh interpreter with the OpenMP wait settings of ``env`` only
    (this process's came from its own cnet import)."""
    import os
    import subprocess
    import sys
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return subprocess.run([sys.executable, "-c", code], env=dict(base, **env),
                          capture_output=True, text=True, timeout=120)


def test_spin_default_and_the_users_wait_policy():
    code = ("import cnet, os; from cnet_ext import _openmp_helpers as h; "
            "print(os.environ.get('GOMP_SPINCOUNT'), *h.workers_spin())")

    def run(**env):
        out = _run_child(code, **env)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert run() == ["10000", "True", str(1 << 15)]
    # a passive wait keeps the cheap passes on one thread for longer
    assert run(OMP_WAIT_POLICY="PASSIVE") == ["None", "False", str(1 << 19)]
    assert run(OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT="2000") == ["2000", "True", str(1 << 15)]
    assert run(GOMP_SPINCOUNT="0") == ["0", "False", str(1 << 19)]


def test_forked_child_runs_on_one_thread_instead_of_hanging():
    # GNU OpenMP cannot start a team in the child of a process that ran one.
    code = """
import os, numpy as np, cnet
from cnet import nn
cnet.set_num_threads(2)
conv, bn = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
x = np.random.default_rng(0).standard_normal((16, 32, 32, 8), dtype=np.float32)
want = bn(conv(x))
pid = os.fork()
if pid == 0:
    ok = cnet.get_num_threads() == 1 and np.allclose(bn(conv(x)), want, atol=1e-5)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), "parent threads", cnet.get_num_threads())
"""
    out = _run_child(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["child", "0", "parent", "threads", "2"]
