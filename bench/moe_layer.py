"""MoE layer forward+backward throughput: Chogori's grouped-GEMM `models.moe.MoE` against the per-expert
Python loop that `transformers` runs for DeepSeek-V3 (`DeepseekV3MoE`, "eager" experts implementation).

    python bench/moe_layer.py --tokens 4096 --hidden 256 --active-ffn 512 --experts 8 64 384 --iters 5

Both layers get the same config and the same weights (ours are copied into the HF module: router weight and
correction bias, gate/up stacked into `gate_up_proj`, down, shared expert). Before timing, every case
checks that the two agree to 1e-4 in float32 and prints it: output and input gradient in absolute terms,
router / expert weight gradients (sums over many tokens) relative to their largest entry.

The sweep keeps the routed compute per token fixed while the experts get finer, as DeepSeek-V3 / Kimi K2 do:
top-k x moe_intermediate_size = --active-ffn (512 by default), so E=8 runs top-2 experts of width 256 and
E=64 / E=384 run top-8 of width 64; one shared expert of width moe_intermediate_size. Tokens are one batch
of shape [1, tokens, hidden]. float32 on CPU, bfloat16 on CUDA. The balance loss is off (aux_loss_alpha=0)
because the HF module has none, so both layers do the same math.

Timing: --warmup untimed iterations, then the median of --iters timed iterations (time.perf_counter, CUDA
synchronized) of zero-grad + forward + backward with a fixed output gradient; torch's thread count is
left at its default. The two layers' iterations alternate (ours, loop, ours, loop, ...) so that load from
other processes hits both alike. On CPU the float32 check step runs the same modules, dtype and shapes,
so it is the warmup (--warmup defaults to 0 there, to 1 on CUDA, where the check runs in float32): the
loop at E=384 takes seconds per step. Each case also prints the median forward / backward split and, with
--profile, the top operators (self CPU time) of one profiled step of each layer (slow for the loop at
E=384). The default sweep takes ~90 s on an idle 2-core CPU.
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

TOL = 1e-4


def shapes(num_experts: int, active_ffn: int) -> tuple[int, int]:
    """(top-k, moe_intermediate_size) with top-k x width = active_ffn: top-2 for E <= 8, else top-8."""
    k = 2 if num_experts <= 8 else 8
    if active_ffn % k:
        raise SystemExit(f"--active-ffn {active_ffn} must be divisible by top-k {k}")
    return k, active_ffn // k


def build(num_experts: int, hidden: int, k: int, inter: int, seed: int):
    """Our MoE with random weights, and transformers' DeepseekV3MoE (eager experts loop) holding copies."""
    from transformers import DeepseekV3Config
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts, DeepseekV3MoE

    cfg = ModelConfig(hidden_size=hidden, n_routed_experts=num_experts, num_experts_per_tok=k,
                      moe_intermediate_size=inter, n_shared_experts=1, n_group=1, topk_group=1,
                      aux_loss_alpha=0.0, num_hidden_layers=2, first_k_dense_replace=1)
    g = torch.Generator().manual_seed(seed)
    ours = MoE(cfg)
    with torch.no_grad():
        for p in ours.parameters():  # 1/sqrt(fan_in): outputs O(1), so 1e-4 is a meaningful tolerance
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        # a small non-zero correction bias, so the biased choice vs. unbiased gate weights is exercised
        ours.gate.e_score_correction_bias.copy_(0.01 * torch.randn(num_experts, generator=g))

    hcfg = DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=num_experts,
                            num_experts_per_tok=k, n_shared_experts=1, n_group=1, topk_group=1,
                            routed_scaling_factor=cfg.routed_scaling_factor,
                            norm_topk_prob=cfg.norm_topk_prob, hidden_act="silu")
    hcfg._experts_implementation = "eager"  # the per-expert Python loop (DeepseekV3Experts.forward)
    hf = DeepseekV3MoE(hcfg)
    # `use_experts_implementation` dispatches through ALL_EXPERTS_FUNCTIONS; "eager" must resolve to the
    # class's own loop, not to a grouped_mm / batched_mm kernel.
    loop_fn = DeepseekV3Experts.forward.__wrapped__
    resolved = ALL_EXPERTS_FUNCTIONS.get_interface(hf.experts.config._experts_implementation, loop_fn)
    if resolved is not loop_fn:
        raise SystemExit(f"experts implementation 'eager' resolved to {resolved}, not the per-expert loop")
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        hf.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        hf.experts.gate_up_proj.copy_(torch.cat([ours.experts.gate_proj, ours.experts.up_proj], dim=1))
        hf.experts.down_proj.copy_(ours.experts.down_proj)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, n).weight.copy_(getattr(ours.shared_experts, n).weight)
    impl = f"{hf.experts.config._experts_implementation} ({resolved.__qualname__})"
    return ours.train(), hf.train(), impl


def run_ours(m: MoE, x: torch.Tensor) -> torch.Tensor:
    return m(x)[0]


def run_hf(m, x: torch.Tensor) -> torch.Tensor:
    return m(x)


def step(m, fn, x: torch.Tensor, grad: torch.Tensor, sync=None) -> tuple[torch.Tensor, float, float]:
    """zero-grad + forward + backward; returns (output, forward s, backward s)."""
    sync = sync or (lambda: None)
    m.zero_grad(set_to_none=True)
    x.grad = None
    t0 = time.perf_counter()
    y = fn(m, x)
    sync()
    t1 = time.perf_counter()
    y.backward(grad)
    sync()
    return y, t1 - t0, time.perf_counter() - t1


def check(ours: MoE, hf, device: torch.device, tokens: int, hidden: int, seed: int) -> dict[str, float]:
    """Max abs difference (float32) of output and input grad, max difference of the weight grads relative
    to their largest entry; raises above TOL."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, tokens, hidden, generator=g).to(device)
    grad = torch.randn(1, tokens, hidden, generator=g).to(device)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = step(ours, run_ours, xa, grad)[0]
    yb = step(hf, run_hf, xb, grad)[0]
    e = ours.experts

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:  # weight grads sum over many tokens: scale-free
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    diff = {
        "out": (ya - yb).abs().max().item(),
        "dx": (xa.grad - xb.grad).abs().max().item(),
        "dW_gate_up(rel)": rel(torch.cat([e.gate_proj.grad, e.up_proj.grad], dim=1),
                               hf.experts.gate_up_proj.grad),
        "dW_down(rel)": rel(e.down_proj.grad, hf.experts.down_proj.grad),
        "dW_router(rel)": rel(ours.gate.weight.grad, hf.gate.weight.grad),
    }
    bad = {k: v for k, v in diff.items() if not v <= TOL}
    if bad:
        raise SystemExit(f"ours and the HF loop disagree beyond {TOL}: {bad}")
    return diff


def bench(layers: list, x: torch.Tensor, grad: torch.Tensor, warmup: int,
          iters: int) -> list[list[tuple[float, ...]]]:
    """For each (module, fn) in `layers`, (total, forward, backward) seconds of each timed iteration; the
    layers take turns iteration by iteration."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else None
    for _ in range(warmup):
        for m, fn in layers:
            step(m, fn, x, grad, sync)
    times: list[list[tuple[float, ...]]] = [[] for _ in layers]
    for _ in range(iters):
        for (m, fn), ts in zip(layers, times, strict=True):
            t0 = time.perf_counter()
            _, fwd, bwd = step(m, fn, x, grad, sync)
            ts.append((time.perf_counter() - t0, fwd, bwd))
    return times


def summary(name: str, times: list[tuple[float, ...]]) -> str:
    total, fwd, bwd = (statistics.median(t[i] for t in times) * 1e3 for i in range(3))
    lo, hi = min(t[0] for t in times) * 1e3, max(t[0] for t in times) * 1e3
    return f"{name} {total:.0f} ms [{lo:.0f}..{hi:.0f}] (fwd {fwd:.0f} + bwd {bwd:.0f})"


def profile(m, fn, x: torch.Tensor, grad: torch.Tensor, label: str, rows: int = 6) -> None:
    with torch.profiler.profile() as prof:
        step(m, fn, x, grad)
    print(f"  profile {label}, top {rows} ops by self CPU time:")
    for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]:
        print(f"    {e.key:<40} {e.self_cpu_time_total / 1e3:9.1f} ms  {e.count:6d} calls")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64, 384])
    ap.add_argument("--active-ffn", type=int, default=512,
                    help="top-k x moe_intermediate_size, held fixed across --experts (default 512)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed iterations per layer after the check step (default: 0 on CPU, 1 on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="also profile one step of each layer per case")
    args = ap.parse_args()

    import transformers

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.warmup is None:
        args.warmup = 0 if device.type == "cpu" else 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"device {device} ({name}), {os.cpu_count()} cpus, torch {torch.__version__} "
          f"(threads {torch.get_num_threads()}), transformers {transformers.__version__}, dtype "
          f"{str(dtype).removeprefix('torch.')}")
    if hasattr(os, "getloadavg"):
        print("load average at start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"tokens {args.tokens}, hidden {args.hidden}, top-k x moe_intermediate_size {args.active_ffn}, "
          f"1 shared expert; untimed: the float32 check step + {args.warmup} warmup; median of {args.iters} "
          "fwd+bwd iterations, ours and loop alternating\n")

    rows = []
    for num_experts in args.experts:
        k, inter = shapes(num_experts, args.active_ffn)
        ours, hf, impl = build(num_experts, args.hidden, k, inter, args.seed)
        ours.to(device), hf.to(device)
        diff = check(ours, hf, device, args.tokens, args.hidden, args.seed)
        probe = torch.empty(1, args.hidden, dtype=dtype, device=device)
        grouped = _grouped_mm_ok(probe, ours.experts.gate_proj.to(dtype))
        kernel = "torch._grouped_mm" if grouped else "grouped_matmul loop fallback"
        print(f"E={num_experts} top-{k} moe_intermediate_size={inter}: ours [{kernel}] vs transformers "
              f"DeepseekV3MoE, experts implementation {impl}; float32 max |diff| "
              + ", ".join(f"{n} {v:.1e}" for n, v in diff.items()) + f" (<= {TOL:g}: ok)")
        ours.to(dtype), hf.to(dtype)
        g = torch.Generator().manual_seed(args.seed + 2)
        x = torch.randn(1, args.tokens, args.hidden, generator=g).to(device, dtype).requires_grad_(True)
        grad = torch.randn(1, args.tokens, args.hidden, generator=g).to(device, dtype)
        t_ours, t_loop = bench([(ours, run_ours), (hf, run_hf)], x, grad, args.warmup, args.iters)
        m_ours, m_loop = (statistics.median(t[0] for t in ts) for ts in (t_ours, t_loop))
        print(f"  median [min..max]: {summary('ours', t_ours)}; {summary('loop', t_loop)}", flush=True)
        if args.profile:
            profile(ours, run_ours, x, grad, "ours")
            profile(hf, run_hf, x, grad, "loop")
        rows.append((num_experts, k, inter, args.tokens / m_ours, args.tokens / m_loop, m_loop / m_ours))
        del ours, hf, x, grad

    print("\n| experts | top-k | expert width | tokens | ours tok/s | loop tok/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for e, k, inter, a, b, s in rows:
        print(f"| {e} | {k} | {inter} | {args.tokens} | {a:,.0f} | {b:,.0f} | {s:.1f}x |")
    if hasattr(os, "getloadavg"):
        print("\nload average at end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
