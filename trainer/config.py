"""Configuration of the trainer (one pydantic model per concern, composed into `TrainConfig`).

Defaults are METHOD.md's: DAPO clip-higher (0.2 / 0.28), λ schedule w0 = 0.5 held for 10 steps and
annealed to 0 at step 40, teacher re-synced every 10 optimizer steps, global token-mean
aggregation, lr 1e-5. [choice] The divergence is bounded per token, keeping its gradient's
direction (`kl_bound: token_scale`, cap 1 nat); the paper's literal per-vocabulary-term clip at 0.05
reverses the gradient and is only an opt-in (`kl_bound: per_term_clip`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from trace_rl.trainer.teacher_prompt import DEFAULT_TEACHER_TEMPLATE

METHODS = ("grpo", "self_opd", "trace")


class RouteConfig(BaseModel):
    """Which routed action TRACE applies (METHOD.md "Routing"); either or both may be on."""

    model_config = ConfigDict(extra="forbid")
    key_forward: bool = True  # forward KL on key spans of correct rollouts (strong base)
    error_reverse: bool = False  # reverse KL on error spans of incorrect rollouts (weak base)


class ScheduleConfig(BaseModel):
    """λ_k = w0 for k < hold_steps, linear to 0 at zero_step, 0 afterwards (k = global step)."""

    model_config = ConfigDict(extra="forbid")
    w0: float = 0.5
    hold_steps: int = 10
    zero_step: int = 40

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        if self.w0 <= 0:
            raise ValueError(f"schedule.w0={self.w0} must be > 0 (the paper uses 0.5)")
        if not 0 <= self.hold_steps <= self.zero_step:
            raise ValueError(
                f"need 0 <= schedule.hold_steps ({self.hold_steps}) <= schedule.zero_step "
                f"({self.zero_step}); e.g. hold_steps=10, zero_step=40"
            )
        return self


class SelfOPDConfig(BaseModel):
    """All-token self-distillation baseline (SDPO / SRPO-style)."""

    model_config = ConfigDict(extra="forbid")
    direction: Literal["forward", "reverse", "jsd"] = "reverse"
    # add: TRACE's combination with S_y = every response token and the λ schedule;
    # replace: SDPO-style, the KL alone with weight 1 on every token and no GRPO term.
    mode: Literal["add", "replace"] = "add"
    jsd_beta: float = 0.5

    @field_validator("jsd_beta")
    @classmethod
    def _beta(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"self_opd.jsd_beta={v} must lie in (0, 1); 0.5 is the symmetric JSD")
        return v


# Modules a LoRA adapter may not wrap: the output head (the KL reads the policy's and the
# teacher's head weight, which must stay the shared base) and the embeddings (tied to it).
LORA_FORBIDDEN = ("lm_head", "embed_tokens")


class LoraConfig(BaseModel):
    """LoRA adapters on the policy (`train.lora`; absent = full fine-tuning). The frozen base is
    kept in the compute dtype (`train.dtype`), the adapters in float32 with float32 AdamW moments.
    W = W0 + (alpha / rank) * B @ A on every linear layer named in `target_modules`."""

    model_config = ConfigDict(extra="forbid")
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # every linear of a Qwen3 / Llama block: attention and MLP (LoRA on attention only learns
    # markedly less in RL and SFT reports; MLP-inclusive is the common recommendation)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj",
                                 "gate_proj", "up_proj", "down_proj"]

    @model_validator(mode="after")
    def _check(self) -> LoraConfig:
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank} must be >= 1 (e.g. 16 or 32)")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha} must be > 0 (commonly 2 x rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must lie in [0, 1); 0 keeps the "
                             "policy's log-probs those of the sampling model")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty; name the linear layers to adapt, "
                             "e.g. [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]")
        bad = [m for m in self.target_modules if m.split(".")[-1] in LORA_FORBIDDEN]
        if bad:
            raise ValueError(f"lora.target_modules may not include {bad}: the output head and "
                             "embeddings stay the frozen, shared base (the KL reads the head)")
        return self


class TrainConfig(BaseModel):
    """Everything `train_round` needs; see METHOD.md for the maths behind each field."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["grpo", "self_opd", "trace"] = "trace"
    route: RouteConfig = RouteConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    self_opd: SelfOPDConfig = SelfOPDConfig()
    # LoRA adapters instead of full fine-tuning (null = full weights); see LoraConfig
    lora: LoraConfig | None = None
    # token_scale: D_t * sg(min(1, kl_token_cap / D_t)), direction-preserving (default);
    # none: unbounded; per_term_clip: each vocabulary term clamped at kl_term_clip, the paper's
    # literal reading, GRADIENT-REVERSING (faithfulness experiments only; docs/method.md).
    kl_bound: Literal["token_scale", "none", "per_term_clip"] = "token_scale"
    kl_token_cap: float = 1.0  # nats per token (kl_bound: token_scale)
    kl_term_clip: float = 0.05  # nats per vocabulary term (kl_bound: per_term_clip)
    kl_support: Literal["full", "topk"] = "full"
    topk: int = 20
    span_source: Literal["annotated", "random", "inverted"] = "annotated"
    span_fraction: float = 0.25  # token budget of the random / inverted ablations
    loss_agg: Literal["token_mean", "seq_mean_token_mean"] = "token_mean"
    adv_norm_std: bool = True
    # Responses cut by the token limit (finish_reason "length"): mask = no loss at all (no
    # policy gradient, no distillation, left out of their group's baseline; DAPO's overlong
    # filtering, TRL's mask_truncated_completions); penalize = reward - overlong_penalty, no
    # distillation; none = trained like any wrong answer. Default mask: a cut response says the
    # budget ran out, not that its working was wrong (trainer/batch.py `overlong_rule`).
    overlong: Literal["mask", "penalize", "none"] = "mask"
    overlong_penalty: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    mini_batch_size: int = 256  # rollouts per optimizer step (32 prompts x 8 samples)
    micro_batch_size: int = 4  # rollouts per forward/backward on one process
    logprob_chunk: int = 1024  # tokens per lm_head chunk in the memory-lean path
    teacher_sync_every: int = 10  # 0 = the live weights under no_grad
    teacher_template: str = DEFAULT_TEACHER_TEMPLATE
    old_logprobs: Literal["recompute", "engine"] = "recompute"
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
    save_every: int = 0  # in-round progress save every N optimizer steps; 0 = never
    # torch intra-op threads of an in-process round (CPU); None = torch's default (all cores).
    # Runtime-only: the same update, computed with more or fewer threads.
    num_threads: int | None = None
    # The full trainer state (optimizer, scheduler, step, RNG) goes into a round's checkpoint
    # every `state_every` rounds and at the run's last round; the others hold weights only (what
    # the rollout engine reads). Inside a flow the trainer stays in memory between rounds; a cold
    # start from a weights-only checkpoint replays the rounds since the last full state.
    state_every: int = 5
    # Disk: after each round, checkpoints are pruned to what a resume needs (the latest, and
    # every one back to the latest full trainer state, teacher copies included: a cold start
    # replays from there) plus the last `keep_checkpoints` (weights; older trainer states and
    # teacher copies go). null keeps everything (stages/prune.py).
    keep_checkpoints: int | None = 2
    persistent: bool = True  # keep the trainer in memory between a flow's rounds
    # Round 0 starts a fresh optimizer at global step 0 (λ at its schedule's start) whatever
    # model.path holds. true: continue the trainer state saved in model.path (another run's final
    # checkpoint): its AdamW moments, scheduler position, global step and teacher snapshot, with
    # this config's lr, betas and weight decay; the round logs what it restored.
    continue_trainer_state: bool = False
    # Per-step metrics go to these trackers through accelerate (offline by default: wandb runs
    # with WANDB_MODE=offline and mlflow writes a local file store unless the environment says
    # otherwise). `tensorboard: false` is shorthand for dropping tensorboard from the list.
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]
    tensorboard: bool = True
    # Multi-process training: the train stage runs `accelerate launch` with this config file
    # (configs/accelerate/*.yaml) and process count; null / 1 = train in the stage's process.
    accelerate_config: str | None = None
    num_processes: int = 1
    # Deadline of every collective of a multi-process trainer group (its process group and
    # command channel): a hung process fails the round on the others within it, instead of
    # torch's defaults (30 minutes; 2 hours for the group's channel before issue 26). Long enough
    # for the slowest legitimate wait: rank 0 saving or loading a full checkpoint. Runtime-only.
    collective_timeout_s: float = 900.0

    @property
    def trackers(self) -> list[str]:
        """The trackers this run reports to, `tensorboard: false` applied."""
        names: list[str] = list(dict.fromkeys(self.report_to))
        return names if self.tensorboard else [n for n in names if n != "tensorboard"]

    @field_validator("kl_term_clip", mode="before")
    @classmethod
    def _term_clip(cls, v):
        if v is None:
            raise ValueError("kl_term_clip: null no longer turns the bound off; set kl_bound: none "
                             "(kl_term_clip only applies with kl_bound: per_term_clip)")
        return v

    @field_validator("teacher_template")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            v.format(problem="p", context="c")
        except (KeyError, IndexError) as e:
            raise ValueError(
                f"teacher_template may only use the fields {{problem}} and {{context}}; got {e!r}"
            ) from e
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        positive = {
            "mini_batch_size": self.mini_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "logprob_chunk": self.logprob_chunk,
            "topk": self.topk,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if self.micro_batch_size > self.mini_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must not exceed mini_batch_size "
                f"({self.mini_batch_size}); lower micro_batch_size"
            )
        if self.kl_term_clip <= 0 or self.kl_token_cap <= 0:
            raise ValueError(f"kl_term_clip={self.kl_term_clip} and kl_token_cap="
                             f"{self.kl_token_cap} must be > 0 (kl_bound: none turns bounding off)")
        if not 0.0 < self.span_fraction <= 1.0:
            raise ValueError(f"span_fraction={self.span_fraction} must lie in (0, 1]")
        if self.method == "trace" and not (self.route.key_forward or self.route.error_reverse):
            raise ValueError(
                "method=trace needs route.key_forward or route.error_reverse (or both) set to true"
            )
        if self.num_processes < 1:
            raise ValueError(f"num_processes={self.num_processes} must be >= 1 (1 = no accelerate launch)")
        if self.state_every < 1:
            raise ValueError("state_every must be >= 1 (1 = the full trainer state every round)")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints={self.keep_checkpoints}: use >= 1 (the last N "
                             "checkpoints kept besides what a resume needs), or null to keep all")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s={self.collective_timeout_s}: use seconds > 0 "
                             "(how long a trainer process may wait on the others)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads}: use a positive integer, or null for "
                             "torch's default")
        if self.teacher_sync_every < 0 or self.save_every < 0 or self.warmup_steps < 0:
            raise ValueError("teacher_sync_every, save_every and warmup_steps must be >= 0")
        return self

    @model_validator(mode="after")
    def _optimizer_ranges(self) -> TrainConfig:
        # Refused at config load: torch would refuse a negative lr only once round 0 is underway.
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0 (the paper's runs use 1e-6 to 1e-5)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)} must each lie in [0, 1)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be > 0 (null turns clipping off)")
        if self.eps_low <= 0 or self.eps_high <= 0:
            raise ValueError(f"eps_low={self.eps_low} and eps_high={self.eps_high} must be > 0")
        return self
