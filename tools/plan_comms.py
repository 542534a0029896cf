"""Communication per step and a step-time estimate for a layout: EP all-to-all (balanced and skewed expert
load), FSDP all-gather / reduce-scatter, Muon's Newton-Schulz, on an H100 / H200 cluster model.

Every figure is per rank and per optimizer step unless it says otherwise. Bytes "through the all-to-all"
count every row handed to the collective, the rank's own chunk included (what parallel.expert_parallel's
`dispatch_bytes` counts); bytes "on the wire" leave out the own chunk, which never leaves the GPU.

Expert load: a list of per-expert shares (one list per MoE layer and logged step) measured by the trainer
(`moe/expert_load/layer<L>` in metrics.jsonl). A profile measured with another expert count is carried over
by its load curve: expert i of E takes the measured load over the fraction [i/E, (i+1)/E) of the measured
experts (each measured expert spread evenly over the experts it covers), so the busiest expert's share of the
mean is kept. Experts sit on EP ranks in contiguous blocks of E/ep (parallel.expert_parallel.shard_experts).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PROFILE = Path(__file__).with_name("expert_load_tiny.json")


# --- hardware ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """The cluster model. H100 and H200 (SXM) have the same bf16 dense peak, NVLink 4 and (in the usual
    build) one 400 Gb/s NIC per GPU, so they get the same step time; they differ in memory (80 / 141 GB)."""

    peak_flops: float = 989e12  # bf16 dense, per GPU
    mfu: float = 0.40  # fraction of peak the matmuls reach (assumed)
    nvlink_bytes_s: float = 450e9  # per direction, per GPU, within a node
    network_bytes_s: float = 400e9 / 8  # 400 Gb/s per GPU across nodes
    gpus_per_node: int = 8
    memory: dict[str, float] = field(default_factory=lambda: {"H100": 80e9, "H200": 141e9})

    def assumptions(self) -> list[str]:
        return [
            f"compute: {self.peak_flops / 1e12:g} TFLOP/s bf16 dense per GPU (H100 = H200) x {self.mfu:.0%} "
            "assumed matmul efficiency (MFU), for the model FLOPs, the full-recompute forward and Newton-Schulz",
            f"NVLink {self.nvlink_bytes_s / 1e9:g} GB/s per direction per GPU within a node of "
            f"{self.gpus_per_node} GPUs; {self.network_bytes_s * 8 / 1e9:g} Gb/s "
            f"({self.network_bytes_s / 1e9:g} GB/s) per GPU across nodes; no latency terms",
            "a collective whose group spans nodes runs at the cross-node figure (ring over the group); one within "
            "a node at NVLink; the all-to-all sends to node-local peers over NVLink and to the rest over the "
            "network at the same time, and a phase lasts as long as the slower of the two",
            "EP all-to-all: dispatch + combine per MoE layer and micro-batch in the forward, their mirror in the "
            "backward, and the forward's again in full recompute (selective checkpointing keeps their results); "
            "tokens*k rows of hidden x compute dtype each",
            "FSDP2 all-gathers each block's weights in the forward and again in the backward "
            "(reshard_after_forward), the root unit (embedding, final norm, LM head) once per micro-batch, in the "
            "compute dtype; reduce-scatters gradients in fp32 (parallel.fsdp's reduce_dtype) once per step "
            "(parallel.grad_sync: step) or per micro-batch",
            "Newton-Schulz: each matrix orthogonalized once in the world, owners balanced, so a rank does total/"
            "gpus; its gather-to-owner and scatter-back move about twice the rank's fp32 Muon shard each way",
            "step time 'overlapped': FSDP traffic hidden behind compute (prefetch), the all-to-all and Newton-"
            "Schulz on the critical path; 'serial': nothing overlapped (an upper bound)",
        ]


# --- expert load ------------------------------------------------------------------------------------------
def load_expert_profile(path: str | Path) -> list[list[float]]:
    """Per-expert share vectors from a metrics.jsonl (every `moe/expert_load/layer<L>` of every record),
    a JSON list of shares, a JSON list of such lists, or a JSON object with a "shares" list of lists."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--expert-load: file not found: {path}")
    text = path.read_text()
    samples: list[list[float]] = []
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        data = None
        for line in text.splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            samples += [v for k, v in rec.items() if k.startswith("moe/expert_load/layer") and isinstance(v, list)]
    if data is not None:
        if isinstance(data, dict):
            data = data.get("shares")
        if isinstance(data, list) and data and all(isinstance(x, (int, float)) for x in data):
            data = [data]
        if not (isinstance(data, list) and all(isinstance(r, list) for r in data)):
            raise ValueError(f"--expert-load: {path} is not a metrics.jsonl, a list of shares or a list of lists")
        samples = data
    samples = [[float(x) for x in s] for s in samples if s and sum(s) > 0]
    if not samples:
        raise ValueError(f"--expert-load: no per-expert shares in {path} (the trainer logs them every "
                         "logging.expert_load_interval steps as moe/expert_load/layer<L>)")
    if len({len(s) for s in samples}) != 1:
        raise ValueError(f"--expert-load: {path} mixes share lists of different lengths")
    return [[x / sum(s) for x in s] for s in samples]


def resample_shares(shares: list[float], num_experts: int) -> list[float]:
    """Carry a measured load curve over to `num_experts` experts: expert i gets the measured load over the
    fraction [i/E, (i+1)/E) of the measured experts, each measured expert's share spread evenly over its slot."""
    m = len(shares)
    if m == num_experts:
        return list(shares)
    out = []
    for i in range(num_experts):
        lo, hi = i * m / num_experts, (i + 1) * m / num_experts
        total, j = 0.0, int(math.floor(lo))
        while j < m and j < hi:
            total += shares[j] * (min(hi, j + 1) - max(lo, j))
            j += 1
        out.append(total)
    s = sum(out)
    return [x / s for x in out]


def rank_shares(shares: list[float], ep: int) -> list[float]:
    """Share of the EP group's routed copies that each EP rank's contiguous block of experts receives."""
    per = len(shares) // ep
    return [sum(shares[r * per:(r + 1) * per]) for r in range(ep)]


def busiest_factor(shares: list[float], num_experts: int, ep: int) -> float:
    """Rows the busiest rank sends or receives in one all-to-all phase, over the balanced rank's (ep - 1)/ep
    of its T*k rows. Each source rank is assumed to route like the group, so rank r receives P_r * (ep - 1) *
    T * k rows from the others and sends (1 - P_r) * T * k; the phase ends with the busiest link."""
    p = rank_shares(resample_shares(shares, num_experts), ep)
    worst = max(max(pr * (ep - 1), 1 - pr) for pr in p)
    return worst / ((ep - 1) / ep)


# --- the estimate -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommInputs:
    """What the comms / time model needs from the plan."""

    gpus: int
    ep: int
    tokens_per_micro: int  # micro_batch * seq_len, per rank
    micro_batches: int  # per rank per step (gradient accumulation)
    hidden: int
    top_k: int
    num_experts: int
    moe_layers: int
    compute_bytes: int
    policy: str  # activation checkpointing
    grad_sync: str  # step | micro_batch
    dense_params: int  # everything FSDP shards over all gpus
    expert_params: int  # all routed-expert parameters (the world's)
    root_params: int  # the root FSDP unit (embedding, final norm, LM head): gathered once per micro-batch
    flops_per_token: int  # training model FLOPs (models/flops.py)
    forward_flops_per_token: int
    ns_flops_total: int  # Newton-Schulz FLOPs of all Muon matrices, one pass (0 for AdamW)
    muon_params: int  # parameters Muon orthogonalizes
    # Weights gathered once per step and kept (a pipeline stage with reshard_after_forward=false: torch's stages
    # also keep them between micro-batches' backwards), instead of for each micro-batch's forward and backward.
    gather_once: bool = False


def _group_bandwidth(hw: Hardware, span: int) -> float:
    """Ring bandwidth of a group spanning `span` consecutive ranks' worth of GPUs."""
    return hw.nvlink_bytes_s if span <= hw.gpus_per_node else hw.network_bytes_s


def _ring(nbytes: float, n: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-gather / reduce-scatter of `nbytes` over n ranks."""
    return nbytes * (n - 1) / n if n > 1 else 0.0


def estimate(inp: CommInputs, hw: Hardware, profile: list[list[float]] | None) -> dict[str, Any]:
    """All-to-all bytes (balanced, skewed), FSDP bytes, NS FLOPs, and the step time they add up to."""
    c = inp.compute_bytes
    # Full recompute re-runs the forward's all-to-alls; selective keeps their results (parallel/fsdp.py).
    steps_fwd = 2 if inp.policy == "full" else 1
    out: dict[str, Any] = {}

    # EP all-to-all: per MoE layer and micro-batch, dispatch + combine in the forward, their mirror in backward.
    ep = inp.ep
    rows = inp.tokens_per_micro * inp.top_k  # token copies this rank routes (and, balanced, receives)
    phase = rows * inp.hidden * c  # one phase (e.g. the dispatch), through the collective incl. own chunk
    phases = int((2 * steps_fwd + 2) * inp.moe_layers * inp.micro_batches) if ep > 1 else 0  # a call count
    forward_through = 2 * phase * inp.moe_layers if ep > 1 else 0  # one forward, no recompute: dispatch_bytes
    wire = phase * (ep - 1) / ep if ep > 1 else 0.0  # per phase, balanced, own chunk left out
    local_peers = min(ep, hw.gpus_per_node) - 1
    intra = wire * local_peers / (ep - 1) if ep > 1 else 0.0
    inter = wire - intra

    def phase_time(scale: float) -> float:
        return max(intra * scale / hw.nvlink_bytes_s, inter * scale / hw.network_bytes_s)

    skew = {"samples": 0, "mean_factor": 1.0, "worst_factor": 1.0}
    if ep > 1 and profile:
        factors = [busiest_factor(s, inp.num_experts, ep) for s in profile]
        skew = {"samples": len(factors), "mean_factor": sum(factors) / len(factors), "worst_factor": max(factors)}
    out["all_to_all"] = {
        "phases_per_step": phases,
        "rows_per_phase": rows if ep > 1 else 0,
        "forward_bytes_through_collective_per_micro_batch": forward_through,
        "balanced": {"bytes_through_collective": phase * phases, "bytes_on_wire": wire * phases,
                     "nvlink_bytes": intra * phases, "network_bytes": inter * phases,
                     "seconds": phase_time(1.0) * phases},
        "skewed": {"busiest_rank_bytes_on_wire": wire * phases * skew["mean_factor"],
                   "busiest_factor_mean": skew["mean_factor"], "busiest_factor_worst": skew["worst_factor"],
                   "profile_samples": skew["samples"],
                   "seconds": phase_time(skew["mean_factor"]) * phases},
    }

    # FSDP: dense weights over all gpus, experts (E/ep per EP rank) over gpus/ep.
    n_dense, n_exp = inp.gpus, inp.gpus // ep
    block_dense = inp.dense_params - inp.root_params
    local_experts = inp.expert_params / ep
    gathers, per_gather = (1, 1) if inp.gather_once else (inp.micro_batches, 2)
    ag_dense = _ring((per_gather * block_dense + inp.root_params) * c, n_dense) * gathers
    ag_exp = _ring(per_gather * local_experts * c, n_exp) * gathers
    syncs = inp.micro_batches if inp.grad_sync == "micro_batch" and not inp.gather_once else 1
    rs_dense = _ring(inp.dense_params * 4, n_dense) * syncs
    rs_exp = _ring(local_experts * 4, n_exp) * syncs
    bw_dense = _group_bandwidth(hw, inp.gpus)
    bw_exp = _group_bandwidth(hw, inp.gpus)  # "dp_mod_ep" strides over the EP groups: it spans the world
    fsdp_s = (ag_dense + rs_dense) / bw_dense + (ag_exp + rs_exp) / bw_exp
    out["fsdp"] = {"all_gather_bytes": ag_dense + ag_exp, "reduce_scatter_bytes": rs_dense + rs_exp,
                   "dense_group": n_dense, "expert_group": n_exp, "reduce_scatters_per_step": syncs,
                   "bandwidth_bytes_s": bw_dense, "seconds": fsdp_s}

    # Compute.
    achieved = hw.peak_flops * hw.mfu
    tokens = inp.tokens_per_micro * inp.micro_batches
    model_flops = inp.flops_per_token * tokens
    recompute_flops = inp.forward_flops_per_token * tokens if inp.policy == "full" else 0
    compute_s = (model_flops + recompute_flops) / achieved
    ns_rank = inp.ns_flops_total / inp.gpus
    ns_bytes = 2 * inp.muon_params / inp.gpus * 4 if inp.gpus > 1 else 0.0
    ns_s = ns_rank / achieved + ns_bytes / _group_bandwidth(hw, inp.gpus)
    out["compute"] = {"tokens_per_rank": tokens, "model_flops": model_flops, "recompute_flops": recompute_flops,
                      "seconds": compute_s}
    out["newton_schulz"] = {"flops_total": inp.ns_flops_total, "flops_per_rank": ns_rank,
                            "bytes_per_rank": ns_bytes, "seconds": ns_s}

    def total(a2a: float) -> dict[str, float]:
        overlapped = max(compute_s, fsdp_s) + a2a + ns_s
        serial = compute_s + fsdp_s + a2a + ns_s
        return {"overlapped_seconds": overlapped, "serial_seconds": serial,
                "tokens_per_s_per_gpu": tokens / overlapped,
                "mfu": model_flops / overlapped / hw.peak_flops}

    out["step_time"] = {"balanced": total(out["all_to_all"]["balanced"]["seconds"]),
                        "skewed": total(out["all_to_all"]["skewed"]["seconds"])}
    return out


def write_profile(metrics_jsonl: str | Path, out: str | Path, min_step: int = 0, note: str = "") -> int:
    """Write the per-expert shares of a trainer metrics.jsonl (records with step > `min_step`) as a profile
    file `load_expert_profile` reads; returns the number of share vectors. How tools/expert_load_tiny.json
    was made: `python -m tools.plan_comms runs/tiny/metrics.jsonl tools/expert_load_tiny.json 30`."""
    samples = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("step", 0) > min_step:
                samples += [v for k, v in sorted(rec.items()) if k.startswith("moe/expert_load/layer")]
    Path(out).write_text(json.dumps({"note": note, "shares": samples}, indent=None) + "\n")
    return len(samples)


if __name__ == "__main__":
    import sys

    metrics, target, first = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0
    print(write_profile(metrics, target, first, note=" ".join(sys.argv[4:])))
