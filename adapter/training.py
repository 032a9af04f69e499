"""IQA-Adapter training, host-free: the trainable module, quality vectors, condition dropout, noise,
loss, the deterministic data order, and checkpoints with exact resume.

Facts followed (docs/METHOD.md §1.3, §5): only the projection and every to_k_ip/to_v_ip train, each
to_k_ip/to_v_ip starting as a copy of its layer's to_k/to_v; the base stays frozen; one uniform draw u
per sample drops conditions (u < 0.01: quality vector zeroed after flag/encoding; 0.01 <= u < 0.06:
caption emptied; 0.06 <= u < 0.07: both); t uniform in [0, T); MSE on the base's own prediction type
(eps or v) averaged over all elements; AdamW (recipe lr 1e-5, weight decay 1e-2, default betas).

The base model is anything with the `BaseModel` interface below (nodes/train_host.py wraps a ComfyUI
checkpoint). All randomness of a step comes from generators seeded by (seed, step, sample's position
in the global batch): a run is deterministic, resumes exactly, and gives the same global batch
whatever the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import shutil
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import training_layout
from .projection import QualityProjection
from .quality import positional_encoding

DROP_VECTOR = 0.01  # u < 0.01: quality vector zeroed
DROP_CAPTION = 0.05  # next 5 %: caption emptied
DROP_BOTH = 0.01  # next 1 %: both
CHECKPOINT_FORMAT = "iqa_adapter_trainer_checkpoint"


class BaseModel(Protocol):
    """What the trainer needs from a frozen text-to-image model (implemented by nodes/train_host.py)."""
    prediction_type: str  # 'eps' | 'v'
    alphas_cumprod: torch.Tensor  # (T,) fp32 DDPM schedule of the base
    cross_attention_dim: int
    layer_widths: list[int]  # hidden width of cross-attention layer k (diffusers order)
    device: torch.device

    def base_kv_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]: ...  # (to_k, to_v) of layer k
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...  # (B,3,S,S) in [-1,1] -> model latents
    # -> context, extra conds; micro[i] = (original (h, w), crop (top, left), resolution)
    def encode_text(self, captions: list[str], micro: list[tuple]) -> tuple[torch.Tensor, dict]: ...
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, extra: dict,
                adapter: TrainableAdapter, tokens: torch.Tensor, scale: float = 1.0) -> torch.Tensor: ...


# ---------------------------------------------------------------- the trainable module

class LayerKV(nn.Module):
    """to_k_ip / to_v_ip of one cross-attention layer: (C -> hidden), no bias (released key names)."""

    def __init__(self, cross_attention_dim: int, hidden: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden, bias=False)


class TrainableAdapter(nn.Module):
    """image_proj + ip_adapter.<2k+1>: the state dict is the released layout (adapter/training_layout.py).

    `forward` runs the whole frozen base with the adapter, so a DistributedDataParallel wrapper around
    this module sees every trainable parameter used in its own forward. The base is held outside the
    module's parameters (it is frozen and must not be broadcast or saved).
    """

    def __init__(self, cross_attention_dim: int, layer_widths: list[int], input_dim: int, num_tokens: int = 2,
                 projection_kind: str = "linear", mlp_hidden_dim: int = 128):
        super().__init__()
        self.image_proj = QualityProjection(input_dim, cross_attention_dim, num_tokens, projection_kind, mlp_hidden_dim)
        self.ip_adapter = nn.ModuleDict({str(training_layout.released_index(k)): LayerKV(cross_attention_dim, width)
                                         for k, width in enumerate(layer_widths)})
        self.layer_widths = list(layer_widths)
        self._base = None

    def attach(self, base: BaseModel) -> TrainableAdapter:
        object.__setattr__(self, "_base", base)  # not a submodule
        return self

    def layer(self, position: int) -> LayerKV:
        return self.ip_adapter[str(training_layout.released_index(position))]

    @torch.no_grad()
    def init_from_base(self, kv_weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Every to_k_ip/to_v_ip starts as a copy of its layer's to_k/to_v (the authors' initialisation)."""
        if len(kv_weights) != len(self.layer_widths):
            raise ValueError(f"base has {len(kv_weights)} cross-attention layers, adapter {len(self.layer_widths)}")
        for position, (wk, wv) in enumerate(kv_weights):
            layer = self.layer(position)
            layer.to_k_ip.weight.copy_(wk.to(layer.to_k_ip.weight))
            layer.to_v_ip.weight.copy_(wv.to(layer.to_v_ip.weight))

    def tokens(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.image_proj(vectors)

    def forward(self, noisy, timesteps, context, extra, vectors, scale: float = 1.0):
        if self._base is None:
            raise RuntimeError("TrainableAdapter: attach(base) first")
        tokens = self.tokens(vectors.to(self.image_proj.norm.weight.device))
        return self._base.predict(noisy, timesteps, context, extra, self, tokens, scale)

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).contiguous()
                for k, v in training_layout.to_released(self.state_dict()).items()}


# ---------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    metrics: list[str]
    normalization: str = "dataset"  # 'dataset' (z-scores from this set's stats), 'cc3m', 'none' (raw scores)
    use_flag: bool = False
    pos_encode_L: int = 0
    num_tokens: int = 2
    projection: str = "linear"
    mlp_hidden_dim: int = 128
    resolution: int = 1024
    batch_size: int = 4  # global batch (all processes together)
    max_steps: int = 1000
    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    drop_vector: float = DROP_VECTOR
    drop_caption: float = DROP_CAPTION
    drop_both: float = DROP_BOTH
    name: str = "iqa_adapter"
    checkpoint: str = ""  # base model file (recorded, and compared on resume by name)
    # resume must refuse a changed run: these fields define the run
    RUN_FIELDS = ("metrics", "normalization", "use_flag", "pos_encode_L", "num_tokens", "projection",
                  "mlp_hidden_dim", "resolution", "batch_size", "learning_rate", "weight_decay", "seed",
                  "drop_vector", "drop_caption", "drop_both")

    def run_signature(self) -> dict:
        return {name: getattr(self, name) for name in self.RUN_FIELDS}

    @property
    def input_dim(self) -> int:
        return (len(self.metrics) + int(self.use_flag)) * (2 * self.pos_encode_L + 1)


def descriptor_dict(config: TrainConfig, stats: dict[str, dict[str, float]]) -> dict:
    """The sidecar descriptor IQAAdapterLoader reads; dataset z-scores record their mean/std."""
    out = {"name": config.name, "kind": "score", "metrics": list(config.metrics),
           "normalization": "none" if config.normalization == "none" else "zscore",
           "use_flag": config.use_flag, "pos_encode_L": config.pos_encode_L}
    if config.normalization == "dataset":
        out["metric_stats"] = {m: {"mean": stats[m]["mean_val"], "std": stats[m]["std_val"]} for m in config.metrics}
    return out


def quality_vectors(config: TrainConfig, scores: dict[str, dict[str, float]], keys: list[str],
                    stats: dict[str, dict[str, float]]) -> torch.Tensor:
    """(len(keys), D_in) fp32: per metric z = (raw - mean)/std (dataset or CC3M stats) or raw, flag, encoding."""
    from ..models import stats as cc3m

    columns = []
    for metric in config.metrics:
        raw = torch.tensor([scores[metric][key] for key in keys], dtype=torch.float64)
        if config.normalization == "dataset":
            mean, std = stats[metric]["mean_val"], stats[metric]["std_val"]
        elif config.normalization == "cc3m":
            cc = cc3m.get_stats(metric)
            mean, std = cc.mean, cc.std
        else:
            mean, std = 0.0, 1.0
        columns.append((raw - mean) / std)
    if config.use_flag:
        columns.append(torch.ones(len(keys), dtype=torch.float64))
    vectors = torch.stack(columns, dim=1)
    return positional_encoding(vectors, config.pos_encode_L).to(torch.float32)


# ---------------------------------------------------------------- deterministic order and randomness

def _seed_of(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def global_batch_indices(dataset_size: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of global batch `step`: epochs are seeded permutations; a last partial batch is dropped."""
    steps_per_epoch = dataset_size // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {batch_size} is larger than the dataset ({dataset_size} images)")
    epoch, position = divmod(step, steps_per_epoch)
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(_seed_of(seed, "epoch", epoch)))
    return order[position * batch_size:(position + 1) * batch_size].tolist()


@dataclass
class SampleRandomness:
    u: float  # condition-dropout draw
    timestep: int
    generator: torch.Generator  # for the noise


def sample_randomness(seed: int, step: int, position: int, num_timesteps: int) -> SampleRandomness:
    gen = torch.Generator().manual_seed(_seed_of(seed, "sample", step, position))
    u = float(torch.rand((), generator=gen))
    t = int(torch.randint(0, num_timesteps, (), generator=gen))
    return SampleRandomness(u, t, gen)


def dropout_kind(u: float, config: TrainConfig) -> tuple[bool, bool]:
    """(zero the quality vector, empty the caption) for one draw u."""
    if u < config.drop_vector:
        return True, False
    if u < config.drop_vector + config.drop_caption:
        return False, True
    if u < config.drop_vector + config.drop_caption + config.drop_both:
        return True, True
    return False, False


def noisy_and_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     alphas_cumprod: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM forward process x_t = sqrt(a) x0 + sqrt(1-a) eps, and the target of the base's prediction type."""
    a = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, *([1] * (latents.dim() - 1)))
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    if prediction_type == "eps":
        target = noise
    elif prediction_type == "v":
        target = a.sqrt() * noise - (1 - a).sqrt() * latents
    else:
        raise ValueError(f"prediction type must be 'eps' or 'v', got {prediction_type!r}")
    return noisy, target


# ---------------------------------------------------------------- checkpoints

def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
            "python": random.getstate()}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def _to_plain(value):
    """Python's random state is nested tuples; torch.load(weights_only) gives them back as tuples too."""
    if isinstance(value, list):
        return tuple(_to_plain(v) for v in value)
    return value


def save_checkpoint(folder: pathlib.Path, module: TrainableAdapter, optimizer, step: int, config: TrainConfig,
                    descriptor: dict) -> pathlib.Path:
    """`step-<N>/`: adapter (released layout) + descriptor, optimizer, RNG states, step; written atomically."""
    from safetensors.torch import save_file

    target = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(module.released_state_dict(), str(tmp / "adapter.safetensors"), metadata={"step": str(step)})
    (tmp / "adapter.json").write_text(json.dumps(descriptor, indent=2) + "\n")
    torch.save({"format": CHECKPOINT_FORMAT, "step": step, "optimizer": optimizer.state_dict(), "rng": capture_rng()},
               tmp / "state.pt")
    (tmp / "run.json").write_text(json.dumps({"step": step, "run": config.run_signature()}, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    kept = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in kept[:-max(1, config.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(folder: pathlib.Path) -> pathlib.Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "state.pt").is_file() and (p / "run.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: pathlib.Path, module: TrainableAdapter, optimizer, config: TrainConfig) -> int:
    """Restore weights, optimizer and RNG states; refuse a checkpoint of a different run. Returns the step."""
    from safetensors.torch import load_file

    run = json.loads((path / "run.json").read_text())
    saved = run["run"]
    current = json.loads(json.dumps(config.run_signature()))
    changed = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
    if changed:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"cannot resume from {path}: the run's settings changed ({detail}); "
                         "use a new output folder or the original settings")
    weights = load_file(str(path / "adapter.safetensors"))
    module.load_state_dict(weights, strict=True)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path / 'state.pt'}: not a trainer checkpoint")
    optimizer.load_state_dict(state["optimizer"])
    rng = dict(state["rng"])
    rng["python"] = _to_plain(rng["python"])
    restore_rng(rng)
    return int(state["step"])


def write_release(out_dir: pathlib.Path, name: str, module: TrainableAdapter, descriptor: dict) -> pathlib.Path:
    """`<name>.safetensors` + `<name>.json`: copy both into models/iqa_adapter to use them."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    tmp = weights.with_suffix(".safetensors.tmp")
    save_file(module.released_state_dict(), str(tmp),
              metadata={"format": "iqa_adapter", "trainer": "comfyui-iqa-adapter"})
    os.replace(tmp, weights)
    weights.with_suffix(".json").write_text(json.dumps(descriptor, indent=2) + "\n")
    return weights


# ---------------------------------------------------------------- one step

@dataclass
class Batch:
    latents: torch.Tensor
    context: torch.Tensor
    extra: dict
    vectors: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    captions: list[str] = field(default_factory=list)


def step_loss(model, batch: Batch, base: BaseModel) -> torch.Tensor:
    """MSE between the adapter-conditioned prediction and the target of the base's prediction type."""
    noisy, target = noisy_and_target(batch.latents, batch.noise, batch.timesteps, base.alphas_cumprod,
                                     base.prediction_type)
    prediction = model(noisy, batch.timesteps, batch.context, batch.extra, batch.vectors)
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def config_to_json(config: TrainConfig) -> str:
    return json.dumps(asdict(config), indent=2)


# ---------------------------------------------------------------- the run

class BatchBuilder:
    """Builds the local part of global batch `step` for process `rank` of `world` (same samples and
    randomness whatever `world` is: sample p of the global batch always draws from (seed, step, p))."""

    def __init__(self, config: TrainConfig, dataset, vectors: torch.Tensor, base: BaseModel,
                 cache_latents: bool = True):
        from .training_data import prepare_image

        self.config, self.dataset, self.vectors, self.base = config, dataset, vectors, base
        self._prepare = prepare_image
        self._latents: dict[int, tuple[torch.Tensor, tuple]] = {}
        self.cache_latents = cache_latents and len(dataset) <= 4096

    def _latent(self, index: int):
        cached = self._latents.get(index)
        if cached is None:
            prepared = self._prepare(self.dataset.open_image(index), self.config.resolution)
            latent = self.base.encode_images(prepared.pixels.unsqueeze(0))[0]
            cached = (latent, (prepared.original_size, prepared.crop_top_left, self.config.resolution))
            if self.cache_latents:
                self._latents[index] = cached
        return cached

    def build(self, step: int, rank: int = 0, world: int = 1) -> Batch:
        config = self.config
        if config.batch_size % world:
            raise ValueError(f"global batch size {config.batch_size} is not divisible by {world} processes")
        local = config.batch_size // world
        indices = global_batch_indices(len(self.dataset), config.batch_size, step, config.seed)
        latents, micro, captions, vectors, noise, timesteps = [], [], [], [], [], []
        for position in range(rank * local, (rank + 1) * local):
            index = indices[position]
            rnd = sample_randomness(config.seed, step, position, len(self.base.alphas_cumprod))
            zero_vector, empty_caption = dropout_kind(rnd.u, config)
            latent, conditioning = self._latent(index)
            latents.append(latent)
            micro.append(conditioning)
            captions.append("" if empty_caption else self.dataset.refs[index].caption)
            vector = self.vectors[index]
            vectors.append(torch.zeros_like(vector) if zero_vector else vector)
            noise.append(torch.randn(latent.shape, generator=rnd.generator))
            timesteps.append(rnd.timestep)
        context, extra = self.base.encode_text(captions, micro)
        device = self.base.device
        return Batch(latents=torch.stack(latents).to(device), context=context, extra=extra,
                     vectors=torch.stack(vectors).to(device), noise=torch.stack(noise).to(device),
                     timesteps=torch.tensor(timesteps, dtype=torch.long, device=device), captions=captions)


def build_module(config: TrainConfig, base: BaseModel) -> TrainableAdapter:
    torch.manual_seed(config.seed)  # the projection's default initialisation
    module = TrainableAdapter(base.cross_attention_dim, base.layer_widths, config.input_dim, config.num_tokens,
                              config.projection, config.mlp_hidden_dim)
    module.init_from_base(base.base_kv_weights())
    return module.to(base.device).attach(base)


class LossLog:
    """`log.csv` (step, epoch, loss, lr, seconds); on resume rows after the resumed step are dropped."""

    COLUMNS = ["step", "epoch", "loss", "lr", "seconds"]

    def __init__(self, path: pathlib.Path, resume_step: int):
        import csv

        self.path = path
        rows = []
        if path.is_file() and resume_step > 0:
            with path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle)
                        if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.COLUMNS)
            writer.writeheader()
            writer.writerows({k: r[k] for k in self.COLUMNS} for r in rows)

    def add(self, **row) -> None:
        import csv

        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.COLUMNS).writerow(row)


def train(config: TrainConfig, dataset, vectors: torch.Tensor, base: BaseModel, out_dir: str | os.PathLike,
          descriptor: dict, accelerator=None, resume: bool = True, stop_at: int | None = None,
          progress: bool = True) -> pathlib.Path | None:
    """Run (or resume) training; returns the released adapter file (None when stopped early by `stop_at`).

    `accelerator`: an `accelerate.Accelerator` (multi-process, mixed precision); one is made if None.
    `stop_at`: stop after this many completed steps, as an interruption would (tests of resume).
    """
    import time

    from accelerate import Accelerator

    out_dir = pathlib.Path(out_dir)
    accelerator = accelerator or Accelerator(cpu=base.device.type == "cpu")
    main = accelerator.is_main_process
    checkpoints = out_dir / "checkpoints"
    if main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(config_to_json(config) + "\n")
    module = build_module(config, base)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    start = 0
    latest = latest_checkpoint(checkpoints) if resume else None
    if latest is not None:
        start = load_checkpoint(latest, module, optimizer, config)
        if main:
            print(f"[train] resumed from {latest} at step {start}")
    model, optimizer = accelerator.prepare(module, optimizer)
    builder = BatchBuilder(config, dataset, vectors, base)
    log = LossLog(out_dir / "log.csv", start) if main else None
    steps_per_epoch = len(dataset) // config.batch_size
    end = config.max_steps if stop_at is None else min(stop_at, config.max_steps)
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=config.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    began = time.perf_counter()
    for step in range(start, end):
        batch = builder.build(step, accelerator.process_index, accelerator.num_processes)
        with accelerator.autocast():
            loss = step_loss(model, batch, base)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
        done = step + 1
        if main:
            log.add(step=done, epoch=step // steps_per_epoch, loss=repr(mean_loss), lr=config.learning_rate,
                    seconds=round(time.perf_counter() - began, 3))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
        if done % config.save_every == 0 or done == config.max_steps:
            if main:
                save_checkpoint(checkpoints, accelerator.unwrap_model(model), optimizer, done, config, descriptor)
            accelerator.wait_for_everyone()
    if bar is not None:
        bar.close()
    if end < config.max_steps:
        return None
    release = out_dir / f"{config.name}.safetensors"  # every process returns it; the main one writes it
    if main:
        release = write_release(out_dir, config.name, accelerator.unwrap_model(model), descriptor)
        print(f"[train] wrote {release} and {release.with_suffix('.json').name}")
    accelerator.wait_for_everyone()
    return release
