"""Does a trained adapter's conditioning carry information? (shared by tests/test_trainer_signal.py and
benchmarks/bench_trainer_signal.py)

Images: crops of the photo matplotlib ships (`grace_hopper.jpg`), each in 7 versions (clean, Gaussian blur
x2, Gaussian noise x2, JPEG x2), labelled by pyiqa's weight-free `piqe` through the trainer's own
labelling (CC3M protocol) and z-scored with the set's statistics. Crops are split: the adapter trains
on some, the held-out crops measure the denoising loss with their true quality vectors and with the
vectors shuffled among them (a fixed derangement), on identical noise and timesteps.
"""
from __future__ import annotations

import io
import pathlib

import numpy as np
import torch

SIZE = 64  # training resolution (8x8 latents)
IMAGE_SIZE = 256  # files (and labels) at 4x: the degradations survive the 512x512 squash
CROP_BOXES = [(40, 40, 240, 240), (260, 40, 460, 240), (40, 300, 240, 500), (260, 300, 460, 500),
              (150, 150, 350, 350), (150, 380, 350, 580)]
HELD_OUT = 2  # the last crops are held out
# strong enough to survive the 4x downscale to the training resolution
DEGRADATIONS = [("clean", None), ("blur", 4.0), ("blur", 10.0), ("noise", 40.0), ("noise", 80.0),
                ("jpeg", 10), ("jpeg", 3)]


def photo():
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        return Image.open(io.BytesIO(handle.read())).convert("RGB")


def degrade(image, kind, level, rng):
    from PIL import Image, ImageFilter

    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(level))
    if kind == "noise":
        array = np.asarray(image, dtype=np.float32) + rng.normal(0, level, (IMAGE_SIZE, IMAGE_SIZE, 3))
        return Image.fromarray(np.clip(array, 0, 255).astype("uint8"))
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(level))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def make_degraded_set(folder: pathlib.Path) -> tuple[list[str], list[str]]:
    """Writes the images; returns (training keys, held-out keys)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    source = photo()
    rng = np.random.default_rng(0)
    train, held = [], []
    for c, box in enumerate(CROP_BOXES):
        crop = source.crop(box).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        for d, (kind, level) in enumerate(DEGRADATIONS):
            name = f"crop{c}_{d}_{kind}.png"
            degrade(crop, kind, level, rng).save(folder / name)
            (folder / name).with_suffix(".txt").write_text("a photo")
            (held if c >= len(CROP_BOXES) - HELD_OUT else train).append(name)
    return train, held


class Subset:
    """The dataset restricted to some keys (same refs, same order rules)."""

    def __init__(self, dataset, keys):
        from comfyui_iqa_adapter.adapter.training_data import ImageDataset

        wanted = set(keys)
        self.inner = ImageDataset([r for r in dataset.refs if r.key in wanted], dataset.description)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


def derangement(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        if all(i != j for i, j in enumerate(order)):
            return order


def run(base, work: pathlib.Path, seed: int, steps: int = 40, batch_size: int = 4, lr: float = 3e-3,
        eval_draws: int = 2) -> dict:
    """Train on the training crops, return held-out losses with true and shuffled vectors."""
    from accelerate import Accelerator

    from comfyui_iqa_adapter.adapter import training, training_data

    images = work / "images"
    if not images.is_dir():
        make_degraded_set(images)
    train_keys, held_keys = _split(images)
    dataset = training_data.open_dataset([str(images)])
    scores = {"piqe": training_data.score_dataset(dataset, "piqe", work / "labels")}
    stats = training_data.write_stats_csv(work / "stats.csv", scores)
    config = training.TrainConfig(metrics=["piqe"], resolution=SIZE, batch_size=batch_size, max_steps=steps,
                                  save_every=steps, learning_rate=lr, seed=seed, name=f"signal_{seed}")
    train_set = Subset(dataset, train_keys)
    vectors = training.quality_vectors(config, scores, train_set.keys(), stats)
    out = work / f"run_{seed}"
    training.train(config, train_set, vectors, base, out, training.descriptor_dict(config, stats),
                   accelerator=Accelerator(cpu=True), resume=False, progress=False)
    module = training.build_module(config, base)
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(out / f"{config.name}.safetensors")))
    module.eval()

    held_set = Subset(dataset, held_keys)
    held_vectors = training.quality_vectors(config, scores, held_set.keys(), stats)
    shuffled = held_vectors[derangement(len(held_set), seed)]
    builder = training.BatchBuilder(config, held_set, held_vectors, base)
    losses = {"true": [], "shuffled": []}
    with torch.no_grad():
        for draw in range(eval_draws):
            for index in range(len(held_set)):
                latent, micro = builder._latent(index)
                rnd = training.sample_randomness(seed + 10_000, draw, index, len(base.alphas_cumprod))
                noise = torch.randn(latent.shape, generator=rnd.generator).unsqueeze(0)
                t = torch.tensor([rnd.timestep])
                context, extra = base.encode_text([held_set.refs[index].caption], [micro])
                noisy, target = training.noisy_and_target(latent.unsqueeze(0), noise, t, base.alphas_cumprod,
                                                          base.prediction_type)
                for name, vecs in (("true", held_vectors), ("shuffled", shuffled)):
                    prediction = module(noisy, t, context, extra, vecs[index:index + 1])
                    losses[name].append(float(torch.mean((prediction - target) ** 2)))
    true, shuf = float(np.mean(losses["true"])), float(np.mean(losses["shuffled"]))
    return {"seed": seed, "steps": steps, "loss_true": true, "loss_shuffled": shuf, "gap": shuf - true,
            "relative_gap": (shuf - true) / shuf, "label_std": float(np.std(list(scores["piqe"].values())))}


def _split(images: pathlib.Path) -> tuple[list[str], list[str]]:
    held_crops = {f"crop{c}_" for c in range(len(CROP_BOXES) - HELD_OUT, len(CROP_BOXES))}
    names = sorted(p.name for p in images.glob("*.png"))
    held = [n for n in names if any(n.startswith(h) for h in held_crops)]
    return [n for n in names if n not in held], held
