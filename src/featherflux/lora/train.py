"""Flow-matching fine-tuning of the FLUX.2 DiT: LoRA (default) or full, from cached latents and prompt embeddings.

Notable features:
- One loop for both modes: `mode="lora"` adds trainable `LoRALinear` adapters (fp32, up initialised to zero) to the
  chosen layers of a frozen base (which may be bf16 or int8/NF4-quantized: QLoRA); `mode="full"` trains every float
  parameter of the model.
- Objective: x_t = (1 - s) x + s noise, target = noise - x, MSE on the velocity. Sigma sampling: "shift" (default:
  logit-normal, then FLUX.2's resolution-aware exponential shift with the sampler's own mu), "logit_normal" or
  "uniform". Caption dropout swaps in the empty-caption embedding.
- Aspect-ratio buckets: every batch takes samples of one latent size; the epoch order is a pure function of
  (seed, epoch), so resume only needs (epoch, batch index).
- Exact resume: a checkpoint holds the trainable tensors, the optimizer state flattened to tensors, the noise
  generator state (safetensors) and the counters (JSON); no pickle anywhere. Checkpoints are written atomically.
- Gradient checkpointing wraps each block during training only; bf16 bases; 8-bit AdamW when bitsandbytes has it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from featherflux.atomic import atomic_write
from featherflux.errors import MissingExtraError, UserError
from featherflux.lora.formats import to_bfl_state_dict, to_diffusers_state_dict
from featherflux.lora.layers import LoRAAdapter, LoRALinear
from featherflux.model.swap import replace_module
from featherflux.sampling import compute_empirical_mu, image_ids, pack, text_ids
from featherflux.weights import save_transformer

TRAIN_ADAPTER = "trained"
# the attention and MLP projections of every block, as diffusers' FLUX.2 scripts train by default
DEFAULT_TARGETS = (
    "img_attn.qkv",
    "txt_attn.qkv",
    "img_attn.proj",
    "txt_attn.proj",
    "img_mlp.0",
    "img_mlp.2",
    "txt_mlp.0",
    "txt_mlp.2",
    "linear1",
    "linear2",
)


@dataclass
class TrainConfig:
    mode: str = "lora"  # "lora" | "full"
    steps: int = 1000
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"  # "constant" | "cosine" (to 0 at `steps`), after a linear warmup
    warmup_steps: int = 0
    batch_size: int = 1
    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # native module name suffixes that get adapters
    timestep_sampling: str = "shift"  # "shift" | "logit_normal" | "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift_steps: int = 50  # mu of the "shift" sampling = the sampler's mu at this many steps
    caption_dropout: float = 0.0
    guidance: float = 1.0  # fed to guidance-distilled models (dev) while training
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"  # "adamw" | "adamw8bit"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # steps; 0 = only at the end
    validate_every: int = 0
    seed: int = 0
    base_model: str = ""  # recorded in the output metadata

    def __post_init__(self):
        if self.mode not in ("lora", "full"):
            raise UserError(f"unknown training mode {self.mode!r}; use lora or full")
        if self.timestep_sampling not in ("shift", "logit_normal", "uniform"):
            raise UserError(f"unknown timestep sampling {self.timestep_sampling!r}; use shift, logit_normal or uniform")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UserError(f"unknown learning-rate schedule {self.lr_schedule!r}; use constant or cosine")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise UserError(f"unknown optimizer {self.optimizer!r}; use adamw or adamw8bit")
        if self.steps < 1 or self.batch_size < 1 or self.rank < 1:
            raise UserError("steps, batch_size and rank must be at least 1")


@dataclass
class CachedDataset:
    """Training data after encoding: normalised latents (C, h, w) and prompt embeddings (L, ctx_dim) per sample."""

    latents: list[Tensor]
    embeds: list[Tensor]
    empty_embed: Tensor  # the "" caption, for caption dropout
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.latents)

    def save(self, path: Path, extra: dict[str, Tensor] | None = None, key: str = "") -> None:
        """One safetensors file; `extra` holds other embeddings (validation prompts), `key` what it was made from."""
        tensors = {f"latents.{i}": t.contiguous() for i, t in enumerate(self.latents)}
        tensors |= {f"embeds.{i}": t.contiguous() for i, t in enumerate(self.embeds)}
        tensors |= {f"extra.{i}": t.contiguous() for i, t in enumerate((extra or {}).values())}
        tensors["empty_embed"] = self.empty_embed.contiguous()
        meta = {"names": json.dumps(self.names), "extra": json.dumps(list(extra or {})), "key": key}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: Path, key: str = "") -> tuple[CachedDataset, dict[str, Tensor]] | None:
        """The dataset and extra embeddings saved at `path`, or None if missing or made from something else."""
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            n = sum(1 for k in f.keys() if k.startswith("latents."))  # noqa: SIM118 (safe_open is not a dict)
            data = cls(
                [f.get_tensor(f"latents.{i}") for i in range(n)],
                [f.get_tensor(f"embeds.{i}") for i in range(n)],
                f.get_tensor("empty_embed"),
                json.loads(meta["names"]),
            )
            extra = {p: f.get_tensor(f"extra.{i}") for i, p in enumerate(json.loads(meta["extra"]))}
        return data, extra


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # per step of this run (after any resume)
    outputs: list[Path]


def add_trainable_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], seed: int = 0) -> int:
    """Wrap every Linear whose name ends with a target in a LoRALinear with a fresh fp32 adapter; returns the count."""
    g = torch.Generator().manual_seed(seed)
    chosen = [
        (n, m)
        for n, m in model.named_modules()
        if hasattr(m, "in_features")
        and not isinstance(m, LoRALinear)
        and n.endswith(targets)
        and not n.endswith(".base")
    ]
    if not chosen:
        raise UserError(f"no layer matches the LoRA targets {', '.join(targets)}")
    for name, linear in chosen:
        device = next(linear.buffers(), next(linear.parameters(), torch.empty(0)))
        down = torch.randn(rank, linear.in_features, generator=g) / rank  # diffusers' "gaussian" init
        up = torch.zeros(linear.out_features, rank)
        wrapped = LoRALinear(linear)
        wrapped.add_adapter(
            TRAIN_ADAPTER, LoRAAdapter(down.to(device.device), up.to(device.device), alpha / rank, trainable=True)
        )
        replace_module(model, name, wrapped)
    return len(chosen)


def trainable_lora_pairs(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """native module name -> (down, up) of the adapter being trained."""
    return {
        name.removesuffix(".base"): (m.adapter(TRAIN_ADAPTER).down.detach(), m.adapter(TRAIN_ADAPTER).up.detach())
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear) and TRAIN_ADAPTER in m.names
    }


def save_lora(model: nn.Module, output: Path, config: TrainConfig, step: int) -> list[Path]:
    """The trained adapter as diffusers/PEFT (`diffusers/pytorch_lora_weights.safetensors`, loads with
    `load_lora_weights`) and BFL/ComfyUI (`lora.safetensors`), both with rank/alpha/base model/steps metadata."""
    pairs = {k: (d.float().cpu(), u.float().cpu()) for k, (d, u) in trainable_lora_pairs(model).items()}
    info = {
        "featherflux.rank": str(config.rank),
        "featherflux.alpha": str(config.alpha),
        "featherflux.base_model": config.base_model,
        "featherflux.steps": str(step),
    }
    diffusers_sd, meta = to_diffusers_state_dict(pairs, model.config, config.rank, config.alpha)
    diffusers_path = output / "diffusers" / "pytorch_lora_weights.safetensors"
    diffusers_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(diffusers_path, lambda tmp: save_file(diffusers_sd, tmp, metadata=meta | info))
    bfl_path = output / "lora.safetensors"
    bfl_sd = to_bfl_state_dict(pairs, config.alpha / config.rank)
    atomic_write(bfl_path, lambda tmp: save_file(bfl_sd, tmp, metadata={"format": "pt"} | info))
    return [diffusers_path, bfl_path]


def learning_rate(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): a pure function of the step, so resume needs no state."""
    scale = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.lr_schedule == "cosine":
        progress = max(0.0, step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        scale *= 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.learning_rate * scale


def sample_sigmas(n: int, seq_len: int, config: TrainConfig, g: torch.Generator) -> Tensor:
    if config.timestep_sampling == "uniform":
        return torch.rand(n, generator=g)
    s = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(n, generator=g))
    if config.timestep_sampling == "logit_normal":
        return s
    mu = compute_empirical_mu(seq_len, config.shift_steps)
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


def epoch_batches(data: CachedDataset, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of same-sized latents (aspect-ratio buckets); a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    buckets: dict[tuple, list[int]] = {}
    for i in torch.randperm(len(data), generator=g).tolist():
        buckets.setdefault(tuple(data.latents[i].shape), []).append(i)
    batches = [idx[j : j + batch_size] for idx in buckets.values() for j in range(0, len(idx), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def flow_matching_loss(
    model: nn.Module, latents: Tensor, embeds: Tensor, sigmas: Tensor, noise: Tensor, guidance: float
) -> Tensor:
    """latents/noise (B, C, h, w), embeds (B, L, ctx), sigmas (B,) -> MSE between predicted and true velocity."""
    b, _, h, w = latents.shape
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    s = sigmas.view(-1, 1, 1, 1)
    noisy = ((1 - s) * latents + s * noise).to(dtype)
    x_ids = image_ids(h, w).expand(b, -1, -1).to(latents.device)
    ctx_ids = text_ids(embeds.shape[1]).expand(b, -1, -1).to(latents.device)
    g = torch.full((b,), guidance, device=latents.device) if model.config.guidance_embed else None
    pred = model(pack(noisy), x_ids, sigmas.to(latents.device), embeds.to(dtype), ctx_ids, g)
    return F.mse_loss(pred.float(), pack(noise - latents).float())


class Checkpointed(nn.Module):
    """Recompute a block's activations in backward instead of storing them."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        if torch.is_grad_enabled():
            return checkpoint(self.block, *args, use_reentrant=False)
        return self.block(*args)


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    for blocks in (model.double_blocks, model.single_blocks):
        for i, block in enumerate(blocks):
            if on and not isinstance(block, Checkpointed):
                blocks[i] = Checkpointed(block)
            elif not on and isinstance(block, Checkpointed):
                blocks[i] = block.block


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # an optional extra (featherflux[quant]), imported only for this optimizer
        except ImportError:
            raise MissingExtraError("8-bit AdamW", "quant") from None
        try:
            return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        except (AttributeError, RuntimeError) as e:
            raise UserError(f"8-bit AdamW needs a working bitsandbytes ({e}); use --optimizer adamw") from None
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def train(
    model: nn.Module,
    data: CachedDataset,
    config: TrainConfig,
    output: str | Path,
    *,
    validate: Callable[[int], None] | None = None,
    resume: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Fine-tune `model` (a native Flux2, possibly quantized) on cached data; writes checkpoints, a CSV log and the
    final LoRA (or, with mode="full", the whole transformer in diffusers layout in `output/transformer`). With `resume`, continues from the
    newest checkpoint there. `stop_after` ends the run early at that step (to test resume)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if len(data) == 0:
        raise UserError("no training samples")
    if config.mode == "lora":
        if not any(isinstance(m, LoRALinear) and TRAIN_ADAPTER in m.names for m in model.modules()):
            add_trainable_lora(model, config.rank, config.alpha, config.targets, config.seed)
        model.requires_grad_(False)
        named = {
            f"{n}.{k}": p
            for n, m in model.named_modules()
            if isinstance(m, LoRAAdapter)
            for k, p in (("down", m.down), ("up", m.up))
        }
    else:
        named = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        if any(hasattr(m, "in_features") and not isinstance(m, (nn.Linear, LoRALinear)) for m in model.modules()):
            raise UserError("full fine-tuning needs an unquantized model; quantized bases train LoRAs only")
    for p in named.values():
        p.requires_grad_(True)
    optimizer = make_optimizer(list(named.values()), config)
    noise_gen = torch.Generator().manual_seed(config.seed)
    step, epoch, batch_index = 0, 0, 0
    ckpt = _latest_checkpoint(output) if resume else None
    if ckpt is not None:
        step, epoch, batch_index = _load_checkpoint(ckpt, named, optimizer, noise_gen, config)
    log_path = output / "log.csv"
    _truncate_log(log_path, step)

    end = min(config.steps, stop_after or config.steps)
    losses = []
    model.train()
    _set_checkpointing(model, config.gradient_checkpointing)
    device = next(iter(named.values())).device
    bar = tqdm(total=config.steps, initial=step, desc=f"train-{config.mode}", unit="step")
    try:
        with log_path.open("a", newline="") as log_file:
            log = csv.writer(log_file)
            if log_file.tell() == 0:
                log.writerow(["step", "loss", "learning_rate", "seconds"])
            batches = epoch_batches(data, config.batch_size, config.seed, epoch)
            while step < end:
                if batch_index >= len(batches):
                    epoch, batch_index = epoch + 1, 0
                    batches = epoch_batches(data, config.batch_size, config.seed, epoch)
                idx = batches[batch_index]
                batch_index += 1
                start = time.perf_counter()
                latents = torch.stack([data.latents[i] for i in idx]).float().to(device)
                drop = torch.rand(len(idx), generator=noise_gen) < config.caption_dropout
                embeds = torch.stack([data.empty_embed if d else data.embeds[i] for i, d in zip(idx, drop.tolist())])
                noise = torch.randn(latents.shape, generator=noise_gen).to(device)
                sigmas = sample_sigmas(len(idx), latents.shape[2] * latents.shape[3], config, noise_gen)
                loss = flow_matching_loss(model, latents, embeds.to(device), sigmas, noise, config.guidance)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lr = learning_rate(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(list(named.values()), config.max_grad_norm)
                optimizer.step()
                step += 1
                losses.append(loss.item())
                log.writerow([step, f"{losses[-1]:.6f}", f"{lr:.3g}", f"{time.perf_counter() - start:.4f}"])
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                    log_file.flush()
                    _save_checkpoint(output, step, epoch, batch_index, named, optimizer, noise_gen, config)
                if validate is not None and config.validate_every and step % config.validate_every == 0:
                    model.eval()
                    with torch.no_grad():
                        validate(step)
                    model.train()
    finally:
        bar.close()
        _set_checkpointing(model, False)
        model.eval()
        for p in named.values():
            p.requires_grad_(False)
    outputs = []
    if step >= config.steps:
        if config.mode == "lora":
            outputs = save_lora(model, output, config, step)
        else:
            save_transformer(model, output / "transformer")
            outputs = sorted((output / "transformer").iterdir())
    return TrainResult(step, losses, outputs)


# --- checkpoints ----------------------------------------------------------------------------------------------------


def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def _save_checkpoint(output, step, epoch, batch_index, named, optimizer, noise_gen, config) -> Path:
    final = output / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_tensors(tmp / "trainable.safetensors", named)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer, list(named))
    _save_tensors(
        tmp / "optimizer.safetensors",
        opt_tensors | {"rng.noise": noise_gen.get_state(), "rng.torch": torch.get_rng_state()},
    )
    state = {
        "step": step,
        "epoch": epoch,
        "batch_index": batch_index,
        "optimizer": opt_meta,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _flatten_optimizer(optimizer, names: list[str]) -> tuple[dict[str, Tensor], dict]:
    """torch optimizer state -> tensors keyed `state.<param name>.<field>` + JSON (param groups, python numbers).

    Nested state (bitsandbytes keeps its 8-bit buffers in a dict) becomes `field/subfield`."""
    sd = optimizer.state_dict()
    tensors, numbers = {}, {}

    def put(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"{prefix}/{k}", v)
        elif isinstance(value, Tensor):
            tensors[f"state.{prefix}"] = value
        else:
            numbers[prefix] = value

    for index, fields in sd["state"].items():
        for key, value in fields.items():
            put(f"{names[index]}.{key}", value)
    return tensors, {"param_groups": sd["param_groups"], "numbers": numbers}


def _unflatten_optimizer(tensors: dict[str, Tensor], numbers: dict, names: list[str]) -> dict[int, dict]:
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict] = {}
    items = [(k.removeprefix("state."), v) for k, v in tensors.items() if k.startswith("state.")]
    for key, value in items + list(numbers.items()):
        head, _, nested = key.partition("/")  # param names have dots, field names have none
        name, field = head.rsplit(".", 1)
        node = state.setdefault(index[name], {})
        *parents, leaf = [field, *nested.split("/")] if nested else [field]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return state


def _latest_checkpoint(output: Path) -> Path | None:
    found = sorted(p for p in (output / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def _load_checkpoint(path: Path, named, optimizer, noise_gen, config) -> tuple[int, int, int]:
    state = json.loads((path / "state.json").read_text())
    saved = state["config"]
    for key in ("mode", "rank", "batch_size", "seed"):
        if saved.get(key) != getattr(config, key):
            raise UserError(
                f"{path} was made with {key}={saved.get(key)!r}, not {getattr(config, key)!r}; use another "
                "--output folder or the same settings"
            )
    trainable = load_file(path / "trainable.safetensors")
    if set(trainable) != set(named):
        raise UserError(f"{path} does not hold this run's trainable tensors; use another --output folder")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(trainable[k])
    tensors = load_file(path / "optimizer.safetensors")
    opt_state = _unflatten_optimizer(tensors, state["optimizer"]["numbers"], list(named))
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    noise_gen.set_state(tensors["rng.noise"])
    torch.set_rng_state(tensors["rng.torch"])
    return state["step"], state["epoch"], state["batch_index"]


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past the resumed step, so the CSV reads like one uninterrupted run."""
    if not path.is_file():
        return
    rows = list(csv.reader(path.open()))
    keep = [r for r in rows[1:] if r and int(r[0]) <= step]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows[:1] + keep)
