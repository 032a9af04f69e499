"""The trainer on the real host with the tiny SD1.5 checkpoint (CPU): its forward is the inference patch,
its output reloads through the nodes, resume is exact, 2 processes equal 1, labels/stats/data as specified.

Kept small: 64 px images (8x8 latents), batch 2, a few steps; one torch thread (the machine is shared).
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from comfyui_iqa_adapter.adapter import checkpoint, iqa_adapter, projection, training, training_data, training_layout
from comfyui_iqa_adapter.scripts import random_weights

PACK_ROOT = pathlib.Path(__file__).resolve().parent.parent
RESOLUTION = 64


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tiny_checkpoint, one_thread):
    from comfyui_iqa_adapter.nodes.train_host import HostBase

    model, clip, vae = tiny_checkpoint
    return HostBase(model, clip, vae)


def make_images(folder: pathlib.Path, count: int, seed: int = 0, size=(80, 96)) -> pathlib.Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base_colour = rng.random(3) * 255
        pixels = np.clip(base_colour + rng.normal(0, 20 + 10 * i, (size[0], size[1], 3)), 0, 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"a test image number {i}")
    return folder


def random_module(base, seed=3, input_dim=1) -> training.TrainableAdapter:
    """A trainable module with random weights (not the to_k/to_v copies) so every path matters."""
    module = training.TrainableAdapter(base.cross_attention_dim, base.layer_widths, input_dim, 2)
    state = random_weights.random_adapter_state_dict(base.cross_attention_dim, base.layer_widths, 2, input_dim,
                                                     seed=seed)
    module.load_state_dict(state, strict=True)
    return module.attach(base).eval()


def inference_adapter(state: dict, descriptor_metrics=("piqe",)):
    from comfyui_iqa_adapter.adapter.descriptor import Descriptor

    weights = checkpoint.split_state_dict(state)
    proj = projection.QualityProjection.from_weights(weights.image_proj, weights.info)
    descriptor = Descriptor(metrics=descriptor_metrics, metric_stats={"piqe": {"mean": 0.0, "std": 1.0}}, source="test")
    return iqa_adapter.IQAAdapter("<trained>", weights.info, descriptor, proj, weights.to_k_ip, weights.to_v_ip)


def host_raw_output(patched, x, sigma, context):
    """The UNet output the host computes inside apply_model for these inputs (same options as the sampler)."""
    model = patched.model
    sampling = model.model_sampling
    options = dict(patched.model_options["transformer_options"], cond_or_uncond=[0])
    xc = sampling.calculate_input(sigma, x)
    t = sampling.timestep(sigma).float()
    with torch.no_grad():
        return xc, model.diffusion_model(xc, t, context=context, transformer_options=options).float()


def forward_inputs(base, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 768, generator=gen)
    timesteps = torch.tensor([120, 640])
    return x0, noise, context, timesteps


def test_trainer_forward_equals_the_inference_patch(base, tiny_checkpoint):
    from comfyui_iqa_adapter.nodes import adapter_patch

    model = tiny_checkpoint[0]
    module = random_module(base)
    vectors = torch.tensor([[0.7], [-1.2]])
    x0, noise, context, timesteps = forward_inputs(base)
    noisy, _ = training.noisy_and_target(x0, noise, timesteps, base.alphas_cumprod, base.prediction_type)
    with torch.no_grad():
        trained = module(noisy, timesteps, context, {}, vectors)

    adapter = inference_adapter(module.released_state_dict())
    tokens = iqa_adapter.encode_tokens(adapter, vectors)
    patched = adapter_patch.apply_iqa_adapter(model, adapter, tokens, weight=1.0)
    sigma = model.model.model_sampling.sigmas[timesteps]
    xc, inferred = host_raw_output(patched, x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, context)
    _, plain = host_raw_output(model, x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, context)

    assert (noisy - xc).abs().max() <= 1e-5  # the trainer's x_t is the host's scaled input
    diff = (trained - inferred).abs().max().item()
    effect = (inferred - plain).abs().max().item()
    print(f"trainer vs inference patch: max |diff| {diff:.2e}; adapter effect {effect:.2e}")
    assert diff <= 1e-5
    assert effect > 1e-2  # the adapter really changes the prediction


def test_saved_adapter_reloads_through_the_nodes(base, tiny_checkpoint, tmp_path):
    import folder_paths

    from comfyui_iqa_adapter.nodes import adapter_nodes

    model = tiny_checkpoint[0]
    module = random_module(base, seed=5)
    config = training.TrainConfig(metrics=["piqe"], name="trained_piqe")
    stats = {"piqe": {"mean_val": 40.0, "std_val": 8.0}}
    folder = tmp_path / "iqa_adapter"
    written = training.write_release(folder, config.name, module, training.descriptor_dict(config, stats))
    folder_paths.add_model_folder_path("iqa_adapter", str(folder))

    (adapter,) = adapter_nodes.IQAAdapterLoader.execute(written.name).args
    assert adapter.descriptor.metric_stats == {"piqe": {"mean": 40.0, "std": 8.0}}
    (tokens, count) = adapter_nodes.IQAAdapterEncodeTarget.execute(adapter, "custom", 50.0, "piqe=0.7; piqe=-1.2",
                                                                  "zscore", 0.0).args
    assert count == 2
    (patched,) = adapter_nodes.IQAAdapterApply.execute(model, adapter, tokens, 1.0, 0.0, 1.0).args

    vectors = torch.tensor([[0.7], [-1.2]])
    x0, noise, context, timesteps = forward_inputs(base, seed=1)
    noisy, _ = training.noisy_and_target(x0, noise, timesteps, base.alphas_cumprod, base.prediction_type)
    with torch.no_grad():
        trained = module(noisy, timesteps, context, {}, vectors)
    sigma = model.model.model_sampling.sigmas[timesteps]
    _, reloaded = host_raw_output(patched, x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, context)
    diff = (trained - reloaded).abs().max().item()
    print(f"trainer vs reloaded through IQAAdapterLoader/EncodeTarget/Apply: max |diff| {diff:.2e}")
    assert diff <= 1e-5


def test_initialisation_copies_to_k_and_to_v(base):
    config = training.TrainConfig(metrics=["piqe"], resolution=RESOLUTION, batch_size=2)
    module = training.build_module(config, base)
    for position, (wk, wv) in enumerate(base.base_kv_weights()):
        assert torch.equal(module.layer(position).to_k_ip.weight, wk)
        assert torch.equal(module.layer(position).to_v_ip.weight, wv)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable == set(module.state_dict())  # only the adapter trains ...
    assert not any(p.requires_grad for p in base.unet.parameters())  # ... the base is frozen


@pytest.mark.parametrize("options", [dict(projection="mlp", use_flag=True, pos_encode_L=2, num_tokens=4),
                                     dict(projection="linear", use_flag=False, pos_encode_L=0, num_tokens=2)])
def test_projection_options_give_files_the_loader_accepts(options):
    from comfyui_iqa_adapter.adapter.descriptor import check_input_dim, descriptor_from_dict

    config = training.TrainConfig(metrics=["topiq_nr", "laion_aes"], normalization="cc3m", **options)
    module = training.TrainableAdapter(64, [32, 48], config.input_dim, config.num_tokens, config.projection)
    weights = checkpoint.split_state_dict(module.released_state_dict())
    assert (weights.info.projection_kind, weights.info.num_tokens, weights.info.input_dim) == \
        (config.projection, config.num_tokens, (2 + options["use_flag"]) * (2 * options["pos_encode_L"] + 1))
    descriptor = descriptor_from_dict(training.descriptor_dict(config, {}))
    check_input_dim(descriptor, weights.info.input_dim, "<trained>")
    scores = {"topiq_nr": {"a": 0.5492, "b": 0.7}, "laion_aes": {"a": 4.684, "b": 5.0}}
    vectors = training.quality_vectors(config, scores, ["a", "b"], {})
    assert vectors.shape == (2, config.input_dim) and abs(vectors[0, 0].item()) < 1e-3  # CC3M mean -> z = 0


def test_condition_dropout_rates_and_targets():
    config = training.TrainConfig(metrics=["piqe"])
    kinds = [training.dropout_kind(u, config) for u in np.linspace(0, 1, 10000, endpoint=False)]
    assert kinds.count((True, False)) == 100 and kinds.count((False, True)) == 500 and kinds.count((True, True)) == 100
    a = torch.tensor([0.25, 0.81])
    x0, eps = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    noisy, target = training.noisy_and_target(x0, eps, torch.tensor([0, 1]), a, "v")
    assert torch.allclose(target, a.sqrt().view(-1, 1, 1, 1) * eps - (1 - a).sqrt().view(-1, 1, 1, 1) * x0)
    assert torch.allclose(noisy, a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps)


def _run(out, dataset, vectors, base, config, stop_at=None):
    from accelerate import Accelerator

    descriptor = training.descriptor_dict(config, {"piqe": {"mean_val": 0.0, "std_val": 1.0}})
    return training.train(config, dataset, vectors, base, out, descriptor, accelerator=Accelerator(cpu=True),
                          stop_at=stop_at, progress=False)


def test_resume_gives_the_uninterrupted_weights(base, tmp_path):
    from safetensors.torch import load_file

    dataset = training_data.open_dataset([str(make_images(tmp_path / "images", 4))])
    vectors = torch.randn(len(dataset), 1, generator=torch.Generator().manual_seed(0))
    config = training.TrainConfig(metrics=["piqe"], resolution=RESOLUTION, batch_size=2, max_steps=4, save_every=2,
                                  learning_rate=1e-3, name="resume", drop_caption=0.5)
    straight = _run(tmp_path / "straight", dataset, vectors, base, config)
    assert _run(tmp_path / "resumed", dataset, vectors, base, config, stop_at=2) is None
    assert training.latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step-00000002"
    torch.manual_seed(12345)  # the global RNG is disturbed between the runs; the checkpoint restores it
    resumed = _run(tmp_path / "resumed", dataset, vectors, base, config)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    initial = training.build_module(config, base).released_state_dict()
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # it did train
    logs = [(tmp_path / run / "log.csv").read_text().splitlines() for run in ("straight", "resumed")]
    losses = [[line.split(",")[2] for line in log[1:]] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_global_batch_is_the_same_for_any_process_count():
    for step in range(5):
        indices = training.global_batch_indices(10, 4, step, seed=7)
        assert len(set(indices)) == 4
    epoch0 = [i for s in range(2) for i in training.global_batch_indices(10, 4, s, 7)]
    assert len(set(epoch0)) == 8  # no repeats within an epoch
    assert training.sample_randomness(7, 3, 1, 1000).u == training.sample_randomness(7, 3, 1, 1000).u


def _train_command(out, data, extra=()):
    return [sys.executable, str(PACK_ROOT / "scripts" / "train.py"), "--checkpoint", "tiny_sd15.safetensors",
            "--data", str(data), "--metrics", "piqe", "--steps", "2", "--save-every", "2", "--resolution",
            str(RESOLUTION), "--batch-size", "2", "--device", "cpu", "--out", str(out), *extra]


def test_two_processes_equal_one(host_dir, tmp_path):
    """accelerate (DDP, gloo) with 2 CPU processes gives the 1-process run for the same global batch: the
    same gradients (Adam's first moments, which keep their scale) and the same weights (recipe lr 1e-5)."""
    from safetensors.torch import load_file

    data = make_images(tmp_path / "images", 4)
    env = dict(os.environ, OMP_NUM_THREADS="1", COMFYUI_PATH=str(host_dir))
    single = subprocess.run(_train_command(tmp_path / "one", data), env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    double = subprocess.run(launcher + _train_command(tmp_path / "two", data)[1:], env=env, capture_output=True,
                            text=True)
    assert double.returncode == 0, double.stdout[-3000:] + double.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one" / "one.safetensors")), load_file(str(tmp_path / "two" / "two.safetensors"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    states = [torch.load(tmp_path / run / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)["optimizer"]
              for run in ("one", "two")]
    moments = [torch.cat([s["exp_avg"].flatten() for s in state["state"].values()]) for state in states]
    moment_diff = ((moments[0] - moments[1]).abs().max() / moments[0].abs().max()).item()
    print(f"2 processes vs 1: max |weight diff| {diff:.2e}; gradient first moments max rel diff {moment_diff:.2e}")
    assert diff <= 1e-5
    assert moment_diff <= 1e-4  # a sum instead of a mean over processes would be off by 2x
    descriptor = json.loads((tmp_path / "two" / "two.json").read_text())
    assert descriptor["metrics"] == ["piqe"] and "piqe" in descriptor["metric_stats"]


def test_labels_are_cached_by_image_and_stats_use_the_cc3m_layout(tmp_path, one_thread):
    folder = make_images(tmp_path / "images", 3)
    dataset = training_data.open_dataset([str(folder)])
    labels = tmp_path / "labels"
    first = training_data.score_dataset(dataset, "piqe", labels)
    # the CC3M protocol: whole image squashed to 512x512, clamped, pyiqa's default model
    from comfyui_iqa_adapter.adapter import iqa_models

    metric = iqa_models.load_metric("piqe", device="cpu")
    direct = metric.score(training_data.cc3m_label_input(dataset.open_image(0))).item()
    assert first[dataset.keys()[0]] == pytest.approx(direct, abs=1e-6)
    make_images(tmp_path / "more", 4, seed=1)
    (folder / "extra.png").write_bytes((tmp_path / "more" / "img03.png").read_bytes())
    rows_before = (labels / "piqe.csv").read_text().splitlines()
    second = training_data.score_dataset(training_data.open_dataset([str(folder)]), "piqe", labels)
    rows_after = (labels / "piqe.csv").read_text().splitlines()
    assert rows_after[:len(rows_before)] == rows_before and len(rows_after) == len(rows_before) + 1  # only the new one
    assert all(second[k] == first[k] for k in first)
    stats = training_data.write_stats_csv(tmp_path / "stats.csv", {"piqe": second})
    with (tmp_path / "stats.csv").open() as handle:
        rows = list(csv.reader(handle))
    cc3m_header = (PACK_ROOT / "models" / "CC3M_stats.csv").read_text().splitlines()[0].split(",")
    assert rows[0] == cc3m_header and [r[1] for r in rows[1:]] == ["piqe", "piqe_normalized"]
    assert float(rows[2][4]) == pytest.approx(0.0, abs=1e-12) and float(rows[2][5]) == pytest.approx(1.0)
    assert stats["piqe"]["std_val"] == pytest.approx(np.std(list(second.values()), ddof=1))


def test_tar_shards_and_caption_tables(tmp_path):
    import io
    import tarfile

    from PIL import Image

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as archive:
        for i in range(2):
            buffer = io.BytesIO()
            Image.new("RGB", (40, 30), (10 * i, 20, 30)).save(buffer, format="JPEG")
            for name, data in ((f"s{i}.jpg", buffer.getvalue()), (f"s{i}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"part/{name}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    dataset = training_data.open_dataset([str(shard)])
    assert dataset.keys() == ["part/s0", "part/s1"] and dataset.refs[1].caption == "caption 1"
    assert dataset.open_image(1).size == (40, 30)
    folder = make_images(tmp_path / "images", 2)
    table = tmp_path / "captions.jsonl"
    table.write_text(json.dumps({"image": "img01.png", "text": "from the table"}) + "\n")
    mixed = training_data.open_dataset([str(folder), str(shard)], captions_file=str(table))
    assert {r.key: r.caption for r in mixed.refs}["img01.png"] == "from the table"
    prepared = training_data.prepare_image(dataset.open_image(0), 16)
    assert prepared.pixels.shape == (3, 16, 16) and prepared.original_size == (30, 40)
    assert prepared.crop_top_left == (0, (21 - 16) // 2) and prepared.pixels.min() >= -1 and prepared.pixels.max() <= 1


def test_trainer_checkpoint_converts_loss_free(base, tmp_path):
    """A trainer checkpoint (and a DDP-prefixed state of the same module) load as the released layout."""
    module = random_module(base, seed=9)
    config = training.TrainConfig(metrics=["piqe"], name="conv")
    optimizer = torch.optim.AdamW(module.parameters())
    saved = training.save_checkpoint(tmp_path, module, optimizer, 7, config, {"metrics": ["piqe"]})
    released = module.released_state_dict()
    from_checkpoint = checkpoint.load_adapter_weights(saved / "adapter.safetensors")
    ddp_state = {f"module.{k}": v for k, v in module.state_dict().items()}
    assert training_layout.to_released(ddp_state).keys() == released.keys()
    for position in range(len(base.layer_widths)):
        released_key = training_layout.released_layer_key(position, "to_k_ip")
        assert torch.equal(from_checkpoint.to_k_ip[position], released[released_key])
    assert all(torch.equal(from_checkpoint.image_proj[k[len("image_proj."):]], v)
               for k, v in released.items() if k.startswith("image_proj."))


def test_cli_refuses_bad_settings_before_loading_anything(host_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", COMFYUI_PATH=str(host_dir))
    data = make_images(tmp_path / "images", 2)
    cc3m = subprocess.run(_train_command(tmp_path / "a", data, ["--normalization", "cc3m"]), env=env,
                          capture_output=True, text=True)
    assert cc3m.returncode != 0 and "unknown metric 'piqe': it has no CC3M statistics" in cc3m.stderr
    empty = subprocess.run(_train_command(tmp_path / "b", tmp_path / "nothing"), env=env, capture_output=True,
                           text=True)
    assert empty.returncode != 0 and "neither a folder nor a .tar shard" in empty.stderr
    assert not (tmp_path / "a" / "labels").exists()
