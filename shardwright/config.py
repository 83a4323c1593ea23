"""Pydantic models shared by every part of Shardwright.

Every model here is strict: unknown fields are errors, and validation messages name the
field, the offending value and the fix. Nothing in this module imports torch, Ray, gRPC or Redis,
so it is cheap to import from the CLI and the scheduler.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Architecture = Literal["llama", "gpt2"]
DType = Literal["float32", "float64", "bfloat16", "float16"]
# Weight-only quantization applied while loading (models.quant): none, int8 per row, rtn4 in groups.
Quantization = Literal["none", "int8", "rtn4"]
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's CPU int4 kernel takes


# The file that makes a directory a training checkpoint (training/checkpoint_root.py writes it last).
CHECKPOINT_MANIFEST = "manifest.json"
# A training checkpoint's step folder, and the Hugging Face export a deployment serves it from
# (beside it: `step-00000020.hf`; training/reshard.py `served_model_dir`).
CHECKPOINT_STEP_PATTERN = r"step-\d{8}"
SERVED_EXPORT_SUFFIX = ".hf"

class StrictModel(BaseModel):
    """Base for every config: unknown fields rejected, instances immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RopeScaling(StrictModel):
    """RoPE frequency scaling, as Hugging Face's `rope_scaling` / `rope_parameters` describe it."""

    rope_type: Literal["default", "linear", "llama3"] = Field(
        "default", description="'linear' divides positions by factor; 'llama3' rescales low frequencies."
    )
    factor: float = Field(1.0, gt=0, description="Scaling factor (context extension ratio).")
    low_freq_factor: float = Field(1.0, gt=0, description="llama3 only: wavelength band start.")
    high_freq_factor: float = Field(4.0, gt=0, description="llama3 only: wavelength band end.")
    original_max_position_embeddings: int = Field(
        8192, gt=0, description="llama3 only: context length the model was trained at."
    )


class ModelSpec(StrictModel):
    """The shape of a decoder-only transformer, independent of how it is sharded."""

    architecture: Architecture = Field(
        description="Decoder family: 'llama' (also Qwen2, Qwen3, Mistral, Phi-3 and Gemma 2, told apart by "
                    "the fields qkv_bias, qk_norm, sliding_window and the Gemma 2 ones) or 'gpt2'.")
    vocab_size: int = Field(gt=0, description="Number of token ids.")
    hidden_size: int = Field(gt=0, description="Model width d_model.")
    intermediate_size: int = Field(gt=0, description="Width of the MLP's hidden layer.")
    num_layers: int = Field(gt=0, description="Number of decoder blocks.")
    num_heads: int = Field(gt=0, description="Number of query heads.")
    num_kv_heads: int = Field(gt=0, description="Number of key/value heads (GQA when < num_heads).")
    head_dim: int = Field(gt=0, description="Width of one attention head.")
    max_position_embeddings: int = Field(gt=0, description="Longest supported sequence in tokens.")
    norm_eps: float = Field(gt=0, description="Epsilon of RMSNorm / LayerNorm.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency (llama only).")
    rope_scaling: RopeScaling | None = Field(None, description="RoPE scaling (llama only).")
    tie_word_embeddings: bool = Field(False, description="LM head shares the embedding matrix.")
    attention_bias: bool = Field(False, description="q/k/v/o projections carry a bias.")
    mlp_bias: bool = Field(False, description="MLP projections carry a bias.")
    qkv_bias: bool = Field(False, description="q/k/v projections carry a bias, o does not (Qwen2; llama only).")
    qk_norm: bool = Field(False, description="Per-head RMSNorm of q and k before RoPE (Qwen3; llama only).")
    sliding_window: int | None = Field(
        None, gt=0, description="Attention sees only the last `sliding_window` keys (itself included) "
                                "(Mistral; llama only).")
    sliding_window_layers: list[int] | None = Field(
        None, description="Layers whose attention is windowed; None = every layer when sliding_window is set.")
    norm_unit_offset: bool = Field(
        False, description="RMSNorm scales by (1 + weight), computed in float32 before the cast (Gemma 2; llama only).")
    post_norms: bool = Field(
        False, description="Each sublayer's output is RMS-normalised before its residual add: a norm after attention "
                           "and one after the MLP besides the two before them (Gemma 2; llama only).")
    embedding_multiplier: float | None = Field(
        None, gt=0, description="Token embeddings are multiplied by this, cast to the model dtype "
                                "(Gemma 2: sqrt(hidden_size)); None = 1.")
    query_pre_attn_scalar: float | None = Field(
        None, gt=0, description="Attention scores are scaled by query_pre_attn_scalar**-0.5 instead of "
                                "head_dim**-0.5 (Gemma 2).")
    attn_logit_softcap: float | None = Field(
        None, gt=0, description="Attention scores s become c*tanh(s/c) before the mask and softmax (Gemma 2).")
    final_logit_softcap: float | None = Field(
        None, gt=0, description="Output logits z become c*tanh(z/c) (Gemma 2).")
    num_experts: int = Field(
        0, ge=0, description="Routed experts per mixture-of-experts layer (Mixtral, Qwen2-MoE); 0 = a dense MLP "
                             "in every layer (llama only).")
    experts_per_token: int = Field(0, ge=0, description="Experts each token is routed to (top-k); MoE only.")
    moe_intermediate_size: int | None = Field(
        None, gt=0, description="Width of one expert's MLP; None = intermediate_size (Mixtral).")
    moe_renormalize: bool = Field(
        True, description="The top-k routing weights are renormalised to sum to 1 (Mixtral; Qwen2-MoE's "
                          "norm_topk_prob).")
    shared_expert_intermediate_size: int = Field(
        0, ge=0, description="Width of the always-on shared expert, gated by sigmoid(x w) (Qwen2-MoE); 0 = none.")
    dense_layers: list[int] | None = Field(
        None, description="Layers of an MoE model that keep a dense MLP of intermediate_size (Qwen2-MoE's "
                          "mlp_only_layers and decoder_sparse_step); None = every layer is MoE.")
    router_aux_loss_coef: float = Field(
        0.0, ge=0, allow_inf_nan=False,
        description="Weight of the router's load-balancing loss in the training loss (transformers' "
                    "router_aux_loss_coef when config.json sets output_router_logits, else 0 = none); MoE only.")
    activation: Literal["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"] = Field(
        "silu", description="MLP activation (SwiGLU gate for llama, plain for gpt2)."
    )
    dtype: DType = Field("float32", description="Parameter and activation dtype.")
    bos_token_id: int | None = Field(None, description="Beginning-of-sequence id, if any.")
    eos_token_id: list[int] = Field(default_factory=list, description="End-of-sequence ids.")
    checkpoint_path: Path | None = Field(None, description="Hugging Face directory with the weights.")

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelSpec:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} "
                "(grouped-query attention shares each kv head among a whole number of query heads)"
            )
        if self.architecture == "gpt2" and self.num_heads * self.head_dim != self.hidden_size:
            raise ValueError(
                f"gpt2 needs num_heads*head_dim == hidden_size, got {self.num_heads}*{self.head_dim} "
                f"!= {self.hidden_size}"
            )
        llama_only = ("qkv_bias", "qk_norm", "sliding_window", "norm_unit_offset", "post_norms",
                      "embedding_multiplier", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
                      "num_experts")
        used = [name for name in llama_only if getattr(self, name)]
        if self.architecture != "llama" and used:
            raise ValueError(f"{', '.join(used)} need architecture='llama', got {self.architecture!r}")
        self._check_experts()
        if self.sliding_window_layers is not None:
            if self.sliding_window is None:
                raise ValueError("sliding_window_layers is set but sliding_window is None: give the window size")
            bad = [i for i in self.sliding_window_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"sliding_window_layers {bad} out of range for num_layers={self.num_layers}")
        return self

    def _check_experts(self) -> None:
        if not self.num_experts:
            if self.experts_per_token or self.shared_expert_intermediate_size or self.dense_layers is not None \
                    or self.moe_intermediate_size is not None or self.router_aux_loss_coef:
                raise ValueError("experts_per_token, moe_intermediate_size, shared_expert_intermediate_size, "
                                 "dense_layers and router_aux_loss_coef describe mixture-of-experts layers: set "
                                 "num_experts too")
            return
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be in 1..num_experts="
                             f"{self.num_experts}")
        if self.mlp_bias:
            raise ValueError("mlp_bias with num_experts > 0 is not supported: expert MLPs carry no bias")
        bad = [i for i in self.dense_layers or [] if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} out of range for num_layers={self.num_layers}")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether (global) layer `layer` routes tokens to experts instead of one dense MLP."""
        return self.num_experts > 0 and layer not in (self.dense_layers or [])

    @property
    def expert_size(self) -> int:
        """Width of one routed expert's MLP."""
        return self.moe_intermediate_size or self.intermediate_size

    def window_of(self, layer: int) -> int | None:
        """The attention window of (global) layer `layer`, None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is not None and layer not in self.sliding_window_layers:
            return None
        return self.sliding_window

    @property
    def num_parameters(self) -> int:
        """Parameter count of the unsharded model (tied embeddings counted once)."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        if self.architecture == "llama":
            block = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
            block += (q + 2 * kv) * (self.qkv_bias or self.attention_bias) + h * self.attention_bias
            block += 2 * self.head_dim * self.qk_norm + (2 * f + h) * self.mlp_bias + 2 * h * self.post_norms
            extra = h
            if self.num_experts:  # MoE layers: router, experts and shared expert (+ its gate) for the MLP
                moe = self.num_experts * (h + 3 * h * self.expert_size)
                moe += 3 * h * self.shared_expert_intermediate_size + h * bool(self.shared_expert_intermediate_size)
                moe_layers = sum(self.is_moe_layer(i) for i in range(self.num_layers))
                extra += moe_layers * (moe - 3 * h * f)
        else:
            block = h * (q + 2 * kv) + (q + 2 * kv) + q * h + h + 2 * h * f + f + h + 4 * h
            extra = self.max_position_embeddings * h + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + head + extra + self.num_layers * block

    @classmethod
    def from_hf_dir(cls, path: str | Path, dtype: DType | None = None) -> ModelSpec:
        """Read `config.json` of a Hugging Face checkpoint directory."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{config_file} not found: --model must be a Hugging Face directory with config.json"
            )
        hf = json.loads(config_file.read_text())
        return cls.from_hf_config(hf, checkpoint_path=path, dtype=dtype)

    @classmethod
    def from_hf_config(
        cls, hf: dict[str, Any], checkpoint_path: Path | None = None, dtype: DType | None = None
    ) -> ModelSpec:
        """Translate a Hugging Face `config.json` dict (Llama or GPT-2) into a ModelSpec."""
        from shardwright.hf_config import spec_fields_from_hf

        fields = spec_fields_from_hf(hf)
        if dtype is not None:
            fields["dtype"] = dtype
        return cls(checkpoint_path=checkpoint_path, **fields)


class ParallelLayout(StrictModel):
    """How one job's workers split a model: world size is dp * pp * cp * ep * tp.

    Ranks are laid out as a dp x pp x cp x ep x tp mesh with tp varying fastest, so a TP group is a
    run of consecutive ranks (and of consecutive GPUs on one node) and an EP group the next stride.
    ep shards the routed experts of every mixture-of-experts layer: ep rank o holds the contiguous
    experts [o * num_experts / ep, (o + 1) * num_experts / ep), each split over tp like a dense MLP;
    everything outside the experts is replicated over ep (see models/moe.py).
    """

    tp: int = Field(1, ge=1, description="Tensor-parallel degree (heads and MLP columns split).")
    pp: int = Field(1, ge=1, description="Pipeline-parallel degree (layers split into stages).")
    cp: int = Field(1, ge=1, description="Context-parallel degree (sequence split across ranks).")
    dp: int = Field(1, ge=1, description="Data-parallel degree (replicas of the model).")
    ep: int = Field(1, ge=1, description="Expert-parallel degree (the experts of each mixture-of-experts layer "
                                         "split across ranks, routed tokens exchanged by all-to-all); MoE only.")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp * self.ep

    def validate_for(self, model: ModelSpec) -> ParallelLayout:
        """Check that this layout can shard `model`; raise ValueError naming field, value and fix."""
        problems = list(self._problems_for(model))
        if problems:
            raise ValueError("invalid parallel layout: " + "; ".join(problems))
        return self

    def _expert_problems(self, model: ModelSpec):
        if self.ep == 1:
            return
        if not model.num_experts:
            yield f"ep={self.ep} needs a mixture-of-experts model (num_experts > 0); this model is dense: use ep=1"
        elif model.num_experts % self.ep:
            yield (f"ep={self.ep} does not divide num_experts={model.num_experts}; "
                   f"choose ep in {_divisors(model.num_experts)}")
        if self.cp > 1:
            yield f"ep={self.ep} with cp={self.cp} is not supported; use cp=1 with expert parallelism"

    def _problems_for(self, model: ModelSpec):
        yield from self._expert_problems(model)
        tp = self.tp
        if model.num_heads % tp:
            yield (
                f"tp={tp} does not divide num_heads={model.num_heads}; "
                f"choose tp in {_divisors(model.num_heads)}"
            )
        kv = model.num_kv_heads
        if kv % tp and tp % kv:
            yield (
                f"tp={tp} and num_kv_heads={kv}: one must divide the other (kv heads are split "
                f"when tp divides them, replicated when they divide tp); choose tp in "
                f"{sorted(set(_divisors(kv)) | {m for m in _divisors(model.num_heads) if m % kv == 0})}"
            )
        if model.architecture == "llama" and model.intermediate_size % tp:
            yield (
                f"tp={tp} does not divide intermediate_size={model.intermediate_size}; "
                f"choose tp in {_divisors(model.intermediate_size, limit=64)}"
            )
        for name, width in (("moe_intermediate_size", model.expert_size if model.num_experts else 0),
                            ("shared_expert_intermediate_size", model.shared_expert_intermediate_size)):
            if width % tp:
                yield f"tp={tp} does not divide {name}={width}; choose tp in {_divisors(width, limit=64)}"
        if model.architecture == "gpt2" and model.intermediate_size % tp:
            yield f"tp={tp} does not divide intermediate_size={model.intermediate_size}"
        if self.pp > model.num_layers:
            yield (
                f"pp={self.pp} exceeds num_layers={model.num_layers}; every pipeline stage needs at "
                f"least one layer, choose pp <= {model.num_layers}"
            )


def _divisors(n: int, limit: int | None = None) -> list[int]:
    found = [d for d in range(1, n + 1) if n % d == 0]
    return [d for d in found if limit is None or d <= limit]


class Settings(StrictModel):
    """Process-wide settings, read from the environment in this one place (SHARDWRIGHT_*)."""

    ray_address: str | None = Field(
        None, description="Ray cluster to join (SHARDWRIGHT_RAY_ADDRESS, else RAY_ADDRESS); "
                          "None starts a local cluster when none is reachable.")
    state_dir: Path = Field(Path.home() / ".shardwright",
                            description="Where embedded Redis and checkpoints live (SHARDWRIGHT_STATE_DIR).")
    redis_url: str | None = Field(None, description="External Redis (SHARDWRIGHT_REDIS_URL); None = embedded.")
    tokens_file: Path | None = Field(None, description="Bearer tokens -> tenants (SHARDWRIGHT_TOKENS_FILE).")
    tls_cert: Path | None = Field(None, description="Server certificate, PEM (SHARDWRIGHT_TLS_CERT).")
    tls_key: Path | None = Field(None, description="Server private key, PEM (SHARDWRIGHT_TLS_KEY).")
    tls_client_ca: Path | None = Field(None, description="CA for client certificates: mutual TLS "
                                                          "(SHARDWRIGHT_TLS_CLIENT_CA).")
    token: str | None = Field(None, description="The client's bearer token (SHARDWRIGHT_TOKEN).")
    ray_auth_mode: Literal["token", "disabled"] = Field(
        "token", description="Ray's token authentication (RAY_AUTH_MODE) of the local Ray head `serve` "
                             "starts and of its drivers; 'disabled' leaves that head open to anyone who "
                             "reaches its ports.")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        import os

        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        address = env.get("SHARDWRIGHT_RAY_ADDRESS") or env.get("RAY_ADDRESS")
        if address:
            values["ray_address"] = address
        if env.get("SHARDWRIGHT_STATE_DIR"):
            values["state_dir"] = Path(env["SHARDWRIGHT_STATE_DIR"])
        if env.get("SHARDWRIGHT_REDIS_URL"):
            values["redis_url"] = env["SHARDWRIGHT_REDIS_URL"]
        if env.get("RAY_AUTH_MODE"):
            values["ray_auth_mode"] = env["RAY_AUTH_MODE"].lower()
            if values["ray_auth_mode"] not in ("token", "disabled"):
                raise ValueError(f"RAY_AUTH_MODE={env['RAY_AUTH_MODE']!r}: Ray knows 'token' and 'disabled'; unset "
                                 "it for token authentication")
        for field, var in (("tokens_file", "SHARDWRIGHT_TOKENS_FILE"), ("tls_cert", "SHARDWRIGHT_TLS_CERT"),
                           ("tls_key", "SHARDWRIGHT_TLS_KEY"), ("tls_client_ca", "SHARDWRIGHT_TLS_CLIENT_CA"),
                           ("token", "SHARDWRIGHT_TOKEN")):
            if env.get(var):
                values[field] = env[var]
        return cls(**values)


PriorityClass = Literal["serving", "high", "batch", "low"]
# The one order of the priority classes, lowest first (the scheduler's PriorityClass ranks them so).
PRIORITY_ORDER: tuple[PriorityClass, ...] = ("low", "batch", "serving", "high")
JOB_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class JobState(str, Enum):
    """The one vocabulary of a job's state, from submission to its end: the scheduler stores it
    (its state machine, `scheduler.jobs.ALLOWED`, says which moves are allowed) and the job's
    controller reports in it (PLACED while its gang starts, then RUNNING, then how it ended:
    SUCCEEDED, FAILED, PREEMPTED when it stopped with a checkpoint, CANCELLED without one)."""

    SUBMITTED = "submitted"
    QUEUED = "queued"
    PLACED = "placed"
    RUNNING = "running"
    PREEMPTING = "preempting"
    PREEMPTED = "preempted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # the value, as a StrEnum prints (Python 3.11+; this one runs on 3.10)
        return self.value


# A memory budget: bytes, or 'device-free' (the GPU's free memory when the worker starts).
Budget = Annotated[int, Field(gt=0)] | Literal["device-free"]


class PoolOptions(StrictModel):
    """A worker's memory budget and peer memory pooling (see DESIGN.md, "Peer memory pooling")."""

    budget_bytes: Budget | None = Field(
        None, description="Device memory each compute worker may keep resident (weights, KV cache, "
                                "activations, fetched layers); 'device-free': the GPU's free memory when the "
                                "worker starts (CUDA only); None: no budget, nothing pooled.")
    peers: int = Field(0, ge=0, description="Memory peers: extra workers (one GPU each) that lend their budget.")
    peer_budget_bytes: Budget | None = Field(
        None, description="Budget of each peer (default budget_bytes); 'device-free' as above.")
    host_bytes: int = Field(0, ge=0, description="Host memory each worker may use for its pooled layers.")
    prefetch_depth: int = Field(2, ge=0, description="Pooled layers fetched ahead of the one running.")
    pooled_fraction: float | None = Field(
        None, ge=0, le=1, description="Pool this share of every rank's layers whatever the budget (benchmarks).")

    @model_validator(mode="after")
    def _needs_budget(self) -> PoolOptions:
        if self.budget_bytes is None and (self.peers or self.pooled_fraction is not None or self.host_bytes):
            raise ValueError("pool: peers, host_bytes and pooled_fraction need budget_bytes (the budget they relieve)")
        return self


class SpeculativeOptions(StrictModel):
    """Speculative decoding of one deployment (serving/speculative.py): drafts verified by the
    target in one step; greedy output is exactly plain decoding's, sampling keeps the target's
    distribution (unless rollback_threshold relaxes it, as BiLD does)."""

    method: Literal["none", "ngram", "draft"] = Field(
        "none", description="none: plain decoding; ngram: prompt lookup in the sequence's own tokens; "
                            "draft: a small draft model (BiLD) in the same gang's workers.")
    num_draft_tokens: int = Field(4, ge=1, le=16, description="Most draft tokens verified per step (k).")
    ngram_max: int = Field(3, ge=1, description="ngram: longest suffix looked up (tried first).")
    ngram_min: int = Field(1, ge=1, description="ngram: shortest suffix looked up.")
    draft_model: Path | None = Field(
        None, description="draft: Hugging Face directory of the draft model (same vocabulary as the target).")
    fallback_threshold: float = Field(
        0.0, ge=0, le=1, description="draft (BiLD fallback): stop drafting once the draft's most likely token "
                                     "has a probability below this; 0 always drafts k tokens.")
    rollback_threshold: float | None = Field(
        None, gt=0, description="BiLD rollback: keep a draft while the target's cross-entropy at it is at "
                                "most this (nats); outputs then differ from plain decoding. None: exact.")

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeOptions:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"speculative: ngram_min={self.ngram_min} > ngram_max={self.ngram_max}; "
                             "choose ngram_min <= ngram_max")
        if self.method == "draft" and self.draft_model is None:
            raise ValueError("speculative: method=draft needs draft_model (a Hugging Face directory)")
        if self.method != "draft" and self.draft_model is not None:
            raise ValueError(f"speculative: draft_model is only used with method=draft, not {self.method}")
        return self


class EngineOptions(StrictModel):
    """Serving options of one inference deployment, as a job file gives them; the one definition of
    these fields (actors.engine.EngineConfig extends it with the model, layout and runtime settings)."""

    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    num_blocks: int = Field(1024, ge=1, description="KV-cache blocks per worker.")
    max_running: int = Field(64, ge=1, description="Most sequences in the running batch.")
    max_tokens_per_step: int = Field(512, ge=1, description="Token budget of one step.")
    max_prefill_tokens_per_step: int | None = Field(
        1024, ge=1, description="Most prompt tokens one step prefills (chunked prefill), within "
                               "max_tokens_per_step beside the decode tokens; smaller steps give a burst's "
                               "first tokens sooner (null: the whole step budget).")
    shortest_prompt_first: bool = Field(True, description="Admit waiting requests shortest prompt first "
                                                          "(false: arrival order); see max_wait_steps.")
    max_wait_steps: int = Field(64, ge=0, description="A request waiting this many steps is admitted in "
                                                      "arrival order ahead of younger ones (no starvation "
                                                      "under shortest_prompt_first).")
    prefix_caching: bool = Field(True, description="Share the KV blocks of identical prompt prefixes between "
                                                   "requests (hash of each full block's tokens and its "
                                                   "predecessors'; LRU eviction); false computes every "
                                                   "prompt in full.")
    pool: PoolOptions = Field(default_factory=PoolOptions, description="Memory budget and peer pooling.")
    kv_spill_blocks: int = Field(0, ge=0, description="KV blocks of paused sequences each worker may keep in "
                                                      "host memory (serving/kv_spill.py): when a waiting request "
                                                      "does not fit, the least recently stepped paused sequences' "
                                                      "blocks are copied there and freed, and copied back on "
                                                      "resume; 0: no spilling (needs cp=1).")
    max_unread_tokens: int | None = Field(None, ge=1, description="Back-pressure: a request whose caller leaves "
                                                                  "this many tokens unread is paused (not "
                                                                  "scheduled; its KV may spill) until the caller "
                                                                  "reads; None: never paused. result() reads all.")
    quant: Quantization = Field("none", description="Weight-only quantization of the linears while loading: "
                                                   "none, int8 (per output row) or rtn4 (4-bit groups of "
                                                   "group_size input features). A GPTQ-format checkpoint "
                                                   "(shardwright quantize) loads quantized with none.")
    group_size: int = Field(128, description="Input features per rtn4 group; one of 32, 64, 128, 256.")
    speculative: SpeculativeOptions = Field(default_factory=SpeculativeOptions,
                                            description="Speculative decoding (off by default).")

    @model_validator(mode="after")
    def _group_size(self) -> EngineOptions:
        check_group_size(self.quant, self.group_size)
        return self


def check_group_size(quant: str, group_size: int) -> None:
    if quant == "rtn4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported for rtn4; choose one of {INT4_GROUP_SIZES}")


class InferenceDeployment(StrictModel):
    """A model served by an InferenceEngine on a gang of layout.world_size GPUs."""

    kind: Literal["inference"] = Field("inference", description="Job kind discriminator.")
    name: str = Field(pattern=JOB_NAME_PATTERN, description="DNS-style name, unique per tenant.")
    model: Path = Field(description="Hugging Face directory (config.json + safetensors) on every node, or a "
                                    "training checkpoint (a step-N folder, or a run's checkpoint folder: its "
                                    "newest complete checkpoint), served from its export written beside it "
                                    "(step-N.hf) on first start.")
    layout: ParallelLayout = Field(default_factory=ParallelLayout,
                                   description="tp, pp, cp and ep (dp = 1); cp shards the KV cache, ep the experts.")
    tenant: str = Field("default", min_length=1, description="Owner; set by the server from the token.")
    priority: PriorityClass = Field("serving", description="Serving is never preempted by training.")
    dtype: DType | None = Field(None, description="Override the checkpoint's dtype.")
    engine: EngineOptions = Field(default_factory=EngineOptions, description="Serving limits.")

    @model_validator(mode="after")
    def _serving_layout(self) -> InferenceDeployment:
        if self.layout.dp != 1:
            raise ValueError(f"layout: inference deployments use tp, pp and cp; got dp={self.layout.dp} "
                             "(deploy several copies for replicas)")
        return self


class ModelSource(StrictModel):
    """Where a training job's initial weights come from: a HF directory or a random preset."""

    path: Path | None = Field(None, description="Hugging Face directory to start from.")
    preset: str | None = Field(None, description="Random initialisation of a named shape (init-model presets).")
    seed: int = Field(0, description="Seed of the random initialisation.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.path is None) == (self.preset is None):
            raise ValueError("model: give exactly one of path (a Hugging Face directory) or preset")
        return self


Schedule = Literal["gpipe", "1f1b"]
Precision = Literal["float32", "bfloat16"]


class DataConfig(StrictModel):
    """Where the corpus is and how it is cut into batches (training.data reads it)."""

    path: Path = Field(description="A .txt or .jsonl file, or a directory of them.")
    seq_len: int = Field(gt=0, le=1 << 20, description="Tokens per training sequence.")
    global_batch_size: int = Field(gt=0, le=1 << 20, description="Sequences per optimizer step, over all DP ranks.")
    seed: int = Field(0, ge=0, lt=1 << 63, description="Seed of the visiting order.")


class OptimConfig(StrictModel):
    """AdamW hyper-parameters, the LR schedule and clipping (training.optim applies them)."""

    lr: float = Field(3e-4, gt=0, allow_inf_nan=False, description="Peak learning rate (after warm-up).")
    min_lr: float = Field(0.0, ge=0, allow_inf_nan=False, description="Learning rate at the end of the cosine decay.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up from lr/warmup_steps to lr.")
    decay_steps: int = Field(1000, ge=1, description="Step at which the cosine reaches min_lr.")
    weight_decay: float = Field(0.1, ge=0, allow_inf_nan=False, description="Decoupled weight decay of matrices.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW first-moment decay.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW second-moment decay.")
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False, description="AdamW denominator epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False,
                                       description="Clip the global grad norm to this; None: no clipping.")

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} exceeds lr={self.lr}; the cosine decays from lr to min_lr")
        if self.warmup_steps > self.decay_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds decay_steps={self.decay_steps}")
        return self


class TrainConfig(StrictModel):
    """Run settings of a training job (the job file's `train:` section)."""

    data: DataConfig = Field(description="Corpus, sequence length, global batch, data seed.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="AdamW, LR schedule, clipping.")
    steps: int = Field(100, gt=0, le=10**9, description="Optimizer steps of the run.")
    num_micro_batches: int = Field(4, gt=0, le=1 << 16, description="Micro-batches per step per DP rank (m).")
    schedule: Schedule = Field("1f1b", description="Pipeline schedule: '1f1b' or 'gpipe'.")
    precision: Precision = Field("float32", description="'bfloat16' runs forward under bf16 autocast.")
    checkpoint_every_steps: int | None = Field(None, gt=0, description="Save every N steps (controller).")
    keep_checkpoints: int = Field(3, ge=1, le=10_000, description="Complete checkpoints kept in the job's "
                                                                 "checkpoint directory; older ones are deleted.")
    peak_flops_per_s: float = Field(150e9, gt=0, allow_inf_nan=False,
                                    description="Peak FLOP/s of the whole gang (for MFU).")
    router_aux_loss_coef: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="Mixture-of-experts models: weight of the router's load-balancing loss added to the training "
                    "loss (transformers' load_balancing_loss_func); None = the model's own (its config.json's "
                    "router_aux_loss_coef when output_router_logits is set, else none), 0 = off.")
    offload_optimizer: float = Field(
        0.0, ge=0, le=1, description="Share of the decoder blocks whose AdamW state lives in host memory and is "
                                     "updated on the CPU, overlapped with the device update of the rest (0 = off).")

    def check_layout(self, layout: ParallelLayout) -> None:
        """ValueError unless every DP rank's micro-batches split the global batch evenly."""
        per_step = layout.dp * self.num_micro_batches
        if self.data.global_batch_size % per_step:
            raise ValueError(f"train.data.global_batch_size={self.data.global_batch_size} must be divisible by "
                             f"layout.dp * train.num_micro_batches = {layout.dp} * {self.num_micro_batches} = "
                             f"{per_step}")


class TrainingJob(StrictModel):
    """A training run on a gang of tp * pp * cp * dp GPUs (fields of the run under `train`)."""

    kind: Literal["training"] = Field("training", description="Job kind discriminator.")
    name: str = Field(pattern=JOB_NAME_PATTERN, description="DNS-style name, unique per tenant.")
    model: ModelSource = Field(description="Initial weights.")
    layout: ParallelLayout = Field(default_factory=ParallelLayout, description="tp, pp, cp, dp and ep.")
    tenant: str = Field("default", min_length=1, description="Owner; set by the server from the token.")
    priority: PriorityClass = Field("batch", description="Training is preemptible (checkpoint, requeue, resume).")
    deadline_s: float | None = Field(None, gt=0, description="Optional deadline, seconds after submission.")
    train: TrainConfig = Field(description="Run settings (data, steps, batch, optimiser, checkpoints).")

    @model_validator(mode="after")
    def _batch_fits_layout(self) -> TrainingJob:
        self.train.check_layout(self.layout)
        return self


JobSpec = Annotated[TrainingJob | InferenceDeployment, Field(discriminator="kind")]


MAX_SPEC_BYTES = 64 * 1024  # the stored spec (JSON) of one job, defaults filled in


class JobFileError(ValueError):
    """A job file that cannot be accepted; the message is one line naming the field."""


def parse_job(text: str) -> TrainingJob | InferenceDeployment:
    """Validate a job file (YAML or JSON text, untrusted): YAML read by `safe_yaml.load` (no
    anchors or aliases; size, depth and node count bounded), then the JobSpec. Raises JobFileError
    with one line naming the field (and the close match of a misspelt field name)."""
    from pydantic import TypeAdapter, ValidationError

    from shardwright import safe_yaml
    from shardwright.field_errors import describe_validation_error

    data = safe_yaml.load(text)
    if not isinstance(data, dict):
        raise JobFileError(f"kind: a job file is a mapping with 'kind: training' or 'kind: inference', "
                           f"got a {type(data).__name__}")
    try:
        return TypeAdapter(JobSpec).validate_python(data)
    except ValidationError as err:
        raise JobFileError(describe_validation_error(err)) from None


def check_spec_size(spec: BaseModel) -> None:
    """Refuse a spec whose stored form would pass MAX_SPEC_BYTES."""
    size = len(spec.model_dump_json())
    if size > MAX_SPEC_BYTES:
        raise JobFileError(f"job spec: {size} bytes once stored, over the {MAX_SPEC_BYTES // 1024} KiB limit")
