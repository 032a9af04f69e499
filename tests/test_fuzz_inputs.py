"""Property-based fuzzing (hypothesis) of what users and files feed the pack, through the real node code
in-process: target text, sidecar JSON, safetensors headers, token files.

Invariant: a valid result, or an error `Node: input: ...` (errors.NodeInputError) naming the node and the
input, of bounded length. Bounded in time (a fixed number of examples, no deadline: the machine may be
slow) and in memory (the process' peak RSS may not grow by more than MEMORY_BOUND_MIB over the run,
although the inputs claim gigabytes).
"""
from __future__ import annotations

import json
import math
import pathlib
import resource
import shutil
import struct
import tempfile
import uuid

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="SKIPPED LOUDLY: hypothesis is not installed "
                                                      "(requirements-dev.txt; CI installs it)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from comfyui_iqa_adapter.adapter import errors, projection  # noqa: E402
from conftest import TINY_ADAPTER  # noqa: E402

pytestmark = pytest.mark.fuzz
MEMORY_BOUND_MIB = 512
MESSAGE_BOUND = errors.MESSAGE_LIMIT + 200
FUZZ = settings(max_examples=80, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def pack(comfy, host_dir):
    """The node modules in-process, with scratch adapter/input folders registered in the host's folder_paths."""
    import folder_paths

    from comfyui_iqa_adapter.nodes import adapter_nodes

    scratch = pathlib.Path(tempfile.mkdtemp(prefix="iqa-fuzz-"))
    (scratch / "adapters").mkdir()
    (scratch / "input").mkdir()
    folder_paths.add_model_folder_path("iqa_adapter", str(scratch / "adapters"))
    old_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(scratch / "input"))
    tiny = host_dir / "models" / "iqa_adapter" / TINY_ADAPTER
    (adapter,) = adapter_nodes.IQAAdapterLoader.execute(TINY_ADAPTER).args
    start = _peak_rss_mib()
    yield adapter_nodes, adapter, scratch, tiny
    grown = _peak_rss_mib() - start
    print(f"\n[fuzz] peak RSS grew {grown:.0f} MiB over the fuzz run (bound {MEMORY_BOUND_MIB} MiB)")
    folder_paths.set_input_directory(old_input)
    paths, _ = folder_paths.folder_names_and_paths["iqa_adapter"]
    if str(scratch / "adapters") in paths:
        paths.remove(str(scratch / "adapters"))
    shutil.rmtree(scratch, ignore_errors=True)
    assert grown < MEMORY_BOUND_MIB, f"fuzzing grew the peak RSS by {grown:.0f} MiB"


def run_node(node: str, inputs: set[str], call):
    """Either the call's result, or an error naming `node` and one of `inputs`; nothing else."""
    try:
        return call()
    except errors.NodeInputError as error:
        message = str(error)
        assert message.startswith(f"{errors.NODE_NAMES.get(node, node)}: "), message[:300]
        assert error.input_name in inputs, f"blamed {error.input_name!r}, expected one of {inputs}: {message[:300]}"
        assert len(message) <= MESSAGE_BOUND, f"{len(message)}-character message"
        return None


def check_tokens(tokens) -> None:
    assert tokens.batch_size >= 1
    assert torch.isfinite(tokens.cond).all() and torch.isfinite(tokens.uncond).all()
    assert float(tokens.cond.abs().max()) <= projection.TOKEN_VALUE_LIMIT


# ---------------------------------------------------------------- target text

NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                    st.sampled_from(["1e30", "-1e300", "1e999", "nan", "0", "100", "50", "abc", "", "9" * 500]))
NAMES = st.one_of(st.sampled_from(["topiq_nr", "laion_aes", "musiq", "x" * 300, "=cmd", ""]),
                  st.text(max_size=20))
ENTRY = st.builds(lambda n, v: f"{n}={v}", NAMES, NUMBERS)
ROW = st.lists(ENTRY, max_size=4).map(", ".join)
TARGET_TEXT = st.one_of(st.lists(ROW, max_size=6).map("; ".join), st.text(max_size=200),
                        st.integers(2000, 6000).map(lambda n: "; ".join(["topiq_nr=50, laion_aes=50"] * n)))


@FUZZ
@given(text=TARGET_TEXT, mode=st.sampled_from(["percentile", "zscore", "raw", "percentage"]),
       negative_scale=st.one_of(st.floats(-10, 10), st.just(math.nan), st.just(math.inf)))
def test_fuzz_target_text(pack, text, mode, negative_scale):
    adapter_nodes, adapter, *_ = pack
    result = run_node("IQAAdapterEncodeTarget", {"targets", "quality", "percentile", "mode", "negative_scale"},
                      lambda: adapter_nodes.IQAAdapterEncodeTarget.execute(adapter, "custom", 50.0, text, mode,
                                                                           negative_scale))
    if result is not None:
        check_tokens(result.args[0])


# ---------------------------------------------------------------- sidecar JSON

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12),
                      st.sampled_from(["topiq_nr", "laion_aes", "score", "reference", "zscore", "none"]),
                      st.just(10 ** 400))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                          max_leaves=12)
SIDECAR_FIELDS = st.fixed_dictionaries({}, optional={
    "kind": JSON_VALUE, "metrics": st.one_of(JSON_VALUE, st.just(["topiq_nr", "laion_aes"])),
    "normalization": JSON_VALUE, "use_flag": JSON_VALUE, "pos_encode_L": JSON_VALUE, "metric_stats": JSON_VALUE,
    "extractor": JSON_VALUE, "name": JSON_VALUE, "unknown": JSON_VALUE})
SIDECAR_TEXT = st.one_of(SIDECAR_FIELDS.map(json.dumps), JSON_VALUE.map(json.dumps), st.text(max_size=100),
                         st.integers(1000, 200000).map(lambda n: "[" * n + "]" * n),
                         st.integers(1000, 200000).map(lambda n: '{"a":' * n + "1" + "}" * n))


@FUZZ
@given(text=SIDECAR_TEXT)
def test_fuzz_sidecar_json(pack, text):
    adapter_nodes, _, scratch, tiny = pack
    name = f"side_{uuid.uuid4().hex[:10]}.safetensors"
    shutil.copyfile(tiny, scratch / "adapters" / name)
    (scratch / "adapters" / name).with_suffix(".json").write_text(text)
    result = run_node("IQAAdapterLoader", {"adapter_name"}, lambda: adapter_nodes.IQAAdapterLoader.execute(name))
    if result is not None:
        assert result.args[0].descriptor.input_dim == result.args[0].info.input_dim


# ---------------------------------------------------------------- safetensors headers

DTYPES = st.sampled_from(["F32", "F16", "BF16", "I32", "F64", "BOOL", "X9", 7])
DIMS = st.lists(st.one_of(st.integers(-3, 70000), st.just(10 ** 12), st.just(2 ** 63), st.floats(),
                          st.text(max_size=3)), max_size=4)
OFFSETS = st.one_of(st.tuples(st.integers(-5, 5000), st.integers(-5, 5000)).map(list), JSON_VALUE)
ENTRY_HEADER = st.one_of(st.fixed_dictionaries({"dtype": DTYPES, "shape": DIMS, "data_offsets": OFFSETS}), JSON_VALUE)
KEYS = st.sampled_from(["image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight",
                        "image_proj.norm.bias", "ip_adapter.1.to_k_ip.weight", "ip_adapter.1.to_v_ip.weight",
                        "__metadata__", "junk", "k" * 400])
HEADER = st.dictionaries(KEYS, ENTRY_HEADER, max_size=6)


@FUZZ
@given(header=HEADER, data_len=st.integers(0, 4096), raw=st.one_of(st.none(), st.binary(max_size=64)),
       length_field=st.one_of(st.none(), st.integers(0, 2 ** 64 - 1)))
def test_fuzz_safetensors_headers(pack, header, data_len, raw, length_field):
    adapter_nodes, _, scratch, tiny = pack
    body = raw if raw is not None else json.dumps(header).encode()
    length = len(body) if length_field is None else length_field
    name = f"head_{uuid.uuid4().hex[:10]}.safetensors"
    path = scratch / "adapters" / name
    path.write_bytes(struct.pack("<Q", length) + body + b"\0" * data_len)
    shutil.copyfile(tiny.with_suffix(".json"), path.with_suffix(".json"))
    run_node("IQAAdapterLoader", {"adapter_name"}, lambda: adapter_nodes.IQAAdapterLoader.execute(name))


# ---------------------------------------------------------------- token files

def _token_header(rows, n, c, dtype, metadata):
    numel = max(0, rows) * max(0, n) * max(0, c)
    size = numel * {"F32": 4, "F16": 2}.get(dtype, 4)
    header = {"cond": {"dtype": dtype, "shape": [rows, n, c], "data_offsets": [0, size]},
              "uncond": {"dtype": dtype, "shape": [rows, n, c], "data_offsets": [size, 2 * size]},
              "__metadata__": metadata}
    return header, 2 * size


TOKEN_META = st.fixed_dictionaries({
    "format": st.sampled_from(["iqa_adapter_quality_tokens", "other"]),
    "num_tokens": st.one_of(st.just("2"), st.text(max_size=6), st.just("9" * 5000)),
    "cross_attention_dim": st.one_of(st.just("768"), st.just("4"), st.text(max_size=6)),
    "labels": st.one_of(st.just("[]"), JSON_VALUE.map(json.dumps), st.integers(1000, 100000).map(lambda n: "[" * n))})


@FUZZ
@given(rows=st.one_of(st.integers(0, 3), st.integers(3000, 10 ** 6), st.just(10 ** 12)),
       n=st.sampled_from([0, 2, 4, 5000]), c=st.sampled_from([4, 768, 10 ** 6]),
       dtype=st.sampled_from(["F32", "F16", "I32"]),
       metadata=TOKEN_META, fill=st.sampled_from([0.5, 1e30, math.nan, -math.inf]), real_data=st.booleans())
def test_fuzz_token_files(pack, rows, n, c, dtype, metadata, fill, real_data):
    adapter_nodes, _, scratch, _ = pack
    header, data_len = _token_header(rows, n, c, dtype, metadata)
    raw = json.dumps(header).encode()
    # real data only when small; otherwise the header claims what the file does not hold
    data = b""
    if real_data and data_len <= 8 * 1024 ** 2:
        if dtype == "I32":
            element = torch.zeros(1, dtype=torch.int32)
        else:
            element = torch.full((1,), fill, dtype={"F32": torch.float32, "F16": torch.float16}.get(dtype, torch.int32))
        data = element.numpy().tobytes() * (data_len // max(1, element.element_size()))
    name = f"tok_{uuid.uuid4().hex[:10]}.safetensors"
    (scratch / "input" / name).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    result = run_node("IQAAdapterLoadTokens", {"file"}, lambda: adapter_nodes.IQAAdapterLoadTokens.execute(name))
    if result is not None:
        check_tokens(result.args[0])
