"""Optimizer-step benchmarks for Muon (issue 4, item 6 a-c). Prints markdown tables.

    python bench/optim_step.py                      # all three parts
    python bench/optim_step.py --parts a --worlds 1 2 4 --reps 5 --warmup 2
    python bench/optim_step.py --parts b --reps 8
    python bench/optim_step.py --parts c --reps 5
    python bench/optim_step.py --parts d --reps 10 --warmup 2   # not in the default run
    python bench/optim_step.py --parts e --reps 15 --warmup 2 --threads-e 1   # not in the default run

(a) Distributed Muon vs the naive scheme, 1 / 2 / 4 gloo ranks. A ~5M-parameter model (hidden 256, 4 layers, 8
    routed experts) is FSDP2-sharded with parallel.parallelize (ep=1), one backward gives the gradients, then
    optimizer.step() is timed with two `orthogonalize` hooks on the same Muon (float32 NS):
      ours  - optim.distributed_ns.orthogonalize: one owner rank per matrix, which receives the other ranks' pieces
              and sends the results back in two bucketed all_to_all_single per mesh group; expert stacks sharded on
              the expert dim orthogonalized in place;
      naive - every rank full_tensor()s every matrix (an all-gather), orthogonalizes all of them, and keeps its
              own slice (Replicate -> original placements, a local slice).
    Step time per rank is the wall time of optimizer.step() between a barrier and the end of the rank's step; the
    table reports the median over reps of the slowest rank. The two schemes alternate rep by rep. NS FLOPs and
    bytes per rank: distributed_ns.NSStats for ours (sent + received: what a rank owns minus what it holds, and the
    results back); for naive a ring all-gather (each rank sends and receives (N-1) shards of every matrix). World
    size 1 is the plain single-process model (no FSDP, plain tensors), where both schemes are local NS. Torch
    threads per rank: max(1, cpus // world), so 4 ranks on a 2-core machine oversubscribe the cores 2x.
(b) Muon step as a fraction of forward+backward of the tiny preset (configs/tiny.yaml through train.Trainer, one
    process): per rep one train step's forward+backward (all micro-batches), grad clipping, then optimizer.step()
    timed once with ns_dtype float32 and once with bfloat16 on the same gradients; also the time inside the
    orthogonalize hook (the NS part of the step).
(c) Our Muon vs torch.optim.Muon(adjust_lr_fn="match_rms_adamw") on the same 2-D matrices with the same gradients,
    one process: the tiny preset's Muon matrices (routed-expert stacks unrolled into 2-D matrices, since
    torch.optim.Muon takes 2-D only) and a few square / rectangular sizes. torch.optim.Muon always runs NS in
    bfloat16; ours in bfloat16 (bitwise the same NS) and float32.
(d) One AdamW step on ~33.6M fp32 parameters in host memory (an embedding-sized [32768, 512], three [2048, 2048]
    matrices, one [1024, 4096], one [2048] vector) with DeepSpeed's CPU Adam kernel (optim.host_adam.HostAdam, what
    `optim.offload: cpu` steps the AdamW groups with) against torch.optim.AdamW with its default CPU for-loop and
    with foreach=True, same hyperparameters, same gradients (a new set per step, identical for the three), at
    torch's default thread count and at 1 thread. The three alternate rep by rep; the last columns are the max abs
    difference of the parameters after all (warm-up + reps) steps. Only with --parts d (it allocates ~2.2 GB).
(e) Issue 18's Muon step: our Muon.step vs torch.optim.Muon.step on E_SHAPES, 24 matrices / 10.62M parameters: the
    Muon matrices of nanoGPT's 6-layer, 384-wide GPT (its shakespeare-char config; per layer the fused q/k/v
    c_attn [1152, 384], attn c_proj [384, 384], mlp c_fc [1536, 384], mlp c_proj [384, 1536]). torch.optim.Muon
    (adjust_lr_fn="match_rms_adamw", equal to ours) runs with its NS patched to float32 (the module function
    torch.optim._muon._zeropower_via_newtonschulz replaced, for that side's steps only, by its own source with the
    bf16 cast made a float32 copy) and unpatched (its hard-coded bf16 NS; --reps-bf16 reps only, ~40 s each on
    CPU). Ours: the default (ns_dtype float32, torch's iteration: one batched NS per shape, foreach updates), and
    the opt-in ns_gram / ns_method=polar_express. Same gradients for every side (a new set per rep), one process,
    --threads-e torch threads; the sides alternate rep by rep, their order rotating. Ratios are per rep (each
    side's time over torch-fp32's in the same rep): median and min-max over reps. Quality: singular values of
    each side's orthogonalized update O = NS(U) for the same U (the Nesterov input after the last rep): min,
    max and mean |1 - s| over all 24 matrices, and over the singular values whose input is >= 1e-3 of the
    matrix's Frobenius norm (the part NS is meant to equalize). The Triton row runs optim/triton_ns.py through
    Triton's interpreter (TRITON_INTERPRET=1, no GPU here) on one layer at 1/6 width (4 matrices): NS only, its
    time is the interpreter's and means nothing; its quality is comparable.

Timing: perf_counter, --warmup untimed repetitions then the median of --reps. Benchmarks never fail a test run;
record the output in docs/bench_optim.md with the machine and load it ran on.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import cpu_model, fmt_ms  # noqa: E402  (bench/ is the script directory)
from optim_step_e import part_e  # noqa: E402  (part (e), in its own file)
from torch.distributed.tensor import DTensor, Replicate  # noqa: E402

from models import ModelConfig, Transformer  # noqa: E402
from optim import build_optimizer, distributed_ns  # noqa: E402
from optim.distributed_ns import NSStats, ns_flops  # noqa: E402
from optim.muon import Muon, local_orthogonalize  # noqa: E402

A_CFG = dict(vocab_size=320, hidden_size=256, intermediate_size=768, num_hidden_layers=4, first_k_dense_replace=1,
             num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
             v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
             moe_intermediate_size=192, max_position_embeddings=256)
A_OPTIM = {"name": "muon", "lr": 1e-3, "weight_decay": 0.1, "ns_dtype": "float32"}
A_BATCH, A_SEQ = 8, 64


# ---------------------------------------------------------------------------------------------------------------
# (a) distributed vs naive
# ---------------------------------------------------------------------------------------------------------------
def naive_orthogonalize(updates: list[torch.Tensor], ns, stats: NSStats | None = None) -> list[torch.Tensor]:
    """Every rank gathers every sharded matrix (full_tensor, an all-gather), orthogonalizes all of them, and keeps
    its own shard (redistribute Replicate -> the original placements: a local slice, no communication)."""
    stats = stats if stats is not None else NSStats()
    stats.local_flops = stats.total_flops = stats.bytes_moved = 0
    out = []
    for u in updates:
        f = ns_flops(u.shape)
        stats.local_flops += f
        stats.total_flops += f
        if not isinstance(u, DTensor):
            out.append(ns(u))
            continue
        mesh = u.device_mesh
        world = mesh.size()
        full = u.full_tensor()
        o = ns(full)
        out.append(DTensor.from_local(o, mesh, [Replicate()] * mesh.ndim, run_check=False)
                   .redistribute(mesh, u.placements))
        # ring all-gather: (N-1) shards sent + (N-1) received per rank (FSDP2's shards, ceil-divided)
        shard = -(-u.numel() // world) * u.element_size()
        stats.bytes_moved += 2 * (world - 1) * shard
    return out


def _timed_hook(fn, box: list[float], compute_box: list[float] | None = None):
    """Wrap an orthogonalize hook: its wall time goes to `box`; with `compute_box`, also the time this rank spent
    inside `ns` itself (the NS arithmetic, without communication or waiting)."""
    def hook(updates, ns):
        spent = [0.0]

        def timed_ns(u):
            t = time.perf_counter()
            o = ns(u)
            spent[0] += time.perf_counter() - t
            return o

        t0 = time.perf_counter()
        out = fn(updates, timed_ns if compute_box is not None else ns)
        box.append(time.perf_counter() - t0)
        if compute_box is not None:
            compute_box.append(spent[0])
        return out
    return hook


def _a_worker(rank: int, world: int, reps: int, warmup: int, out_path: str) -> None:
    """One rank of part (a) (world == 1: called in-process, no process group)."""
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if world > 1:
        from parallel import ParallelDims, build_mesh, parallelize
        with torch.device("meta"):
            model = Transformer(ModelConfig(**A_CFG))
        parallelize(model, build_mesh(ParallelDims(world, world, 1), "cpu"))
        model.to_empty(device="cpu")
        model.init_weights()
    else:
        model = Transformer(ModelConfig(**A_CFG))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, A_CFG["vocab_size"], (A_BATCH, A_SEQ), generator=g)
    y = torch.randint(0, A_CFG["vocab_size"], (A_BATCH, A_SEQ), generator=g)
    local = A_BATCH // world
    sl = slice(rank * local, (rank + 1) * local)
    out = model(x[sl])
    (F.cross_entropy(out.logits.flatten(0, 1), y[sl].flatten()) + out.balance_loss).backward()

    opt = build_optimizer(model, A_OPTIM)
    assert isinstance(opt, Muon)
    stats = {"ours": NSStats(), "naive": NSStats()}
    ns_time: dict[str, list[float]] = {"ours": [], "naive": []}
    if world > 1:
        base = {"ours": functools.partial(distributed_ns.orthogonalize, stats=stats["ours"]),
                "naive": functools.partial(naive_orthogonalize, stats=stats["naive"])}
    else:
        def local_with_stats(st):
            def f(updates, ns):
                st.local_flops = st.total_flops = sum(ns_flops(u.shape) for u in updates)
                st.bytes_moved = 0
                return local_orthogonalize(updates, ns)
            return f
        base = {"ours": local_with_stats(stats["ours"]), "naive": local_with_stats(stats["naive"])}
    ns_compute: dict[str, list[float]] = {"ours": [], "naive": []}
    hooks = {k: _timed_hook(v, ns_time[k], ns_compute[k]) for k, v in base.items()}
    times: dict[str, list[float]] = {"ours": [], "naive": []}
    for i in range(warmup + reps):
        for scheme in ("ours", "naive"):
            opt.orthogonalize = hooks[scheme]
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
            nt = ns_time[scheme][-1]
            ct = ns_compute[scheme][-1]
            pair = torch.tensor([dt, nt, ct], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(pair, op=dist.ReduceOp.MAX)
            if i >= warmup:
                times[scheme].append(pair[0].item())
                ns_time[scheme][-1] = pair[1].item()
                ns_compute[scheme][-1] = pair[2].item()
            else:
                ns_time[scheme].pop()
                ns_compute[scheme].pop()
    per_rank = {}
    for scheme, st in stats.items():
        t = torch.tensor([st.local_flops, st.bytes_moved, st.total_flops], dtype=torch.float64)
        if world > 1:
            gathered = [torch.zeros_like(t) for _ in range(world)]
            dist.all_gather(gathered, t)
        else:
            gathered = [t]
        per_rank[scheme] = [r.tolist() for r in gathered]
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        muon_params = [p for gr in opt.param_groups if gr["use_muon"] for p in gr["params"]]
        res = {"world": world, "threads": threads, "times": times, "ns_times": ns_time, "ns_compute": ns_compute,
               "per_rank": per_rank, "params": n_params, "muon_tensors": len(muon_params),
               "muon_numel": sum(p.numel() for p in muon_params)}
        Path(out_path).write_text(json.dumps(res))


def part_a(worlds: list[int], reps: int, warmup: int) -> None:
    from tests.dist_harness import run_ranks
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            path = str(Path(tmp) / f"a{world}.json")
            if world == 1:
                _a_worker(0, 1, reps, warmup, path)
            else:
                run_ranks(_a_worker, world, reps, warmup, path)
            results.append(json.loads(Path(path).read_text()))
            print(f"(a) world {world} done", file=sys.stderr, flush=True)
    r0 = results[0]
    print("\n### (a) Distributed Muon vs naive gather-everything, optimizer.step(), float32 NS\n")
    print(f"model: {r0['params'] / 1e6:.2f}M params, {r0['muon_tensors']} Muon tensors "
          f"({r0['muon_numel'] / 1e6:.2f}M elements; routed experts as [8, n, m] stacks), FSDP2 over N gloo "
          f"ranks (ep=1); median of {reps} reps after {warmup} warm-up, slowest rank per rep.\n")
    print("NS part = wall time of the orthogonalize hook (the all-to-alls, NS, waiting); NS compute = time spent "
          "inside the NS function itself on the busiest rank.\n")
    print("| ranks N | torch threads/rank | ours step (ms) | naive step (ms) | naive / ours | ours NS part (ms) "
          "| ours NS compute (ms) | naive NS part (ms) | naive NS compute (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        to, tn = statistics.median(r["times"]["ours"]), statistics.median(r["times"]["naive"])
        no, nn = statistics.median(r["ns_times"]["ours"]), statistics.median(r["ns_times"]["naive"])
        co, cn = statistics.median(r["ns_compute"]["ours"]), statistics.median(r["ns_compute"]["naive"])
        print(f"| {r['world']} | {r['threads']} | {fmt_ms(to)} | {fmt_ms(tn)} | {tn / to:.2f} | {fmt_ms(no)} | "
              f"{fmt_ms(co)} | {fmt_ms(nn)} | {fmt_ms(cn)} |")
    print("\nNS FLOPs and communication per rank per step (sent + received bytes, float32 updates):\n")
    print("| ranks N | total NS GFLOP | ours GFLOP/rank (max / min) | naive GFLOP/rank | ours max / total "
          "| ours MB/rank (max / mean) | naive MB/rank |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ours = r["per_rank"]["ours"]
        naive = r["per_rank"]["naive"]
        total = ours[0][2]
        of = [x[0] for x in ours]
        ob = [x[1] for x in ours]
        nf = max(x[0] for x in naive)
        nb = max(x[1] for x in naive)
        print(f"| {r['world']} | {total / 1e9:.2f} | {max(of) / 1e9:.2f} / {min(of) / 1e9:.2f} | {nf / 1e9:.2f} | "
              f"{max(of) / total:.3f} | {max(ob) / 1e6:.2f} / {statistics.mean(ob) / 1e6:.2f} | {nb / 1e6:.2f} |")


# ---------------------------------------------------------------------------------------------------------------
# (b) Muon step vs forward+backward of the tiny preset
# ---------------------------------------------------------------------------------------------------------------
def part_b(reps: int, warmup: int, config: str) -> None:
    from parallel import clip_grad_norm_
    from train.config import load_config
    from train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [f"train.out_dir={out}", "train.eval_interval=0", "checkpoint.save_final=false",
                                   "logging.progress=false", "optim.ns_dtype=float32"])
        tr = Trainer(cfg)
        opt = tr.optimizer
        ns_box: list[float] = []
        opt.orthogonalize = _timed_hook(opt.orthogonalize, ns_box)
        fb: list[float] = []
        step: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        nst: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        mb = cfg.train.micro_batch_size
        for i in range(warmup + reps):
            tr.model.train()
            inputs, targets = next(tr.train_loader)
            t0 = time.perf_counter()
            for k in range(tr.accum_steps):
                lm, aux = tr._loss(inputs[k * mb:(k + 1) * mb], targets[k * mb:(k + 1) * mb])
                ((lm + aux) / tr.accum_steps).backward()
            t1 = time.perf_counter()
            clip_grad_norm_(tr.model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
            for dtype in ("float32", "bfloat16"):
                for gr in opt.param_groups:
                    if gr["use_muon"]:
                        gr["ns_dtype"] = dtype
                s0 = time.perf_counter()
                opt.step()
                s1 = time.perf_counter()
                if i >= warmup:
                    step[dtype].append(s1 - s0)
                    nst[dtype].append(ns_box[-1])
            opt.zero_grad(set_to_none=True)
            tr.scheduler.step()
            if i >= warmup:
                fb.append(t1 - t0)
        n_params = tr.model.num_params()
        tokens = cfg.train.global_batch_size * cfg.data.seq_len
        muon_numel = sum(p.numel() for gr in opt.param_groups if gr["use_muon"] for p in gr["params"])
        tr.close()
    f = statistics.median(fb)
    print(f"\n### (b) Optimizer step vs forward+backward, {config} (one process)\n")
    print(f"model: {n_params / 1e6:.2f}M params ({muon_numel / 1e6:.2f}M in Muon matrices), {tokens} tokens per step "
          f"({cfg.train.global_batch_size} x {cfg.data.seq_len}, {tr.accum_steps} micro-batches), torch threads "
          f"{torch.get_num_threads()}; median of {reps} reps after {warmup} warm-up.\n")
    print("| ns_dtype | forward+backward (ms) | optimizer.step (ms) | of which NS (ms) | step / fwd+bwd "
          "| step / (fwd+bwd+step) |")
    print("|---|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        s = statistics.median(step[dtype])
        n = statistics.median(nst[dtype])
        print(f"| {dtype} | {fmt_ms(f)} | {fmt_ms(s)} | {fmt_ms(n)} | {100 * s / f:.1f}% | {100 * s / (f + s):.1f}% |")


# ---------------------------------------------------------------------------------------------------------------
# (c) our Muon vs torch.optim.Muon
# ---------------------------------------------------------------------------------------------------------------
def _tiny_matrix_shapes(config: str) -> list[tuple[int, int]]:
    from train.config import load_config
    cfg = load_config(config, ["optim.lr=1e-3"])
    model = Transformer(cfg.model)
    opt = build_optimizer(model, {"name": "muon", "lr": 1e-3})
    shapes = []
    for gr in opt.param_groups:
        if gr["use_muon"]:
            for p in gr["params"]:
                shapes += [tuple(p.shape[-2:])] * (p[..., 0, 0].numel())
    return shapes


def part_c(reps: int, warmup: int, config: str) -> None:
    shapes_tiny = _tiny_matrix_shapes(config)
    cases = [("tiny preset Muon matrices", shapes_tiny), ("256x256 x4", [(256, 256)] * 4),
             ("512x1024 x2", [(512, 1024)] * 2), ("1024x1024 x1", [(1024, 1024)])]
    print("\n### (c) Our Muon.step vs torch.optim.Muon.step (adjust_lr_fn='match_rms_adamw'), one process\n")
    print(f"torch threads {torch.get_num_threads()}; same 2-D params and grads; median of {reps} reps after "
          f"{warmup} warm-up; the three optimizers alternate rep by rep. The last column compares the parameters "
          f"after one step from the same state: not bitwise, because torch keeps the momentum as an EMA (a (1-mu) "
          f"factor) and the differently scaled NS input rounds differently when cast to bf16.\n")
    print("| matrices | count | elements (M) | torch bf16 (ms) | ours bf16 (ms) | ours / torch (bf16) "
          "| ours fp32 (ms) | max abs diff ours-bf16 vs torch after 1 step |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shapes in cases:
        if not shapes:
            continue
        g = torch.Generator().manual_seed(0)
        init = [torch.randn(s, generator=g) * 0.02 for s in shapes]
        grads = [torch.randn(s, generator=g) for s in shapes]

        def make(kind: str, init=init, grads=grads):
            ps = [torch.nn.Parameter(w.clone()) for w in init]
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.clone()
            if kind == "torch":
                return ps, torch.optim.Muon(ps, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                                            adjust_lr_fn="match_rms_adamw")
            return ps, Muon(ps, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                            ns_dtype="bfloat16" if kind == "ours_bf16" else "float32")

        opts = {k: make(k) for k in ("torch", "ours_bf16", "ours_fp32")}
        # correctness sanity: one step from the same state
        for _, o in opts.values():
            o.step()
        diff = max((a - b).abs().max().item() for a, b in zip(opts["ours_bf16"][0], opts["torch"][0], strict=True))
        times: dict[str, list[float]] = {k: [] for k in opts}
        for i in range(warmup + reps):
            for k, (_, o) in opts.items():
                t0 = time.perf_counter()
                o.step()
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[k].append(dt)
        m = {k: statistics.median(v) for k, v in times.items()}
        numel = sum(a * b for a, b in shapes)
        label = name if name != "tiny preset Muon matrices" else f"{name} ({len(set(shapes))} shapes)"
        print(f"| {label} | {len(shapes)} | {numel / 1e6:.2f} | {fmt_ms(m['torch'])} | {fmt_ms(m['ours_bf16'])} | "
              f"{m['ours_bf16'] / m['torch']:.2f} | {fmt_ms(m['ours_fp32'])} | {diff:.1e} |")
        print(f"(c) {name} done", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# (d) DeepSpeed's CPU Adam kernel vs torch.optim.AdamW on host tensors
# ---------------------------------------------------------------------------------------------------------------
D_SHAPES = [(32768, 512), (2048, 2048), (2048, 2048), (2048, 2048), (1024, 4096), (2048,)]
D_HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


class _KernelAdamW:
    """HostAdam.update over plain tensors with torch.optim.AdamW's state layout (what optim/muon.py's offloaded
    AdamW group does, without the optimizer around it)."""

    def __init__(self, params: list[torch.Tensor], kernel) -> None:
        self.params, self.kernel = params, kernel
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = [torch.tensor(0.0) for _ in params]

    def step(self) -> None:
        self.kernel.update(self.params, [p.grad for p in self.params], self.exp_avg, self.exp_avg_sq, self.steps,
                           **D_HP)


def part_d(reps: int, warmup: int, thread_counts: list[int]) -> None:
    from optim.host_adam import HostAdam
    kernel = HostAdam.load()
    if kernel is None:
        print("\n### (d) skipped: DeepSpeed's CPU Adam kernel is not available\n")
        return
    numel = sum(torch.Size(s).numel() for s in D_SHAPES)
    default_threads = torch.get_num_threads()
    print("\n### (d) One AdamW step on host fp32 tensors: DeepSpeed's CPU Adam kernel vs torch.optim.AdamW\n")
    print(f"{numel / 1e6:.2f}M fp32 parameters in {len(D_SHAPES)} tensors ({', '.join(map(str, D_SHAPES))}); lr "
          f"{D_HP['lr']}, betas {D_HP['betas']}, weight decay {D_HP['weight_decay']}; a new gradient per step, the "
          f"same for all three; median (min-max) of {reps} reps after {warmup} warm-up, the three alternating rep by "
          f"rep. Ratio = torch median / kernel median. Max |diff| = largest parameter difference after "
          f"{warmup + reps} steps from the same start (parameters ~0.02).\n")
    print("| torch threads | kernel (ms) | torch for-loop (ms) | torch foreach (ms) | for-loop / kernel "
          "| foreach / kernel | max abs diff kernel vs for-loop | max abs diff foreach vs for-loop |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        init = [torch.randn(s, generator=g) * 0.02 for s in D_SHAPES]
        grads = [torch.empty(s) for s in D_SHAPES]
        ps = {k: [torch.nn.Parameter(w.clone()) for w in init] for k in ("kernel", "loop", "foreach")}
        del init
        opts = {"kernel": _KernelAdamW(ps["kernel"], kernel),
                "loop": torch.optim.AdamW(ps["loop"], **D_HP),
                "foreach": torch.optim.AdamW(ps["foreach"], **D_HP, foreach=True)}
        times: dict[str, list[float]] = {k: [] for k in opts}
        for i in range(warmup + reps):
            for gr in grads:
                gr.normal_(generator=g)
            for k, o in opts.items():
                for p, gr in zip(ps[k], grads, strict=True):
                    p.grad = gr  # shared: none of the three writes to the gradient
                t0 = time.perf_counter()
                o.step()
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[k].append(dt)
        with torch.no_grad():
            d_kernel = max((a - b).abs().max().item() for a, b in zip(ps["kernel"], ps["loop"], strict=True))
            d_foreach = max((a - b).abs().max().item() for a, b in zip(ps["foreach"], ps["loop"], strict=True))
        m = {k: statistics.median(v) for k, v in times.items()}
        cell = {k: f"{fmt_ms(m[k])} ({fmt_ms(min(v))}-{fmt_ms(max(v))})" for k, v in times.items()}
        label = f"{threads} (default)" if threads == default_threads else str(threads)
        print(f"| {label} | {cell['kernel']} | {cell['loop']} | {cell['foreach']} | {m['loop'] / m['kernel']:.2f} | "
              f"{m['foreach'] / m['kernel']:.2f} | {d_kernel:.1e} | {d_foreach:.1e} |")
        print(f"(d) threads {threads} done", file=sys.stderr, flush=True)
        del ps, opts, grads
    torch.set_num_threads(default_threads)


# ---------------------------------------------------------------------------------------------------------------
# (e) issue 18: our Muon step vs torch.optim.Muon (NS patched to float32, and its own bf16)
# ---------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c", "d", "e"],
                    help="(d) and (e) only when named")
    ap.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps-c", type=int, default=None, help="reps for part (c) (bf16 NS is slow on CPU); "
                    "default --reps")
    ap.add_argument("--warmup-c", type=int, default=None, help="warm-up reps for part (c); default --warmup")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--threads-d", nargs="+", type=int, default=None,
                    help="torch thread counts for part (d); default: the machine's default, then 1")
    ap.add_argument("--threads-e", type=int, default=1, help="torch threads for part (e) (default 1)")
    ap.add_argument("--reps-bf16", type=int, default=2, help="part (e): reps of torch's own bf16 step (~40 s each "
                    "on CPU); 0 leaves it out")
    args = ap.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")
    if "a" in args.parts:
        part_a(args.worlds, args.reps, args.warmup)
    if "b" in args.parts:
        part_b(args.reps, args.warmup, args.config)
    if "c" in args.parts:
        part_c(args.reps_c if args.reps_c is not None else args.reps,
               args.warmup_c if args.warmup_c is not None else args.warmup, args.config)
    if "d" in args.parts:
        default = torch.get_num_threads()
        part_d(args.reps, args.warmup, args.threads_d or ([default, 1] if default > 1 else [1]))
    if "e" in args.parts:
        part_e(args.reps, args.warmup, args.threads_e, args.reps_bf16)
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end")


if __name__ == "__main__":
    main()
