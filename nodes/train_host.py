"""The trainer's base model from a ComfyUI checkpoint file, through the host's own loader (host glue, no math).

`HostBase` implements adapter/training.py's `BaseModel`: the host loads the checkpoint
(`comfy.sd.load_checkpoint_guess_config`, offline), its model sampling says the prediction type and
the DDPM schedule, its CLIP encodes captions (SDXL: both encoders' penultimate states + pooled, and
the size/crop micro-conditioning through the model's own `encode_adm`), its VAE encodes images (the
posterior mean: the host's encoder does not sample), and the adapter enters the frozen UNet through
the same attn2 replace-patch keys the inference patch uses (nodes/adapter_patch.py), with the same
text attention and the same quality-attention math — only the keys/values are computed from the
trainable layers instead of being precomputed.
"""
from __future__ import annotations

import torch

from ..adapter import attention as adapter_attention
from . import adapter_patch

TRAIN_OPTION = "iqa_adapter_train"  # transformer_options entry: (adapter module, tokens (B, N, C), scale)
TEXT_TOKENS = 77  # one CLIP window per caption (the authors' tokenizers truncate to 77)


class TrainingAttn2Patch:
    """attn2 replace patch of layer `position` during training: host text attention + scale * A_quality."""

    def __init__(self, position: int):
        self.position = position

    def __call__(self, q, k, v, extra_options):
        out = adapter_patch._host_text_attention(q, k, v, extra_options)
        adapter, tokens, scale = extra_options[TRAIN_OPTION]
        layer = adapter.layer(self.position)
        ip_out = adapter_attention.ip_attention(
            q, layer.to_k_ip(tokens), layer.to_v_ip(tokens), extra_options["n_heads"])
        return adapter_attention.decoupled_output(out, ip_out.to(out.dtype), scale)


class HostBase:
    """A frozen base model for adapter/training.py, from the host's (model patcher, CLIP, VAE)."""

    @classmethod
    def from_checkpoint(cls, checkpoint_path: str, device: str | torch.device = "cpu") -> HostBase:
        import comfy.sd

        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint_path), output_vae=True,
                                                                    output_clip=True, embedding_directory=None)
        if model is None or clip is None or vae is None:
            raise ValueError(f"train: checkpoint {checkpoint_path}: needs a UNet, a text encoder and a VAE in one file")
        return cls(model, clip, vae, device, str(checkpoint_path))

    def __init__(self, model, clip, vae, device: str | torch.device = "cpu", path: str = "<loaded model>"):
        import comfy.model_management as model_management
        import comfy.model_sampling as model_sampling

        self.path = path
        self.patcher, self.clip, self.vae = model, clip, vae
        self.model_management = model_management
        self.device = torch.device(device)
        sampling = model.get_model_object("model_sampling")
        if not isinstance(sampling, model_sampling.ModelSamplingDiscrete) or isinstance(sampling, model_sampling.EDM):
            raise ValueError(f"train: checkpoint {self.path}: model sampling {type(sampling).__name__} is not a "
                             "discrete DDPM schedule (SD1.5/SDXL family)")
        if isinstance(sampling, model_sampling.V_PREDICTION):
            self.prediction_type = "v"
        elif isinstance(sampling, model_sampling.EPS) and not isinstance(sampling, model_sampling.CONST):
            self.prediction_type = "eps"
        else:
            raise ValueError(
                f"train: checkpoint {self.path}: prediction type {type(sampling).__name__} is not eps or v")
        sigmas = sampling.sigmas.detach().double().cpu()
        self.alphas_cumprod = (1.0 / (1.0 + sigmas ** 2)).float()
        keys, widths, context_dim = adapter_patch.unet_cross_attention_layers(model)
        self.layer_keys, self.layer_widths, self.cross_attention_dim = keys, widths, context_dim
        self.base_model = model.model
        self.unet = model.model.diffusion_model
        self.unet.requires_grad_(False).eval()
        self.patches = {key: TrainingAttn2Patch(position) for position, key in enumerate(keys)}
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._ensure_loaded()
        self.dtype = self.base_model.manual_cast_dtype or self.base_model.get_dtype()

    def _ensure_loaded(self):
        if self.device.type != "cpu":
            self.model_management.load_models_gpu([self.patcher], force_full_load=True)

    def base_kv_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for block_name, block_id, index in self.layer_keys:
            blocks = {"input": self.unet.input_blocks, "output": self.unet.output_blocks}.get(block_name)
            block = self.unet.middle_block if block_name == "middle" else blocks[block_id]
            transformer = adapter_patch._spatial_transformers(block)[0]
            attn2 = transformer.transformer_blocks[index].attn2
            out.append((attn2.to_k.weight.detach().float().cpu(), attn2.to_v.weight.detach().float().cpu()))
        return out

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> latents in the model's space (the host's VAE, then its latent format)."""
        images = ((pixels.float() + 1.0) / 2.0).permute(0, 2, 3, 1).cpu()
        latents = self.vae.encode(images)
        return self.base_model.process_latent_in(latents.float()).to(self.device)

    @torch.no_grad()
    def _encode_caption(self, caption: str):
        cached = self._text_cache.get(caption)
        if cached is None:
            tokens = self.clip.tokenize(caption)
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
            cached = (cond[:, :TEXT_TOKENS].float().cpu(), None if pooled is None else pooled.float().cpu())
            if len(self._text_cache) < 4096:
                self._text_cache[caption] = cached
        return cached

    @torch.no_grad()
    def encode_text(self, captions: list[str], micro: list[tuple]) -> tuple[torch.Tensor, dict]:
        """Text context (B, 77, C) and extra conditions (SDXL: `y` = pooled + size/crop embeddings);
        `micro[i]` = (original (h, w), crop (top, left), resolution) of sample i."""
        encoded = [self._encode_caption(c) for c in captions]
        context = torch.cat([cond for cond, _ in encoded]).to(self.device)
        rows = []
        for (_, pooled), conditioning in zip(encoded, micro):
            adm = self.base_model.encode_adm(
                pooled_output=pooled, device=torch.device("cpu"), **sdxl_sizes(*conditioning))
            if adm is None:
                return context, {}
            rows.append(adm)
        return context, {"y": torch.cat(rows).to(self.device)}

    def predict(self, noisy, timesteps, context, extra, adapter, tokens, scale: float = 1.0) -> torch.Tensor:
        """The UNet's raw output (eps or v) for x_t at integer timesteps, adapter in every attn2."""
        self._ensure_loaded()
        dtype = self.dtype
        options = {"patches_replace": {"attn2": self.patches}, TRAIN_OPTION: (adapter, tokens, float(scale))}
        extra = {k: v.to(self.device, dtype) for k, v in extra.items()}
        out = self.unet(noisy.to(self.device, dtype), timesteps.to(self.device).float(),
                        context=context.to(self.device, dtype), transformer_options=options, **extra)
        return out.float()


def sdxl_sizes(original_size: tuple[int, int], crop_top_left: tuple[int, int], resolution: int) -> dict:
    """Micro-conditioning in the host's encode_adm names: [orig h, orig w, crop top, crop left, size, size]."""
    height, width = original_size
    top, left = crop_top_left
    return {"height": height, "width": width, "crop_h": top, "crop_w": left,
            "target_height": resolution, "target_width": resolution}
