"""MoE layer forward+backward throughput: Chogori's `models.moe.MoE` against transformers' `DeepseekV3MoE`, the
module a user would pick instead, with the experts implementation they would run (`grouped_mm` by default:
transformers' own grouped-GEMM path; `--theirs eager` for its per-expert Python loop).

    python bench/moe_layer.py                       # the issue-18 sweep, one thread, ~2 min on a 2-core CPU
    python bench/moe_layer.py --cases 384:8:fp32 --profile --memory
    python bench/moe_layer.py --theirs eager --cases 8:2:fp32 64:8:fp32 384:8:fp32
    python bench/moe_layer.py --compile --profile    # also both layers under torch.compile (inductor)

A case is EXPERTS:TOP_K:DTYPE (fp32 or bf16). Every case has --tokens tokens in one sequence, hidden size
--hidden, routed experts of width --expert-ffn and one shared expert of the same width; n_group = 1, the balance
loss off (the HF module has none), so both layers do the same math. Both get the same weights (ours are copied
into the HF module: router weight and correction bias, gate/up stacked into `gate_up_proj`, down, shared
expert). A bare HF module has no experts implementation set, so the script sets the one asked for and checks
that it is the one that runs.

Before timing, each case checks in float32 that the two layers agree: forward output to 1e-5, input gradient
and router / expert weight gradients (relative to their largest entry) to 1e-4, and prints the differences.

Timing: --warmup untimed steps, then --iters timed steps of each layer, ours and theirs alternating step by
step (so that load from other processes hits both alike); a step is zero-grad + forward + backward with a
fixed output gradient. With one torch thread (the default, --threads 1) the clock is the thread's CPU time
(`time.thread_time`: what this computation cost, not time spent descheduled while other processes ran), else
wall time (CUDA synchronized). The ratio column is theirs / ours step time of each alternating pair: median
[min..max] over the --iters pairs. --memory adds the peak bytes one fwd+bwd step allocates on top of what was
allocated before it (CUDA: the allocator's peak; CPU: glibc's bytes in use after every op, Linux). --profile
adds, from one profiled step of each layer, the share of the step spent outside the grouped GEMMs
(`aten::_grouped_mm`, children included) and outside every GEMM (also the shared expert's `mm`), and the top ops.

--compile also times both layers under `torch.compile` (inductor; ours as `train.compile` compiles a block,
theirs the whole module), alternating with the eager steps, after --warmup (at least 2: the first compiles).
Its ratio is the faster of their eager and compiled step over our compiled step, pair by pair. transformers'
compiled fp32 path runs its own `grouped_mm` fallback op (torch's fake rule for `_grouped_mm` takes bf16 only);
ours registers `chogori::grouped_mm` for that (models/moe.py).
Benchmarks never fail a test run; record the output in docs/BENCHMARKS.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from machine import cpu_model  # noqa: E402  (bench/ is the script directory)

from models.config import ModelConfig  # noqa: E402
from models.moe import MoE, _grouped_mm_ok  # noqa: E402

TOL, FWD_TOL = 1e-4, 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_CASES = ["8:8:fp32", "64:8:fp32", "384:8:fp32", "8:2:fp32", "384:2:fp32", "64:8:bf16", "384:8:bf16"]


def parse_case(text: str) -> tuple[int, int, str]:
    try:
        experts, k, dtype = text.split(":")
        if dtype not in DTYPES:
            raise ValueError
        return int(experts), int(k), dtype
    except ValueError:
        raise SystemExit(f"--cases: '{text}' is not EXPERTS:TOP_K:DTYPE with DTYPE in {sorted(DTYPES)}") from None


def build(num_experts: int, hidden: int, k: int, inter: int, seed: int, theirs: str):
    """Our MoE with random weights, and transformers' DeepseekV3MoE holding copies, running the experts
    implementation `theirs`."""
    from transformers import DeepseekV3Config
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts, DeepseekV3MoE

    cfg = ModelConfig(hidden_size=hidden, n_routed_experts=num_experts, num_experts_per_tok=k,
                      moe_intermediate_size=inter, n_shared_experts=1, n_group=1, topk_group=1,
                      aux_loss_alpha=0.0, num_hidden_layers=2, first_k_dense_replace=1)
    g = torch.Generator().manual_seed(seed)
    ours = MoE(cfg)
    with torch.no_grad():
        for p in ours.parameters():  # 1/sqrt(fan_in): outputs O(1), so the tolerances are meaningful
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        # a small non-zero correction bias, so the biased choice vs. unbiased gate weights is exercised
        ours.gate.e_score_correction_bias.copy_(0.01 * torch.randn(num_experts, generator=g))

    hcfg = DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=num_experts,
                            num_experts_per_tok=k, n_shared_experts=1, n_group=1, topk_group=1,
                            routed_scaling_factor=cfg.routed_scaling_factor,
                            norm_topk_prob=cfg.norm_topk_prob, hidden_act="silu")
    hcfg._experts_implementation = theirs
    hf = DeepseekV3MoE(hcfg)
    loop_fn = DeepseekV3Experts.forward.__wrapped__
    resolved = ALL_EXPERTS_FUNCTIONS.get_interface(hf.experts.config._experts_implementation, loop_fn)
    # "eager" must resolve to the class's own loop, anything else to the kernel of that name
    if (resolved is loop_fn) != (theirs == "eager") or (theirs != "eager" and theirs not in resolved.__name__):
        raise SystemExit(f"experts implementation '{theirs}' resolved to {resolved.__qualname__}")
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        hf.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj.flatten(1, 2))  # [E, 2, I, H] -> [E, 2I, H]
        hf.experts.down_proj.copy_(ours.experts.down_proj)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, n).weight.copy_(getattr(ours.shared_experts, n).weight)
    return ours.train(), hf.train(), f"{theirs} ({resolved.__qualname__})"


def run_ours(m: MoE, x: torch.Tensor) -> torch.Tensor:
    return m(x)[0]


def run_hf(m, x: torch.Tensor) -> torch.Tensor:
    return m(x)


def step(m, fn, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    m.zero_grad(set_to_none=True)
    x.grad = None
    y = fn(m, x)
    y.backward(grad)
    return y


def check(ours: MoE, hf, tokens: int, hidden: int, seed: int) -> dict[str, float]:
    """Float32 differences: output and input grad absolute, weight grads relative to their largest entry."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, tokens, hidden, generator=g)
    grad = torch.randn(1, tokens, hidden, generator=g)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = step(ours, run_ours, xa, grad), step(hf, run_hf, xb, grad)
    e = ours.experts

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:  # weight grads sum over many tokens: scale-free
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    diff = {
        "out": (ya - yb).abs().max().item(),
        "dx": (xa.grad - xb.grad).abs().max().item(),
        "dW_gate_up(rel)": rel(e.gate_up_proj.grad.flatten(1, 2), hf.experts.gate_up_proj.grad),
        "dW_down(rel)": rel(e.down_proj.grad, hf.experts.down_proj.grad),
        "dW_router(rel)": rel(ours.gate.weight.grad, hf.gate.weight.grad),
    }
    bad = {k: v for k, v in diff.items() if not v <= (FWD_TOL if k == "out" else TOL)}
    if bad:
        raise SystemExit(f"ours and transformers disagree (out > {FWD_TOL}, others > {TOL}): {bad}")
    return diff


def bench(layers: list, x: torch.Tensor, grad: torch.Tensor, warmup: int, iters: int,
          clock) -> list[list[float]]:
    """Seconds of each timed step, per layer; the layers take turns step by step."""
    for _ in range(warmup):
        for m, fn in layers:
            step(m, fn, x, grad)
    times: list[list[float]] = [[] for _ in layers]
    for _ in range(iters):
        for (m, fn), ts in zip(layers, times, strict=True):
            t0 = clock()
            step(m, fn, x, grad)
            ts.append(clock() - t0)
    return times


def peak_bytes(m, fn, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Peak bytes allocated during one step above what was allocated when it began. CUDA: the allocator's peak.
    CPU: glibc's bytes in use (`mallinfo2`: heap chunks + mmapped blocks) read after every op, so the peak is exact
    at op granularity (an op's own temporaries freed inside it are missed; every tensor is some op's output)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(m, fn, x, grad)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.utils._python_dispatch import TorchDispatchMode

    in_use = _glibc_bytes_in_use()

    class Peak(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, in_use())
            return out

    m.zero_grad(set_to_none=True)
    x.grad = None
    base = in_use()
    with Peak() as tracker:
        step(m, fn, x, grad)
    return tracker.peak - base


def _glibc_bytes_in_use():
    """A function returning the bytes glibc's malloc has handed out and not taken back (Linux)."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    return in_use


# The grouped GEMM ops of either layer: torch's, and transformers' own op for it under torch.compile in fp32
# (ours under compile is `chogori::grouped_mm`, which calls `aten::_grouped_mm`, so it is counted through that).
GROUPED_OPS = ("aten::_grouped_mm", "transformers::grouped_mm_fallback", "transformers::grouped_mm_fallback_backward")
MM_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def gemm_shares(m, fn, x: torch.Tensor, grad: torch.Tensor, rows: int) -> tuple[float, float, list[str]]:
    """(share of the step outside the grouped GEMMs, share outside all GEMMs, top ops by self time) of one
    profiled step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step(m, fn, x, grad)
        total = (time.perf_counter() - t0) * 1e6
    avg = {e.key: e for e in prof.key_averages()}
    grouped = sum(avg[k].cpu_time_total for k in GROUPED_OPS if k in avg)

    def mm_below(e) -> float:  # noqa: ANN001  (a profiler event)
        return sum(c.self_cpu_time_total if c.name in MM_OPS else mm_below(c) for c in e.cpu_children)

    # mm / addmm outside a grouped GEMM: their self time minus what the grouped GEMMs' descendants took
    plain = sum(avg[k].self_cpu_time_total for k in MM_OPS if k in avg)
    inner = sum(mm_below(e) for e in prof.events() if e.name in GROUPED_OPS)
    gemm = grouped + plain - inner
    top = [f"{e.key:<36} {e.self_cpu_time_total / 1e3:8.1f} ms {e.count:6d} calls"
           for e in sorted(avg.values(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]]
    return 1 - grouped / total, 1 - gemm / total, top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="EXPERTS:TOP_K:DTYPE (fp32|bf16)")
    ap.add_argument("--theirs", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"],
                    help="transformers' experts implementation (default grouped_mm)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--expert-ffn", type=int, default=128, help="moe_intermediate_size (default 128)")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 leaves torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory", action="store_true", help="also the peak bytes of one fwd+bwd step per layer")
    ap.add_argument("--profile", action="store_true", help="also the time outside the GEMMs, from a profiled step")
    ap.add_argument("--compile", action="store_true", help="also both layers under torch.compile (inductor)")
    args = ap.parse_args()
    cases = [parse_case(c) for c in args.cases]

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cpu_thread = device.type == "cpu" and torch.get_num_threads() == 1
    if on_cpu_thread:
        clock, clock_name = time.thread_time, "thread CPU time"
    else:
        def clock() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()
        clock_name = "wall time"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"device {device} ({name}), {os.cpu_count()} cpus, torch {torch.__version__} "
          f"(threads {torch.get_num_threads()}), transformers {transformers.__version__}, clock: {clock_name}")
    if hasattr(os, "getloadavg"):
        print("load average at start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"tokens {args.tokens}, hidden {args.hidden}, expert width {args.expert_ffn}, 1 shared expert; theirs: "
          f"DeepseekV3MoE, experts implementation {args.theirs}; {args.warmup} warmup + {args.iters} timed "
          "fwd+bwd steps each, alternating\n")

    rows = []
    for num_experts, k, dtype_name in cases:
        dtype = DTYPES[dtype_name]
        ours, hf, impl = build(num_experts, args.hidden, k, args.expert_ffn, args.seed, args.theirs)
        diff = check(ours, hf, args.tokens, args.hidden, args.seed)
        ours.to(device, dtype), hf.to(device, dtype)
        probe = torch.empty(1, args.hidden, dtype=dtype, device=device)
        kernel = "torch._grouped_mm" if _grouped_mm_ok(probe, ours.experts.down_proj) else "loop fallback"
        print(f"E={num_experts} top-{k} {dtype_name}: ours [{kernel}] vs {impl}; float32 max |diff| "
              + ", ".join(f"{n} {v:.1e}" for n, v in diff.items()) + " (ok)")
        g = torch.Generator().manual_seed(args.seed + 2)
        x = torch.randn(1, args.tokens, args.hidden, generator=g).to(device, dtype).requires_grad_(True)
        grad = torch.randn(1, args.tokens, args.hidden, generator=g).to(device, dtype)
        layers = [(ours, run_ours), (hf, run_hf)]
        if args.compile:  # compiled after the cast, so the graphs are of the timed dtype
            layers += [(torch.compile(ours), run_ours), (torch.compile(hf), run_hf)]
        warmup = max(args.warmup, 2) if args.compile else args.warmup
        times = bench(layers, x, grad, warmup, args.iters, clock)
        t_ours, t_hf = times[:2]
        ratios = sorted(b / a for a, b in zip(t_ours, t_hf, strict=True))
        m_ours, m_hf = statistics.median(t_ours), statistics.median(t_hf)
        row = {"case": (num_experts, k, dtype_name), "ours": args.tokens / m_ours, "theirs": args.tokens / m_hf,
               "ratio": statistics.median(ratios), "lo": ratios[0], "hi": ratios[-1]}
        print(f"  step median ours {m_ours * 1e3:.0f} ms, theirs {m_hf * 1e3:.0f} ms; theirs/ours per pair "
              f"{row['ratio']:.2f} [{row['lo']:.2f}..{row['hi']:.2f}]", flush=True)
        if args.compile:
            t_oc, t_hc = times[2:]
            c_ratios = sorted(min(te, tc) / oc for oc, te, tc in zip(t_oc, t_hf, t_hc, strict=True))
            m_oc, m_hc = statistics.median(t_oc), statistics.median(t_hc)
            row["compiled"] = (args.tokens / m_oc, args.tokens / m_hc, statistics.median(c_ratios), c_ratios[0],
                               c_ratios[-1])
            print(f"  compiled: step median ours {m_oc * 1e3:.0f} ms, theirs {m_hc * 1e3:.0f} ms; their faster "
                  f"(eager or compiled) / our compiled per round {row['compiled'][2]:.2f} "
                  f"[{c_ratios[0]:.2f}..{c_ratios[-1]:.2f}]", flush=True)
        if args.memory:
            row["mem"] = tuple(peak_bytes(m, fn, x, grad) / 2**20 for m, fn in layers[:2])
            print(f"  peak MiB of one step: ours {row['mem'][0]:.1f}, theirs {row['mem'][1]:.1f}")
        if args.profile:
            shares = [gemm_shares(m, fn, x, grad, 8) for m, fn in layers]
            row["outside"] = tuple((s[0], s[1]) for s in shares)
            labels = ("ours", "theirs", "ours compiled", "theirs compiled")[:len(shares)]
            for label, (grouped, gemm, top) in zip(labels, shares, strict=True):
                print(f"  {label}: {grouped:.0%} of the step outside the grouped GEMMs, {gemm:.0%} outside all GEMMs"
                      " (profiled)")
                print("\n".join("    " + t for t in top))
        rows.append(row)
        del ours, hf, x, grad

    head = "| experts | top-k | dtype | ours tok/s | theirs tok/s | theirs/ours time, median [min..max] |"
    sep = "|---|---|---|---|---|---|"
    if args.compile:
        head += " compiled: ours tok/s | theirs tok/s | their faster / ours compiled |"
        sep += "---|---|---|"
    if args.memory:
        head, sep = head + " peak MiB ours / theirs |", sep + "---|"
    if args.profile:
        head += " outside grouped GEMMs ours / theirs | outside all GEMMs ours / theirs |"
        if args.compile:
            head += " compiled: outside grouped GEMMs ours / theirs |"
        sep += "---|---|" + ("---|" if args.compile else "")
    print("\n" + head + "\n" + sep)
    for r in rows:
        e, k, dt = r["case"]
        line = (f"| {e} | {k} | {dt} | {r['ours']:,.0f} | {r['theirs']:,.0f} | {r['ratio']:.2f}x "
                f"[{r['lo']:.2f}..{r['hi']:.2f}] |")
        if args.compile:
            oc, hc, ratio, lo, hi = r["compiled"]
            line += f" {oc:,.0f} | {hc:,.0f} | {ratio:.2f}x [{lo:.2f}..{hi:.2f}] |"
        if args.memory:
            line += f" {r['mem'][0]:.1f} / {r['mem'][1]:.1f} |"
        if args.profile:
            (og, oa), (tg, ta) = r["outside"][:2]
            line += f" {og:.0%} / {tg:.0%} | {oa:.0%} / {ta:.0%} |"
            if args.compile:
                line += f" {r['outside'][2][0]:.0%} / {r['outside'][3][0]:.0%} |"
        print(line)
    if hasattr(os, "getloadavg"):
        print("\nload average at end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
