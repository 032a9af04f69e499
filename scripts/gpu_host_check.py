"""The pack on an NVIDIA GPU under a host that manages VRAM itself (ComfyUI >= 0.12 with comfy-aimdo).

Not part of CI (CI has no GPU). Run on a CUDA machine with the host's requirements installed:
    python scripts/make_tiny_models.py --comfy /path/to/ComfyUI
    python scripts/gpu_host_check.py --comfy /path/to/ComfyUI --out gpu_check.json
(the pack is linked into the host's custom_nodes if it is not installed there).
Through the real server, without --cpu, it checks:
1. the host's dynamic VRAM is active (its log says so), so host-managed modules carry native buffers;
2. gradient quality guidance (decoder=vae, differentiable metric on the GPU) and the IQA-Adapter run;
3. the live VAE survives guidance: a plain render after guided renders (and a forced unload/collect)
   matches the same render before them within the host's own floor (a repeat render, and a render
   after a pack-free prompt of another size).
   A guidance path that deep-copied the VAE would free the live VAE's buffers when the copy is collected.
Prints one JSON object; exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

from comfyui_iqa_adapter.scripts.comfy_server import ComfyServer, ensure_pack_linked

TINY_CHECKPOINT = "tiny_sd15.safetensors"
TINY_ADAPTER = "tiny_sd15_iqa_adapter.safetensors"


def txt2img(seed: int, prefix: str, size: int = 256, steps: int = 6) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def guided(seed: int, prefix: str) -> dict:
    graph = txt2img(seed, prefix)
    graph["10"] = {"class_type": "IQAAdapterLoader", "inputs": {"adapter_name": TINY_ADAPTER}}
    graph["11"] = {"class_type": "IQAAdapterEncodeTarget", "inputs": {"adapter": ["10", 0]}}
    graph["12"] = {"class_type": "IQAAdapterApply", "inputs": {
        "model": ["1", 0], "adapter": ["10", 0], "tokens": ["11", 0], "weight": 1.0,
        "start_at": 0.0, "end_at": 1.0}}
    graph["8"] = {"class_type": "IQAMetricLoader",
                  "inputs": {"metric": "cnniqa", "device": "auto", "differentiable": True}}
    graph["9"] = {"class_type": "IQAGradientGuidance", "inputs": {
        "model": ["12", 0], "vae": ["1", 2], "metric": ["8", 0], "scale": 1.0, "start_at": 0.0,
        "end_at": 1.0, "decoder": "vae", "normalization": "rms", "target": "raise", "max_resolution": 0,
        "chunk_size": 4}}
    graph["5"]["inputs"]["model"] = ["9", 0]
    return graph


def fill_defaults(server: ComfyServer, graph: dict) -> dict:
    """Fill required widget inputs the graph leaves out with the node's defaults from /object_info."""
    info = server.object_info()
    for node in graph.values():
        spec = info[node["class_type"]]["input"].get("required", {})
        for name, entry in spec.items():
            if name in node["inputs"]:
                continue
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if "default" in options:
                node["inputs"][name] = options["default"]
            elif isinstance(entry[0], list) and entry[0]:
                node["inputs"][name] = entry[0][0]
    return graph


def load_pixels(server: ComfyServer, result, node_id: str = "7"):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(server.output_file(result.images(node_id)[0])).convert("RGB"), dtype=np.int16)


def max_abs_diff(a, b) -> int | None:
    """Largest per-pixel difference in grey levels (0-255)."""
    return None if a is None or b is None else int(abs(a - b).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfy", type=pathlib.Path, required=True, help="the host's ComfyUI folder")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the JSON summary here")
    parser.add_argument("--front-end-root", default=None,
                        help="serve this frontend folder (a machine without the host's frontend package)")
    args = parser.parse_args()
    from comfyui_iqa_adapter.scripts import random_weights

    ensure_pack_linked(args.comfy)
    metric_folder = args.comfy / "models" / "iqa"
    metric_folder.mkdir(parents=True, exist_ok=True)
    random_weights.write_random_weights("cnniqa", str(metric_folder), seed=0)

    summary: dict = {"checks": {}}
    work = pathlib.Path(tempfile.mkdtemp(prefix="iqa-gpu-check-"))
    extra = ["--front-end-root", args.front_end_root] if args.front_end_root else []
    with ComfyServer(work, args.comfy.resolve(), extra_args=extra, cpu=False) as server:
        log = server.log_text()
        summary["dynamic_vram"] = "DynamicVRAM support detected and enabled" in log
        summary["device_line"] = next((line for line in log.splitlines() if line.startswith("Device:")), "")
        runs, pixels = [], {}
        sequence = (("plain_a", txt2img(3, "plain_a")), ("plain_b", txt2img(3, "plain_b")),
                    ("host_only", txt2img(5, "host_only", size=384)), ("plain_e", txt2img(3, "plain_e")),
                    ("guided_a", guided(3, "guided_a")), ("plain_c", txt2img(3, "plain_c")),
                    ("guided_b", guided(4, "guided_b")), ("free", None), ("plain_d", txt2img(3, "plain_d")))
        for label, graph in sequence:
            if graph is None:  # unload everything, as a busy server would between prompts
                server.post("/free", {"unload_models": True, "free_memory": True})
                time.sleep(2)
                continue
            started = time.monotonic()
            result = server.run(fill_defaults(server, graph))
            entry = {"label": label, "ok": result.ok, "seconds": round(time.monotonic() - started, 2)}
            if result.ok:
                pixels[label] = load_pixels(server, result)
                if label != "host_only":  # another size: it only changes what the host holds
                    entry["max_abs_diff_vs_plain_a"] = max_abs_diff(pixels[label], pixels.get("plain_a"))
            else:
                entry["error"] = result.error_message()
            runs.append(entry)
        summary["runs"] = runs
        summary["log_tail"] = server.log_tail(12)
    diffs = {r["label"]: r.get("max_abs_diff_vs_plain_a") for r in runs}
    # The host's own floor on this GPU: a repeat render, and the same render after a pack-free prompt
    # of another size (the host may load or cast weights differently after it).
    host_diffs = [diffs.get("plain_b"), diffs.get("plain_e")]
    floor = None if None in host_diffs else max(host_diffs)
    summary["plain_floor_grey_levels"] = floor
    checks = summary["checks"]
    checks["all_prompts_ran"] = all(r["ok"] for r in runs)
    checks["dynamic_vram_active"] = summary["dynamic_vram"]
    after = [diffs.get("plain_c"), diffs.get("plain_d")]
    checks["plain_renders_after_guidance_within_floor"] = (
        floor is not None and None not in after and max(after) <= max(2 * floor, 2))
    checks["guidance_changes_the_image"] = (diffs.get("guided_a") or 0) > max(2 * (floor or 0), 2)
    summary["passed"] = all(checks.values())
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
