"""Part (e) of bench/optim_step.py (issue 18): our Muon step against torch.optim.Muon with its Newton–Schulz
patched to float32 (and its own bf16 one), 24 matrices of nanoGPT's 6-layer 384-wide GPT, one process. Run it
as `python bench/optim_step.py --parts e`; the method is described in that script's docstring and in
docs/bench_optim.md (e).
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

import torch
from machine import fmt_ms

from optim.muon import Muon

E_LAYER = [(1152, 384), (384, 384), (1536, 384), (384, 1536)]
E_SHAPES = E_LAYER * 6
E_HP = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
E_SIDES = {  # name -> our Muon's NS options (None: torch.optim.Muon)
    "torch fp32 (NS patched)": None,
    "ours default (fp32)": {},
    "ours ns_gram": {"ns_gram": True},
    "ours polar_express": {"ns_method": "polar_express"},
    "ours polar_express + ns_gram": {"ns_method": "polar_express", "ns_gram": True},
}


def torch_ns_fp32():
    """torch.optim.Muon's own NS source with its one bf16 cast made a float32 copy (as tests/test_muon.py)."""
    import inspect

    from torch.optim import _muon
    src = inspect.getsource(_muon._zeropower_via_newtonschulz)
    assert src.count("grad.bfloat16()") == 1, "torch's NS changed: update the float32 patch"
    namespace = dict(vars(_muon))
    exec(src.replace("grad.bfloat16()", "grad.float().clone()"), namespace)
    return namespace["_zeropower_via_newtonschulz"]


def _sv_stats(outs: list[torch.Tensor], ins: list[torch.Tensor]) -> tuple[float, float, float, float, float]:
    """min, max, mean |1 - s| of the singular values of all `outs`; then min and max over those whose input
    singular value is >= 1e-3 of its matrix's Frobenius norm (paired by rank: NS keeps the order up to its
    non-monotone map, so the count of such values is what is paired)."""
    sv, big = [], []
    for o, u in zip(outs, ins, strict=True):
        s_out = torch.linalg.svdvals(o.double())
        s_in = torch.linalg.svdvals(u.double()) / u.double().norm()
        sv.append(s_out)
        big.append(s_out[: int((s_in >= 1e-3).sum())])
    a, b = torch.cat(sv), torch.cat(big)
    return a.min().item(), a.max().item(), (a - 1).abs().mean().item(), b.min().item(), b.max().item()


def part_e(reps: int, warmup: int, threads: int, reps_bf16: int) -> None:
    from torch.optim import _muon

    from optim.newton_schulz import zeropower_via_newtonschulz5
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    ns32, ns_bf16 = torch_ns_fp32(), _muon._zeropower_via_newtonschulz
    numel = sum(a * b for a, b in E_SHAPES)
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) * 0.02 for s in E_SHAPES]
    sides = dict(E_SIDES)
    if reps_bf16 > 0:
        sides["torch bf16 (its own NS)"] = None
    params = {k: [torch.nn.Parameter(w.clone()) for w in init] for k in sides}
    opts = {}
    for k, kw in sides.items():
        if kw is None:
            opts[k] = torch.optim.Muon(params[k], **E_HP, adjust_lr_fn="match_rms_adamw")
        else:
            opts[k] = Muon(params[k], **E_HP, ns_dtype="float32", **kw)
    grads = [torch.empty(s) for s in E_SHAPES]
    times: dict[str, list[float]] = {k: [] for k in sides}
    ratios: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for i in range(warmup + reps):
        for gr in grads:
            gr.normal_(generator=g)
        order = names[i % len(names):] + names[:i % len(names)]
        rep_t = {}
        for k in order:
            if k.startswith("torch bf16") and i >= warmup + reps_bf16:
                continue
            if k.startswith("torch bf16") and i < warmup and i > 0:
                continue  # one warm-up rep is plenty at ~40 s
            for p, gr in zip(params[k], grads, strict=True):
                p.grad = gr
            if k.startswith("torch fp32"):
                _muon._zeropower_via_newtonschulz = ns32
            try:
                t0 = time.perf_counter()
                opts[k].step()
                rep_t[k] = time.perf_counter() - t0
            finally:
                _muon._zeropower_via_newtonschulz = ns_bf16
        if i >= warmup:
            for k, t in rep_t.items():
                times[k].append(t)
                ratios[k].append(t / rep_t["torch fp32 (NS patched)"])
        print(f"(e) rep {i + 1}/{warmup + reps} done", file=sys.stderr, flush=True)
    # quality: every side's NS on the same inputs (the Nesterov input of our default side after the last step)
    ref_opt = opts["ours default (fp32)"]
    ins = [gr + E_HP["momentum"] * ref_opt.state[p]["momentum_buffer"] for p, gr in
           zip(params["ours default (fp32)"], grads, strict=True)]
    coeffs = (3.4445, -4.7750, 2.0315)
    ns_of = {"torch fp32 (NS patched)": lambda u: ns32(u, coeffs, 5, 1e-7),
             "torch bf16 (its own NS)": lambda u: ns_bf16(u, coeffs, 5, 1e-7).float()}
    for k, kw in E_SIDES.items():
        if kw is not None:
            ns_of[k] = functools.partial(zeropower_via_newtonschulz5, dtype=torch.float32,
                                         method=kw.get("ns_method", "muon"), gram=kw.get("ns_gram", False))
    quality = {k: _sv_stats([ns_of[k](u) for u in ins], ins) for k in sides}

    print("\n### (e) Muon step, 24 matrices (10.62M parameters): ours vs torch.optim.Muon\n")
    print(f"Shapes: nanoGPT 6 x 384 ({numel / 1e6:.2f}M parameters: per layer {', '.join(map(str, E_LAYER))}); "
          f"lr {E_HP['lr']}, weight decay {E_HP['weight_decay']}, momentum {E_HP['momentum']}, Nesterov; torch "
          f"threads {threads}; {reps} reps after {warmup} warm-up (torch bf16: {min(reps, reps_bf16)} reps), the "
          f"sides alternating with rotating order. Time: median (min-max) over reps. Ratio: per rep, the side's "
          f"time / torch-fp32's in the same rep, median (min-max). Singular values s of NS(U) for the same U: all "
          f"24 matrices, then only those whose input singular value is >= 1e-3 of the matrix's norm.\n")
    print("| side | step (ms) | / torch fp32 | s min | s max | mean abs(1-s) | s min (input >= 1e-3) "
          "| s max (input >= 1e-3) |")
    print("|---|---|---|---|---|---|---|---|")
    for k in sides:
        t, r, q = times[k], ratios[k], quality[k]
        if not t:
            continue
        print(f"| {k} | {fmt_ms(statistics.median(t))} ({fmt_ms(min(t))}-{fmt_ms(max(t))}) | "
              f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f}) | {q[0]:.3g} | {q[1]:.3f} | {q[2]:.3f} | "
              f"{q[3]:.3f} | {q[4]:.3f} |")
    _e_triton_row(ns32)
    torch.set_num_threads(default_threads)


def _e_triton_row(ns32) -> None:
    """NS through optim/triton_ns.py in Triton's interpreter (CPU): one layer of E_SHAPES at 1/6 width."""
    import importlib.util
    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        print("\n(Triton row skipped: " + ("Triton is not installed" if not torch.cuda.is_available()
                                           else "a GPU is present: run the GPU tests instead") + ")")
        return
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is jitted on first use
    from optim.newton_schulz import zeropower_via_newtonschulz5
    g = torch.Generator().manual_seed(1)
    ins = [torch.randn(a // 6, b // 6, generator=g) for a, b in E_LAYER]
    coeffs = (3.4445, -4.7750, 2.0315)
    rows = {"torch fp32 NS (mm)": lambda u: ns32(u, coeffs, 5, 1e-7),
            "ours, Triton kernel (INTERPRETER)": lambda u: zeropower_via_newtonschulz5(u, dtype=torch.float32,
                                                                                     triton=True)}
    print(f"\nTriton NS kernel, CPU interpreter (TRITON_INTERPRET=1; the time is the interpreter's, not meaningful): "
          f"NS only on one layer at 1/6 width ({', '.join(str((a // 6, b // 6)) for a, b in E_LAYER)}).\n")
    print("| NS | time (ms, 1 run) | s min | s max | mean abs(1-s) | max abs diff vs torch fp32 NS |")
    print("|---|---|---|---|---|---|")
    ref = [rows["torch fp32 NS (mm)"](u) for u in ins]
    for k, fn in rows.items():
        t0 = time.perf_counter()
        outs = [fn(u) for u in ins]
        dt = time.perf_counter() - t0
        q = _sv_stats(outs, ins)
        diff = max((o - r).abs().max().item() for o, r in zip(outs, ref, strict=True))
        print(f"| {k} | {fmt_ms(dt)} | {q[0]:.3g} | {q[1]:.3f} | {q[2]:.3f} | {diff:.1e} |")
