"""CPU facts read before numpy loads (nothing here may import numpy)."""


def _first_cpu(path="/proc/cpuinfo"):
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def openblas_coretype(path="/proc/cpuinfo"):
    """The OpenBLAS kernel family cnet asks for on this CPU, or None for OpenBLAS's own pick.

    AMD Zen 4 (family 25 with AVX-512) executes 512-bit FMAs as two 256-bit
    halves; OpenBLAS then picks its Intel SkylakeX kernels, but its AVX2
    (Haswell) sgemm is faster there: 1-thread sgemm on the conv shapes of
    VGG/ResNeXt, 98-106 vs 90-102 GFLOP/s (mean of 12 shapes 101 vs 95, three
    alternating runs), VGG-11 training step at 2 threads 3-10% faster
    (bench/RESULTS.md).  Zen 5 has full-width AVX-512 and is left alone.
    """
    cpu = _first_cpu(path)
    flags = cpu.get("flags", "").split()
    if (cpu.get("vendor_id") == "AuthenticAMD" and cpu.get("cpu family") == "25"
            and "avx512f" in flags):
        return "Haswell"
    return None
