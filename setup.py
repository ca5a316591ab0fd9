"""Build the Cython kernels in cnet_ext/.

Every ``cnet_ext/*.pyx`` becomes an extension ``cnet_ext.<name>``, so adding a
kernel family needs no edit here.  OpenMP is probed with the compiler that will
build the extensions; without it (or with ``CNET_NO_OPENMP=1``) the kernels are
built single-threaded and ``cnet.show_config()`` says so.

Developer conveniences (not needed for ``pip install .``):
``CNET_EXT=_conv,_pool python setup.py build_ext --inplace`` builds only those.
``CNET_ANNOTATE=1`` writes ``cython -a`` HTML next to the sources.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def compiler_supports_openmp(compiler):
    """Compile and link a tiny OpenMP program with the build's own compiler."""
    tmp = tempfile.mkdtemp(prefix="cnet-omp-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
        compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=["-fopenmp"])
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExtWithOpenMP(build_ext):
    def build_extensions(self):
        use_openmp = os.environ.get("CNET_NO_OPENMP", "") not in ("1", "true", "yes")
        if use_openmp and not compiler_supports_openmp(self.compiler):
            warnings.warn("cnet: the compiler does not support OpenMP; building "
                          "single-threaded kernels")
            use_openmp = False
        for ext in self.extensions:
            if use_openmp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        super().build_extensions()


def extensions():
    only = {s.strip() for s in os.environ.get("CNET_EXT", "").split(",") if s.strip()}
    exts = []
    for path in sorted(glob.glob(os.path.join("cnet_ext", "*.pyx"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if only and name not in only:
            continue
        exts.append(Extension(
            f"cnet_ext.{name}", [path],
            # A header edit must rebuild the modules that include it.
            depends=sorted(glob.glob(os.path.join("cnet_ext", "*.h"))
                           + glob.glob(os.path.join("cnet_ext", "*.pxd"))),
            include_dirs=[np.get_include(), "cnet_ext"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=["-O3", "-fno-math-errno", "-Wno-unused-function",
                                "-Wno-maybe-uninitialized"],
            extra_link_args=[],
        ))
    return exts


os.makedirs(os.path.join(HERE, "cnet_ext"), exist_ok=True)
setup(
    ext_modules=cythonize(
        extensions(),
        compiler_directives={
            "language_level": 3, "boundscheck": False, "wraparound": False,
            "cdivision": True, "initializedcheck": False, "embedsignature": True,
        },
        annotate=os.environ.get("CNET_ANNOTATE") == "1",
        nthreads=int(os.environ.get("CNET_CYTHON_JOBS", "0")) or None,
    ),
    cmdclass={"build_ext": BuildExtWithOpenMP},
)
