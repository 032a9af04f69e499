"""The host contract: everything the pack relies on from ComfyUI, pinned per host version.

Runs in seconds on the selected host (IQA_TEST_HOST, see scripts/comfy_server.py) with no model files:
the UNet used for the patch conventions is built in memory. A host that changes any of these fails here
and the failure names the change:
- the pack loads through the host's own custom-node loader and every node's schema builds;
- an attn2 replace patch gets q/k/v = to_q(x)/to_k(ctx)/to_v(ctx), its result goes through to_out, the
  3-part key wins over the 2-part key, and extra_options holds every key the pack's patch reads;
- a post-CFG function gets every key gradient guidance reads, and its return value is the new denoised;
- every host function the pack calls still accepts the call the pack makes;
- where a combo value outside the options is rejected (per host version, as measured);
- folder registration in ComfyExtension.on_load (hosts that await it) and at import (older hosts).
"""
from __future__ import annotations

import asyncio
import inspect
import re

import pytest
import torch

from conftest import PACK_ROOT, PromptRejected, comfy_server_module

# Keys the pack's code reads, found in its source so that a new read is pinned without editing this file.
PATCH_SOURCE = PACK_ROOT / "nodes" / "adapter_patch.py"
GUIDANCE_SOURCE = PACK_ROOT / "nodes" / "guidance_nodes.py"


def _keys_read(path, variable: str) -> set[str]:
    text = path.read_text()
    return set(re.findall(rf'{variable}(?:\[|\.get\()\s*["\'](\w+)["\']', text))


# ------------------------------------------------------------------ a tiny SD1.5-layout model in memory

TINY_UNET = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
             "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
             "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1, "num_heads": 2,
             "num_head_channels": -1, "context_dim": 48, "use_linear_in_transformer": False,
             "use_spatial_transformer": True, "adm_in_channels": None, "use_temporal_attention": False,
             "use_temporal_resblock": False}


def _initialise(module: torch.nn.Module) -> None:
    """The host builds layers without initialising them (torch.empty): give every weight a finite value."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            fan_in = parameter[0].numel() if parameter.dim() > 1 else 1
            scale = fan_in ** -0.5 if parameter.dim() > 1 else 0.1
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def tiny_patcher(comfy):
    import comfy.model_patcher
    import comfy.supported_models

    model = comfy.supported_models.SD15(dict(TINY_UNET)).get_model({})
    _initialise(model)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _sample(patcher, seed=0, cfg=5.0, batch=1):
    import comfy.sample

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, 8, 8, generator=generator)
    positive = [[torch.randn(1, 3, 48, generator=generator), {}]]
    negative = [[torch.randn(1, 3, 48, generator=generator), {}]]
    return comfy.sample.sample(patcher, noise, 2, cfg, "euler", "normal", positive, negative,
                               torch.zeros(batch, 4, 8, 8), seed=seed)


# ------------------------------------------------------------------ loading and schemas

def test_pack_loads_through_the_host_loader_and_every_schema_builds(comfy, comfy_server):
    from comfyui_iqa_adapter.nodes import NODE_MODULES

    ours = {node.GET_SCHEMA().node_id: node for module in NODE_MODULES for node in module.NODES}
    assert len(ours) >= 10, sorted(ours)
    info = comfy_server.object_info()
    missing = sorted(set(ours) - set(info))
    assert not missing, f"the host's loader did not register {missing}:\n{comfy_server.log_tail()}"
    for node_id, node in ours.items():
        schema = node.GET_SCHEMA()
        served = info[node_id]
        declared = {i.id for i in schema.inputs}
        served_inputs = set(served["input"].get("required", {})) | set(served["input"].get("optional", {}))
        assert served_inputs == declared, (node_id, served_inputs, declared)
        assert len(served["output"]) == len(schema.outputs), node_id
        assert served["category"].startswith("IQA-Adapter"), node_id
    assert "IMPORT FAILED" not in "\n".join(line for line in comfy_server.log_text().splitlines()
                                           if "IQA-Adapter" in line)


PYIQA_PROBE = """
import json, sys
from comfyui_iqa_adapter.scripts.comfy_server import import_host
import_host(cpu=True)
from comfyui_iqa_adapter.nodes import NODE_MODULES
for module in NODE_MODULES:
    for node in module.NODES:
        node.GET_SCHEMA()
from comfyui_iqa_adapter.nodes.metric_nodes import IQAMetricLoader
IQAMetricLoader.validate_inputs(metric="topiq_nr", device="auto")
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] == "pyiqa")))
"""


def test_pyiqa_is_not_imported_at_server_start(host_dir):
    """pyiqa (PolyForm Noncommercial) is imported only where a metric is built: loading the node layer, building
    every schema (the metric picker) and validating a metric choice at queue time read models/metric_catalog.json.
    A fresh interpreter, because this test session imports pyiqa elsewhere."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, IQA_COMFYUI_DIR=str(host_dir))
    run = subprocess.run([sys.executable, "-c", PYIQA_PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


def test_model_folders_are_registered_once_at_import_and_in_on_load(comfy):
    import folder_paths

    from comfyui_iqa_adapter.nodes import IQAAdapterExtension, paths

    for name in (paths.ADAPTER_FOLDER, paths.METRIC_FOLDER):
        assert name in folder_paths.folder_names_and_paths, f"'{name}' not registered at import"
    before = {name: list(folder_paths.folder_names_and_paths[name][0])
              for name in (paths.ADAPTER_FOLDER, paths.METRIC_FOLDER)}
    asyncio.run(IQAAdapterExtension().on_load())
    asyncio.run(IQAAdapterExtension().on_load())
    for name, folders in before.items():
        after = folder_paths.folder_names_and_paths[name][0]
        assert after == folders, f"on_load changed '{name}' folders (not idempotent): {folders} -> {after}"
        assert len(after) == len(set(after)), after


def test_host_awaits_on_load_where_expected(host_dir, host_version):
    """Hosts >= 0.14 await ComfyExtension.on_load before get_node_list; older ones never call it (the
    pack then relies on its import-time registration)."""
    text = (host_dir / "nodes.py").read_text()
    awaits = "await extension.on_load()" in text
    assert awaits == (host_version >= (0, 14)), (
        f"ComfyUI {host_version}: on_load awaited={awaits}, expected {host_version >= (0, 14)}")


# ------------------------------------------------------------------ attn2 replace patch convention

def test_attn2_replace_patch_convention(comfy):
    """What nodes/adapter_patch.py assumes of BasicTransformerBlock: the patch gets to_q(x), to_k(ctx),
    to_v(ctx) and extra_options, its result goes through to_out, the 3-part key wins over the 2-part key."""
    from comfy.ldm.modules.attention import BasicTransformerBlock, optimized_attention

    block = BasicTransformerBlock(64, 2, 32, context_dim=48).eval()
    _initialise(block)
    x, context = torch.randn(2, 16, 64), torch.randn(2, 3, 48)
    seen = {}

    def host_like(label):
        def patch(q, k, v, extra_options):
            seen[label] = (q, k, v, extra_options)
            return optimized_attention(q, k, v, extra_options["n_heads"])
        return patch

    def run(patches):
        options = {"block": ("input", 1), "block_index": 0, "patches_replace": {"attn2": patches}}
        with torch.no_grad():
            return block(x, context=context, transformer_options=options)

    plain = run({})
    patched = run({("input", 1, 0): host_like("three"), ("input", 1): host_like("two")})
    assert "three" in seen and "two" not in seen, "the 3-part key (block, id, index) must be looked up first"
    torch.testing.assert_close(patched, plain, rtol=1e-5, atol=1e-5,
                               msg="a patch returning plain attention must reproduce the unpatched block "
                                   "(the host applies to_out to the patch's result)")
    q, k, v, extra = seen["three"]
    with torch.no_grad():
        torch.testing.assert_close(k, block.attn2.to_k(context))
        torch.testing.assert_close(v, block.attn2.to_v(context))
        assert q.shape == (2, 16, 64)
    assert extra["n_heads"] == 2 and extra["dim_head"] == 32
    run({("input", 1): host_like("fallback")})
    assert "fallback" in seen, "the 2-part key (block, id) is no longer looked up"


def test_patch_and_post_cfg_get_the_keys_the_pack_reads(tiny_patcher):
    patch_reads = _keys_read(PATCH_SOURCE, "extra_options")
    guidance_reads = _keys_read(GUIDANCE_SOURCE, "args")
    assert {"n_heads", "sigmas", "cond_or_uncond"} <= patch_reads, patch_reads  # the scan itself works
    assert {"denoised", "sigma"} <= guidance_reads, guidance_reads
    from comfy.ldm.modules.attention import optimized_attention

    patch_calls, post_calls = [], []

    def patch(q, k, v, extra_options):
        patch_calls.append((q.shape, dict(extra_options)))
        return optimized_attention(q, k, v, extra_options["n_heads"])

    def post_cfg(args):
        post_calls.append(dict(args))
        return args["denoised"] * 0.5

    model = tiny_patcher.clone()
    model.set_model_attn2_replace(patch, "input", 1, 0)
    model.set_model_sampler_post_cfg_function(post_cfg)
    assert not tiny_patcher.model_options.get("sampler_post_cfg_function"), "clone() shares model_options"
    reference = _sample(tiny_patcher.clone(), batch=2)
    halved = _sample(model, batch=2)
    assert patch_calls and post_calls
    for shape, extra in patch_calls:
        missing = patch_reads - set(extra)
        assert not missing, f"the host no longer passes {sorted(missing)} in the attn2 extra_options"
        chunks = extra["cond_or_uncond"]
        assert sorted(chunks) == [0, 1] and shape[0] == 2 * len(chunks), (chunks, shape)
        assert torch.is_tensor(extra["sigmas"]), type(extra["sigmas"])
    sigmas = [float(extra["sigmas"].flatten()[0]) for _, extra in patch_calls]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[0] > sigmas[-1], sigmas
    for args in post_calls:
        missing = guidance_reads - set(args)
        assert not missing, f"the host no longer passes {sorted(missing)} to post-CFG functions"
        assert args["denoised"].shape == (2, 4, 8, 8) and torch.is_tensor(args["sigma"])
    assert not torch.equal(halved, reference), "the post-CFG function's return value was ignored"


# ------------------------------------------------------------------ host functions the pack calls

def _call_shapes():
    """(callable, args, kwargs) exactly as the pack calls them (grep nodes/ for comfy.* and folder_paths.*)."""
    import comfy.ldm.modules.attention as attention
    import comfy.model_management as mm
    import comfy.model_patcher as mp
    import comfy.sd as sd
    import comfy.taesd.taesd as taesd
    import comfy.utils as utils
    import folder_paths as fp

    x = object()
    return {
        "folder_paths.get_filename_list": (fp.get_filename_list, (x,), {}),
        "folder_paths.get_full_path": (fp.get_full_path, (x, x), {}),
        "folder_paths.get_full_path_or_raise": (fp.get_full_path_or_raise, (x, x), {}),
        "folder_paths.get_folder_paths": (fp.get_folder_paths, (x,), {}),
        "folder_paths.get_output_directory": (fp.get_output_directory, (), {}),
        "folder_paths.get_input_directory": (fp.get_input_directory, (), {}),
        "folder_paths.get_save_image_path": (fp.get_save_image_path, (x, x), {}),
        "folder_paths.annotated_filepath": (fp.annotated_filepath, (x,), {}),
        "comfy.model_management.free_memory": (mm.free_memory, (x, x), {}),
        "comfy.model_management.load_models_gpu": (mm.load_models_gpu, (x,), {}),
        "comfy.model_management.throw_exception_if_processing_interrupted":
            (mm.throw_exception_if_processing_interrupted, (), {}),
        "comfy.model_management.unet_offload_device": (mm.unet_offload_device, (), {}),
        "comfy.model_management.get_torch_device": (mm.get_torch_device, (), {}),
        "ModelPatcher.add_callback": (mp.ModelPatcher.add_callback, (x, x, x), {}),
        "comfy.model_patcher.ModelPatcher": (mp.ModelPatcher, (x,), {"load_device": x, "offload_device": x}),
        "ModelPatcher.clone": (mp.ModelPatcher.clone, (x,), {}),
        "ModelPatcher.get_model_object": (mp.ModelPatcher.get_model_object, (x, x), {}),
        "ModelPatcher.set_model_attn2_replace": (mp.ModelPatcher.set_model_attn2_replace, (x, x, x, x, x), {}),
        "ModelPatcher.set_model_sampler_post_cfg_function":
            (mp.ModelPatcher.set_model_sampler_post_cfg_function, (x, x), {}),
        "comfy.utils.ProgressBar": (utils.ProgressBar, (x,), {}),
        "ProgressBar.update_absolute": (utils.ProgressBar.update_absolute, (x, x, x), {}),
        "comfy.utils.load_torch_file": (utils.load_torch_file, (x,), {"safe_load": True}),
        "comfy.sd.load_checkpoint_guess_config": (
            sd.load_checkpoint_guess_config, (x,),
            {"output_vae": True, "output_clip": True, "embedding_directory": None}),
        "comfy.taesd.taesd.TAESD": (taesd.TAESD, (), {"latent_channels": x}),
        "comfy.ldm.modules.attention.optimized_attention":
            (attention.optimized_attention, (x, x, x, x), {"attn_precision": x, "transformer_options": x}),
    }


PINNED_CALLS = sorted(
    ["folder_paths.get_filename_list", "folder_paths.get_full_path", "folder_paths.get_full_path_or_raise",
     "folder_paths.get_folder_paths", "folder_paths.get_output_directory", "folder_paths.get_input_directory",
     "folder_paths.get_save_image_path", "folder_paths.annotated_filepath",
     "comfy.model_management.free_memory", "comfy.model_management.load_models_gpu",
     "comfy.model_management.throw_exception_if_processing_interrupted",
     "comfy.model_management.unet_offload_device", "comfy.model_management.get_torch_device",
     "comfy.model_patcher.ModelPatcher", "ModelPatcher.clone", "ModelPatcher.add_callback",
     "ModelPatcher.get_model_object", "ModelPatcher.set_model_attn2_replace",
     "ModelPatcher.set_model_sampler_post_cfg_function", "comfy.utils.ProgressBar",
     "ProgressBar.update_absolute", "comfy.utils.load_torch_file", "comfy.taesd.taesd.TAESD",
     "comfy.sd.load_checkpoint_guess_config",
     "comfy.ldm.modules.attention.optimized_attention"])


@pytest.mark.parametrize("name", PINNED_CALLS)
def test_host_function_accepts_the_packs_call(comfy, name):
    function, args, kwargs = _call_shapes()[name]
    signature = inspect.signature(function)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        pytest.fail(f"{name}{signature} no longer accepts the pack's call "
                    f"({len(args)} positional, keywords {sorted(kwargs)}): {error}")


def test_every_host_call_in_the_pack_is_pinned(comfy):
    """A new comfy.* / folder_paths.* call in nodes/ must be added to PINNED_CALLS (with the call's shape)."""
    assert sorted(_call_shapes()) == PINNED_CALLS
    pinned = {name.rsplit(".", 1)[-1] for name in PINNED_CALLS}
    import comfy.patcher_extension

    assert comfy.patcher_extension.CallbacksMP.ON_CLONE  # read, not called
    # read, not called (InterruptProcessingException is only caught)
    attributes = {"models_dir", "folder_names_and_paths", "CallbacksMP", "InterruptProcessingException"}
    modules = {"model_management", "model_patcher", "utils", "taesd", "ldm", "modules", "attention",
               "patcher_extension", "sd"}
    calls = set()
    for path in (PACK_ROOT / "nodes").glob("*.py"):
        calls |= set(re.findall(r"\b(?:folder_paths|comfy\.[a-z_]+(?:\.[a-z_]+)*)\.([A-Za-z_]\w*)\b",
                                path.read_text()))
    unpinned = sorted(calls - pinned - attributes - modules)
    assert not unpinned, f"host calls in nodes/ not pinned in PINNED_CALLS: {unpinned}"


# ------------------------------------------------------------------ validation of combo values

def test_bad_combo_value_is_rejected_where_this_host_rejects_it(comfy_server, host_version):
    """A combo value outside the options, on an input no validate_inputs of ours takes (IQAScore.save_rows):
    0.33.0 rejects it at validation (HTTP 400 value_not_in_list); 0.3.75 runs the node, whose own check
    names the node, the input and the choices."""
    info = comfy_server.object_info()

    def inputs(kind, **given):
        required = info[kind]["input"]["required"]
        return {**{name: _default(spec) for name, spec in required.items() if name not in given}, **given}

    prompt = {"1": {"class_type": "EmptyImage", "inputs": inputs("EmptyImage", width=64, height=64, batch_size=1)},
              "2": {"class_type": "IQAMetricLoader", "inputs": inputs("IQAMetricLoader", metric="piqe", device="cpu")},
              "3": {"class_type": "IQAScore", "inputs": inputs("IQAScore", images=["1", 0], metric=["2", 0],
                                                               save_rows="no_such_format")}}
    if host_version >= (0, 33, 0):
        with pytest.raises(PromptRejected) as rejected:
            comfy_server.queue(prompt)
        assert rejected.value.code == 400
        errors = rejected.value.body.get("node_errors", {}).get("3", {}).get("errors", [])
        assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [("value_not_in_list", "save_rows")], \
            rejected.value.body
    elif host_version <= (0, 3, 75):
        result = comfy_server.run(prompt)
        assert result.status == "error", result.status
        message = result.error_message()
        assert "IQAScore" in message and "save_rows" in message and "no_such_format" in message, message
    else:
        pytest.skip(f"SKIPPED LOUDLY: combo validation not measured on ComfyUI {host_version}; "
                    "add its behaviour here")


def _default(spec):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return kind[0]
    if kind == "COMBO":
        return options.get("default", options.get("options", [None])[0])
    return options.get("default", 0)


def test_selected_host_is_the_one_running(comfy_server, host_dir, host_version):
    """One pytest run targets one host: the server, the in-process host and the version agree."""
    assert comfy_server.comfy_dir == host_dir == comfy_server_module.host_dir()
    stats = comfy_server.get("/system_stats")
    served = stats.get("system", {}).get("comfyui_version", "")
    assert served.startswith(".".join(map(str, host_version))), (served, host_version)


def test_host_is_inside_the_declared_range(host_version):
    """pyproject's requires-comfyui states exactly the tested range: every host the tests run lies in it."""
    import tomllib
    from packaging.specifiers import SpecifierSet

    declared = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())["tool"]["comfy"]["requires-comfyui"]
    version = ".".join(map(str, host_version))
    assert version in SpecifierSet(declared), f"ComfyUI {version} is tested but outside requires-comfyui {declared}"
