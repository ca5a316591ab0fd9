"""Shared pieces of the benchmark suite: the benchmarked models, the machine
description, memory readings, statistics, worker processes and table output.

Nothing here imports cnet or torch: the parent process of a benchmark stays
free of both, and each measurement runs in a worker process that imports only
the framework it measures (see throughput.py for why).
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# name -> how to build it in cnet, its input and batch.  ``builder`` is an
# attribute of cnet.models; ``kwargs`` its arguments.
MODELS = {
    "lenet5": dict(builder="lenet5", kwargs={}, input=(32, 32, 1), batch=256, classes=10),
    "vgg11_bn": dict(builder="vgg11_bn", kwargs={"input_size": 32, "num_classes": 10},
                     input=(32, 32, 3), batch=64, classes=10),
    "resnet20": dict(builder="resnet20", kwargs={}, input=(32, 32, 3), batch=128, classes=10),
    # torchvision's ImageNet ResNet-18 (7x7/2 stem + max-pool) on 64x64 inputs,
    # 200 classes: the Tiny-ImageNet setting.
    "resnet18": dict(builder="resnet18", kwargs={"num_classes": 200, "input_size": 224},
                     input=(64, 64, 3), batch=32, classes=200),
    # ResNeXt-29 with cardinality 8 and bottleneck width 16 ("8x16d"; grouped
    # widths 128/256/512), from the CIFAR ResNeXt builder.
    "resnext29_8x16d": dict(builder="resnext_cifar",
                            kwargs={"depth": 29, "cardinality": 8, "base_width": 16},
                            input=(32, 32, 3), batch=64, classes=10),
}

HERE = os.path.dirname(os.path.abspath(__file__))


def build_cnet_model(name, batch=None):
    """(model, input_shape, batch, classes) for a MODELS entry (imports cnet)."""
    from cnet import models
    m = MODELS[name]
    model = getattr(models, m["builder"])(**m["kwargs"])
    return model, tuple(m["input"]), batch or m["batch"], m["classes"]


def remove_batchnorm(model):
    """throughput.py --ablate batchnorm: every BatchNorm2d taken out of its
    Sequential before the first forward, so that the ReLU after it fuses into the
    convolution before it (the step as if batch norm cost nothing).  The network
    computes something else; its convolutions, joins, loss and optimizer do the same
    work.  Edits Sequential's layer list before its fusion plan exists (built at
    the first forward).  Returns how many were removed."""
    from cnet import nn
    removed = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        if module._plan is not None:
            raise ValueError("remove_batchnorm: the model has run; build a fresh one")
        for name, layer in list(module._modules.items()):
            if isinstance(layer, nn.BatchNorm2d):
                module._layers.remove(layer)
                delattr(module, name)
                removed += 1
    left = [type(m).__name__ for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise ValueError(f"remove_batchnorm: {len(left)} batch norms outside a Sequential")
    return removed


# -- machine --------------------------------------------------------------------

def _lscpu():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = {}
    for line in out.splitlines():
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    return info


def _package_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001  (not installed, or broken metadata)
        return None


def machine_info():
    """A dict describing the machine and the software (no cnet/torch import)."""
    cpu = _lscpu()
    info = {
        "cpu": cpu.get("Model name", platform.processor()),
        "cpus": cpu.get("CPU(s)"), "cores_per_socket": cpu.get("Core(s) per socket"),
        "threads_per_core": cpu.get("Thread(s) per core"),
        "l2": cpu.get("L2 cache"), "l3": cpu.get("L3 cache"),
        "hypervisor": cpu.get("Hypervisor vendor"),
        "avx512": "avx512f" in cpu.get("Flags", ""),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "numpy": _package_version("numpy"), "torch": _package_version("torch"),
        "threadpoolctl": _package_version("threadpoolctl"),
        "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    try:
        import numpy  # noqa: F401
        from threadpoolctl import threadpool_info
        info["blas"] = [f"{d.get('internal_api')} {d.get('version')} "
                        f"({d.get('architecture', '?')}, {d.get('threading_layer', '?')})"
                        for d in threadpool_info() if d.get("user_api") == "blas"]
    except ImportError:
        info["blas"] = []
    return info


def format_machine(info):
    return "\n".join([
        f"CPU: {info['cpu']} ({info['cpus']} CPUs, {info['cores_per_socket']} cores/socket, "
        f"{info['threads_per_core']} thread/core, L2 {info['l2']}, L3 {info['l3']}, "
        f"hypervisor {info['hypervisor']}, AVX-512 {'yes' if info['avx512'] else 'no'})",
        f"Python {info['python']}, numpy {info['numpy']} (BLAS: {'; '.join(info['blas']) or '?'}), "
        f"torch {info['torch'] or 'not installed'}",
        f"{info['platform']}; measured {info['date']}; load average "
        f"{' '.join(f'{v:.2f}' for v in info['loadavg'])}",
    ])


# -- memory ---------------------------------------------------------------------

def proc_status_kb(field):
    """A 'kB' field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset the process's peak-RSS mark to the current RSS (Linux >= 4.0:
    writing 5 to clear_refs); returns the current RSS in kB.  Where that is not
    possible the peak stays what it was, which only overstates the later delta
    if the import phase itself peaked above the run (it rarely does)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss = proc_status_kb("VmRSS")
    if rss is None:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss


def peak_rss_kb():
    hwm = proc_status_kb("VmHWM")
    if hwm is None:
        import resource
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return hwm


# -- statistics -------------------------------------------------------------------

def median(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    """Relative inter-quartile range of a sample (a noise indicator)."""
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


# -- worker processes ----------------------------------------------------------------

class Worker:
    """A benchmark process speaking JSON lines: the parent writes one command per
    line to its stdin, it answers one JSON object per line on its stdout (its
    own prints go to stderr).  ``script`` is run as ``python script --worker CFG``."""

    def __init__(self, script, cfg, env=None):
        self.cfg = cfg
        self.proc = subprocess.Popen(
            [sys.executable, script, "--worker", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)

    def recv(self):
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise RuntimeError(f"worker {self.cfg} exited with status {rc} (see stderr above)")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"worker {self.cfg}: {msg['error']}")
        return msg

    def call(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def serve(handler):
    """Worker side of ``Worker``: ``handler(cmd) -> reply dict`` per input line,
    until stdin closes or a command has ``quit``."""
    out = sys.stdout
    sys.stdout = sys.stderr           # stray prints must not corrupt the protocol
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            reply = handler(cmd)
        except Exception as e:  # noqa: BLE001  (reported to the parent, which raises)
            import traceback
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if cmd.get("quit") or "error" in reply:
            break


# The OpenMP wait settings as the user set them (cnet sets GOMP_SPINCOUNT when it
# is imported).
_OMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_USER_OMP_WAIT = ({k: os.environ[k] for k in _OMP_WAIT_VARS if k in os.environ}
                  if "cnet" not in sys.modules else {})


def malloc_env():
    """The glibc malloc thresholds cnet sets at import (cnet/_malloc.py), as the
    environment variables that give a torch worker the same setting.  The file is
    loaded on its own: this process must not import cnet."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_cnet_malloc", os.path.join(HERE, os.pardir, "cnet", "_malloc.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    keep = str(module.KEEP_BYTES)
    return {"MALLOC_MMAP_THRESHOLD_": keep, "MALLOC_TRIM_THRESHOLD_": keep}


def torch_env():
    """The environment for a torch worker: cnet's OpenMP wait default must not
    leak into torch's OpenMP runtime (a user's own setting is kept)."""
    env = {k: v for k, v in os.environ.items() if k not in _OMP_WAIT_VARS}
    env.update(_USER_OMP_WAIT)
    return env


def torch_available():
    import importlib.util
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


# -- tables ----------------------------------------------------------------------------

def table(header, rows, align=None):
    """A GitHub-markdown table (also readable as plain text)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    align = align or ["<"] + [">"] * (len(header) - 1)
    fmt = "| " + " | ".join(f"{{:{a}{w}}}" for a, w in zip(align, widths)) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == ">" else ("-" * (w + 2))
                          for a, w in zip(align, widths)) + "|"
    return "\n".join([fmt.format(*header), rule, *(fmt.format(*r) for r in rows)])
