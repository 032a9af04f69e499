"""Install IQA-Adapter decoupled cross-attention on a ComfyUI model (host glue; the math is adapter/attention.py).

One attn2 replace patch per cross-attention layer, keyed `(block_name, block_id, transformer_index)` as
the host's BasicTransformerBlock looks them up. The host hands the patch q = to_q(n), k = to_k(context),
v = to_v(context) and applies to_out to what the patch returns, so the patch returns
`A_text + weight * A_quality` (docs/METHOD.md §1.5).

Design decisions:
- The quality tokens' keys/values are computed once per apply (fp32, CPU) and cached per
  (device, dtype) inside each patch object; the adapter's weights are not touched while sampling.
  Hence the patches own no module for the host to load or offload, only a few (N x hidden) tensors per
  layer that follow the activations' device; their `.models()` passes on those of the patches they chain,
  which the host no longer sees on the key. `cleanup()` (called by hosts >= 0.17 after sampling) drops
  the per-device copies.
- Other packs' attention patches, either order. A patch found on the layer's key is chained: it computes
  the text part (plus its own branches). A pack applied after us finds our object on the key it uses and
  adds its branch to it, IPAdapter_plus style (`.add(callback, **kwargs)`; `.set_new_condition(**kwargs)`
  of older forks). So that it finds us: a block with one transformer (SD1.5) is installed under its
  2-part key `(block, id)` as well, which is what IPAdapter_plus uses there (the 3-part key on SDXL).
- Patch objects are shared, never deep-copied (`__deepcopy__` returns the object; hosts >= 0.14 do not
  deep-copy patch objects at all), so a pack that adds its branch in place would also change every other
  model holding the object. A clone callback therefore gives each clone of a patched model its own view
  of our patches (same tensors and caches, its own list of added branches): the IQA-only model used
  elsewhere in the graph never runs another pack's branch.
- weight == 0, or a step outside [start_at, end_at], skips the quality branch entirely: the text
  attention is then computed exactly as the unpatched host does, so the result is bit-identical.
"""
from __future__ import annotations

import copy
import math
import sys

import torch

from ..adapter import attention as adapter_attention
from ..adapter import errors, projection
from ..adapter import layers as adapter_layers
from ..adapter.errors import InputError
from .inputs import check_schedule

NODE = "IQAAdapterApply"


# ---------------------------------------------------------------- model inspection

def _diffusion_model(model):
    inner = getattr(model, "model", None)
    unet = getattr(inner, "diffusion_model", None)
    if unet is None or not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        kind = type(inner).__name__ if inner is not None else type(model).__name__
        raise InputError(f"{kind} has no LDM UNet (input_blocks/middle_block/output_blocks); "
                         "IQA-Adapter works with SD1.5 / SDXL-family UNets", "model")
    return unet


def _spatial_transformers(block):
    from comfy.ldm.modules.attention import SpatialTransformer

    modules = block if isinstance(block, torch.nn.Sequential) else [block]
    return [m for m in modules if isinstance(m, SpatialTransformer)]


def unet_cross_attention_layers(model) -> tuple[list[tuple[str, int, int]], list[int], int]:
    """Walk the host UNet: (layer keys in checkpoint order, hidden width of each, context dim).

    Works on any device, meta included (only weight shapes are read).
    """
    unet = _diffusion_model(model)
    layout, widths, context_dims = [], {}, set()
    groups = [("input", list(unet.input_blocks)), ("middle", [unet.middle_block]), ("output", list(unet.output_blocks))]
    for block_name, blocks in groups:
        for block_id, block in enumerate(blocks):
            transformers = _spatial_transformers(block)
            if not transformers:
                continue
            if len(transformers) > 1:
                raise InputError(f"block ({block_name}, {block_id}) holds {len(transformers)} "
                                 "spatial transformers; the host's patch keys cannot tell them apart", "model")
            blocks_in = list(transformers[0].transformer_blocks)
            layout.append((block_name, block_id, len(blocks_in)))
            for j, tb in enumerate(blocks_in):
                if tb.attn2 is None:
                    raise InputError(f"layer ({block_name}, {block_id}, {j}) has no cross-attention", "model")
                widths[(block_name, block_id, j)] = int(tb.attn2.to_k.weight.shape[0])
                context_dims.add(int(tb.attn2.to_k.weight.shape[1]))
    keys = adapter_layers.ordered_layer_keys(layout)
    if not keys:
        raise InputError("the UNet has no cross-attention layers", "model")
    if len(context_dims) != 1:
        raise InputError(f"cross-attention layers take different context sizes {sorted(context_dims)}", "model")
    return keys, [widths[k] for k in keys], context_dims.pop()


def check_adapter_fits(model, adapter) -> list[tuple[str, int, int]]:
    keys, widths, context_dim = unet_cross_attention_layers(model)
    try:
        adapter_layers.check_layers_match(adapter.info.layer_widths, adapter.info.cross_attention_dim, widths,
                                          context_dim, adapter_name=f"adapter ({adapter.info.base})")
    except ValueError as error:
        raise InputError(str(error), "adapter") from None
    return keys


# ---------------------------------------------------------------- the patch

_HOST_ATTENTION = None


def _host_text_attention(q, k, v, extra_options):
    """Exactly what the unpatched CrossAttention computes between to_q/k/v and to_out."""
    global _HOST_ATTENTION
    if _HOST_ATTENTION is None:
        from comfy.ldm.modules import attention as host_attention

        _HOST_ATTENTION = host_attention
    # Looked up per call: the host picks its attention backend at startup (module attribute).
    return _HOST_ATTENTION.optimized_attention(q, k, v, extra_options["n_heads"],
                                              attn_precision=extra_options.get("attn_precision"),
                                              transformer_options=extra_options)


class SigmaWindow:
    """Whether the current step lies in [start_at, end_at] (fractions of the schedule, host's percent_to_sigma)."""

    def __init__(self, sigma_start: float, sigma_end: float, always: bool):
        self.sigma_start, self.sigma_end, self.always = float(sigma_start), float(sigma_end), always
        self._last = (None, True)  # (sigmas tensor, verdict): one host sync per model call, not per layer

    def __deepcopy__(self, memo):
        return self

    def forget(self) -> None:
        self._last = (None, True)  # drop the reference to the last sampling's sigmas (device memory)

    def active(self, extra_options) -> bool:
        if self.always:
            return True
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        last_tensor, verdict = self._last
        if last_tensor is sigmas:  # the host passes the same tensor object to every layer of one call
            return verdict
        sigma = float(sigmas.detach().flatten()[0].item())
        verdict = self.sigma_end <= sigma <= self.sigma_start
        self._last = (sigmas, verdict)
        return verdict


class IQAAttn2Patch:
    """attn2 replace patch for one layer: text attention (own or a chained patch's), branches other packs
    added to it, then + weight * quality attention."""

    def __init__(self, k_cond, v_cond, k_uncond, v_uncond, weight: float, window: SigmaWindow,
                 previous=None, label: str = ""):
        self.kv_cpu = (k_cond, v_cond, k_uncond, v_uncond)  # (B_t, N, hidden) fp32 CPU each
        self.targets = k_cond.shape[0]
        self.weight = float(weight)
        self.window = window
        self.previous = previous  # an attn2 replace patch that was there before (IPAdapter, another IQA adapter)
        self.label = label
        self._device_cache: dict = {}  # (device, dtype) -> kv; (device, dtype, layout) -> batched kv
        self.added: list[tuple] = []  # (callback, kwargs) added by a later pack (IPAdapter_plus `.add`)
        self.foreign = None  # an older fork's CrossAttentionPatch built through `.set_new_condition`

    def __deepcopy__(self, memo):
        return self  # immutable apart from caches; ModelPatcher.clone must not duplicate the tensors

    def view(self) -> IQAAttn2Patch:
        """The same patch for another model: shared tensors and caches, its own added branches."""
        other = copy.copy(self)
        other.added = list(self.added)
        if self.foreign is not None:
            other.foreign = copy.copy(self.foreign)
            for name, value in vars(self.foreign).items():  # its per-condition lists
                if isinstance(value, list):
                    setattr(other.foreign, name, list(value))
        return other

    # ---- the protocol other packs use on a patch they find on a key

    def add(self, callback, **kwargs):
        """IPAdapter_plus: `out += callback(out, q, k, v, extra_options, **kwargs)` while
        sigma_end <= sigma <= sigma_start (kwargs), after the text attention."""
        self.added.append((callback, kwargs))

    def set_new_condition(self, **kwargs):
        """Older IPAdapter_plus forks (InstantID, PuLID): the caller's own `CrossAttentionPatch` class holds
        the semantics; the first call builds one from the kwargs, later calls are handed to it."""
        if self.foreign is not None:
            self.foreign.set_new_condition(**kwargs)
            return
        caller = sys._getframe(1).f_globals
        patch_class = caller.get("CrossAttentionPatch")
        if not (isinstance(patch_class, type) and hasattr(patch_class, "set_new_condition")):
            raise RuntimeError(
                f"{NODE}: the pack '{caller.get('__name__', '?')}' tried to add its attention to IQA-Adapter's "
                "patch with set_new_condition() but has no CrossAttentionPatch class; apply that pack before "
                "IQA-Adapter in the graph")
        self.foreign = patch_class(**kwargs)

    # ---- host protocol

    def _chained(self):
        return [patch for patch in (self.previous, self.foreign) if patch is not None]

    def to(self, device):  # ModelPatcher.model_patches_to; our cache moves lazily, chained patches move now
        # The host keeps what a patch's .to returns; so do we for the patches we took off the key.
        if self.previous is not None and hasattr(self.previous, "to"):
            self.previous = self.previous.to(device)
        if self.foreign is not None and hasattr(self.foreign, "to"):
            self.foreign = self.foreign.to(device)
        return self

    def models(self):  # ModelPatcher.model_patches_models: what the chained patches need loaded (ours: none)
        return [model for patch in self._chained() if hasattr(patch, "models") for model in patch.models()]

    def cleanup(self):  # ModelPatcher.cleanup after sampling (hosts >= 0.17)
        self._device_cache.clear()
        self.window.forget()
        for patch in self._chained():
            if hasattr(patch, "cleanup"):
                patch.cleanup()

    def _kv_on(self, device, dtype):
        key = (device, dtype)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = tuple(t.to(device=device, dtype=dtype) for t in self.kv_cpu)
            self._device_cache[key] = cached
        return cached

    def _batched_kv(self, q, cond_or_uncond):
        chunks = len(cond_or_uncond)
        if q.shape[0] % chunks:
            raise ValueError(f"{NODE}: batch of {q.shape[0]} does not split into {chunks} cond/uncond chunks")
        chunk_batch = q.shape[0] // chunks
        layout = (q.device, q.dtype, tuple(cond_or_uncond), chunk_batch)
        cached = self._device_cache.get(layout)
        if cached is not None:
            return cached
        if self.targets not in (1, chunk_batch):
            # raised while sampling, outside this node's execute: named here
            raise errors.NodeInputError(NODE, "tokens", f"the quality tokens hold {self.targets} targets but the "
                                        f"latent batch is {chunk_batch}; give 1 target (used for every image) or "
                                        f"exactly {chunk_batch} (target i for image i)")
        k_cond, v_cond, k_uncond, v_uncond = self._kv_on(q.device, q.dtype)
        ks, vs = [], []
        for kind in cond_or_uncond:  # 0 = cond, 1 = uncond (host convention)
            k, v = (k_uncond, v_uncond) if kind == 1 else (k_cond, v_cond)
            ks.append(k.expand(chunk_batch, -1, -1))
            vs.append(v.expand(chunk_batch, -1, -1))
        cached = (torch.cat(ks).contiguous(), torch.cat(vs).contiguous())
        self._device_cache[layout] = cached
        return cached

    def _text_and_other_branches(self, q, k, v, extra_options):
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
            if self.foreign is not None:  # both chained: each holds the text once
                out = out + self.foreign(q, k, v, extra_options) - _host_text_attention(q, k, v, extra_options)
        elif self.foreign is not None:
            out = self.foreign(q, k, v, extra_options)
        else:
            out = _host_text_attention(q, k, v, extra_options)
        if self.added:
            sigmas = extra_options.get("sigmas")
            sigma = float(sigmas.detach().flatten()[0].item()) if sigmas is not None else math.inf
            for callback, kwargs in self.added:
                if kwargs.get("sigma_end", -math.inf) <= sigma <= kwargs.get("sigma_start", math.inf):
                    out = out + callback(out, q, k, v, extra_options, **kwargs)
            out = out.to(q.dtype)
        return out

    def __call__(self, q, k, v, extra_options):
        out = self._text_and_other_branches(q, k, v, extra_options)
        if self.weight == 0.0 or not self.window.active(extra_options):
            return out
        k_ip, v_ip = self._batched_kv(q, extra_options.get("cond_or_uncond") or [0])
        ip_out = adapter_attention.ip_attention(q, k_ip, v_ip, extra_options["n_heads"])
        return adapter_attention.decoupled_output(out, ip_out.to(out.dtype), self.weight)


def _clone_gets_own_views(parent, clone) -> None:
    """ModelPatcher ON_CLONE callback: the clone's attn2 entries that are our patches become views, one per
    patch object (a patch sits under two keys on one-transformer blocks)."""
    replace = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")
    if not replace:
        return
    views: dict[int, IQAAttn2Patch] = {}
    for key, patch in list(replace.items()):
        if isinstance(patch, IQAAttn2Patch):
            if id(patch) not in views:
                views[id(patch)] = patch.view()
            replace[key] = views[id(patch)]


# ---------------------------------------------------------------- apply

def _check_tokens(adapter, tokens) -> None:
    if tokens.cross_attention_dim != adapter.info.cross_attention_dim:
        raise InputError(f"quality tokens have width {tokens.cross_attention_dim} but the adapter "
                         f"expects C={adapter.info.cross_attention_dim} (tokens made by another adapter?)", "tokens")
    if tokens.num_tokens != adapter.info.num_tokens:
        raise InputError(f"{tokens.num_tokens} quality tokens per target but the adapter was trained "
                         f"with N={adapter.info.num_tokens} (tokens made by another adapter?)", "tokens")


# Keys/values are cast to the model's dtype while sampling: beyond fp16's range they become inf (black images).
KV_VALUE_LIMIT = 6.0e4


@errors.node_errors(NODE, "tokens")
def apply_iqa_adapter(model, adapter, tokens, weight: float = 1.0, start_at: float = 0.0, end_at: float = 1.0,
                      host_batch_cap: int = 4096):
    """A clone of `model` with the adapter's decoupled cross-attention on every attn2 layer."""
    if not math.isfinite(weight):
        raise InputError(f"must be a finite number, got {weight}", "weight")
    check_schedule(start_at, end_at)
    _check_tokens(adapter, tokens)
    # before any key/value is computed: the rows' memory follows from the adapter's architecture
    projection.check_row_count(tokens.batch_size, projection.max_rows_for(adapter.info, host_batch_cap),
                               "token rows (targets)", "tokens")
    projection.check_token_values(tokens.cond, tokens.uncond, "tokens")
    keys = check_adapter_fits(model, adapter)

    patched = model.clone()
    sampling = patched.get_model_object("model_sampling")
    always = start_at <= 0.0 and end_at >= 1.0
    window = SigmaWindow(sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at), always)

    both = torch.cat([tokens.cond, tokens.uncond]).to(torch.float32)
    kv = adapter_attention.precompute_ip_kv(adapter, both)
    for k_all, v_all in kv:
        peak = max(float(k_all.abs().max()), float(v_all.abs().max()))
        if not math.isfinite(peak) or peak > KV_VALUE_LIMIT:
            raise InputError(f"these quality tokens give attention keys/values of {peak:.3g} in this "
                             f"adapter (limit {KV_VALUE_LIMIT:g}, beyond it half-precision sampling makes black "
                             "images); use tokens from moderate targets", "tokens")
    b = tokens.cond.shape[0]
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    label = getattr(adapter, "path", "")
    single = _single_transformer_blocks(keys)
    for position, key in enumerate(keys):
        k_all, v_all = kv[position]
        # The host looks up the 3-tuple key first, then (block_name, block_id): chain whichever is there.
        previous = existing.get(key, existing.get(key[:2]))
        patch = IQAAttn2Patch(k_all[:b].contiguous(), v_all[:b].contiguous(), k_all[b:].contiguous(),
                              v_all[b:].contiguous(), weight, window, previous=previous, label=label)
        patched.set_model_attn2_replace(patch, key[0], key[1], key[2])
        if key[:2] in single:  # where a pack keys this layer (block, id) it finds us (and is not shadowed)
            patched.set_model_attn2_replace(patch, key[0], key[1])
    _register_clone_views(patched)
    return patched


def _single_transformer_blocks(keys) -> set:
    per_block: dict = {}
    for key in keys:
        per_block[key[:2]] = per_block.get(key[:2], 0) + 1
    return {block for block, count in per_block.items() if count == 1}


def _register_clone_views(patched) -> None:
    import comfy.patcher_extension

    on_clone = comfy.patcher_extension.CallbacksMP.ON_CLONE
    if _clone_gets_own_views not in patched.get_all_callbacks(on_clone):  # once per lineage (clones inherit it)
        patched.add_callback(on_clone, _clone_gets_own_views)
