"""IQAGradientGuidance: steer any sampler with a differentiable IQA metric's gradient (host glue; the math is
adapter/guidance.py).

The patch is a sampler post-CFG function on a model clone, so it stacks with other patches (IQAAdapterApply's
attention patches, other post-CFG functions) and works with every sampler: each model evaluation inside the
chosen step range replaces the CFG-combined denoised estimate D by D + s·σ²·∇_D S.

Memory and devices follow the host. The decoder and the metric network used for gradients are host
ModelPatchers attached to the guided model (`additional_models`): the host counts them when it loads the
model for sampling and may offload them; nothing is kept in module-level caches. The VAE is never
deep-copied: on hosts that load it with dynamic VRAM its modules carry native buffers freed in `__del__`,
so the gradient decoder comes from the host's own non-dynamic clone (a fresh module it loads itself).
Devices are the host's (`comfy.model_management`: --cpu, --cuda-device, MPS, XPU, DirectML).
"""
from __future__ import annotations

import logging
import math

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..adapter import errors, guidance, iqa_models
from ..adapter.errors import InputError
from . import presentation, types
from .host_models import host_managed, memory_managed
from .inputs import check_schedule, schedule_inputs

NODE = "IQAGradientGuidance"
DECODERS = ("vae", "taesd")
MIN_SCORED_SIZE = 32  # smallest longer side a decoded estimate is resized to before scoring
logger = logging.getLogger(__name__)

GUIDANCE_MODELS = "iqa_gradient_guidance"  # key of the guided model's additional models


def _latent_format(model):
    return model.get_model_object("latent_format")


def _to_vae_latent(latent_format):
    # The sampler works in the model's scaled latent space; the VAE expects process_out(latent).
    return latent_format.process_out


def _check_image_latents(latent_format):
    if getattr(latent_format, "latent_dimensions", 2) != 2:
        raise InputError(f"the latent format {type(latent_format).__name__} is a video format; gradient quality "
                         "guidance scores images and supports image models only (SD1.5, SDXL and the like)", "model")


def _taesd_latent_channels(state: dict, latent_format) -> int:
    """Latent channels of an image TAESD decoder file: its first conv's input, except Flux2's (128 latent
    channels, unpacked 2x2 to the 32 its conv takes)."""
    wanted = int(latent_format.latent_channels)
    conv_in = int(state["1.weight"].shape[1]) if "1.weight" in state else wanted
    if conv_in == wanted or (wanted == 4 * conv_in and wanted == 128):
        return wanted
    raise InputError(f"the TAESD decoder file takes {conv_in} latent channels but the model's latent format "
                     f"{type(latent_format).__name__} has {wanted}; put the model's own TAESD decoder in "
                     "models/vae_approx or use decoder 'vae'", "decoder")


def _taesd_module(latent_format) -> torch.nn.Module:
    """A fresh host TAESD with the decoder from models/vae_approx matching the model's latent format."""
    import comfy.taesd.taesd

    name = getattr(latent_format, "taesd_decoder_name", None)
    if not name:
        raise InputError(f"'taesd' is not available for the latent format {type(latent_format).__name__} "
                         f"(no TAESD decoder exists for it); use decoder 'vae'.", "decoder")
    candidates = [f for f in folder_paths.get_filename_list("vae_approx") if f.startswith(name + ".")]
    if not candidates:
        folders = ", ".join(folder_paths.get_folder_paths("vae_approx"))
        raise InputError(f"'taesd' needs '{name}.safetensors' (or .pth) in models/vae_approx "
                         f"(searched: {folders}); put the file there or use decoder 'vae'.", "decoder")
    path = folder_paths.get_full_path_or_raise("vae_approx", min(candidates))
    with torch.inference_mode(False):
        state = comfy.utils.load_torch_file(path, safe_load=True)
        module = comfy.taesd.taesd.TAESD(latent_channels=_taesd_latent_channels(state, latent_format))
        try:
            module.taesd_decoder.load_state_dict(state)
        except RuntimeError as error:
            raise InputError(f"'{path}' is not a TAESD decoder this host can load for "
                             f"{type(latent_format).__name__} ({str(error).splitlines()[0]})", "decoder") from None
        # TAESD decodes the sampler-space latent: undo process_out's scaling/shift exactly.
        module.vae_scale.data.fill_(float(latent_format.scale_factor))
        module.vae_shift.data.fill_(float(getattr(latent_format, "shift_factor", None) or 0.0))
        module.eval()
    return module


def _decoder_latent_channels(module, fallback):
    """Latent channels the decoder really takes (the VAE object's attribute is not set on every load path)."""
    for path in ("post_quant_conv", "decoder.conv_in", "taesd_decoder.1"):
        layer = module
        for part in path.split("."):
            layer = layer[int(part)] if part.isdigit() and isinstance(layer, torch.nn.Sequential) \
                else getattr(layer, part, None)
            if layer is None:
                break
        if isinstance(layer, torch.nn.Conv2d):
            return layer.in_channels
    return fallback


def _own_vae_module(vae) -> torch.nn.Module:
    """A VAE autoencoder of our own for gradients, never a deep copy of a module the host manages dynamically:
    such a host (>= 0.12, dynamic VRAM) gives a non-dynamic clone with a fresh module it loads itself."""
    patcher = getattr(vae, "patcher", None)
    if patcher is not None and getattr(patcher, "is_dynamic", lambda: False)():
        try:
            return patcher.clone(disable_dynamic=True).model
        except RuntimeError as error:  # a VAE the host cannot load again (not from a core loader)
            raise InputError(f"this VAE is managed by the host's dynamic VRAM and cannot be reloaded without it "
                             f"({error}); load it with a core loader (VAELoader, CheckpointLoaderSimple) or use "
                             "decoder 'taesd'", "vae") from None
    # Plain torch module (no native buffers on hosts without dynamic loading): a twin with its own tensors.
    return guidance.frozen_twin(vae.first_stage_model)


def _check_decoder(decoder: str, vae, latent_format) -> None:
    if decoder not in DECODERS:
        raise InputError(f"expected one of {', '.join(DECODERS)}, got {errors.quote(decoder)}", "decoder")
    if decoder != "vae":
        return
    if vae is None:
        raise InputError("decoder 'vae' needs a VAE connected", "vae")
    module = getattr(vae, "first_stage_model", None)
    if module is None or not hasattr(module, "decode"):
        raise InputError(f"this VAE ({type(module).__name__}) has no differentiable decoder", "vae")
    vae_channels = _decoder_latent_channels(module, getattr(vae, "latent_channels", None))
    if vae_channels is not None and vae_channels != latent_format.latent_channels:
        raise InputError(f"the VAE has {vae_channels} latent channels but the model's latent format "
                         f"{type(latent_format).__name__} has {latent_format.latent_channels}; connect "
                         f"the VAE that belongs to this model.", "vae")


def _decoder_module(decoder: str, vae, latent_format) -> torch.nn.Module:
    return _own_vae_module(vae) if decoder == "vae" else _taesd_module(latent_format)


def _check_metric(metric):
    if metric is None or not hasattr(metric, "score") or not hasattr(metric, "net"):
        raise InputError("expected an IQA_METRIC from IQAMetricLoader", "metric")
    if not getattr(metric, "differentiable", False):
        raise InputError(f"metric '{metric.name}' was loaded without gradients; set 'differentiable' "
                         f"to true on IQAMetricLoader (gradient guidance needs a differentiable metric)", "metric")
    if getattr(metric, "is_full_reference", False):
        raise InputError(f"metric '{metric.name}' is full-reference; guidance needs a no-reference metric", "metric")


def check_inputs(scale=None, start_at=None, end_at=None, target=None, normalization=None, max_resolution=None,
                 chunk_size=None) -> None:
    """The node's own inputs, at queue time and when it runs (None: wired, not known yet)."""
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise InputError(f"expected a finite number, got {errors.quote(scale)}", "scale")
    check_schedule(start_at, end_at)
    if target is not None and target not in guidance.TARGETS:
        raise InputError(f"expected one of {', '.join(guidance.TARGETS)}, got {errors.quote(target)}", "target")
    if normalization is not None and normalization not in guidance.NORMALIZATIONS:
        raise InputError(f"expected one of {', '.join(guidance.NORMALIZATIONS)}, got {errors.quote(normalization)}",
                         "normalization")
    if max_resolution is not None and int(max_resolution) != 0 and int(max_resolution) < MIN_SCORED_SIZE:
        raise InputError(f"expected 0 (no resize) or at least {MIN_SCORED_SIZE} pixels (IQA metrics need images of "
                         f"about that size), got {max_resolution}", "max_resolution")
    if chunk_size is not None and int(chunk_size) < 1:
        raise InputError(f"expected >= 1, got {chunk_size}", "chunk_size")


@errors.node_errors(NODE, "model")
def build_guided_model(model, vae, metric, scale: float, start_at: float, end_at: float, decoder: str = "vae",
                       normalization: str = "none", target: str = "raise", max_resolution: int = 0,
                       chunk_size: int = 4):
    """The patched clone (used by the node and by tests/benchmarks)."""
    check_inputs(scale, start_at, end_at, target, normalization, max_resolution, chunk_size)
    scale = float(scale)
    _check_metric(metric)
    try:
        divisor = guidance.score_divisor(normalization, metric.name)
    except ValueError as error:
        raise InputError(str(error), "normalization") from None
    sign = guidance.score_sign(target, bool(metric.lower_better))

    latent_format = _latent_format(model)
    _check_image_latents(latent_format)
    _check_decoder(decoder, vae, latent_format)
    patched = model.clone()
    if scale == 0.0:
        return patched  # nothing to add: the sampler runs exactly as unguided
    device = comfy.model_management.get_torch_device()  # the host's choice (--cpu, --cuda-device, ...)
    offload = comfy.model_management.unet_offload_device()  # where the host keeps it until it loads it
    decoder_patcher = host_managed(_decoder_module(decoder, vae, latent_format).to(offload, torch.float32), device)
    metric_patcher = memory_managed(metric)  # the metric's one host patcher (scoring uses it too)
    patched.set_additional_models(GUIDANCE_MODELS, [decoder_patcher, metric_patcher])
    model_sampling = model.get_model_object("model_sampling")
    sigma_start = float(model_sampling.percent_to_sigma(start_at))
    sigma_end = float(model_sampling.percent_to_sigma(end_at))
    to_vae_latent = _to_vae_latent(latent_format)

    def post_cfg_function(args):
        denoised = args["denoised"]
        sigma = args["sigma"]
        current = float(sigma.reshape(-1)[0])
        if not (sigma_end <= current <= sigma_start):
            return denoised
        if denoised.dim() != 4:
            raise errors.NodeInputError(NODE, "model", f"expected image latents (B, C, H, W), got shape "
                                                       f"{tuple(denoised.shape)}")
        comfy.model_management.throw_exception_if_processing_interrupted()
        # The host loads both beside the diffusion model (a no-op when they are loaded already); it moved
        # them under inference mode, so their tensors are made normal again (ours alone, in place).
        comfy.model_management.load_models_gpu([decoder_patcher, metric_patcher])
        for patcher in (decoder_patcher, metric_patcher):
            guidance.normal_tensors(patcher.model)
        decode = guidance.latent_decoder(decoder_patcher.model.decode, to_vae_latent)
        score = metric.score
        if normalization == "std":  # CC3M std units: score as the statistics were made (512x512 squash)
            def score(images):
                return metric.score(iqa_models.resize_for_scoring(images, "cc3m"))
        result = guidance.quality_guided_denoised(
            denoised, sigma, decode, score, scale, sign=sign, normalization=normalization,
            divisor=divisor, max_resolution=int(max_resolution), chunk_size=int(chunk_size))
        logger.debug("%s sigma %.4f %s %s", NODE, current, metric.name, result.scores.tolist())
        return result.denoised

    patched.set_model_sampler_post_cfg_function(post_cfg_function)
    return patched


class IQAGradientGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return presentation.schema(
            NODE, presentation.GUIDANCE,
            description=(
                "Nudge every sampling step toward a higher (or lower) score of a quality metric: the image in "
                "progress is decoded, scored, and moved the way that raises the score. Slower than the adapter; "
                "strong settings raise the guiding metric with odd textures that other metrics do not reward."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (a clone is patched)."),
                io.Vae.Input("vae", tooltip="The model's VAE; its decoder is differentiated when decoder = 'vae'."),
                types.Metric.Input(
                    "metric", tooltip="A no-reference IQA metric loaded with differentiable = true."),
                io.Float.Input("scale", default=1.0, min=-1.0e4, max=1.0e4, step=0.01,
                               tooltip="How hard to push. 0 = off. With normalization 'rms' try 0.05-0.5; with "
                                       "'std' or 'none' the useful range depends on the metric: start at 1 and "
                                       "raise it until the score moves (a few hundred for small CNN metrics)."),
                *schedule_inputs("; 0.6-0.8 leaves the final details alone"),
                io.Combo.Input("decoder", options=list(DECODERS), default="vae",
                               tooltip="'vae': differentiate the given VAE's decoder (faithful, costly). "
                                       "'taesd': the cheap TAESD decoder from models/vae_approx."),
                io.Combo.Input("normalization", options=list(guidance.NORMALIZATIONS), default="none",
                               tooltip="'none': as in the paper. 'std': scale in units of the metric's typical "
                                       "spread on CC3M (the image is scored squashed to 512x512, as those "
                                       "statistics were made). 'rms': the same step size for every metric "
                                       "(easiest to tune)."),
                io.Combo.Input("target", options=list(guidance.TARGETS), default="raise",
                               tooltip="'raise' = better quality for any metric direction; 'lower' = worse."),
                io.Int.Input("max_resolution", default=0, min=0, max=8192, step=8,
                             tooltip="Resize the decoded estimate so its longer side is at most this before "
                                     "scoring (0 = full decoded size)."),
                io.Int.Input("chunk_size", default=4, min=1, max=64,
                             tooltip="Images decoded and differentiated at once (memory vs. speed)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with quality guidance applied while sampling.")],
        )

    @classmethod
    def validate_inputs(cls, scale=None, start_at=None, end_at=None, target=None, normalization=None,
                        max_resolution=None, chunk_size=None):
        return presentation.validation(NODE, check_inputs, scale, start_at, end_at, target, normalization,
                                       max_resolution, chunk_size)

    @classmethod
    @errors.node_errors(NODE, "model")
    def execute(cls, model, vae, metric, scale, start_at, end_at, decoder, normalization, target,
                max_resolution, chunk_size) -> io.NodeOutput:
        return io.NodeOutput(build_guided_model(
            model, vae, metric, scale, start_at, end_at, decoder=decoder, normalization=normalization,
            target=target, max_resolution=max_resolution, chunk_size=chunk_size))


NODES = [IQAGradientGuidance]
