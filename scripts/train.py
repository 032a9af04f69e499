"""Train an IQA-Adapter for a ComfyUI SD1.5/SDXL checkpoint on your images and metrics.

    .venv/bin/python scripts/train.py --checkpoint tiny_sd15.safetensors --data my_images/ \
        --metrics piqe --steps 200 --out runs/piqe

Several processes / GPUs: `accelerate launch [--num_processes N] scripts/train.py ...` (same arguments).
Writes into --out: `<name>.safetensors` + `<name>.json` (released layout + descriptor: copy both into
models/iqa_adapter), `labels/<metric>.csv` (raw scores by image, resume-safe), `stats.csv` (the
authors' CC3M_stats.csv layout), `log.csv`, `config.json` and `checkpoints/step-N/`. Running the same
command again resumes from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import os
import pathlib

from comfyui_iqa_adapter.scripts.comfy_server import PACK_ROOT, import_host


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="ComfyUI checkpoint file (path, or a name in the host's models/checkpoints)")
    p.add_argument("--data", nargs="+", required=True, help="image folders and/or WebDataset .tar shards")
    p.add_argument("--captions", help="CSV or JSONL with columns image,text (else <image>.txt / the shard's txt)")
    p.add_argument("--metrics", nargs="+", required=True, help="pyiqa metric ids, in input-vector order")
    p.add_argument("--normalization", choices=["dataset", "cc3m", "none"], default="dataset",
                   help="z-scores from this dataset's statistics (written to the descriptor), CC3M's, or raw scores")
    p.add_argument("--flag", action="store_true", help="append a constant 1.0 after the metrics")
    p.add_argument("--pos-encode-L", type=int, default=0, help="sin/cos encoding frequencies (0 = off)")
    p.add_argument("--tokens", type=int, default=2, help="quality tokens N")
    p.add_argument("--projection", choices=["linear", "mlp"], default="linear")
    p.add_argument("--mlp-hidden", type=int, default=128)
    p.add_argument("--resolution", type=int, default=1024, help="training resolution (SD1.5: 512)")
    p.add_argument("--batch-size", type=int, default=4, help="global batch size (all processes together)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--out", required=True, help="output folder (resumed when it holds checkpoints)")
    p.add_argument("--name", help="adapter file name (default: the output folder's name)")
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (with accelerate: the process's device)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--metric-folder", action="append", default=[], help="folder with IQA metric weights")
    p.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH", str(PACK_ROOT / ".host" / "ComfyUI")),
                   help="ComfyUI folder (its loader reads the checkpoint)")
    p.add_argument("--stop-at", type=int, help=argparse.SUPPRESS)  # tests: stop as if interrupted
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from accelerate import Accelerator
    except ImportError:
        raise SystemExit("train: the trainer needs `accelerate`: pip install -r requirements-train.txt") from None
    cpu = args.device == "cpu" or (args.device == "auto" and not __import__("torch").cuda.is_available())
    accelerator = Accelerator(cpu=cpu, mixed_precision=args.mixed_precision)
    device = str(accelerator.device)
    comfy_dir = pathlib.Path(args.comfy).resolve()
    import_host(comfy_dir, cpu)
    from comfyui_iqa_adapter.adapter import training, training_data
    from comfyui_iqa_adapter.nodes.train_host import HostBase

    out = pathlib.Path(args.out)
    name = args.name or out.resolve().name
    ckpt = pathlib.Path(args.checkpoint)
    if not ckpt.is_file():
        ckpt = comfy_dir / "models" / "checkpoints" / args.checkpoint
    if not ckpt.is_file():
        raise SystemExit(f"train: --checkpoint {args.checkpoint}: no such file (nor in {comfy_dir}/models/checkpoints)")
    config = training.TrainConfig(
        metrics=list(args.metrics), normalization=args.normalization, use_flag=args.flag,
        pos_encode_L=args.pos_encode_L, num_tokens=args.tokens, projection=args.projection,
        mlp_hidden_dim=args.mlp_hidden, resolution=args.resolution, batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=args.lr, weight_decay=args.weight_decay, seed=args.seed,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, name=name, checkpoint=ckpt.name)
    try:  # the descriptor the run will write must be valid before hours of labelling and training
        from comfyui_iqa_adapter.adapter.descriptor import descriptor_from_dict

        placeholder = {m: {"mean_val": 0.0, "std_val": 1.0} for m in config.metrics}
        descriptor_from_dict(training.descriptor_dict(config, placeholder), source="train.py arguments")
        dataset = training_data.open_dataset(args.data, args.captions)
    except ValueError as error:
        raise SystemExit(f"train: {error}") from None
    labels_dir = out / "labels"
    scores = {}
    # The main process scores (and caches) the labels; the others read its table.
    for turn in ("main", "others"):
        if (turn == "main") == accelerator.is_main_process:
            for metric in config.metrics:
                if accelerator.is_main_process:
                    print(f"[train] labels: {metric} on {len(dataset)} images (cached in {labels_dir})")
                scores[metric] = training_data.score_dataset(dataset, metric, labels_dir, device=device,
                                                             metric_folders=tuple(args.metric_folder))
        accelerator.wait_for_everyone()
    stats = training_data.write_stats_csv(out / "stats.csv", scores) if accelerator.is_main_process else \
        {m: training_data.metric_statistics(list(scores[m].values())) for m in config.metrics}
    vectors = training.quality_vectors(config, scores, dataset.keys(), stats)
    descriptor = training.descriptor_dict(config, stats)
    base = HostBase.from_checkpoint(str(ckpt), device=device)
    release = training.train(config, dataset, vectors, base, out, descriptor, accelerator=accelerator,
                             resume=not args.no_resume, stop_at=args.stop_at)
    del base  # release the host's model patchers while the host's modules are still alive
    __import__("gc").collect()
    return 0 if release is not None or args.stop_at else 1


if __name__ == "__main__":
    raise SystemExit(main())
