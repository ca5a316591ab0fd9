"""Training and inference throughput of cnet models, against PyTorch in the same run.

    python bench/throughput.py [--models resnet20,lenet5] [--threads 1,2]
                               [--repeats 9] [--quick] [--no-torch] [--json out.json]
    python bench/throughput.py --scaling [--threads 1,2]   # cnet's thread speed-up alone
    python bench/throughput.py --ablate batchnorm ...      # + cnet without its batch norms

For every model (bench/common.py MODELS), thread count and mode (train: forward,
cross-entropy loss, backward, SGD momentum step; infer: eval-mode forward), the
suite runs one worker process per framework: cnet, and with torch installed
the identical network in torch (bench/_torch_models.py: same layer shapes,
float32, torch.set_num_threads equal to cnet's) in NCHW and in channels_last.

How it measures:
- Each worker builds its model and batch once, runs warm-up steps, then the
  parent interleaves the frameworks (by default one iteration each in turn:
  cnet, torch NCHW, torch CL, then the next round in rotated order), so load
  changes on this shared machine hit all of them; the time of a configuration is the median over its timed
  iterations (each iteration timed on its own; --repeats per framework, fewer
  for slow models: at most --budget seconds of timed iterations each).
- The ratio is cnet speed / torch speed against torch's FASTER layout, so > 1
  means cnet is faster.
- GFLOP/s from cnet.summary's forward FLOPs (training counts 3x forward:
  forward, input gradient, weight gradient).  "%sgemm" divides it by the square
  2048 sgemm GFLOP/s at the same thread count, measured by this run between
  models (bench/gemm_ceiling.py; the best sample of the faster of numpy's BLAS
  and cnet's own GEMM kernel: what the machine can do).
- Peak memory: each worker is its own process; after its imports it resets the
  kernel's peak-RSS mark (Linux clear_refs) and reads its RSS; the reported
  figure is the peak RSS (VmHWM) after all its iterations minus that baseline:
  model, gradients, optimizer state, the batch, activations and workspaces,
  counted the same way for both frameworks.
- Warm turns: each turn of a framework starts with untimed iterations for
  --warm seconds (at least one) when a step takes under --slow seconds.  After
  the pause between turns the cores have idled, and on this VM they take a
  while to come back to full speed: ~60 ms when first measured (LeNet-5, cnet,
  2 threads: 11-14 ms per step back to back; right after a 0.25 s sleep 19, 19,
  18, 15, 15, 14 ms), 0.3-0.7 s on 2026-11-28 (mean step by time since a 0.25 s
  sleep, 12 trials: 1 thread 15.7 ms in the first 20 ms, 13.4 at 0.15-0.2 s,
  12.7 from 0.4 s; 2 threads 9.1, 8.1, 7.4 from 0.7 s).  With 0.1 s of warm
  turns LeNet-5's 2-thread medians read 6.4-8.1 ms (iqr 17-37%) against 5.3-5.8
  back to back; with 0.5 s, 5.3-5.6 ms (iqr 2-9%), hence the default.  An engine
  whose idle threads spin long (torch's default OpenMP policy) hides part of
  it, one that sleeps soon (cnet spins ~0.5 ms) does not; training runs its
  steps back to back, so both are timed warm.
- ``--ablate batchnorm`` adds a cnet worker whose model has every batch norm
  taken out (common.remove_batchnorm: the ReLU after each fuses into the
  convolution), timed in the same rounds: the step as if batch norm cost
  nothing, a bound on what folding it into the convolutions could give.  The
  table adds its time ("cnet no-BN ms") and the faster torch's time over it.
- Worker processes, not threads: cnet sets its own OpenMP wait (GOMP_SPINCOUNT)
  at import, which would also change torch's OpenMP runtime, so a torch worker
  never imports cnet and gets the environment without it.
"""
import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
from common import MODELS, Worker, machine_info, format_machine, median, spread, table  # noqa: E402

FRAMEWORKS = ("cnet", "torch_nchw", "torch_cl")
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


# -- worker side ------------------------------------------------------------------------

def _cnet_worker(cfg):
    import cnet              # before numpy: cnet sets OpenBLAS options its import reads
    import numpy as np
    from cnet import nn, optim
    from _torch_models import spec_from_cnet

    cnet.set_num_threads(cfg["threads"])
    cnet.manual_seed(0)
    base = common.reset_peak_rss()
    model, shape, batch, classes = common.build_cnet_model(cfg["model"], cfg.get("batch"))
    if cfg["framework"] == "cnet_no_bn":
        common.remove_batchnorm(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + shape, dtype=np.float32)
    y = rng.integers(0, classes, batch)
    if cfg["mode"] == "train":
        model.train()
        model.requires_input_grad_(False)     # as torch: the input does not require grad
        loss_fn = nn.CrossEntropyLoss()
        opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

        def step():
            logits = model(x)
            loss_fn(logits, y)
            opt.zero_grad()
            model.backward(loss_fn.backward())
            opt.step()
    else:
        model.eval()

        def step():
            model(x)
    state = {"model": model, "shape": shape, "batch": batch}
    ready = {"spec": spec_from_cnet(model), "batch": batch, "input": list(shape),
             "classes": classes}
    return step, base, ready, state


def _cnet_finish(state):
    import cnet
    s = cnet.summary(state["model"], state["shape"], verbose=False)
    return {"flops_per_sample": s["flops"], "params": s["total_params"]}


def _torch_worker(cfg):
    import torch
    import torch.nn.functional as F
    from _torch_models import build_torch

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    base = common.reset_peak_rss()
    model = build_torch(cfg["spec"])
    h, w, c = cfg["input"]
    batch = cfg["batch"]
    x = torch.randn(batch, c, h, w)
    y = torch.randint(0, cfg["classes"], (batch,))
    if cfg["framework"].startswith("torch_cl"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if cfg["mode"] == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY)

        def step():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.inference_mode():
                model(x)
    return step, base, {}, {}


def worker_main(cfg):
    import time as _time
    if cfg["framework"].startswith("cnet"):
        step, base, ready, state = _cnet_worker(cfg)
    else:
        step, base, ready, state = _torch_worker(cfg)

    def handle(cmd):
        if "run" in cmd:
            times = []
            warm_until = _time.perf_counter() + cmd.get("warm_s", 0)
            while _time.perf_counter() < warm_until:
                step()
            for _ in range(cmd["run"]):
                t0 = _time.perf_counter()
                step()
                times.append(_time.perf_counter() - t0)
            return {"times": times}
        if cmd.get("quit"):
            reply = {"peak_kb": common.peak_rss_kb() - base, "base_kb": base}
            if cfg["framework"].startswith("cnet"):
                reply.update(_cnet_finish(state))
            return reply
        if cmd.get("hello"):
            return ready
        raise ValueError(f"unknown command {cmd}")

    common.serve(handle)


# -- parent side ------------------------------------------------------------------------

def _timed_rounds(workers, args):
    """Warm-up, then the timed iterations of every worker ({key: Worker}) in interleaved
    rounds of rotating order; returns ({key: [seconds]}, [min, max load average])."""
    keys = list(workers)
    # Warm-up: the first iteration allocates workspaces; one more unless slow.
    first = {}
    for k in keys:
        t = workers[k].call(run=1)["times"][0]
        first[k] = t
        if t < args.slow:
            workers[k].call(run=1)
    # Repeats: as asked, but at most `budget` seconds of timed steps each.
    slowest = max(first.values())
    repeats = max(args.min_repeats, min(args.repeats, int(args.budget / max(slowest, 1e-9))))
    rounds = min(args.rounds, repeats) if args.rounds > 0 else repeats
    per_round = math.ceil(repeats / rounds)
    times = {k: [] for k in keys}
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            if args.gap > 0:
                time.sleep(args.gap)      # let the previous worker's spinning threads stop
            warm = args.warm if first[k] < args.slow else 0   # see "Warm turns" above
            times[k] += workers[k].call(run=per_round, warm_s=warm)["times"]
        load.append(os.getloadavg()[0])
    return times, [min(load), max(load)]


def run_scaling(model, mode, thread_counts, args):
    """cnet alone at each thread count, interleaved like the frameworks of run_config:
    the 1 -> N speed-up from one stretch of time (separate configurations, minutes
    apart on this shared VM, see the machine's speed drift by 10-20%)."""
    script = os.path.abspath(__file__)
    workers = {}
    try:
        for t in thread_counts:
            workers[t] = Worker(script, {"model": model, "threads": t, "mode": mode,
                                         "batch": args.batch, "framework": "cnet"})
            workers[t].call(hello=True)
        times, load = _timed_rounds(workers, args)
        return {"model": model, "mode": mode, "loadavg": load,
                "times": {str(t): v for t, v in times.items()},
                "median_s": {str(t): median(v) for t, v in times.items()},
                "spread": {str(t): spread(v) for t, v in times.items()}}
    finally:
        for w in workers.values():
            w.close()


def scaling_table(results, thread_counts):
    """Markdown table of run_scaling results: ms (iqr) per thread count and speed-ups."""
    base = str(thread_counts[0])
    header = (["model", "mode"] + [f"{t} thr ms" for t in thread_counts]
              + [f"{base} -> {t} thr" for t in thread_counts[1:]] + ["load"])
    rows = []
    for r in results:
        med = r["median_s"]
        rows.append([r["model"], r["mode"]]
                    + [f"{med[str(t)] * 1e3:.1f} ({r['spread'][str(t)]:.0%})"
                       for t in thread_counts]
                    + [f"{med[base] / med[str(t)]:.2f}x" for t in thread_counts[1:]]
                    + [f"{r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f}"])
    return table(header, rows)

def run_config(model, threads, mode, frameworks, args, log):
    """Interleaved measurement of one (model, threads, mode) for all frameworks."""
    script = os.path.abspath(__file__)
    base_cfg = {"model": model, "threads": threads, "mode": mode, "batch": args.batch}
    workers = {}
    try:
        workers["cnet"] = Worker(script, dict(base_cfg, framework="cnet"))
        ready = workers["cnet"].call(hello=True)
        for fw in frameworks[1:]:
            if fw.startswith("cnet"):
                workers[fw] = Worker(script, dict(base_cfg, framework=fw))
                continue
            cfg = dict(base_cfg, framework=fw, spec=ready["spec"], input=ready["input"],
                       batch=ready["batch"], classes=ready["classes"])
            env = common.torch_env()
            if fw.endswith("_passive"):
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            if fw.endswith("_malloc"):
                env.update(common.malloc_env())
            workers[fw] = Worker(script, cfg, env=env)
        for fw in frameworks[1:]:
            workers[fw].call(hello=True)
        times, load = _timed_rounds(workers, args)
        result = {"model": model, "threads": threads, "mode": mode, "repeats": len(times["cnet"]),
                  "loadavg": load, "frameworks": {}}
        for fw in frameworks:
            fin = workers[fw].call(quit=True)
            result["frameworks"][fw] = {"times": times[fw], "median_s": median(times[fw]),
                                        "spread": spread(times[fw]), "peak_mb": fin["peak_kb"] / 1024}
            if fw == "cnet":
                result["flops_per_sample"] = fin["flops_per_sample"]
                result["params"] = fin["params"]
        result["batch"] = ready["batch"]
        return result
    finally:
        for w in workers.values():
            w.close()


def derive(r, ceilings):
    """Images/s, GFLOP/s, %sgemm, ratios for one result (in place)."""
    batch = r["batch"]
    flops = r["flops_per_sample"] * batch * (3 if r["mode"] == "train" else 1)
    for fw, d in r["frameworks"].items():
        t = d["median_s"]
        d["images_per_s"] = batch / t
        d["gflops"] = flops / t / 1e9
    ceil = ceilings.get(r["threads"])
    c = r["frameworks"]["cnet"]
    c["pct_sgemm"] = 100 * c["gflops"] / ceil if ceil else None
    torch_fw = [fw for fw in r["frameworks"] if fw.startswith("torch")]
    if torch_fw:
        best = min(torch_fw, key=lambda fw: r["frameworks"][fw]["median_s"])
        tb = r["frameworks"][best]
        r["torch_best"] = best
        r["speed_ratio"] = tb["median_s"] / c["median_s"]
        # best-of ratio: the fastest iteration of each (least disturbed by other load)
        r["speed_ratio_best"] = (min(min(r["frameworks"][fw]["times"]) for fw in torch_fw)
                                 / min(c["times"]))
        r["mem_ratio"] = c["peak_mb"] / tb["peak_mb"] if tb["peak_mb"] > 0 else None
        r["frameworks"][best]["pct_sgemm"] = 100 * tb["gflops"] / ceil if ceil else None
        if "cnet_no_bn" in r["frameworks"]:
            r["no_bn_ratio"] = tb["median_s"] / r["frameworks"]["cnet_no_bn"]["median_s"]
    return r


def _f(v, fmt):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


LABELS = {"torch_nchw": "torch NCHW ms", "torch_cl": "torch CL ms",
          "torch_nchw_passive": "torch NCHW passive ms", "torch_cl_passive": "torch CL passive ms",
          "torch_cl_malloc": "torch CL malloc ms"}


_SOURCE_NAMES = {"blas": "numpy's BLAS", "cnet": "cnet's own GEMM"}


def ceiling_sources(probes):
    """{threads: {source: best GFLOP/s}} from a run's sgemm probes (each a
    gemm_ceiling.ceiling_sources dict; a plain number, numpy's BLAS, in older files)."""
    out = {}
    for t, samples in probes.items():
        best = {}
        for probe in samples:
            for src, v in (probe.items() if isinstance(probe, dict) else [("blas", probe)]):
                best[src] = max(best.get(src, 0.0), v)
        if best:
            out[int(t)] = best
    return out


def report(results, ceilings, have_torch, sources=None):
    lines = []
    header = ["model", "thr", "mode", "cnet ms", "cnet img/s", "cnet GFLOP/s", "%sgemm",
              "cnet MB", "iqr"]
    torch_fws = [fw for fw in LABELS if any(fw in r["frameworks"] for r in results)]
    ablated = any("cnet_no_bn" in r["frameworks"] for r in results)
    if ablated:
        header += ["cnet no-BN ms"] + (["no-BN vs torch"] if have_torch else [])
    if have_torch:
        header += [LABELS[fw] for fw in torch_fws] + [
            "torch img/s", "torch %sgemm", "torch MB", "speed vs torch", "best-of",
            "mem vs torch"]
    header += ["n", "load"]
    rows = []
    for r in results:
        c = r["frameworks"]["cnet"]
        row = [r["model"], r["threads"], r["mode"], _f(c["median_s"] * 1e3, ".1f"),
               _f(c["images_per_s"], ".0f"), _f(c["gflops"], ".1f"), _f(c["pct_sgemm"], ".0f"),
               _f(c["peak_mb"], ".0f"), _f(c["spread"], ".0%")]
        if ablated:
            nb = r["frameworks"].get("cnet_no_bn")
            row.append(_f(nb["median_s"] * 1e3 if nb else None, ".1f"))
            if have_torch:
                row.append(_f(r.get("no_bn_ratio"), ".2f") + "x")
        if have_torch:
            fws = r["frameworks"]
            tb = fws[r["torch_best"]]
            row += [_f(fws[fw]["median_s"] * 1e3 if fw in fws else None, ".1f")
                    for fw in torch_fws]
            row += [_f(tb["images_per_s"], ".0f"), _f(tb.get("pct_sgemm"), ".0f"),
                    _f(tb["peak_mb"], ".0f"), _f(r["speed_ratio"], ".2f") + "x",
                    _f(r.get("speed_ratio_best"), ".2f") + "x", _f(r["mem_ratio"], ".2f") + "x"]
        row += [r["repeats"], f"{r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f}"]
        rows.append(row)
    lines.append(table(header, rows))
    # 1 -> 2 (or min -> max) thread scaling
    by = {(r["model"], r["mode"], r["threads"]): r for r in results}
    thr = sorted({r["threads"] for r in results})
    if len(thr) > 1:
        lo, hi = thr[0], thr[-1]
        srows = []
        for (model, mode, t), r in by.items():
            if t != hi or (model, mode, lo) not in by:
                continue
            r1 = by[(model, mode, lo)]
            row = [model, mode, _f(r1["frameworks"]["cnet"]["median_s"] / r["frameworks"]["cnet"]["median_s"], ".2f") + "x"]
            if have_torch:
                t1 = min(d["median_s"] for fw, d in r1["frameworks"].items()
                         if fw.startswith("torch"))
                t2 = min(d["median_s"] for fw, d in r["frameworks"].items()
                         if fw.startswith("torch"))
                row.append(_f(t1 / t2, ".2f") + "x")
            srows.append(row)
        lines.append("")
        lines.append(table(["model", "mode", f"cnet {lo}->{hi} thr speed-up"]
                           + ([f"torch (best layout) {lo}->{hi}"] if have_torch else []), srows))
    lines.append("")
    def which(t):
        found = (sources or {}).get(t)
        if not found or len(found) < 2:
            return ""
        top = max(found, key=found.get)
        rest = "; ".join(f"{_SOURCE_NAMES.get(s, s)} {v:.1f}" for s, v in found.items() if s != top)
        return f" ({_SOURCE_NAMES.get(top, top)}; {rest})"
    lines.append("sgemm ceiling (square 2048, GFLOP/s, best sample of the probes of this run, "
                 "the faster of numpy's BLAS and cnet's own GEMM kernel): "
                 + ", ".join(f"{t} thr {v:.1f}{which(t)}" for t, v in sorted(ceilings.items())))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated, from: {', '.join(MODELS)}")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--modes", default="train,infer")
    ap.add_argument("--repeats", type=int, default=9, help="timed iterations per framework")
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=0,
                    help="interleaving rounds (0: one per timed iteration, i.e. the frameworks "
                         "alternate every iteration)")
    ap.add_argument("--budget", type=float, default=30.0,
                    help="at most this many seconds of timed iterations per framework and config")
    ap.add_argument("--slow", type=float, default=2.0,
                    help="a step slower than this gets one warm-up iteration instead of two")
    ap.add_argument("--warm", type=float, default=0.5,
                    help="untimed iterations for this many seconds at the start of each turn "
                         "(steps faster than --slow only): the cores come back from idle")
    ap.add_argument("--gap", type=float, default=0.25,
                    help="seconds of idle time before each worker's turn: a worker's BLAS/OpenMP "
                         "threads spin for up to ~0.1 s after its step (OpenBLAS's default "
                         "timeout) and would slow the NEXT framework down")
    ap.add_argument("--batch", type=int, default=None, help="override every model's batch")
    ap.add_argument("--quick", action="store_true", help="3 repeats, 1 round, 10 s budget")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-layouts", default="nchw,cl",
                    help="torch variants to run: nchw, cl (channels_last), and nchw_passive, "
                         "cl_passive (the same with OMP_WAIT_POLICY=PASSIVE, which can help "
                         "torch when other processes share the cores), cl_malloc "
                         "(channels_last with the malloc thresholds cnet sets at import)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the sgemm probes")
    ap.add_argument("--ablate", default="", choices=["", "batchnorm"],
                    help="batchnorm: also time cnet with every batch norm taken out, in the "
                         "same rounds (what the step would take if batch norm cost nothing)")
    ap.add_argument("--scaling", action="store_true",
                    help="cnet only: its thread counts interleaved in one stretch of time, "
                         "for the speed-up from the first thread count to the others")
    ap.add_argument("--json", default=None, help="write all results (raw times too) here")
    ap.add_argument("--from-json", default=None,
                    help="print the tables of an earlier --json file instead of measuring")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        sources = ceiling_sources(data.get("ceiling_probes") or {})
        ceilings = ({t: max(v.values()) for t, v in sources.items()} if sources
                    else {int(t): v for t, v in data["ceilings"].items()})
        results = [derive(r, ceilings) for r in data["results"]]
        print(format_machine(data["machine"]))
        print(report(results, ceilings, any(fw.startswith("torch") for r in results
                                            for fw in r["frameworks"]), sources))
        return results
    if args.quick:
        args.repeats, args.rounds, args.budget, args.min_repeats = 3, 1, 10.0, 1
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    threads = [int(t) for t in args.threads.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    have_torch = common.torch_available() and not args.no_torch
    layouts = {"nchw": "torch_nchw", "cl": "torch_cl", "channels_last": "torch_cl",
               "nchw_passive": "torch_nchw_passive", "cl_passive": "torch_cl_passive",
               "cl_malloc": "torch_cl_malloc"}
    frameworks = (("cnet",) + (("cnet_no_bn",) if args.ablate == "batchnorm" else ())
                  + (tuple(layouts[t] for t in args.torch_layouts.split(",") if t)
                     if have_torch else ()))

    info = machine_info()
    print(format_machine(info))
    print(f"command: python bench/throughput.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(flush=True)
    if args.scaling:
        results = []
        for model in models:
            for mode in modes:
                results.append(run_scaling(model, mode, threads, args))
                print(f"{model} {mode}: " + "  ".join(
                    f"{t} thr {v * 1e3:.1f} ms" for t, v in results[-1]["median_s"].items()),
                    flush=True)
        print()
        print(scaling_table(results, threads))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, "args": vars(args), "scaling": results}, f, indent=1)
        return results
    probes = {t: [] for t in threads}
    results = []
    t_start = time.time()
    for model in models:
        if not args.no_ceiling:
            import gemm_ceiling
            for t in threads:
                probes[t].append(gemm_ceiling.ceiling_sources(t, repeats=3))
        for t in threads:
            for mode in modes:
                r = run_config(model, t, mode, frameworks, args, print)
                results.append(r)
                fws = r["frameworks"]
                msg = "  ".join(f"{fw} {d['median_s'] * 1e3:.1f} ms ({d['peak_mb']:.0f} MB)"
                                for fw, d in fws.items())
                print(f"[{time.time() - t_start:6.0f}s] {model} threads={t} {mode}: {msg}  "
                      f"n={r['repeats']} load={r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f}",
                      flush=True)
    if not args.no_ceiling:
        import gemm_ceiling
        for t in threads:
            probes[t].append(gemm_ceiling.ceiling_sources(t, repeats=3))
    sources = ceiling_sources(probes)
    ceilings = {t: max(v.values()) for t, v in sources.items()}
    for r in results:
        derive(r, ceilings)
    print()
    print(report(results, ceilings, have_torch, sources))
    info["loadavg_end"] = os.getloadavg()
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in info['loadavg_end'])}; "
          f"total {time.time() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "ceilings": ceilings,
                       "ceiling_probes": probes, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
