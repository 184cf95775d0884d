"""Run configuration: nested dataclasses, each field with a one-line help and a sane default.

A config is built from defaults, then a YAML file (``--config``), then the CLI's named flags, then
``section.field=value`` overrides — later wins. Every run writes the resolved result to its
``config.yaml``. Unknown keys and values of the wrong type are user errors (one line, exit 2); so is a key that moved
to another section (`MOVED`), with its new name.

``algo`` holds what every learner reads; each other learner setting lives in the section of the learners that read it:
``pg`` (PPO, GRPO: the clipped surrogate), ``ppo`` (its critic), ``group`` (GRPO, AWM, NFT: group advantages),
``joint`` (I-DRUID's joint loss: PPO, GRPO, SFT) and ``forward`` (AWM, NFT).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from diffrl.errors import UserError
from diffrl.files import atomic_write_text


def option(default: Any, help: str):
    """A dataclass field with its help line (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = option("shapes-mislabeled", "--model: a registered generator name (shapes-mislabeled, the default's base; shapes-tiny, the hard benchmark) or a generator folder")
    device: str = option("cpu", "device for generator, env and learner (cpu, cuda, cuda:1)")
    text_cache: int = option(4096, "text embeddings kept between batches (0: encode every batch afresh, slower)")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "weights and activations of the generator: float32, bfloat16 or float16 (log-probs are float32 always)")
    lora_rank: int = option(-1, "LoRA rank on the backbone (-1: 16 for real models such as SD3, off for shapes-tiny; 0: off)")
    lora_alpha: float = option(0.0, "LoRA alpha, the update scales by alpha/rank (0: alpha = rank)")
    lora_targets: list = option([], "backbone modules LoRA adapts (names or suffixes; []: the attention projections of SD3's and FLUX's blocks)")
    t5: bool = option(False, "SD3: load the T5-XXL text encoder too (off: its tokens are zeros, as diffusers does without it; saves ~9 GiB)")
    adapter: str = option("", "layout adapter checkpoint folder (config.json + model.safetensors) for a real model ('': a fresh one, gates 0)")
    idm: bool = option(False, "give the layout adapter I-DRUID's Instance-Disentangled Module if it has none (fresh: outputs unchanged until it trains); for joint.dis_coef")
    guidance_scale: float = option(1.0, "classifier-free guidance scale s in rollout and training (1: off; SD3 samples at ~5–7); FLUX.1-dev: its distilled guidance value, no CFG pass (3.5 in FluxPipeline)")
    resolution: int = option(0, "FLUX: image side in pixels, a multiple of 16 (0: the VAE's sample_size, 1024 for FLUX.1)")
    gradient_checkpointing: bool = option(False, "recompute the backbone's activations in the backward pass (less memory, slower)")


@dataclass
class EnvConfig:
    name: str = option("layout", "--env: the environment")
    data: str = option("", "--data: a dataset name or a JSONL file of layouts ('': the Shapes world the model was pre-trained in, shapes for other models)")
    levels: list = option([2, 3, 4, 5, 6], "Shapes levels (instance counts) to train on")
    layouts_per_iter: int = option(64, "distinct layouts per iteration")
    group_size: int = option(4, "samples per layout (GRPO groups)")
    share_noise: bool = option(False, "the samples of a layout start from one initial noise x_1 (DanceGRPO's init_same_noise), so they differ only by the window's exploration")
    num_steps: int = option(10, "denoising steps per image")
    shift: float = option(0.0, "flow-time shift of the sampling schedule (0: the model's own: its scheduler's, 3.0 for SD3 folders; 1.0 for shapes-tiny)")


@dataclass
class PolicyConfig:
    noise_level: float = option(0.7, "SDE noise level a in σ_t = a·sqrt(t/(1−t))")
    window: float = option(0.2, "fraction of denoising steps, from the start, that RL explores and trains (I-DRUID: 0.2)")
    window_start: float = option(0.0, "fraction of denoising steps before the RL window opens (0: at the first step, as I-DRUID; 0.4 of 10 steps: the window starts at step 4)")
    train: Literal["all", "adapter"] = option("all", "what RL updates: all (backbone + layout adapter) or adapter (the backbone stays frozen)")


@dataclass
class AlgoConfig:
    name: str = option("nft", "--algo: the learner (nft, DiffusionNFT: the default, the one that learns most on the embedded default; awm; ppo, I-DRUID's actor-critic; grpo; sft)")
    lr: float = option(1e-5, "learning rate of the generator (awm, nft: 1e-4, their own default)")
    epochs: int = option(1, "passes over each iteration's transitions")
    minibatch_size: int = option(64, "samples of one denoising step per gradient step (≥ batch: the whole step)")
    micro_batch: int = option(0, "rows per forward/backward pass of a minibatch, their gradients summed exactly (0: the minibatch split evenly over the --learners; one process: the whole minibatch). The update is the same bit for bit on any number of learners with the same micro_batch")
    kl_coef: float = option(0.01, "weight of KL(π_θ ‖ π_ref) to the initial policy (awm, nft: forward.kl_coef instead)")
    max_grad_norm: float = option(1.0, "gradient-norm clip")
    accumulate: bool = option(True, "one optimizer step per epoch, averaging the gradients of all window steps (Flow-GRPO); awm, nft: off, a step per minibatch")


@dataclass
class PGConfig:
    clip_epsilon: float = option(0.2, "PPO/GRPO: ratio clip ζ of the clipped surrogate")
    log_prob_reduce: Literal["sum", "mean"] = option("sum", "PPO/GRPO: log-prob over latent dims: sum (exact density) or mean (Flow-GRPO)")
    anchor_steps: int = option(0, "PPO/GRPO: post-window steps per epoch held to the reference by the KL term (0: none)")


@dataclass
class PPOConfig:
    critic_lr: float = option(1e-3, "PPO: learning rate of the critic φ")
    critic_coef: float = option(1.0, "PPO: weight of the critic loss (φ(s_t) − r)²")
    normalize_advantage: bool = option(True, "PPO: standardise advantages over each iteration's batch")


@dataclass
class GroupConfig:
    scale: Literal["group", "batch"] = option("group", "GRPO/AWM/NFT: divide r − group mean by the group's std (group) or by the batch's (batch: Dr. GRPO)")


@dataclass
class JointConfig:
    ldm_coef: float = option(0.0, "PPO/GRPO: weight λ of I-DRUID's L_ldm: flow matching on paired renders of each iteration's layouts (0: off; --data shapes)")
    dis_coef: float = option(0.0, "PPO/GRPO/SFT: weight λ_dis of I-DRUID's IDC loss L_dis on each training forward (0: off; needs a generator with IDM: model.idm=true, or one from `diffrl pretrain --idm`)")


@dataclass
class ForwardConfig:
    sampler: Literal["ode", "sde"] = option("ode", "AWM/NFT: how rollouts are drawn: ode (deterministic from x_1, as DiffusionNFT) or sde (policy.noise_level at every step)")
    timesteps: int = option(2, "AWM/NFT: flow times per sample at which the loss is taken, at most env.num_steps with time_sampling=schedule (the papers: every step of the schedule)")
    time_sampling: Literal["schedule", "uniform"] = option("schedule", "AWM/NFT: where those times are drawn: schedule (the sampling schedule's times) or uniform (U(0, 1))")
    crn: bool = option(True, "AWM/NFT: the samples of a group share their (t, ε) draws (common random numbers), so what they have in common cancels under zero-mean advantages")
    kl_coef: float = option(0.0001, "AWM/NFT: weight of ‖v_θ − v_ref‖² to the initial model (DiffusionNFT: 1e-4)")
    awm_power: float = option(0.25, "AWM: p of the weighting w(ℓ, t) = t/p·((ℓ+ε)^p − ε^p) of the matching loss ℓ (Flow-Factory's ghuber: 0.25; 1: w(ℓ) = ℓ, the plain loss)")
    nft_beta: float = option(1.0, "NFT: β of v± = v_old ± β·(v_θ − v_old) (DiffusionNFT: 1.0)")
    adv_clip: float = option(5.0, "NFT: advantages are clipped to ±this before r = A/(2·clip) + 1/2 (DiffusionNFT: 5)")
    old_uprate: float = option(0.001, "NFT: v_old ← η·v_old + (1−η)·v_θ after each iteration, η = min(old_uprate·iteration, old_uphold)")
    old_uphold: float = option(0.5, "NFT: the largest η of that soft update")


@dataclass
class RewardConfig:
    name: str = option("shapes", "--reward: a reward name, or weighted parts such as gdino=1,cycle=0.5")
    model: str = option("", "--reward-model: gdino/cycle detector: folder, hub id or 'shapes' ('': grounding-dino-tiny)")
    runtime_env: dict = option({}, "Ray runtime_env of the --reward-workers actors (pip, conda, env_vars, …), so a reward with its own dependencies runs beside the trainer ({}: the driver's environment)")
    http_batch: int = option(32, "--reward http://…: images per request to the reward server")
    http_timeout: float = option(60.0, "--reward http://…: seconds to wait for the answer to one request")
    http_retries: int = option(3, "--reward http://…: how often a request that got no answer or a 5xx is tried again (after 0.5, 1, 2, … s) before its samples count invalid")
    http_format: Literal["png", "safetensors"] = option("png", "--reward http://…: how images travel: png (8-bit, portable) or safetensors (lossless float32)")
    max_down_iterations: int = option(10, "iterations in a row the reward may be unreachable on every sample (a reward server down) before the run stops; those iterations skip the update")
    options: dict = option({}, "keyword arguments of the reward's constructor, e.g. reward.options.distance=giou (weighted parts: reward.options.<part>.key=value)")


@dataclass
class EvalConfig:
    data: str = option("", "layouts of the base/final evaluation: '' (the training data's: Shapes' held-out set, or a held-out part of a --data file), shapes, or a file of layouts (JSONL, COCO-MIG, LayoutSAM)")
    holdout: float = option(0.1, "fraction of a --data file held out of training for the evaluation (at least 1 layout, at most eval.layouts; 0: evaluate on training layouts)")
    layouts: int = option(250, "held-out layouts for the base/final evaluation (Shapes: spread evenly over levels; a --data file: at most this many held out)")
    levels: list = option([2, 3, 4, 5, 6], "levels of the held-out set")
    seed: int = option(1234, "seed of the held-out set and of its initial noise")
    batch_size: int = option(125, "images per evaluation batch")
    grid: int = option(16, "images in the before/after sample grids")
    every: int = option(0, "also evaluate every N iterations during training, logged as eval_* in metrics.jsonl (0: only before and after)")


@dataclass
class RayConfig:
    workers: int = option(0, "--workers: Ray rollout actors, each a policy replica with its env (0: everything in this process, Ray not started)")
    reward_workers: int = option(0, "--reward-workers: Ray actors scoring rewards on their own device while rollouts go on (0: none)")
    address: str = option("", "--address: join this Ray cluster (host:port printed by `ray start --head`, or auto); '': start a local one")
    worker_cpus: float = option(1.0, "CPUs per rollout worker (fractions allowed; also its torch threads, at least 1)")
    worker_gpus: float = option(0.0, "GPUs per rollout worker (fractions share a GPU; > 0 runs the worker on cuda)")
    reward_cpus: float = option(1.0, "CPUs per reward worker")
    reward_gpus: float = option(0.0, "GPUs per reward worker (> 0 runs the reward on cuda)")
    chunk_layouts: int = option(0, "layouts per rollout chunk (0: layouts_per_iter split in 2 chunks per rollout worker, or in 4 without rollout workers)")
    chunk_timeout: float = option(0.0, "seconds a rollout worker may take for a chunk (queueing behind its other chunk included) before it counts as hung and is replaced (0: wait forever)")
    max_restarts: int = option(3, "replacements of a dead worker or reward actor per chunk before the run stops")
    dashboard: bool = option(False, "start Ray's dashboard (bound to 127.0.0.1) with a local cluster")
    learners: int = option(1, "--learners: processes the update runs on, data-parallel through Ray Train (1: this process, no Ray; N: each runs its share of every minibatch's pieces, gradients summed, the same update)")
    learner_cpus: float = option(1.0, "CPUs per learner process (also its torch threads, at least 1); on cuda each learner also takes a GPU")
    learner_strategy: Literal["ddp", "fsdp"] = option("ddp", "--learners N: ddp (every learner holds the trainable weights; LoRA, adapters, models that fit a device) or fsdp (FSDP2 fully_shard of the denoiser: each learner keeps 1/N of the trainable weights, their gradients and Adam state, for full fine-tuning; ppo, grpo, awm, nft)")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    pg: PGConfig = field(default_factory=PGConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    iterations: int = option(30, "training iterations (rollout + update each)")
    seed: int = option(0, "seed of data order, noise and initialisation")
    out: str = option("", "run folder (default runs/<algo>-<time>)")
    checkpoint_every: int = option(10, "iterations between checkpoints")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def field_help(cls=TrainConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf field."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows += field_help(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", value, f.metadata.get("help", "")))
    return rows


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = get_origin(annotation) or annotation
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config {key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config {key}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"config {key}: expected a number, got {value!r}")
    if kind is str or kind is Literal:  # a Literal's choices are checked with the section (`validate`)
        return str(value)
    if kind is dict:
        if isinstance(value, dict):
            return value
        raise UserError(f"config {key}: expected a mapping (in YAML, or {key}.name=value on the command line), "
                        f"got {value!r}")
    if kind is list:
        if isinstance(value, list):
            return value
        if isinstance(value, (int, float, str)):
            return [value]
        raise UserError(f"config {key}: expected a list, got {value!r}")
    return value


# Keys that left the shared ``algo`` section for the section of the learners that read them: a user who writes the
# old key (override, --config file, sweep row) is told the new one, in one line; nothing reads the old names.
MOVED = {
    "algo.clip_epsilon": "pg.clip_epsilon",
    "algo.log_prob_reduce": "pg.log_prob_reduce",
    "algo.anchor_steps": "pg.anchor_steps",
    "algo.critic_lr": "ppo.critic_lr",
    "algo.critic_coef": "ppo.critic_coef",
    "algo.normalize_advantage": "ppo.normalize_advantage",
    "algo.group_scale": "group.scale",
    "algo.ldm_coef": "joint.ldm_coef",
    "algo.dis_coef": "joint.dis_coef",
}


def set_value(cfg, key: str, value: Any) -> None:
    """Set ``section.field`` (or a top-level field) on a config, checking the key and the type."""
    target, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(target)]
        if part not in names:
            if key in MOVED:
                raise UserError(f"config {key} is now {MOVED[key]} (algo keeps what every learner shares)")
            valid = [k for k, _, _ in field_help()]
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `diffrl train --help` lists every key"
            raise UserError(f"unknown config key {key!r}{hint}")
        if i == len(parts) - 1:
            annotation = get_type_hints(type(target))[part]
            if dataclasses.is_dataclass(getattr(target, part)):
                if not isinstance(value, dict):
                    raise UserError(f"config {key}: expected a mapping of its fields")
                for sub, sub_value in value.items():
                    set_value(cfg, f"{key}.{sub}", sub_value)
            elif isinstance(getattr(target, part), dict):  # a free-form mapping: merged, so overrides add keys
                getattr(target, part).update(_coerce(key, value, annotation))
            else:
                setattr(target, part, _coerce(key, value, annotation))
        elif isinstance(getattr(target, part), dict):  # section.mapping.key[.key…]=value sets inside the mapping
            _set_nested(getattr(target, part), parts[i + 1:], value)
            return
        else:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise UserError(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} has no fields")


def _set_nested(mapping: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        if not isinstance(mapping.get(key), dict):
            mapping[key] = {}
        mapping = mapping[key]
    mapping[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``algo.lr=1e-4`` → ("algo.lr", 1e-4); the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise UserError(f"override {text!r} must look like section.field=value (e.g. algo.lr=1e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def upgrade_saved(data: dict) -> dict:
    """A config that diffrl itself saved before the `MOVED` keys left ``algo`` (a run's config.yaml, a sweep
    trial's trial.json), with those keys in their new sections, so older runs still resume, export and evaluate.
    Only for files diffrl wrote: a user's --config or override with an old key stays an error (`set_value`)."""
    data = {section: dict(value) if isinstance(value, dict) else value for section, value in data.items()}
    for old, new in MOVED.items():
        (old_section, old_field), (new_section, new_field) = old.split("."), new.split(".")
        if isinstance(data.get(old_section), dict) and old_field in data[old_section]:
            value = data[old_section].pop(old_field)
            data.setdefault(new_section, {}).setdefault(new_field, value)
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of config sections")
    return data


# A learner's own defaults where the shared ones do not suit it: they sit between the global defaults and a user's
# settings (YAML, flags, overrides), which win. The forward-process learners take many small Adam steps on a fresh
# flow-matching loss, where the window learners take one accumulated step on a clipped surrogate. AWM's negative
# weights are unbounded (−A·w(ℓ) falls without limit as ℓ grows), so it keeps a velocity KL of 0.1 (Flow-Factory's
# ema_kl_beta); NFT's implicit negative policy is bounded and keeps DiffusionNFT's 1e-4.
LEARNER_DEFAULTS: dict[str, dict[str, Any]] = {
    "awm": {"algo.lr": 1e-4, "algo.accumulate": False, "forward.kl_coef": 0.1, "iterations": 20},
    "nft": {"algo.lr": 1e-4, "algo.accumulate": False, "iterations": 20},
}


def build_config(yaml_data: dict | None = None, overrides: list[tuple[str, Any]] = ()) -> TrainConfig:
    def settle(cfg: TrainConfig) -> TrainConfig:
        for key, value in (yaml_data or {}).items():
            set_value(cfg, key, value)
        for key, value in overrides:
            set_value(cfg, key, value)
        return cfg

    cfg = settle(TrainConfig())
    if own := LEARNER_DEFAULTS.get(cfg.algo.name):  # again, from the learner's own defaults
        cfg = TrainConfig()
        for key, value in own.items():
            set_value(cfg, key, value)
        cfg = settle(cfg)
    if not cfg.env.data:
        from diffrl.envs.datasets import model_data

        cfg.env.data = model_data(cfg.model.name)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks per section, then those that span sections; each failure is one line naming the key and what would be
    valid."""
    check_choices(cfg)
    if cfg.iterations < 0:
        raise UserError("config iterations: must be ≥ 0")
    _check_eval(cfg.eval)
    _check_policy(cfg)
    _check_model(cfg.model)
    _check_env(cfg.env)
    _check_algo(cfg)
    _check_pg(cfg.pg)
    _check_ppo(cfg.ppo)
    _check_joint(cfg)
    _check_forward(cfg.forward)
    _check_ray(cfg.ray)
    _check_fsdp(cfg)
    _check_reward(cfg)


def check_choices(cfg) -> None:
    """Every ``Literal`` field of every section holds one of its values: ``config forward.sampler: 'ode' or 'sde',
    got 'x'`` (three or more: ``one of a, b, c``)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                annotation = get_type_hints(type(value))[g.name]
                if get_origin(annotation) is Literal and getattr(value, g.name) not in get_args(annotation):
                    raise UserError(f"config {f.name}.{g.name}: {_choices(get_args(annotation))}, "
                                    f"got {getattr(value, g.name)!r}")


def _choices(values: tuple) -> str:
    return f"{values[0]!r} or {values[1]!r}" if len(values) == 2 else f"one of {', '.join(map(str, values))}"


def _check_eval(e: EvalConfig) -> None:
    if e.every < 0:
        raise UserError(f"config eval.every: must be ≥ 0 (0: off), got {e.every}")
    if not 0 <= e.holdout < 1:
        raise UserError(f"config eval.holdout: a fraction in [0, 1), got {e.holdout}")


def _check_policy(cfg: TrainConfig) -> None:
    """The RL window's fractions, and that it ends within env.num_steps."""
    if not 0 < cfg.policy.window <= 1:
        raise UserError(f"config policy.window: must be in (0, 1], got {cfg.policy.window}")
    if not 0 <= cfg.policy.window_start < 1:
        raise UserError(f"config policy.window_start: must be in [0, 1), got {cfg.policy.window_start}")
    first, end = window_first_step(cfg), window_first_step(cfg) + window_steps(cfg)
    if end > cfg.env.num_steps:
        raise UserError(f"config policy.window_start={cfg.policy.window_start} + policy.window={cfg.policy.window}: the "
                        f"window (steps {first}..{end - 1}) runs past the last of {cfg.env.num_steps} steps; make their "
                        "sum ≤ 1")
    if cfg.policy.noise_level <= 0:
        raise UserError(f"config policy.noise_level: must be > 0 for RL to explore, got {cfg.policy.noise_level}")


def _check_model(m: ModelConfig) -> None:
    if m.lora_rank < -1:
        raise UserError(f"config model.lora_rank: -1 (auto), 0 (off) or a rank ≥ 1, got {m.lora_rank}")
    if m.lora_alpha < 0:
        raise UserError(f"config model.lora_alpha: must be ≥ 0 (0: alpha = rank), got {m.lora_alpha}")
    if not all(isinstance(t, str) and t for t in m.lora_targets):
        raise UserError(f"config model.lora_targets: a list of module names such as [to_q, to_k], got {m.lora_targets!r}")
    if m.guidance_scale < 1:
        raise UserError(f"config model.guidance_scale: must be ≥ 1 (1: no guidance), got {m.guidance_scale}")
    if m.resolution < 0:
        raise UserError(f"config model.resolution: image side in pixels, or 0 for the model's own; got {m.resolution}")
    if m.adapter and not (Path(m.adapter) / "config.json").is_file():
        raise UserError(f"config model.adapter {m.adapter}: no config.json there; pass a layout adapter folder "
                        "(as `diffrl export` writes under layout_adapter/)")
    if m.text_cache < 0:
        raise UserError(f"config model.text_cache: must be ≥ 0, got {m.text_cache}")


def _check_env(e: EnvConfig) -> None:
    if e.shift < 0:
        raise UserError(f"config env.shift: must be ≥ 0 (0: the model's own), got {e.shift}")
    if e.num_steps < 1 or e.layouts_per_iter < 1 or e.group_size < 1:
        raise UserError("config env.num_steps, env.layouts_per_iter and env.group_size must be ≥ 1")


def _check_algo(cfg: TrainConfig) -> None:
    """What the learner needs of the env."""
    if cfg.algo.name in ("grpo", *FORWARD_LEARNERS) and cfg.env.group_size < 2:
        raise UserError(f"config env.group_size: --algo {cfg.algo.name} compares samples of one layout, so it needs ≥ 2")
    if cfg.algo.micro_batch < 0:
        raise UserError(f"config algo.micro_batch: must be ≥ 0 (0: the minibatch split over the learners), got "
                        f"{cfg.algo.micro_batch}")


def _check_pg(p: PGConfig) -> None:
    """PPO's and GRPO's clipped surrogate (``log_prob_reduce``'s choices: `check_choices`)."""
    if p.clip_epsilon <= 0:
        raise UserError(f"config pg.clip_epsilon: must be > 0, got {p.clip_epsilon}")
    if p.anchor_steps < 0:
        raise UserError(f"config pg.anchor_steps: must be ≥ 0 (0: none), got {p.anchor_steps}")


def _check_ppo(p: PPOConfig) -> None:
    """PPO's critic."""
    if p.critic_lr < 0 or p.critic_coef < 0:
        raise UserError(f"config ppo.critic_lr and ppo.critic_coef must be ≥ 0, got {p.critic_lr}, {p.critic_coef}")


def _check_joint(cfg: TrainConfig) -> None:
    """I-DRUID's joint-loss weights, which learners have the joint loss, and the paired renders L_ldm needs."""
    from diffrl.envs.datasets import shapes_world

    if is_forward_learner(cfg) and (cfg.joint.ldm_coef or cfg.joint.dis_coef):
        raise UserError(f"config joint.ldm_coef / joint.dis_coef: --algo {cfg.algo.name} has no joint loss; use ppo or grpo")
    if cfg.joint.ldm_coef < 0:
        raise UserError(f"config joint.ldm_coef: must be ≥ 0, got {cfg.joint.ldm_coef}")
    if cfg.joint.dis_coef < 0:
        raise UserError(f"config joint.dis_coef: must be ≥ 0, got {cfg.joint.dis_coef}")
    if uses_paired_data(cfg) and cfg.env.data and shapes_world(cfg.env.data) is None:  # '': the model's Shapes world
        raise UserError("config joint.ldm_coef / --algo sft need paired images; only the Shapes worlds (--data shapes, "
                        "shapes-loose) render them so far")


def _check_forward(f: ForwardConfig) -> None:
    if f.timesteps < 1:
        raise UserError(f"config forward.timesteps: must be ≥ 1, got {f.timesteps}")
    if not 0 < f.awm_power <= 1:
        raise UserError(f"config forward.awm_power: in (0, 1] (1: the plain matching loss), got {f.awm_power}")
    if f.nft_beta <= 0 or f.adv_clip <= 0 or f.kl_coef < 0 or not 0 <= f.old_uphold < 1 or f.old_uprate < 0:
        raise UserError("config forward: nft_beta and adv_clip must be > 0, kl_coef and old_uprate ≥ 0, old_uphold in [0, 1)")


def _check_ray(r: RayConfig) -> None:
    for key, value in (("workers", r.workers), ("reward_workers", r.reward_workers), ("chunk_layouts", r.chunk_layouts),
                       ("max_restarts", r.max_restarts), ("worker_gpus", r.worker_gpus), ("reward_gpus", r.reward_gpus),
                       ("chunk_timeout", r.chunk_timeout)):
        if value < 0:
            flag = {"workers": "--workers", "reward_workers": "--reward-workers"}.get(key, f"config ray.{key}")
            raise UserError(f"{flag}: must be ≥ 0, got {value}")
    if r.learners < 1:
        raise UserError(f"--learners: must be ≥ 1 (1: the update in this process), got {r.learners}")
    if r.learner_cpus <= 0:
        raise UserError(f"config ray.learner_cpus: must be > 0 (fractions such as 0.5 are fine), got {r.learner_cpus}")
    if r.worker_cpus <= 0 or r.reward_cpus <= 0:
        raise UserError("config ray.worker_cpus and ray.reward_cpus must be > 0 (fractions such as 0.5 are fine)")
    if r.address and not (r.workers or r.reward_workers or r.learners > 1):
        raise UserError(f"--address {r.address}: nothing would run on the cluster; add --workers N, --reward-workers N "
                        "and/or --learners N")


FSDP_LEARNERS = ("ppo", "grpo", "awm", "nft")


def _check_fsdp(cfg: TrainConfig) -> None:
    """What ``ray.learner_strategy=fsdp`` covers so far (see `diffrl.distributed.learners.FsdpShard`)."""
    if cfg.ray.learner_strategy != "fsdp":
        return
    if cfg.ray.learners < 2:
        raise UserError("config ray.learner_strategy=fsdp shards the denoiser over the learners; add --learners N (N ≥ 2)")
    if cfg.algo.name not in FSDP_LEARNERS:
        raise UserError(f"config ray.learner_strategy=fsdp: --algo {cfg.algo.name} is not supported with it yet; use "
                        f"{', '.join(FSDP_LEARNERS)}, or ray.learner_strategy=ddp")
    if cfg.joint.ldm_coef:
        raise UserError("config ray.learner_strategy=fsdp with joint.ldm_coef: L_ldm is backpropagated by one learner, "
                        "which a sharded denoiser cannot do alone; use ray.learner_strategy=ddp")


def _check_reward(cfg: TrainConfig) -> None:
    w = cfg.reward
    if w.http_batch < 1 or w.http_timeout <= 0 or w.http_retries < 0 or w.max_down_iterations < 1:
        raise UserError("config reward.http_batch ≥ 1, reward.http_timeout > 0, reward.http_retries ≥ 0 and "
                        f"reward.max_down_iterations ≥ 1; got {w.http_batch}, {w.http_timeout}, {w.http_retries}, "
                        f"{w.max_down_iterations}")
    if w.runtime_env and not cfg.ray.reward_workers:
        raise UserError("config reward.runtime_env: it is the environment of the reward actors; add --reward-workers N")


def uses_paired_data(cfg: TrainConfig) -> bool:
    """Does the learner train on paired renders (the L_ldm term, or SFT alone)?"""
    return cfg.joint.ldm_coef > 0 or cfg.algo.name == "sft"


def window_steps(cfg: TrainConfig) -> int:
    """How many denoising steps RL explores and trains (at least one), from `window_first_step` on."""
    return window_step_count(cfg.policy.window, cfg.env.num_steps)


def window_first_step(cfg: TrainConfig) -> int:
    """The first denoising step of the RL window (0 unless ``policy.window_start`` delays it)."""
    return round(cfg.policy.window_start * cfg.env.num_steps)


def is_forward_learner(cfg: TrainConfig) -> bool:
    """Does ``--algo`` train on final samples only (AWM, NFT), rather than on a window of SDE steps?"""
    return cfg.algo.name in FORWARD_LEARNERS


FORWARD_LEARNERS = ("awm", "nft")


def rollout_window(cfg: TrainConfig) -> tuple[int, int]:
    """(steps, first step) that the rollout policy explores with ``policy.noise_level``: the RL window for PPO /
    GRPO; for a forward-process learner every step with ``forward.sampler=sde`` and none (the ODE) with ``ode``."""
    if is_forward_learner(cfg):
        return (cfg.env.num_steps if cfg.forward.sampler == "sde" else 0), 0
    return window_steps(cfg), window_first_step(cfg)


def window_step_count(window: float, num_steps: int) -> int:
    """``policy.window`` (a fraction of the steps) → how many of the first ``num_steps`` steps it covers (≥ 1)."""
    return max(1, round(window * num_steps))


def chunk_layouts(cfg: TrainConfig) -> int:
    """Layouts per rollout chunk when rollouts or rewards run on Ray (see `diffrl.distributed.ray_workers`)."""
    if cfg.ray.chunk_layouts:
        return min(cfg.ray.chunk_layouts, cfg.env.layouts_per_iter)
    chunks = 2 * cfg.ray.workers if cfg.ray.workers else 4
    return math.ceil(cfg.env.layouts_per_iter / chunks)


def micro_batch(cfg: TrainConfig) -> int:
    """Rows per forward/backward pass of the update: ``algo.micro_batch``, or by default a minibatch (at most the
    iteration's samples) split evenly over ``ray.learners`` (0 with one learner: the whole minibatch)."""
    if cfg.algo.micro_batch or cfg.ray.learners == 1:
        return cfg.algo.micro_batch
    rows = min(cfg.algo.minibatch_size, cfg.env.layouts_per_iter * cfg.env.group_size)
    return math.ceil(rows / cfg.ray.learners)


def uses_ray(cfg: TrainConfig) -> bool:
    """Whether rollouts or rewards leave this process (else Ray is never imported)."""
    return cfg.ray.workers > 0 or cfg.ray.reward_workers > 0


def http_options(cfg: TrainConfig) -> dict:
    """The keywords of a ``--reward http://…`` client (`diffrl.rewards.http.HttpReward`) from ``reward.http_*``."""
    r = cfg.reward
    return dict(batch_size=r.http_batch, timeout=r.http_timeout, retries=r.http_retries, image_format=r.http_format)


def save_yaml(cfg: TrainConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
