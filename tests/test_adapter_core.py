"""Host-free tests of the adapter core: checkpoint reading/validation, descriptors, CC3M stats,
quality vectors, projection/tokens and the attention math. Real safetensors / torch files are
written with random weights in the released layout (scripts/random_weights.py)."""
from __future__ import annotations

import json
import math
import os
import pathlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from comfyui_iqa_adapter.adapter import attention, checkpoint, descriptor, iqa_adapter, layers, projection, quality
from comfyui_iqa_adapter.models import adapters as catalog
from comfyui_iqa_adapter.models import stats
from comfyui_iqa_adapter.scripts import random_weights
from support.bad_files import BAD_FILES, RunsCode

AdapterFileError = checkpoint.AdapterFileError
RECIPE = {"kind": "score", "metrics": ["topiq_nr", "laion_aes"], "use_flag": False, "pos_encode_L": 0}


def write_sidecar(weights: pathlib.Path, data: dict) -> None:
    weights.with_suffix(".json").write_text(json.dumps(data))


def sd15_dict(**kw):
    return random_weights.random_adapter_state_dict(768, layers.SD15_LAYER_WIDTHS, **kw)


def small_dict(**kw):
    return random_weights.random_adapter_state_dict(64, [32, 48, 32], **kw)


def save_st(path: pathlib.Path, sd: dict, sidecar: dict | None = RECIPE) -> pathlib.Path:
    save_file(sd, str(path))
    if sidecar is not None:
        write_sidecar(path, sidecar)
    return path


# ---------------------------------------------------------------- round trips and inferred info

@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_safetensors_round_trip_sd15(tmp_path, kind):
    sd = sd15_dict(num_tokens=4, input_dim=2, projection_kind=kind, mlp_hidden_dim=96, seed=3)
    path = save_st(tmp_path / "a.safetensors", sd)
    adapter = iqa_adapter.load_adapter(path)
    info = adapter.info
    assert (info.projection_kind, info.num_tokens, info.input_dim, info.cross_attention_dim) == (kind, 4, 2, 768)
    assert info.num_layers == 16 and info.layer_widths == layers.SD15_LAYER_WIDTHS and info.base == "sd15"
    assert info.mlp_hidden_dim == (96 if kind == "mlp" else None)
    for k in range(16):
        assert torch.equal(adapter.to_k_ip[k], sd[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"])
        assert torch.equal(adapter.to_v_ip[k], sd[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"])
        assert adapter.to_k_ip[k].dtype == torch.float32 and adapter.to_k_ip[k].device.type == "cpu"
    assert adapter.descriptor.metrics == ("topiq_nr", "laion_aes")
    assert not adapter.projection.training


def test_sdxl_layout_inferred_fp16_converted(tmp_path):
    # Real SDXL shapes, zero-filled fp32 (cheap) and in memory; file I/O and fp16 on a small adapter below.
    sd = {"image_proj.proj.weight": torch.zeros(2 * 2048, 2), "image_proj.proj.bias": torch.zeros(2 * 2048),
          "image_proj.norm.weight": torch.ones(2048), "image_proj.norm.bias": torch.zeros(2048)}
    shared = {640: torch.zeros(640, 2048), 1280: torch.zeros(1280, 2048)}  # one buffer per width keeps it fast
    for k, width in enumerate(layers.SDXL_LAYER_WIDTHS):
        for name in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{2 * k + 1}.{name}.weight"] = shared[width]
    info = checkpoint.split_state_dict(sd, "sdxl.safetensors").info
    assert info.base == "sdxl" and info.num_layers == 70 and (info.num_tokens, info.input_dim) == (2, 2)
    assert info.layer_widths == layers.SDXL_LAYER_WIDTHS
    small = {k: v.half() for k, v in small_dict().items()}
    adapter = iqa_adapter.load_adapter(save_st(tmp_path / "h.safetensors", small))
    assert adapter.info.dtype == "float16" and adapter.to_k_ip[0].dtype == torch.float32
    assert torch.equal(adapter.to_k_ip[0], small["ip_adapter.1.to_k_ip.weight"].float())


@pytest.mark.parametrize("layout", ["nested", "flat"])
@pytest.mark.parametrize("ext", [".bin", ".pt"])
def test_torch_file_round_trip(tmp_path, layout, ext):
    sd = small_dict(num_tokens=3, input_dim=3, projection_kind="mlp", mlp_hidden_dim=16)
    path = tmp_path / f"w{ext}"
    torch.save(random_weights.nested_bin_layout(sd) if layout == "nested" else sd, path)
    write_sidecar(path, {"metrics": ["topiq_nr", "laion_aes"], "use_flag": True})
    adapter = iqa_adapter.load_adapter(path)
    assert adapter.info.layer_widths == [32, 48, 32] and adapter.info.base == "custom"
    assert (adapter.info.num_tokens, adapter.info.input_dim, adapter.info.mlp_hidden_dim) == (3, 3, 16)
    assert torch.equal(adapter.to_k_ip[1], sd["ip_adapter.3.to_k_ip.weight"])
    for key, value in sd.items():
        if key.startswith("image_proj."):
            assert torch.equal(adapter.projection.state_dict()[key[len("image_proj."):]], value)


def test_cache_key_changes_with_file(tmp_path):
    path = save_st(tmp_path / "a.safetensors", small_dict())
    key = checkpoint.adapter_cache_key(path)
    save_file(small_dict(seed=5, num_tokens=4), str(path))
    assert checkpoint.adapter_cache_key(path) != key and key[0] == str(path.resolve())


def test_cache_key_follows_the_sidecar_even_with_the_same_mtime_and_size(tmp_path):
    path = save_st(tmp_path / "a.safetensors", small_dict(), sidecar={"metrics": ["topiq_nr", "laion_aes"]})
    side = path.with_suffix(".json")
    key = checkpoint.adapter_cache_key(path)
    stat = side.stat()
    side.write_text(side.read_text().replace('["topiq_nr", "laion_aes"]', '["laion_aes", "topiq_nr"]'))
    os.utime(side, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert side.stat().st_size == stat.st_size
    edited = checkpoint.adapter_cache_key(path)
    assert edited != key and edited[:-1] == key[:-1]  # same weights signature, other descriptor
    side.unlink()
    deleted = checkpoint.adapter_cache_key(path)
    assert deleted[-1] is None and len({key, edited, deleted}) == 3


# ---------------------------------------------------------------- validation errors

def expect_file_error(path, *fragments):
    with pytest.raises(AdapterFileError) as info:
        checkpoint.load_adapter_weights(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("case", BAD_FILES, ids=lambda case: case.name)
def test_bad_file_is_refused_with_a_clear_error(tmp_path, case):
    marker = tmp_path / "PWNED"
    path = tmp_path / f"{case.name}{case.ext}"
    path.write_bytes(case.build(small_dict(), str(marker)))
    expect_file_error(path, *case.needles)
    assert not marker.exists(), "SECURITY: reading the file ran code from its pickle"


def test_an_extra_trailing_layer_is_a_custom_adapter_that_the_model_check_refuses(tmp_path):
    sd = sd15_dict()
    sd["ip_adapter.33.to_k_ip.weight"] = torch.zeros(1280, 768)
    sd["ip_adapter.33.to_v_ip.weight"] = torch.zeros(1280, 768)
    weights = checkpoint.load_adapter_weights(save_st(tmp_path / "x.safetensors", sd, None))
    assert weights.info.num_layers == 17 and weights.info.base == "custom"
    with pytest.raises(ValueError, match="has 17 cross-attention layers .* but the model has 16"):
        layers.check_layers_match(weights.info.layer_widths, 768, layers.SD15_LAYER_WIDTHS, 768)


def test_directory_and_absent_file(tmp_path):
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    expect_file_error(folder, "directory")
    expect_file_error(tmp_path / "absent.bin", "not found")


def test_the_pickle_payload_of_the_bad_files_really_runs_code(tmp_path):
    """The control for the pickle cases above: unpickled without weights_only, the payload touches its marker."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(RunsCode(str(marker))))
    assert marker.exists()


# ---------------------------------------------------------------- descriptors

def test_sidecar_wins_and_input_dim_mismatch_names_both_numbers(tmp_path):
    path = save_st(tmp_path / "topiq_laion.safetensors", small_dict(input_dim=3),
                   {"metrics": ["topiq_nr", "laion_aes"], "use_flag": True, "pos_encode_L": 0})
    d = iqa_adapter.load_adapter(path).descriptor
    assert d.metrics == ("topiq_nr", "laion_aes") and d.use_flag and d.source.endswith("topiq_laion.json")
    write_sidecar(path, {"metrics": ["topiq_nr", "laion_aes", "musiq", "liqe"]})
    with pytest.raises(ValueError, match=r"size 3.*describes size 4"):
        iqa_adapter.load_adapter(path)


def test_catalog_match_by_file_name(tmp_path):
    path = save_st(tmp_path / "IQA-Adapter_TOPIQ_LAION-AES.safetensors", small_dict(input_dim=2), None)
    adapter = iqa_adapter.load_adapter(path)
    assert adapter.descriptor.metrics == ("topiq_nr", "laion_aes") and not adapter.descriptor.use_flag
    assert "recipe-matched to the authors' training script" in adapter.descriptor.source
    assert "exact" not in adapter.descriptor.source
    # the authors' inference wrappers default to input_dim=3: the same entry takes the flag variant
    path = save_st(tmp_path / "iqa_adapter_topiq_laion_aes_flag.safetensors", small_dict(input_dim=3), None)
    d = iqa_adapter.load_adapter(path).descriptor
    assert d.metrics == ("topiq_nr", "laion_aes") and d.use_flag and d.pos_encode_L == 0 and d.input_dim == 3
    assert "recipe-matched" in d.source and "flag" in d.source
    path = save_st(tmp_path / "iqa_adapter_topiq_laion_aes_big.safetensors", small_dict(input_dim=42), None)
    assert iqa_adapter.load_adapter(path).descriptor.name != "TOPIQ + LAION-AES"  # neither 2 nor 3 inputs
    # The input size decides flag / encoding for a single-metric adapter (documented guess).
    path = save_st(tmp_path / "hyperiqa_adapter.safetensors", small_dict(input_dim=2), None)
    d = iqa_adapter.load_adapter(path).descriptor
    assert d.metrics == ("hyperiqa",) and d.use_flag and d.pos_encode_L == 0
    path = save_st(tmp_path / "musiq_koniq_ava.safetensors", small_dict(input_dim=42), None)
    d = iqa_adapter.load_adapter(path).descriptor
    assert d.metrics == ("musiq", "musiq-ava") and d.pos_encode_L == 10 and not d.use_flag


def test_catalog_specificity():
    cases = {"topiq_nr-flive.safetensors": "TOPIQ (FLIVE)", "topiq_koniq.bin": "TOPIQ (KonIQ)",
             "liqe_mix.safetensors": "LIQE-MIX", "clipiqa+_liqe_mix.bin": "CLIPIQA+ + LIQE-MIX",
             "arniqa_kadid.safetensors": "ARNIQA (KADID)", "musiq_ava.safetensors": "MUSIQ (AVA)",
             "laion_aes.safetensors": "LAION-AES", "4x_topiq.safetensors": "4xTOPIQ (multi-dataset)"}
    for name, expected in cases.items():
        entry, tied = catalog.match_catalog(name)
        assert entry is not None and entry.name == expected, (name, entry, tied)
    assert len(catalog.CATALOG) == 26
    assert [e.name for e in catalog.CATALOG if e.recipe] == ["TOPIQ + LAION-AES"]
    recipe = next(e for e in catalog.CATALOG if e.name == "TOPIQ + LAION-AES")
    assert [dim for _, _, dim in recipe.input_dim_variants()] == [2, 3]
    assert catalog.match_catalog("my_adapter.safetensors") == (None, [])


def test_no_descriptor_explains_the_sidecar(tmp_path):
    path = save_st(tmp_path / "my_adapter.safetensors", small_dict(), None)
    with pytest.raises(ValueError, match=r"my_adapter\.json"):
        iqa_adapter.load_adapter(path)


def test_sidecar_errors(tmp_path):
    path = save_st(tmp_path / "a.safetensors", small_dict(), None)
    path.with_suffix(".json").write_text("{metrics: [}")
    with pytest.raises(ValueError, match="invalid JSON at line 1"):
        iqa_adapter.load_adapter(path)
    write_sidecar(path, {"metrics": ["topiq_nr", "not_a_metric"]})
    with pytest.raises(ValueError, match="unknown metric 'not_a_metric'"):
        iqa_adapter.load_adapter(path)
    write_sidecar(path, {"metrics": ["topiq_nr", "laion_aes"], "use_flags": True})
    with pytest.raises(ValueError, match="unknown field"):
        iqa_adapter.load_adapter(path)
    write_sidecar(path, {"metrics": ["topiq_nr", "my_metric"],
                         "metric_stats": {"my_metric": {"mean": 1.0, "std": 2.0}}})
    adapter = iqa_adapter.load_adapter(path)
    vec = quality.build_quality_vector(adapter.descriptor, {"topiq_nr": 0.0, "my_metric": 5.0}, mode="raw")
    assert vec[0, 1].item() == pytest.approx(2.0)


def test_reference_descriptor(tmp_path):
    path = save_st(tmp_path / "ref.safetensors", small_dict(input_dim=40),
                   {"kind": "reference",
                    "extractor": {"model": "arniqa", "layers": ["backbone"], "pooling": "avg", "dim": 40}})
    d = iqa_adapter.load_adapter(path).descriptor
    assert d.kind == "reference" and d.input_dim == 40
    with pytest.raises(ValueError, match="reference"):
        quality.build_quality_vector(d, {})


# ---------------------------------------------------------------- CC3M stats

def test_cc3m_table():
    table = stats.cc3m_stats()
    assert len(table) == 21 and list(table)[0] == "topiq_nr-flive" and "hyperiqa_normalized" not in table
    s = table["topiq_nr"]
    assert s.mean == pytest.approx(0.5492, abs=1e-4) and s.std == pytest.approx(0.0988, abs=1e-4)


def test_hyperiqa_paper_targets_are_exact_knots():
    s = stats.get_stats("hyperiqa")
    for p, expected in zip([1, 25, 50, 75, 99], [0.287, 0.501, 0.577, 0.639, 0.750]):
        assert s.percentile_to_raw(p) == pytest.approx(expected, abs=1e-3)
        assert s.percentile_to_raw(p) == s.quantiles[p]  # exactly the knot
    assert s.percentile_to_raw(0) == s.min and s.percentile_to_raw(100) == s.max
    mid = s.percentile_to_raw(37.5)
    assert mid == pytest.approx((s.quantiles[25] + s.quantiles[50]) / 2)
    for p in [0.5, 3, 37.5, 62, 97]:
        assert s.raw_to_percentile(s.percentile_to_raw(p)) == pytest.approx(p)
    with pytest.raises(ValueError):
        s.percentile_to_raw(101)


def test_flat_quantiles_invert_to_the_middle():
    # A saturating metric (like liqe at 5): q95 == q99 == max.
    q = {1: 1.0, 5: 2.0, 10: 2.5, 25: 3.0, 50: 4.0, 75: 4.5, 90: 4.9, 95: 5.0, 99: 5.0}
    s = stats.MetricStats("sat", mean=4.0, std=1.0, min=0.5, max=5.0, quantiles=q)
    assert s.raw_to_percentile(5.0) == 100.0  # at max: clamps
    assert s.raw_to_percentile(4.0) == 50.0 and s.raw_to_percentile(4.95) == pytest.approx(92.5)
    s2 = stats.MetricStats("flat", mean=4.0, std=1.0, min=0.5, max=6.0, quantiles=q)
    assert s2.raw_to_percentile(5.0) == pytest.approx(97.0)  # middle of the flat run 95..99
    assert s2.percentile_to_raw(97.0) == 5.0
    liqe = stats.get_stats("liqe")
    assert 0 <= liqe.raw_to_percentile(4.9) <= 100


# ---------------------------------------------------------------- quality vectors

def recipe_descriptor(**kw) -> descriptor.Descriptor:
    return descriptor.descriptor_from_dict({**RECIPE, **kw}, source="test")


def test_percentile_zscore_raw_modes():
    d = recipe_descriptor()
    t, a = stats.get_stats("topiq_nr"), stats.get_stats("laion_aes")
    v = quality.build_quality_vector(d, {"laion_aes": 50, "topiq_nr": 99})  # dict order does not matter
    assert v.shape == (1, 2) and v.dtype == torch.float32
    assert v[0, 0].item() == pytest.approx((t.quantiles[99] - t.mean) / t.std, abs=1e-6)
    assert v[0, 0].item() == pytest.approx(2.011, abs=1e-3)
    assert v[0, 1].item() == pytest.approx((a.quantiles[50] - a.mean) / a.std, abs=1e-6)
    z = quality.build_quality_vector(d, [{"topiq_nr": 1.5, "laion_aes": -2.0}, {"topiq_nr": 0, "laion_aes": 0}],
                                     mode="zscore")
    assert torch.equal(z, torch.tensor([[1.5, -2.0], [0.0, 0.0]]))
    r = quality.build_quality_vector(d, {"topiq_nr": 0.6, "laion_aes": 6.0}, mode="raw")
    assert r[0].tolist() == pytest.approx([(0.6 - t.mean) / t.std, (6.0 - a.mean) / a.std], abs=1e-6)


def test_flag_and_positional_encoding_layout():
    d = recipe_descriptor(use_flag=True, pos_encode_L=10)
    assert d.input_dim == 63
    v = quality.build_quality_vector(d, {"topiq_nr": 1.0, "laion_aes": -0.5}, mode="zscore")[0].double()
    assert v.shape == (63,)
    base = [1.0, -0.5, 1.0]
    assert v[:3].tolist() == pytest.approx(base)
    for i, p in enumerate(base):
        for k in range(10):
            w = math.pi * 2**k
            assert v[3 + i * 10 + k].item() == pytest.approx(math.sin(w * p), abs=1e-5)
            assert v[33 + i * 10 + k].item() == pytest.approx(math.cos(w * p), abs=1e-5)
    assert recipe_descriptor(use_flag=True).input_dim == 3
    flagged = quality.build_quality_vector(recipe_descriptor(use_flag=True), {"topiq_nr": 0, "laion_aes": 0},
                                           mode="zscore")
    assert flagged.tolist() == [[0.0, 0.0, 1.0]]


def test_target_errors():
    d = recipe_descriptor()
    bad = [({"topiq_nr": float("nan"), "laion_aes": 50}, "finite"),
           ({"topiq_nr": float("inf"), "laion_aes": 50}, "finite"),
           ({"topiq_nr": 50}, "missing metric"),
           ({"topiq_nr": 50, "laion_aes": 50, "musiq": 50}, "unknown metric"),
           ({"topiq_nr": 0, "laion_aes": 50}, "strictly between 0 and 100"),
           ({"topiq_nr": 100, "laion_aes": 50}, "strictly between 0 and 100")]
    for target, fragment in bad:
        with pytest.raises(ValueError, match=fragment):
            quality.build_quality_vector(d, target)
    with pytest.raises(ValueError, match="mode"):
        quality.build_quality_vector(d, {"topiq_nr": 5, "laion_aes": 5}, mode="percent")


def test_target_and_sweep_errors_name_the_input_a_value_came_from(tmp_path):
    """The one encode path blames inputs by where each value came from, never by reading a message."""
    from comfyui_iqa_adapter.adapter import sweep
    from comfyui_iqa_adapter.adapter.errors import InputError

    adapter = iqa_adapter.load_adapter(save_st(tmp_path / "a.safetensors", small_dict(input_dim=2, seed=1)))

    def blamed(call) -> str:
        with pytest.raises(InputError) as caught:
            call()
        return caught.value.input_name

    def target(targets="", mode="percentile", quality_choice="best", percentile=99.0, negative_scale=0.0):
        return quality.target_tokens(adapter, quality_choice, percentile, targets, mode, negative_scale, 64)

    def swept(start=1.0, stop=99.0, steps=3, mode="percentile", spacing="linear", hold="", metrics="topiq_nr"):
        return sweep.sweep_tokens(adapter, metrics, start, stop, steps, mode, spacing, hold, 0.0, 64)

    assert target(targets="topiq_nr=99; topiq_nr=1").tokens.batch_size == 2
    assert blamed(lambda: target(targets="topiq_nr=1e30", mode="zscore")) == "targets"
    assert blamed(lambda: target(quality_choice="best", percentile=40.0)) == "percentile"
    assert blamed(lambda: target(mode="zscore")) == "mode"  # nothing typed for zscore to apply to
    assert blamed(lambda: target(negative_scale=float("nan"))) == "negative_scale"
    assert blamed(lambda: target(targets="; ".join(["topiq_nr=50"] * 65))) == "targets"
    tokens, targets = swept()
    assert tokens.batch_size == len(targets) == 3
    assert blamed(lambda: swept(mode="raw", start=1.0, stop=999.0)) == "stop"
    assert blamed(lambda: swept(mode="raw", start=999.0, stop=1.0)) == "start"
    assert blamed(lambda: swept(hold="1e30", mode="zscore", start=-1.0, stop=1.0)) == "hold"
    assert blamed(lambda: swept(hold="high")) == "hold"
    assert blamed(lambda: swept(start=0.0)) == "start"
    assert blamed(lambda: swept(metrics="musiq")) == "metrics"
    assert blamed(lambda: swept(spacing="paper", mode="zscore")) == "spacing"
    assert blamed(lambda: swept(steps=100)) == "steps"  # more rows than the 64 allowed here


def test_parse_targets_text():
    rows = quality.parse_targets("topiq_nr=99, laion_aes=90; topiq_nr=1,laion_aes=1\nclipiqa+=50")
    assert rows == [{"topiq_nr": 99.0, "laion_aes": 90.0}, {"topiq_nr": 1.0, "laion_aes": 1.0}, {"clipiqa+": 50.0}]
    for text in ["topiq_nr 99", "topiq_nr=abc", "topiq_nr=nan", "topiq_nr=1, topiq_nr=2", "  ;  "]:
        with pytest.raises(ValueError):
            quality.parse_targets(text)


def test_describe_target_reports_raw_and_percentile():
    d = recipe_descriptor()
    label = quality.describe_target(d, {"topiq_nr": 99, "laion_aes": 50})
    assert label["raw"]["topiq_nr"] == stats.get_stats("topiq_nr").quantiles[99]
    assert label["percentile"]["laion_aes"] == pytest.approx(50)


# ---------------------------------------------------------------- projection and tokens

def load_small(tmp_path, kind="linear", **kw):
    sd = small_dict(projection_kind=kind, num_tokens=3, input_dim=2, mlp_hidden_dim=16, **kw)
    return iqa_adapter.load_adapter(save_st(tmp_path / f"{kind}.safetensors", sd)), sd


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projection_matches_hand_computation(tmp_path, kind):
    adapter, sd = load_small(tmp_path, kind)
    v = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    if kind == "linear":
        h = v @ sd["image_proj.proj.weight"].T + sd["image_proj.proj.bias"]
    else:
        hidden = v @ sd["image_proj.proj.0.weight"].T + sd["image_proj.proj.0.bias"]
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        h = hidden @ sd["image_proj.proj.2.weight"].T + sd["image_proj.proj.2.bias"]
    h = h.reshape(2, 3, 64)
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    h = h * sd["image_proj.norm.weight"] + sd["image_proj.norm.bias"]
    out = adapter.projection(v)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out, h, atol=1e-5, rtol=1e-5)


def test_encode_tokens_negative_scale(tmp_path):
    adapter, _ = load_small(tmp_path)
    v = torch.tensor([[1.0, -2.0], [0.3, 0.7]])
    tokens = iqa_adapter.encode_tokens(adapter, v, negative_scale=0.0)
    assert tokens.cond.shape == tokens.uncond.shape == (2, 3, 64) and tokens.num_tokens == 3
    torch.testing.assert_close(tokens.uncond, adapter.projection(torch.zeros(2, 2)))
    assert not torch.allclose(tokens.uncond, torch.zeros_like(tokens.uncond))  # proj(0) is not zero tokens
    neg = iqa_adapter.encode_tokens(adapter, v, negative_scale=0.5)
    torch.testing.assert_close(neg.cond, tokens.cond)
    torch.testing.assert_close(neg.uncond, adapter.projection(-0.5 * v))
    assert not torch.allclose(neg.uncond, tokens.uncond)


def test_quality_tokens_save_load(tmp_path):
    adapter, _ = load_small(tmp_path)
    tokens = iqa_adapter.encode_tokens(adapter, torch.randn(3, 2), 0.5, labels=[{"i": i} for i in range(3)])
    tokens.save(tmp_path / "t.safetensors")
    back = projection.QualityTokens.load(tmp_path / "t.safetensors")
    assert torch.equal(back.cond, tokens.cond) and torch.equal(back.uncond, tokens.uncond)
    assert back.labels == [{"i": 0}, {"i": 1}, {"i": 2}] and (back.num_tokens, back.cross_attention_dim) == (3, 64)
    with pytest.raises(ValueError, match="not a QualityTokens file"):
        projection.QualityTokens.load(tmp_path / "linear.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\0\0\0\0\0\0\0garbage")
    with pytest.raises(ValueError, match="truncated or corrupt safetensors file: header claims 16 bytes"):
        projection.QualityTokens.load(junk)


# ---------------------------------------------------------------- attention

def reference_attention(q, k, v, heads):
    b, t, width = q.shape
    d = width // heads

    def split(x):
        return x.reshape(x.shape[0], x.shape[1], heads, d).permute(0, 2, 1, 3).double()

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ split(v)).permute(0, 2, 1, 3).reshape(b, t, width)


def test_attention_matches_hand_written_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 40, generator=gen) for n in (7, 5, 5))
    out = attention.attention(q, k, v, heads=5)
    assert out.shape == (2, 7, 40)
    assert (out.double() - reference_attention(q, k, v, 5)).abs().max().item() < 1e-6


def test_ip_attention_broadcast_and_decoupled_sum():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 6, 32, generator=gen)
    k1, v1 = torch.randn(1, 2, 32, generator=gen), torch.randn(1, 2, 32, generator=gen)
    shared = attention.ip_attention(q, k1, v1, heads=4)
    expanded = attention.ip_attention(q, k1.expand(3, -1, -1).clone(), v1.expand(3, -1, -1).clone(), heads=4)
    torch.testing.assert_close(shared, expanded)
    assert (shared.double() - reference_attention(q, k1.expand(3, -1, -1), v1.expand(3, -1, -1), 4)).abs().max() < 1e-6
    text = torch.randn(3, 6, 32, generator=gen)
    torch.testing.assert_close(attention.decoupled_output(text, shared, 0.7), text + 0.7 * shared)
    with pytest.raises(ValueError, match="batch"):
        attention.ip_attention(q, torch.randn(2, 2, 32), torch.randn(2, 2, 32), heads=4)


def test_precompute_ip_kv(tmp_path):
    adapter, sd = load_small(tmp_path)
    tokens = iqa_adapter.encode_tokens(adapter, torch.randn(2, 2)).cond
    kv = attention.precompute_ip_kv(adapter, tokens)
    assert [tuple(k.shape) for k, _ in kv] == [(2, 3, 32), (2, 3, 48), (2, 3, 32)]
    torch.testing.assert_close(kv[1][1], tokens @ sd["ip_adapter.3.to_v_ip.weight"].T)


# ---------------------------------------------------------------- layer check

def test_sd15_adapter_on_sdxl_model_is_refused():
    with pytest.raises(ValueError, match=r"adapter has 16 cross-attention layers \(C=768\) "
                                         r"but the model has 70 \(context dim 2048\)"):
        layers.check_layers_match(layers.SD15_LAYER_WIDTHS, 768, layers.SDXL_LAYER_WIDTHS, 2048)
    swapped = list(layers.SD15_LAYER_WIDTHS)
    swapped[0] = 640
    with pytest.raises(ValueError, match="layer 0 .*ip_adapter.1.* width 640"):
        layers.check_layers_match(swapped, 768, layers.SD15_LAYER_WIDTHS, 768)
    layers.check_layers_match(layers.SDXL_LAYER_WIDTHS, 2048, layers.SDXL_LAYER_WIDTHS, 2048)


def test_misnamed_files_are_read_by_content(tmp_path):
    sd = small_dict()
    st_as_bin = tmp_path / "really_safetensors.bin"
    save_file(sd, str(st_as_bin))
    torch_as_st = tmp_path / "really_torch.safetensors"
    torch.save(random_weights.nested_bin_layout(sd), torch_as_st)
    for path in (st_as_bin, torch_as_st):
        weights = checkpoint.load_adapter_weights(path)
        assert torch.equal(weights.to_v_ip[2], sd["ip_adapter.5.to_v_ip.weight"])
    odd = tmp_path / "w.ckpt2"
    odd.write_bytes(b"x")
    expect_file_error(odd, "unknown extension")


def test_every_token_path_refuses_huge_or_empty_values(tmp_path):
    """encode (targets, sweep, reference all go through encode_tokens), loaded tokens, empty rows."""
    from comfyui_iqa_adapter.adapter import errors, files

    state = random_weights.random_adapter_state_dict(cross_attention_dim=32, layer_widths=[16, 32], num_tokens=2,
                                                input_dim=6, seed=3)
    path = tmp_path / "ref.safetensors"
    save_file(state, str(path))
    reference = descriptor.descriptor_from_dict(
        {"kind": "reference", "extractor": {"model": "m", "layers": ["x"], "dim": 6}})
    adapter = iqa_adapter.load_adapter(path, reference)
    ok = iqa_adapter.encode_tokens(adapter, torch.ones(2, 6))
    assert ok.batch_size == 2
    for vectors in (torch.full((1, 6), 1e30), torch.full((1, 6), float("nan")), torch.full((1, 6), 1e7)):
        with pytest.raises(errors.InputError):
            iqa_adapter.encode_tokens(adapter, vectors)
    for cond in (torch.full((1, 2, 32), 1e30), torch.full((1, 2, 32), float("nan")), torch.zeros(0, 2, 32)):
        with pytest.raises(ValueError):
            projection.QualityTokens(cond, cond.clone())
    # reports: NaN is null in JSON lines, formula-like text is neutralised, foreign CSVs are not appended to
    out = files.append_jsonl(tmp_path / "s.jsonl", [{"score": float("nan"), "metric": "=x"}])
    assert out.read_text().strip() == '{"score": null, "metric": "=x"}'
    foreign = tmp_path / "s.csv"
    foreign.write_text("a,b\n1,2\n")
    written = files.write_csv(foreign, ["metric", "score"], [{"metric": "-1+2", "score": -1.5}], append=True)
    assert foreign.read_text() == "a,b\n1,2\n" and written.name == "s_2.csv"
    assert written.read_text().splitlines() == ["metric,score", "'-1+2,-1.5"]
    # sweep reports: user text from the graph is neutralised, a second report never overwrites the first
    import csv

    from comfyui_iqa_adapter.adapter import sweep
    targets = sweep.build_sweep(["topiq_nr"], "", 10.0, 90.0, 3)
    hostile = {"prompt": '=HYPERLINK("http://example.invalid")', "model": "+cmd $\\frac{$", "adapter": "@SUM(1)"}
    first = sweep.write_report(tmp_path, "r", targets, {"topiq_nr": [0.1, 0.5, 0.9]}, None, ["a", "b", "c"], hostile)
    second = sweep.write_report(tmp_path, "r", targets, {"topiq_nr": [0.2, 0.5, 0.8]}, None, ["a", "b", "c"], hostile)
    assert set(first["paths"].values()).isdisjoint(second["paths"].values())
    rows = list(csv.DictReader(first["paths"]["csv"].open(newline="")))
    assert all(row["prompt"] == "'" + hostile["prompt"] and row["model"] == "'" + hostile["model"]
               and row["adapter"] == "'" + hostile["adapter"] for row in rows), rows[0]
