"""The training loop: build model, data, optimizer from one ExperimentConfig and run optimizer steps.

One step = `global_batch_size` sequences, run as micro-batches of `micro_batch_size` with gradient
accumulation, then clip, optimizer step, LR schedule step, and the router-bias update from the expert load
of the whole step. The loop is deterministic for a given seed: the same config gives the same losses,
and resuming from a checkpoint continues the exact trajectory.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from data.loader import build_loaders, document_positions, eval_batches
from models import Transformer
from models.config import ConfigError
from models.flops import flops_per_token
from models.hf import check_hf_config, load_hf_weights
from optim import build_lr_scheduler, build_optimizer, describe_groups, split_params
from parallel import (
    PipelinePlan,
    StageModule,
    all_reduce_max,
    all_reduce_sum,
    build_mesh,
    clip_grad_norm_,
    dp_mesh,
    init_distributed,
    parallelize,
    plan_pipeline,
)
from parallel.pipeline import LMLoss, build_schedule, forward_only, gather_stage_stats
from train.checkpoint import Checkpointer, find_resume, list_checkpoints, load_checkpoint, read_train_state
from train.config import ExperimentConfig, pipeline_microbatches, to_yaml, validate_layout
from train.metrics import MetricsLogger, detect_peak_tflops, peak_memory_gb
from train.profiling import StepProfiler, region
from train.resume import check_resume
from train.signals import stop_signals
from train.spikes import SpikeDetector
from train.step_hooks import register_post_step_hooks
from train.step_record import StepRecord


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def compute_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The low-precision compute dtype of `train.dtype`, or None for fp32: `auto` is bf16 on CUDA, fp32 on CPU
    (CPU bf16 matmuls are slow, and tests want fp32)."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def build_model(cfg: ExperimentConfig, device: torch.device, mesh: DeviceMesh | None = None,
                param_dtype: torch.dtype | None = None, pipeline: PipelinePlan | None = None,
                init_from: str | None = None) -> tuple[Transformer, list[StageModule] | None]:
    """Construct on the meta device (no memory), apply parallelism from outside, materialize on `device`
    and initialise: the weights depend only on the seed, not on the number of ranks or the layout.
    `param_dtype`: FSDP2's compute dtype for the weights (they stay fp32 in storage); needs a mesh.
    `pipeline`: this rank's stages; the model then holds only their layers. `init_from`: a released-layout
    checkpoint whose weights replace the random init (never drawn then). Returns the model and the stage views
    (None without a pipeline)."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    reshard = {"auto": None, "true": True, "false": False}[str(cfg.parallel.reshard_after_forward).lower()]
    stages = parallelize(model, mesh, activation_checkpointing=cfg.parallel.activation_checkpointing,
                         param_dtype=param_dtype, compile=cfg.train.compile, pipeline=pipeline,
                         reshard_after_forward=reshard, offload=cfg.optim.offload == "cpu")
    model.to_empty(device=device)
    model.init_weights(seed=cfg.train.seed, parameters=init_from is None)
    if init_from is not None:  # each rank reads only the slices of the tensors it holds
        load_hf_weights(model, init_from)
    for stage in stages or []:
        stage.reset_balance_loss()
    return model, stages


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message names the last good checkpoint."""




class Trainer:
    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        # Handlers first (`python -m train` installs them even before importing torch): a stop signal during
        # start-up, minutes at scale, is honoured once start-up is done.
        stop_signals.install()
        try:
            self._setup(cfg)
        except BaseException:
            stop_signals.restore()
            raise

    def _setup(self, cfg: ExperimentConfig) -> None:
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.out_dir = Path(t.out_dir)
        self.device = pick_device(t.device)
        # Under torchrun every rank runs this same code; one process is the world-size-1 case of it.
        # Mixed precision is FSDP2's policy (bf16 compute, fp32 master weights, fp32 gradient reduction), also in
        # one process: it then gets a one-rank group and mesh, and runs the same code as every rank of a cluster.
        self.compute_dtype = compute_dtype(t.dtype, self.device)
        # FSDP2 also in one process when it has work there: the bf16 policy, or offloading the state to the host.
        one_process_fsdp = self.compute_dtype is not None or cfg.optim.offload == "cpu"
        self.rank, self.world, self._owns_group = init_distributed(
            self.device, cfg.parallel.timeout_minutes, one_process_group=one_process_fsdp)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dims = validate_layout(cfg, self.world)
        use_fsdp = self.world > 1 or one_process_fsdp
        self.mesh = build_mesh(self.dims, self.device.type) if use_fsdp else None
        torch.manual_seed(t.seed)
        # The ranks of a pipeline stage are its data-parallel ranks; the ranks of one data-parallel coordinate
        # (one per stage) read the same batch.
        dp = dp_mesh(self.mesh) if use_fsdp else None
        self.dp_rank, self.dp_world = (dp.get_local_rank(), dp.size()) if dp is not None else (0, 1)
        self.accum_steps = t.global_batch_size // self.dp_world // t.micro_batch_size

        self._notes: list[str] = []  # start-up messages, shown once the metrics logger exists
        resume = find_resume(cfg.checkpoint.resume, self.out_dir, notify=self._notes.append)
        # A new run may start from a released-layout checkpoint; its config is checked before anything is built.
        init_from = cfg.model.init_from if resume is None else None
        if init_from:
            if not (Path(init_from) / "config.json").is_file():
                raise ConfigError(f"model.init_from: {init_from} is not a checkpoint in the released layout (no "
                                  "config.json there); give the directory `python -m tools.export` wrote")
            check_hf_config(cfg.model, init_from)

        self.pipeline = None
        if self.dims.pp > 1:
            p = cfg.parallel
            self.pipeline = plan_pipeline(cfg.model, cfg.data.seq_len, self.dims.pp, p.pp_schedule,
                                          p.pp_virtual_stages, self.mesh["pp"].get_local_rank())
        self.model, self.stages = build_model(cfg, self.device, self.mesh, param_dtype=self.compute_dtype,
                                              pipeline=self.pipeline, init_from=init_from or None)
        if init_from:
            self._notes.append(f"init_from: weights from {init_from}")
        self._pp_group = self.mesh["pp"].get_group() if self.pipeline is not None else None
        if self.stages is not None:
            self._pp_microbatches = pipeline_microbatches(cfg, self.dims)
            self._lm_loss = LMLoss(1.0 / self.accum_steps)
            self.schedule = build_schedule(self.stages, self.pipeline, self._pp_group, self.device,
                                           self._pp_microbatches, self._lm_loss, t.micro_batch_size,
                                           cfg.data.seq_len, self.compute_dtype)
        self.optimizer = build_optimizer(self.model, dataclasses.asdict(cfg.optim))
        _, self._qk_clip = register_post_step_hooks(self.optimizer, self.model, cfg.optim.qk_clip_tau)
        # Statistics are reduced over the ranks that see different tokens for the same weights: every
        # data-parallel rank of the stage (the flattened "dp" dim, expert parallelism included), never across
        # pipeline stages, never implicitly WORLD.
        self._stats_group = dp_mesh(self.mesh).get_group() if self.mesh is not None else None
        self._stop_seen = 0.0
        self.train_loader, self.val_dataset, self.tokenizer = build_loaders(
            cfg.data, seq_len=cfg.data.seq_len, global_batch_size=t.global_batch_size, seed=t.seed,
            dp_rank=self.dp_rank, dp_world=self.dp_world, vocab_size=cfg.model.vocab_size)

        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_steps = 0  # skipped updates
        self.spikes = SpikeDetector(**dataclasses.asdict(cfg.logging.spike))
        if resume is not None:
            # Config first (refuses what cannot continue, lists what changed), then state only: the model's and
            # optimizer's tensors, data position, counters, RNG. Hyperparameters stay this config's.
            self._notes += check_resume(resume, cfg, self.model, read_train_state(resume),
                                        self.tokenizer.fingerprint)
            state = load_checkpoint(resume, self.model, self.optimizer)
            self.train_loader.load_state_dict(state["data"])
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.nonfinite_steps = state.get("nonfinite_steps", 0)
            if "spikes" in state:
                self.spikes.load_state_dict(state["spikes"])
        # The LR schedule of this config, from the checkpoint's step on.
        self.scheduler = build_lr_scheduler(self.optimizer, dataclasses.asdict(cfg.optim), t.steps,
                                            last_step=self.step)
        self.resumed_from = resume
        self.metrics = MetricsLogger(cfg, self.out_dir, rank=self.rank, resumed_step=self.step)
        self.checkpointer = Checkpointer(self.out_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save,
                                         device=self.device, protect=resume)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)  # the same count as models.plan
        self.peak_tflops = cfg.logging.peak_tflops or detect_peak_tflops(self.device)
        self._bad_in_a_row = 0
        self._sample_log = None
        if t.sample_log:
            log_dir = self.out_dir / "samples"
            log_dir.mkdir(parents=True, exist_ok=True)
            self._sample_log = open(log_dir / f"rank{self.rank}.txt", "a", encoding="utf-8")  # noqa: SIM115

    # --- one optimizer step ---------------------------------------------------------------------
    def _document_kwargs(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Packed documents do not attend to each other: their rotary positions and ids, when masking."""
        if not self.cfg.data.document_masking:
            return {}
        return dict(zip(("positions", "document_ids"), document_positions(inputs, self.tokenizer.eos_id), strict=True))

    def _run_pipeline(self, inputs: torch.Tensor, targets: torch.Tensor, train: bool = True,
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's stages over the batch, as `train.pp_microbatches`-sized pipeline runs: forward and (if
        `train`) backward. Returns (sum of the micro-batches' language-model losses, sum of their balance losses,
        number of micro-batches); the losses are this rank's part: the LM loss only on the last stage, the
        balance loss of this rank's layers."""
        holds_first = any(s.is_first for s in self.stages)
        holds_last = any(s.is_last for s in self.stages)
        for stage in self.stages:
            stage.reset_balance_loss()
            stage.balance_grad_scale = 1.0 / self.accum_steps
        self._lm_loss.scale = 1.0 / self.accum_steps if train else 1.0
        per_run = self._pp_microbatches * self.cfg.train.micro_batch_size
        losses: list[torch.Tensor] = []
        for start in range(0, inputs.shape[0], per_run):
            x = inputs[start:start + per_run].to(self.device, non_blocking=True)
            y = targets[start:start + per_run].to(self.device, non_blocking=True)
            if not train:
                losses += forward_only(self.stages, self.pipeline, self._pp_group, x, y, self._lm_loss,
                                       self.cfg.train.micro_batch_size, self.compute_dtype,
                                       **self._document_kwargs(x))
                continue
            args = (x,) if holds_first else ()
            last = dict(target=y, losses=losses) if holds_last else {}
            self.schedule.step(*args, **last, **self._document_kwargs(x))
        lm = torch.stack([loss.detach() for loss in losses]).sum() / self._lm_loss.scale if losses else \
            torch.zeros((), device=self.device)
        balance = sum((s.balance_loss for s in self.stages), torch.zeros((), device=self.device))
        return lm, balance, inputs.shape[0] // self.cfg.train.micro_batch_size

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = inputs.to(self.device, non_blocking=True)
        out = self.model(inputs, **self._document_kwargs(inputs))  # in FSDP2's compute dtype; the router in fp32
        lm = F.cross_entropy(out.logits.float().flatten(0, 1), targets.to(self.device).flatten())
        return lm, out.balance_loss

    def train_step(self) -> dict[str, Any]:
        """One optimizer step. The trainer orchestrates; it walks no layer. Device->host synchronisations: one
        to decide whether the update is finite (and whether a stop signal arrived), one to read the whole
        metrics record, at any depth (expert parallelism's split sizes aside: see docs/architecture.md)."""
        cfg, model = self.cfg, self.model
        model.train()
        t0 = time.perf_counter()
        loader = self.train_loader
        first_sample = loader.samples_consumed + loader.dp_rank * loader.local_batch_size
        inputs, targets = next(self.train_loader)
        if self._sample_log is not None:  # append-only, survives restarts: which samples each step trained on
            self._sample_log.write(f"{self.step + 1} {first_sample} {first_sample + inputs.shape[0]}\n")
            self._sample_log.flush()
        model.reset_stats()
        lm_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        mb = cfg.train.micro_batch_size
        sync_each = cfg.parallel.grad_sync == "micro_batch"
        with region("forward_backward"):
            if self.stages is not None:  # the schedule runs the micro-batches; torch's stages sync FSDP once per run
                lm_sum, aux_sum, _ = self._run_pipeline(inputs, targets)
            for i in range(self.accum_steps if self.stages is None else 0):
                if self.mesh is not None:  # FSDP2: reduce-scatter after the last micro-batch only (unless asked)
                    model.set_requires_gradient_sync(sync_each or i == self.accum_steps - 1)
                lm, aux = self._loss(inputs[i * mb:(i + 1) * mb], targets[i * mb:(i + 1) * mb])
                ((lm + aux) / self.accum_steps).backward()
                lm_sum += lm.detach()
                aux_sum += aux.detach()

        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        with region("clip_grad_norm"):
            grad_norm = clip_grad_norm_(model.parameters(), clip)  # global norm over all ranks' shards, all stages
        lr = self.optimizer.param_groups[0]["lr"]
        # All of the step's statistics in one bucket per reduction op, over the ranks that see other tokens for
        # the same weights: losses (weighted by tokens), expert loads and drops summed; max logits and the stop
        # flag maxed. The model takes the global values back for the post-step hooks.
        with region("stats_reduce"):  # the step's statistics and losses over the ranks, and the host syncs
            stats = model.stats_buckets()
            # Under a pipeline the LM loss (and its token count) comes from the last stage only; every stage adds
            # the balance loss of its layers. The stages' totals are then added up over the pipeline ranks.
            lm_here = self.stages is None or any(s.is_last for s in self.stages)
            ntok = torch.tensor(float(targets.numel()), device=self.device)
            losses = torch.stack([lm_sum / self.accum_steps * ntok * lm_here, aux_sum / self.accum_steps * ntok,
                                  ntok * lm_here])
            summed = all_reduce_sum(torch.cat([stats.sum, losses.double()]), self._stats_group)
            stop = torch.tensor([0.0 if stop_signals.received is None else 1.0], device=self.device)
            maxed = all_reduce_max(torch.cat([stats.max, stop]), self._stats_group)
            stats.sum, stats.max = summed[:-3], maxed[:-1]
            model.load_stats(stats)
            totals = torch.cat([summed[-3:], maxed[-1:].double()])
            if self._pp_group is not None:
                totals = all_reduce_sum(totals, self._pp_group)
            lm_loss, aux_loss = totals[0] / totals[2], totals[1] / totals[2]
            loss = lm_loss + aux_loss  # what the gradients are of
            # Every rank has the same global loss and norm, so all of them take the same branch (sync 1 of 2).
            finite, self._stop_seen = (torch.stack([torch.isfinite(loss) & torch.isfinite(grad_norm),
                                                    totals[3] > 0]).tolist())
        if finite:
            with region("optimizer_step"):
                self.optimizer.step()  # then its post-step hooks: router-bias update, QK-Clip (train/step_hooks.py)
            self._bad_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule follows the step count, skipped or not

        self.step += 1
        tokens = inputs.numel() * self.dp_world
        self.tokens_seen += tokens
        record = StepRecord()
        for name, value in (("loss", loss), ("lm_loss", lm_loss), ("balance_loss", aux_loss),
                            ("grad_norm", grad_norm)):
            record.scalar(name, value)
        clipped = self._qk_clip.clipped if finite and self._qk_clip is not None else None
        with_shares = self.step % cfg.logging.expert_load_interval == 0 or self.step == 1  # for the heatmap
        spread = model.router_bias_spread()
        if self._pp_group is not None:  # every layer's statistics in every stage's record
            stats, clipped, spread = gather_stage_stats(stats, clipped, spread, cfg.model, self._pp_group)
        record.add_stats(stats, clipped, spread, with_shares)
        rec: dict[str, Any] = {"step": self.step, **record.to_host()}  # sync 2 of 2
        dt = time.perf_counter() - t0
        if not finite:
            self._skip_bad_step(rec["loss"], rec["grad_norm"])
        rec["moe/dropped_tokens"] = int(rec["moe/dropped_tokens"])
        for key in [k for k in rec if k.startswith("qk_clip/heads_clipped")]:
            rec[key] = int(rec[key])
        spike = self.spikes.update(rec["loss"])
        if spike.spike:
            self.metrics.event(f"loss spike at step {self.step}: {rec['loss']:.4f} vs running median "
                               f"{spike.baseline:.4f} ({spike.score:.1f} robust std above; {self.spikes.count} so far)")
        tflops = self.flops_per_token * tokens / dt / self.world / 1e12  # achieved, per device
        rec.update({
            "lr": lr,
            "tokens_per_s": tokens / dt,
            "tokens_seen": self.tokens_seen,
            "step_time_s": dt,
            "tflops": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "peak_mem_gb": peak_memory_gb(self.device),
            "spike": spike.spike,
            "spikes": self.spikes.count,
            "loss_baseline": spike.baseline,
            "nonfinite_steps": self.nonfinite_steps,
        })
        return rec

    def _skip_bad_step(self, loss: float, grad_norm: float) -> None:
        """A NaN/Inf loss or gradient: the update of step `self.step` was not applied. Count it; stop after too
        many in a row."""
        self.nonfinite_steps += 1
        self._bad_in_a_row += 1
        limit = max(1, self.cfg.train.max_bad_steps)
        self.metrics.event(f"step {self.step}: loss {loss} / grad norm {grad_norm} is not finite; update "
                           f"skipped ({self._bad_in_a_row} in a row, limit {limit})")
        if self._bad_in_a_row >= limit:
            ckpts = list_checkpoints(self.out_dir)
            last = f"the last good checkpoint is {ckpts[-1][1]}" if ckpts else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"stopping: {self._bad_in_a_row} steps in a row (up to step {self.step}) had a non-finite loss "
                f"or gradient norm (train.max_bad_steps={self.cfg.train.max_bad_steps}); {last}. Lower optim.lr, "
                f"check the data around these steps, or resume from an earlier checkpoint.")

    # --- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean next-token loss over a fixed set of held-out sequences (the same every time, any world size)."""
        cfg = self.cfg
        self.model.eval()
        total, n = 0.0, 0
        # The eval set is the first `eval_batches` global batches of the held-out split, whatever the
        # number of ranks: each rank takes its slice of each, in micro-batches, so val loss is comparable.
        mb = cfg.train.micro_batch_size
        for inputs, targets in eval_batches(self.val_dataset, cfg.train.global_batch_size, cfg.train.eval_batches,
                                            dp_rank=self.dp_rank, dp_world=self.dp_world):
            if self.stages is not None:  # the last stage has the losses; the others add nothing
                lm, _, count = self._run_pipeline(inputs, targets, train=False)
                if any(s.is_last for s in self.stages):
                    total, n = total + lm.item(), n + count
                continue
            for i in range(0, inputs.shape[0], mb):
                lm, _ = self._loss(inputs[i:i + mb], targets[i:i + mb])
                total += lm.item()
                n += 1
        self.model.reset_max_logits()
        self.model.train()
        total, n = all_reduce_sum(torch.tensor([total, float(n)], device=self.device, dtype=torch.float64)).tolist()
        loss = total / max(n, 1.0)
        return {"step": self.step, "split": "val", "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    # --- checkpointing --------------------------------------------------------------------------
    def save(self, wait: bool = False) -> Path | None:
        """Checkpoint the current step (in the background with `checkpoint.async_save`, unless `wait`)."""
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "nonfinite_steps": self.nonfinite_steps,
                 "spikes": self.spikes.state_dict(), "data": self.train_loader.state_dict(),
                 "tokenizer": self.tokenizer.fingerprint}
        path = self.checkpointer.save(self.step, self.model, self.optimizer, state, to_yaml(self.cfg))
        if wait:
            path = self.checkpointer.wait() or path
        if path is not None:
            self.metrics.event(f"saved checkpoint {path}")
        return path

    # --- signals ----------------------------------------------------------------------------------
    def _stopped_by(self, trained: bool = True) -> str | None:
        """The stop signal's name if any rank got one (a scheduler may signal only some of them), else None.
        After a step the flag came with the step's statistics (no extra synchronisation); before the first
        step it is asked for here."""
        if trained:
            seen = bool(self._stop_seen)
        else:
            flag = torch.tensor([0.0 if stop_signals.received is None else 1.0], device=self.device)
            seen = all_reduce_max(flag, self._stats_group).item() > 0
        if not seen:
            return None
        name = stop_signals.name or "another rank"
        self.metrics.event(f"{name} received: " + (f"saving step {self.step} and exiting" if trained else
                                                    "exiting before the first step"))
        return name

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t, ck = cfg.train, cfg.checkpoint
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
        m = self.model
        self.metrics.event(
            f"chogori: {m.num_params() / 1e6:.2f}M parameters, {cfg.model.num_hidden_layers} layers "
            f"({cfg.model.num_moe_layers} MoE x {cfg.model.n_routed_experts} experts), device {self.device}, "
            f"dtype {self.compute_dtype or torch.float32}, {t.global_batch_size} x {cfg.data.seq_len} tokens/step "
            f"({self.accum_steps} micro-batch(es)), run dir {self.out_dir}")
        self.metrics.event(describe_groups(split_params(m)))
        for note in self._notes:
            self.metrics.event(note)
        if self.resumed_from is not None:
            self.metrics.event(f"resumed from {self.resumed_from} at step {self.step}")

        bar = _progress(t.steps, self.step, enabled=cfg.logging.progress and self.rank == 0)
        # Log lines go through the bar (cleared, printed, redrawn), so the two never share a terminal line.
        plain_printer = self.metrics.printer
        if bar is not None:
            self.metrics.printer = bar.write
        profiler = StepProfiler(t.profile, self.out_dir, self.rank, self.device)
        last: dict[str, Any] = {}
        first_loss = None
        first_step = self.step + 1
        stopped_by = self._stopped_by(trained=False) if self.step < t.steps else None  # a signal during start-up
        try:
            while self.step < t.steps and stopped_by is None:
                profiler.before_step(self.step + 1)
                rec = self.train_step()
                profiler.after_step(self.step)
                if first_loss is None and cfg.train.compile:  # once: the first step includes compiling the blocks
                    self.metrics.event(f"torch.compile: step {rec['step']} took {rec['step_time_s']:.1f} s "
                                       "(compiling the transformer blocks)")
                first_loss = rec["loss"] if first_loss is None else first_loss
                last = rec
                echo = self.step % t.log_interval == 0 or self.step == t.steps
                self.metrics.log(rec, echo=echo)
                if bar is not None:
                    bar.update(1)
                if t.eval_interval and self.step % t.eval_interval == 0:
                    self.metrics.log(self.evaluate())
                published = self.checkpointer.poll()
                if published is not None:
                    self.metrics.event(f"saved checkpoint {published}")
                stopped_by = self._stopped_by()
                if stopped_by is None and ck.interval and self.step % ck.interval == 0 and self.step < t.steps:
                    self.save()
        finally:
            stop_signals.restore()
            profiler.close()  # a run stopped inside the traced steps still writes what it recorded
        if profiler.written:
            self.metrics.event(f"profile: steps {profiler.first}-{profiler.last} traced into {profiler.dir} "
                               "(docs/profiling.md)")
        if bar is not None:
            bar.close()
            self.metrics.printer = plain_printer
        if (ck.save_final or stopped_by) and last:
            self.save(wait=True)
        else:
            self.checkpointer.wait()
        if self._sample_log is not None:
            self._sample_log.close()
        self.metrics.close()
        return {"first_loss": first_loss, "first_step": first_step, "stopped_by": stopped_by, **last}

    def close(self) -> None:
        """Leave the process group (torchrun ranks; a no-op in one process) and the signal handlers."""
        stop_signals.restore()
        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self._owns_group = False


def _progress(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar on an interactive terminal only; log lines stay readable in files and CI."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)
