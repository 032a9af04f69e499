"""API-format prompts the tests queue: one builder per graph shape, node ids fixed so tests can wire to them.

txt2img nodes: 1 checkpoint, 2/3 prompts, 4 latent, 5 sampler, 6 decode, 7 save. The adapter adds 10 loader,
11 encode, 12 apply (on the sampler's model); scoring adds 20 metric loader, 21 score; guidance adds 40.
"""
from __future__ import annotations

import uuid

TINY_CHECKPOINT = "tiny_sd15.safetensors"  # written by scripts/setup.sh into the host's models/checkpoints
TINY_ADAPTER = "tiny_sd15_iqa_adapter.safetensors"  # ... and models/iqa_adapter (+ its .json descriptor)
SCORE_METRIC = "piqe"  # weight-free pyiqa metric: scoring works without any downloaded file


def unique_prefix(label: str) -> str:
    """An output prefix no other prompt uses (the host reuses the outputs of an identical prompt)."""
    return f"iqa_test/{label}_{uuid.uuid4().hex[:8]}"


def txt2img(ckpt=TINY_CHECKPOINT, text="a photo of a cat", negative="", seed=1, steps=2, cfg=5.0, width=64,
            height=64, batch=1, sampler="euler", scheduler="normal", prefix="iqa_test") -> dict:
    """A plain text-to-image graph (node ids are strings, as the server expects)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def encode_target(adapter=TINY_ADAPTER, targets="", target=90.0, mode="percentile", quality="custom") -> dict:
    """Loader (10) -> Encode Target (11): the tokens without a model. `target` is the percentile slider."""
    return {
        "10": {"class_type": "IQAAdapterLoader", "inputs": {"adapter_name": adapter}},
        "11": {"class_type": "IQAAdapterEncodeTarget", "inputs": {
            "adapter": ["10", 0], "quality": quality, "percentile": target, "targets": targets, "mode": mode,
            "negative_scale": 0.0}},
    }


def adapter_graph(adapter=TINY_ADAPTER, targets="", target=90.0, mode="percentile", quality="custom", weight=1.0,
                  start_at=0.0, end_at=1.0, seed=1, steps=2, batch=1, size=64, prefix=None) -> dict:
    """txt2img with the adapter on the sampler's model (10 loader, 11 encode, 12 apply); a unique prefix unless
    one is given."""
    graph = txt2img(seed=seed, steps=steps, width=size, height=size, batch=batch,
                    prefix=prefix or unique_prefix("iqa"))
    graph.update(encode_target(adapter, targets, target, mode, quality))
    graph["12"] = {"class_type": "IQAAdapterApply", "inputs": {
        "model": ["1", 0], "adapter": ["10", 0], "tokens": ["11", 0], "weight": weight, "start_at": start_at,
        "end_at": end_at}}
    graph["5"]["inputs"]["model"] = ["12", 0]
    return graph


def target_sweep_workflow(steps=2, size=64) -> dict:
    """The workflow scripts/sweep.py sweeps: one adapter target, the positive prompt titled as users title it."""
    graph = adapter_graph(target=50.0, steps=steps, size=size, prefix="iqa_test")
    graph["2"]["_meta"] = {"title": "Positive prompt"}
    return graph


def add_score(graph: dict, images, metric=SCORE_METRIC, differentiable=False, save_rows="none",
              prefix=None) -> dict:
    """Metric loader (20) and Quality Score (21) on `images` (a link such as ["6", 0])."""
    graph["20"] = {"class_type": "IQAMetricLoader", "inputs": {"metric": metric, "device": "cpu",
                                                               "differentiable": differentiable}}
    graph["21"] = {"class_type": "IQAScore", "inputs": {
        "images": images, "metric": ["20", 0], "chunk_size": 8, "save_rows": save_rows,
        "filename_prefix": prefix or unique_prefix("scores")}}
    return graph


def add_guidance(graph: dict, model=("12", 0), metric=("20", 0), normalization="none", max_resolution=0) -> dict:
    """Gradient guidance (40) between `model` and the sampler, steered by `metric` (a differentiable loader)."""
    graph["40"] = {"class_type": "IQAGradientGuidance", "inputs": {
        "model": list(model), "vae": ["1", 2], "metric": list(metric), "scale": 1.0, "start_at": 0.0,
        "end_at": 1.0, "decoder": "vae", "normalization": normalization, "target": "raise",
        "max_resolution": max_resolution, "chunk_size": 4}}
    graph["5"]["inputs"]["model"] = ["40", 0]
    return graph


def empty_image(width: int, height: int, color: int = 0x336699) -> dict:
    """One solid image (node 30), for scoring without sampling."""
    return {"30": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": 1,
                                                          "color": color}}}
