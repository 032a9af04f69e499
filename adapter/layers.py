"""Order of the cross-attention layers, host-free.

Checkpoint key 2k+1 belongs to cross-attention layer k in diffusers' `unet.attn_processors` order:
down blocks, then up blocks, then the mid block LAST (diffusers registers `mid_block` after
`up_blocks`); inside a block its transformer blocks in order. In the LDM/ComfyUI numbering these are
('input', id, j), ('output', id, j), ('middle', 0, j), with j the index inside the block's
SpatialTransformer (ComfyUI's attn2 replace-patch key).
"""
from __future__ import annotations

from collections.abc import Iterable

LayerKey = tuple[str, int, int]  # (block_name, block_id, transformer_index)
BLOCK_ORDER = {"input": 0, "output": 1, "middle": 2}

# Hidden widths of the cross-attention layers of the full base models, in checkpoint (diffusers) order.
SD15_LAYER_WIDTHS = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
SDXL_LAYER_WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10


def ordered_layer_keys(layout: Iterable[tuple[str, int, int]]) -> list[LayerKey]:
    """(block_name, block_id, depth) per transformer-carrying block -> keys in checkpoint order.

    Position k of the result is checkpoint key ip_adapter.<2k+1>. Blocks with depth 0 are skipped.
    """
    blocks = []
    seen = set()
    for block_name, block_id, depth in layout:
        if block_name not in BLOCK_ORDER:
            raise ValueError(f"layer layout: block name must be one of {list(BLOCK_ORDER)}, got {block_name!r}")
        if (block_name, block_id) in seen:
            raise ValueError(f"layer layout: block ({block_name!r}, {block_id}) listed twice")
        seen.add((block_name, block_id))
        if int(depth) > 0:
            blocks.append((BLOCK_ORDER[block_name], int(block_id), block_name, int(depth)))
    blocks.sort()
    return [(name, block_id, j) for _, block_id, name, depth in blocks for j in range(depth)]


def check_layers_match(adapter_widths: list[int], adapter_context_dim: int, model_widths: list[int],
                       model_context_dim: int | None = None, adapter_name: str = "adapter") -> None:
    """Raise a ValueError that says what differs when an adapter does not fit a model."""
    model_desc = f"{len(model_widths)}" + (f" (context dim {model_context_dim})" if model_context_dim else "")
    adapter_desc = f"{len(adapter_widths)} cross-attention layers (C={adapter_context_dim})"
    if len(adapter_widths) != len(model_widths) or (model_context_dim and model_context_dim != adapter_context_dim):
        raise ValueError(f"{adapter_name} has {adapter_desc} but the model has {model_desc}: "
                         "this adapter was trained for a different base model (SD1.5 adapters: 16 layers, C=768; "
                         "SDXL adapters: 70 layers, C=2048)")
    bad = [(k, a, m) for k, (a, m) in enumerate(zip(adapter_widths, model_widths)) if a != m]
    if bad:
        k, a, m = bad[0]
        raise ValueError(f"{adapter_name}: cross-attention layer {k} (key ip_adapter.{2 * k + 1}) has width {a} but "
                         f"the model's layer {k} has width {m} ({len(bad)} layers differ): different base model")
