"""Bytes the expert-parallel dispatch moves per token per MoE layer, against the theoretical minimum.

    python bench/dispatch_bytes.py --world 4 --ep 4 --dtype bf16

Runs one forward of a MoE model on `--world` gloo processes (CPU) and reads the dispatcher's byte counter.
The minimum for a dropless top-k dispatch is top-k x hidden x dtype bytes per token in each direction
(every routed copy must reach its expert and come back). Rows whose expert lives on the sending rank still
go through the all-to-all as a local copy; the table splits them out, since only the rest crosses the
network.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from models import ModelConfig, Transformer  # noqa: E402
from parallel import ParallelDims, build_mesh, dispatch_bytes, parallelize  # noqa: E402


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = ModelConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=2,
                      first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=64,
                      qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=args.experts,
                      num_experts_per_tok=args.topk, moe_intermediate_size=64, max_position_embeddings=4096)
    with torch.device("meta"):
        model = Transformer(cfg)
    per_rank = cfg.n_routed_experts // args.ep
    seen = {"copies": 0, "local": 0}
    ep_rank = rank % args.ep

    def count(module: torch.nn.Module, inputs: tuple) -> None:  # runs before the dispatch hook: global counts
        counts = inputs[1]
        seen["copies"] += int(counts.sum())
        seen["local"] += int(counts[ep_rank * per_rank:(ep_rank + 1) * per_rank].sum())

    for moe in model.moe_layers():
        moe.experts.register_forward_pre_hook(count)
    parallelize(model, build_mesh(ParallelDims(world, world, args.ep), "cpu"), param_dtype=dtype)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    tokens = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        model(tokens)
    stats = torch.tensor([float(dispatch_bytes(model)), float(tokens.numel()), float(seen["copies"]),
                          float(seen["local"])])
    dist.all_reduce(stats)
    if rank == 0:
        torch.save({"bytes": stats[0].item(), "tokens": stats[1].item(), "copies": stats[2].item(),
                    "local_copies": stats[3].item(), "elem": torch.finfo(dtype).bits // 8}, out)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/chogori-dispatch-{os.getpid()}.pt"
    mp.spawn(worker, args=(args.world, port, args, out), nprocs=args.world, join=True)
    r = torch.load(out)
    os.remove(out)
    moe_layers = 1
    per_token_dir = r["bytes"] / 2 / r["tokens"] / moe_layers  # one direction (dispatch or combine)
    minimum = args.topk * args.hidden * r["elem"]
    local_share = r["local_copies"] / r["copies"]
    print(f"world {args.world}, ep {args.ep}, {args.experts} experts, top-{args.topk}, hidden {args.hidden}, "
          f"{args.dtype}, {int(r['tokens'])} tokens")
    print()
    print("| per token per MoE layer, one direction | bytes |")
    print("|---|---|")
    print(f"| sent by the dispatch | {per_token_dir:,.0f} |")
    print(f"| theoretical minimum (top-k x hidden x dtype) | {minimum:,} |")
    print(f"| ratio | {per_token_dir / minimum:.3f} |")
    print(f"| of which stays on the rank (local copy, share {local_share:.1%}) | {per_token_dir * local_share:,.0f} |")
    print(f"| of which crosses ranks | {per_token_dir * (1 - local_share):,.0f} |")


if __name__ == "__main__":
    main()
