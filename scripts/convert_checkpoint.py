"""Convert IQA-Adapter training output to the released layout + descriptor (what IQAAdapterLoader reads).

    .venv/bin/python scripts/convert_checkpoint.py output/checkpoint-3000 models/iqa_adapter/my_adapter.safetensors \
        --metrics topiq_nr laion_aes

Accepts the authors' `accelerator.save_state` folders/files (`unet.*`, `qual_proj_model.*`,
`adapter_modules.<i>.*`; both copies of the adapter weights must agree), this pack's trainer
checkpoints (`checkpoints/step-N/`), or a released file. Pickled `.bin` files are read tensors-only.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="checkpoint folder or weights file")
    p.add_argument("target", help="output .safetensors (the descriptor goes next to it as .json)")
    p.add_argument("--descriptor",
                   help="descriptor JSON file to write next to the weights (instead of the options below)")
    p.add_argument("--metrics", nargs="+", help="pyiqa ids in the order of the training --features")
    p.add_argument("--normalization", choices=["zscore", "none"], default="zscore",
                   help="the training --normalized flag")
    p.add_argument("--flag", action="store_true", help="trained with --use_flag 1")
    p.add_argument("--pos-encode-L", type=int, default=0, help="trained with --pos_encode 1: its --pos_encode_L")
    args = p.parse_args(argv)
    from comfyui_iqa_adapter.adapter import checkpoint

    if args.descriptor:
        descriptor = json.loads(pathlib.Path(args.descriptor).read_text())
    elif args.metrics:
        descriptor = {"kind": "score", "metrics": args.metrics, "normalization": args.normalization,
                      "use_flag": args.flag, "pos_encode_L": args.pos_encode_L}
    else:
        p.error("give --metrics (and --flag / --pos-encode-L as trained) or --descriptor")
    try:
        released = checkpoint.convert_training_output(args.source, args.target, descriptor)
    except ValueError as error:
        print(f"convert: {error}", file=sys.stderr)
        return 2
    layers = sum(1 for k in released if k.endswith("to_k_ip.weight"))
    print(f"convert: wrote {args.target} ({layers} cross-attention layers) and "
          f"{pathlib.Path(args.target).with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
