"""Pipeline parallelism on `torch.distributed.pipelining`, applied to the plain model from outside.

The network is cut by layers into `pp * v` stages (`v` = `parallel.pp_virtual_stages`): the embedding goes with
the first, the final norm, LM head and loss with the last, and the cut points balance the forward FLOPs of the
stages (`split_layers`; the dense first layers and the LM head counted as they cost). Each rank keeps one
`Transformer` holding only its stages' layers (names unchanged: "layers.7" stays "layers.7", so the optimizer,
the post-step hooks, checkpoints and HF export see the same names as without a pipeline), and one
`StageModule` per stage: a view that shares the model's modules and runs the stage's part of the forward.
FSDP2 applies to each view as its root; expert parallelism inside each stage as without a pipeline.

Stage placement: "loop" (stage s on pipeline rank s mod pp; 1F1B, GPipe, interleaved 1F1B) or "v" (rank r holds
stages r and 2 pp - 1 - r; ZBV, DualPipeV), the layout each of torch's schedules expects.

The balance loss: each stage's MoE layers add theirs to the loss through the backward of the stage's output
(`_BalanceLossGrad`, as Megatron's MoE aux-loss scaler), so no stage has to pass it forward to the last one,
and every stage trains its routers, middle stages included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ConfigError, ModelConfig
from models.flops import layer_flops
from models.stats import StatsBuckets
from models.transformer import Transformer, run_blocks
from parallel.dims import SCHEDULES, virtual_stages


def stage_ids(schedule: str, pp: int, v: int, pp_rank: int) -> list[int]:
    """The global stage indices that pipeline rank `pp_rank` runs, in ascending order."""
    if SCHEDULES[schedule][1] == "v":
        return sorted({pp_rank, 2 * pp - 1 - pp_rank})
    return [pp_rank + i * pp for i in range(v)]


def split_layers(cfg: ModelConfig, n_stages: int, seq_len: int) -> list[list[int]]:
    """Cut the layers into `n_stages` contiguous runs minimising the largest stage's forward FLOPs (the LM head
    counts on the last stage: the bubble follows the slowest stage), then the sum of squared stage FLOPs (the
    other stages as even as that allows); dynamic programming over cut points."""
    per_layer, head = layer_flops(cfg, seq_len)
    n = len(per_layer)
    if n < n_stages:
        raise ConfigError(f"parallel.pp: {n_stages} pipeline stages (parallel.pp x parallel.pp_virtual_stages) need "
                          f"at least as many layers, model.num_hidden_layers is {n}")
    prefix = [0]
    for f in per_layer:
        prefix.append(prefix[-1] + f)
    worst = (float("inf"), float("inf"))
    # best[s][i]: (max stage cost, sum of squares) of layers[:i] in s stages; cut[s][i]: where the last stage starts
    best = [[worst] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = (0, 0)
    for s in range(1, n_stages + 1):
        for i in range(s, n + 1):
            extra = head if s == n_stages and i == n else 0
            for j in range(s - 1, i):
                stage = prefix[i] - prefix[j] + extra
                cost = (max(best[s - 1][j][0], stage), best[s - 1][j][1] + stage * stage)
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    bounds, i = [], n
    for s in range(n_stages, 0, -1):
        bounds.append((cut[s][i], i))
        i = cut[s][i]
    return [list(range(a, b)) for a, b in reversed(bounds)]


class _BalanceLossGrad(torch.autograd.Function):
    """Identity on the hidden states whose backward also starts the backward of the stage's balance loss,
    scaled as the trainer scales the language-model loss (`scale` = 1 / micro-batches per step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, balance: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(balance)
        ctx.scale = scale
        # A new tensor, not a view: zero-bubble schedules detach a stage's output in place, which a view refuses.
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # noqa: ANN001
        (balance,) = ctx.saved_tensors
        return grad, torch.full_like(balance, ctx.scale), None


class StageModule(nn.Module):
    """One pipeline stage: a view of `model` (the same module objects, so the same parameters) that runs the
    embedding if first, its layers, and the final norm and LM head if last. Input: token ids (first stage) or
    hidden states; output: hidden states, or logits (last stage). `balance_loss` adds up (detached) the balance
    loss of the micro-batches run since `reset_balance_loss`, for the step's metrics."""

    def __init__(self, model: Transformer, stage: int, num_stages: int, layers: Sequence[int]) -> None:
        super().__init__()
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.embed_tokens = model.embed_tokens if self.is_first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.rotary = model.rotary
        self.balance_grad_scale = 1.0
        self.balance_loss = torch.zeros(())

    def reset_balance_loss(self) -> None:
        self.balance_loss = torch.zeros((), device=self.rotary.inv_freq.device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        x, balance = run_blocks(self.layers.values(), x, self.rotary, positions, document_ids)
        self.balance_loss = self.balance_loss + balance.detach()
        if balance.requires_grad:
            x = _BalanceLossGrad.apply(x, balance, self.balance_grad_scale)
        if self.lm_head is not None:
            return self.lm_head(self.norm(x))
        return x


@dataclass
class PipelinePlan:
    """What one rank runs: its stage indices, each stage's layers, and the schedule's name."""

    schedule: str
    pp: int
    virtual: int
    stages: list[int]  # global stage indices of this rank, ascending
    layers: list[list[int]]  # layers of every stage (all ranks'), by global stage index

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual

    def local_layers(self) -> list[int]:
        return [i for s in self.stages for i in self.layers[s]]


def plan_pipeline(cfg: ModelConfig, seq_len: int, pp: int, schedule: str, virtual: int, pp_rank: int) -> PipelinePlan:
    v = virtual_stages(schedule, virtual)
    return PipelinePlan(schedule=schedule, pp=pp, virtual=v, stages=stage_ids(schedule, pp, v, pp_rank),
                        layers=split_layers(cfg, pp * v, seq_len))


def prune_to_stages(model: Transformer, plan: PipelinePlan) -> list[StageModule]:
    """Drop from `model` what this rank's stages do not run (on the meta device: nothing was allocated) and
    return one `StageModule` per stage, in ascending stage order."""
    keep = set(plan.local_layers())
    for name in [n for n in model.layers if int(n) not in keep]:
        del model.layers[name]
    if 0 not in plan.stages:
        model.embed_tokens = None
    if plan.num_stages - 1 not in plan.stages:
        model.norm = None
        model.lm_head = None
    return [StageModule(model, s, plan.num_stages, plan.layers[s]) for s in plan.stages]


def build_schedule(modules: list[StageModule], plan: PipelinePlan, group: torch.distributed.ProcessGroup,
                   device: torch.device, n_microbatches: int, loss_fn: Callable, micro_batch: int, seq_len: int,
                   compute_dtype: torch.dtype | None) -> object:
    """torch's schedule over this rank's stages. Gradients are not rescaled by the schedule (`scale_grads=False`):
    `loss_fn` and the balance-loss gradient carry the trainer's own 1 / micro-batches normalisation.

    Every stage is given the shapes it receives and sends ([micro_batch, seq_len] token ids into the first;
    hidden states in the compute dtype between stages; logits out of the last), so torch never runs a stage's
    forward to discover them: such a forward would count into the layers' statistics (expert loads, max logits)."""
    from torch.distributed.pipelining import PipelineStage, schedules

    cfg = modules[0].rotary.cfg
    dtype = compute_dtype or torch.float32
    # (requires_grad: a stage receives the gradient of what it sends, and computes that of what it receives)
    hidden = torch.empty(micro_batch, seq_len, cfg.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    ids = torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta")
    logits = torch.empty(micro_batch, seq_len, cfg.vocab_size, dtype=dtype, device="meta", requires_grad=True)
    stages = [PipelineStage(m, m.stage, plan.num_stages, device, group=group,
                            input_args=ids if m.is_first else hidden, output_args=logits if m.is_last else hidden)
              for m in modules]
    cls = getattr(schedules, SCHEDULES[plan.schedule][0])
    if SCHEDULES[plan.schedule][2] == 1:
        return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


@torch.no_grad()
def forward_only(modules: list[StageModule], plan: PipelinePlan, group: torch.distributed.ProcessGroup,
                 inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable, micro_batch: int,
                 dtype: torch.dtype | None, **kwargs: torch.Tensor) -> list[torch.Tensor]:
    """Evaluation: each micro-batch through every stage in turn, hidden states sent point-to-point between ranks
    (no overlap: evaluation is rare, and torch's zero-bubble schedules have no forward-only mode). Every pipeline
    rank calls it with the same batch; returns the last stage's losses (empty on the other ranks)."""
    import torch.distributed as dist

    mine = {m.stage: m for m in modules}
    owner = {s: r for r in range(plan.pp) for s in stage_ids(plan.schedule, plan.pp, plan.virtual, r)}
    me = dist.get_rank(group)
    losses = []
    for start in range(0, inputs.shape[0], micro_batch):
        chunk = {k: v[start:start + micro_batch] for k, v in kwargs.items()}
        x = inputs[start:start + micro_batch]
        for s in range(plan.num_stages):
            if s not in mine:
                continue
            if s > 0 and owner[s - 1] != me:
                x = torch.empty(*x.shape[:2], mine[s].rotary.cfg.hidden_size, dtype=dtype or torch.float32,
                                device=x.device)
                dist.recv(x, src=dist.get_global_rank(group, owner[s - 1]), group=group)
            x = mine[s](x, **chunk)
            if mine[s].is_last:
                losses.append(loss_fn(x, targets[start:start + micro_batch]))
            elif owner[s + 1] != me:
                dist.send(x.contiguous(), dst=dist.get_global_rank(group, owner[s + 1]), group=group)
    return losses


class LMLoss:
    """The last stage's loss per micro-batch: mean next-token cross-entropy in fp32, times `scale` (the trainer
    sets 1 / micro-batches per step for training, 1 for evaluation)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) * self.scale


def _spread_rows(values: torch.Tensor, rows: list[int], all_rows: list[int], width: int) -> torch.Tensor:
    """`values` ([len(rows) * width]) placed at `rows` of a zero [len(all_rows) * width] tensor."""
    out = values.new_zeros(len(all_rows), width)
    if rows:
        index = torch.tensor([all_rows.index(r) for r in rows], device=values.device)
        out[index] = values.view(len(rows), width)
    return out.flatten()


@torch.no_grad()
def gather_stage_stats(stats: StatsBuckets, clipped: torch.Tensor | None, bias_spread: torch.Tensor,
                       cfg: ModelConfig, group: torch.distributed.ProcessGroup,
                       ) -> tuple[StatsBuckets, torch.Tensor | None, torch.Tensor]:
    """Every layer's (already data-parallel-reduced) statistics, QK-Clip counts and router-bias spread on every
    pipeline rank, for the step's metrics: each stage fills its own layers' rows of whole-model tensors and one
    all-reduce sum over the pipeline ranks adds them up (disjoint rows, so the sum is a gather). Reporting only:
    the step contract (bias update, QK-Clip) has already run on each stage's own statistics."""
    layers = list(range(cfg.num_hidden_layers))
    moe_layers = [i for i in layers if cfg.is_moe_layer(i)]
    e, h = stats.num_experts, stats.num_heads
    parts = [
        _spread_rows(stats.expert_load(), stats.moe_layers, moe_layers, e),
        _spread_rows(stats.dropped(), stats.moe_layers, moe_layers, 1),
        _spread_rows(stats.max_logit().double(), stats.layers, layers, h),
        _spread_rows(bias_spread.double(), stats.moe_layers, moe_layers, 1),
    ]
    if clipped is not None:
        parts.append(_spread_rows(clipped.double(), stats.layers, layers, 1))
    flat = torch.cat([p.to(stats.sum.device, torch.float64) for p in parts])
    torch.distributed.all_reduce(flat, group=group)
    sizes = [len(moe_layers) * e, len(moe_layers), len(layers) * h, len(moe_layers)]
    sizes += [len(layers)] if clipped is not None else []
    load, dropped, max_logit, spread, *rest = flat.split(sizes)
    full = StatsBuckets(sum=torch.cat([load, dropped]), max=max_logit.to(stats.max.dtype), moe_layers=moe_layers,
                        layers=layers, num_experts=e, num_heads=h)
    return full, (rest[0].to(clipped.dtype) if clipped is not None else None), spread.to(bias_spread.dtype)
