"""Image datasets, the U-Net and DiT networks, their training and checkpoints, and the diffusers adapter."""
from __future__ import annotations

import json

import pytest
import torch

from diffbench.process import make_process
from diffbench.registry import ConfigError, Incompatible
from diffbench_plugins import image_data
from diffbench_plugins.dit import DIT_CONFIGS, DIT_PLUGIN, build_dit
from diffbench.checkpoints import shipped_dir
from diffbench_plugins.unet import UNET_CONFIGS, UNET_PLUGIN, build_unet

PROC = make_process("vp-linear")


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----- datasets ------------------------------------------------------------------------------

def test_digits_range_shape_and_labels():
    ds = image_data.load_digits()
    assert ds.examples.shape == (1797, 1, 8, 8) and ds.num_classes == 10
    assert ds.examples.min() == -1 and ds.examples.max() == 1  # 0..16 mapped onto [-1, 1]
    assert torch.equal(ds.labels.bincount(), torch.tensor([178, 182, 177, 183, 181, 182, 181, 179, 174, 180]))


def test_shapes_are_deterministic_and_classes_differ():
    a, la = image_data.draw_shapes(400, seed=3)
    b, lb = image_data.draw_shapes(400, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb) and a.shape == (400, 3, 32, 32)
    # Mean filled area per class, in units of r²: circle π > square 2.56 > cross 2.22 > triangle 1.88.
    fill = (a > -1).any(1).float().mean((1, 2))
    area = torch.stack([fill[la == k].mean() for k in range(4)])
    assert area[0] > area[1] > area[3] > area[2]


def test_cifar10_binary_parsing(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(7, dtype=torch.uint8)
    records = torch.cat([labels[:, None], images.reshape(7, -1)], 1)
    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}.bin").write_bytes(records.numpy().tobytes())
    ds = image_data.load_cifar10(str(tmp_path))
    assert ds.examples.shape == (35, 3, 32, 32)
    assert torch.equal(image_data.to_uint8(ds.examples[:7]), images) and torch.equal(ds.labels[:7], labels.long())
    with pytest.raises(ConfigError, match="test_batch.bin"):
        image_data.load_cifar10(str(tmp_path), split="test")


def test_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    for k, name in enumerate(["cats", "dogs"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            img = torch.full((20, 24, 3), 40 + 100 * k, dtype=torch.uint8)  # [H, W, C], 20×24: cropped to 20×20
            Image.fromarray(img.numpy()).save(tmp_path / name / f"{i}.png")
    ds = image_data.load_image_folder(str(tmp_path), size=16)
    assert ds.examples.shape == (6, 3, 16, 16) and ds.num_classes == 2
    assert torch.equal(ds.labels, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.allclose(ds.examples[0], torch.full((3, 16, 16), 40 / 127.5 - 1), atol=1e-5)


@pytest.mark.parametrize("loader", [image_data.load_image_folder, image_data.load_cifar10])
def test_missing_path_names_the_option(loader):
    with pytest.raises(ConfigError, match="'path'"):
        loader()


# ----- networks --------------------------------------------------------------------------------

def test_ddpm_cifar10_unet_has_the_papers_35_7m_parameters():
    with torch.device("meta"):
        net = build_unet("ddpm-cifar10", 3, 32, PROC, 0)
    assert n_params(net) == pytest.approx(35.7e6, rel=2e-3)


@pytest.mark.parametrize("name, millions", [("DiT-S/2", 33), ("DiT-B/2", 130), ("DiT-L/2", 458), ("DiT-XL/2", 675)])
def test_dit_configs_match_paper_parameter_counts(name, millions):
    """Table 1 of Peebles & Xie (ImageNet 256: 32×32×4 latents, 1000 classes, learned Σ)."""
    with torch.device("meta"):
        net = build_dit(name, 4, 32, PROC, 1000, learn_sigma=True)
    total = n_params(net) + net.pos_embed.numel()  # the reference counts its frozen pos_embed parameter
    assert total == pytest.approx(millions * 1e6, rel=5e-3)
    if name == "DiT-XL/2":
        assert total == 675_129_632  # the reference implementation's exact count


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_config_output_shape(name):
    with torch.device("meta"):
        net = build_unet(name, 3, 32, PROC, 10)
        out = net(torch.empty(2, 3, 32, 32), torch.empty(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_dit_config_output_shape(name):
    with torch.device("meta"):
        net = build_dit(name, 4, 32, PROC, 10)
        out = net(torch.empty(2, 4, 32, 32), torch.empty(2), None)
    assert out.shape == (2, 4, 32, 32)


@pytest.mark.parametrize("build, config, shape", [(build_unet, "tiny-8px", (1, 8, 8)), (build_dit, "DiT-tiny/2", (1, 8, 8)),
                                                  (build_unet, "tiny", (3, 32, 32)), (build_dit, "DiT-tiny/4", (3, 32, 32))])
def test_zero_initialised_output_and_class_conditioning(build, config, shape):
    """The output layer starts at zero (DDPM's zero conv; DiT's adaLN-Zero); after a perturbation
    the class label changes the output and an unconditional call is the null class."""
    torch.manual_seed(0)
    net = build(config, shape[0], shape[-1], PROC, 10)
    x, t = torch.randn(2, *shape), torch.tensor([10.0, 500.0])
    assert torch.count_nonzero(net(x, t, torch.tensor([1, 2]))) == 0
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out1, out2 = net(x, t, torch.tensor([1, 1])), net(x, t, torch.tensor([2, 2]))
    assert out1.shape == (2, *shape) and (out1 - out2).abs().max() > 1e-4
    assert torch.allclose(net(x, t, None), net(x, t, torch.tensor([10, 10])))


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    from diffbench.training import denoising_loss

    torch.manual_seed(0)
    net = build_unet("tiny-8px", 1, 8, PROC, 10)
    x0, labels = image_data.load_digits().examples[:32], image_data.load_digits().labels[:32]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)

    def loss():
        return denoising_loss(net, PROC, "eps", x0, labels, torch.Generator().manual_seed(1))

    with torch.no_grad():
        before = float(loss())
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = float(loss())
    assert after < 0.8 * before


# ----- training entry point and checkpoints ------------------------------------------------------

@pytest.mark.parametrize("plugin, param", [(UNET_PLUGIN, "eps"), (DIT_PLUGIN, "v")])
def test_checkpoint_round_trip_without_pickle(tmp_path, plugin, param):
    from safetensors.torch import load_file

    ds = image_data.load_digits()
    out = plugin.train(ds, tmp_path / "ckpt", steps=3, batch_size=8, parameterization=param, progress=False)
    assert out.suffix == ".safetensors"
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["model"]["parameterization"] == param and saved["train"]["steps"] == 3
    den = plugin.load(ds, checkpoint=str(tmp_path / "ckpt"))
    assert den.parameterization == param and den.num_classes == 10 and den.null_class == 10
    weights = load_file(str(out))  # plain tensors, no unpickling
    assert all(torch.equal(weights[k].float(), v) for k, v in den.net.model.state_dict().items())
    x = torch.randn(4, 1, 8, 8)
    assert torch.isfinite(den(x, 500.0, torch.arange(4))).all() and den.nfe == 1


@pytest.mark.parametrize("plugin", [UNET_PLUGIN, DIT_PLUGIN], ids=lambda p: p.name)
def test_shapes_defaults_to_v_prediction_and_names_relative_to_it(plugin, tmp_path, monkeypatch):
    """On shapes unet and dit default to v (an ε-model's x̂0 is noise at low SNR there), elsewhere to ε;
    a checkpoint name and its train command are relative to the dataset's defaults."""
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path))
    shapes, digits = image_data.load_shapes(num=8), image_data.load_digits()
    for ds, other in ((shapes, "eps"), (digits, "v")):
        with pytest.raises(Incompatible, match=rf"'{plugin.name}-{ds.name}\[parameterization={other}\]'.*"
                                               rf"--dataset {ds.name} --set parameterization={other}$"):
            plugin.load(ds, parameterization=other)
    out = plugin.train(shapes, tmp_path / "ckpt", steps=1, batch_size=2, progress=False)
    assert json.loads(out.with_suffix(".json").read_text())["model"]["parameterization"] == "v"


def test_flow_unet_keeps_its_velocity_on_shapes():
    from diffbench_plugins.flow import FLOW_UNET_PLUGIN

    with pytest.raises(Incompatible, match="no checkpoint 'flow-unet-shapes'"):
        FLOW_UNET_PLUGIN.load(image_data.load_shapes(num=8))


def test_load_rejects_other_modalities_and_missing_checkpoints(tmp_path):
    from diffbench.data import DataSource

    points = DataSource(name="p", modality="points", shape=(2,), examples=torch.zeros(4, 2))
    with pytest.raises(Incompatible, match="images"):
        UNET_PLUGIN.load(points)
    with pytest.raises(Incompatible, match="diffbench train --model dit"):
        DIT_PLUGIN.load(image_data.load_digits(), checkpoint=str(tmp_path / "none"))


@pytest.mark.parametrize("model", ["unet", "dit"])
@pytest.mark.parametrize("dataset", ["digits", "shapes"])
def test_shipped_checkpoints_load_and_denoise(model, dataset):
    """A shipped model's x0 prediction at moderate noise is closer to the truth than the noisy input."""
    if not (shipped_dir() / f"{model}-{dataset}.safetensors").exists():
        pytest.skip(f"{model}-{dataset} not shipped")
    ds = {"digits": image_data.load_digits, "shapes": image_data.load_shapes}[dataset]()
    den = {"unet": UNET_PLUGIN, "dit": DIT_PLUGIN}[model].load(ds)
    x0, labels = ds.reference(64)
    t = 200.0
    a, s = float(den.process.alpha(t)), float(den.process.sigma(t))
    x_t = a * x0 + s * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (den(x_t, t, labels) - x0).pow(2).mean()
    assert err < 0.5 * (x_t / a - x0).pow(2).mean()


# ----- diffusers adapter ---------------------------------------------------------------------------

def test_diffusers_unet_adapter_agrees_with_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffbench_plugins.diffusers_adapter import load_diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                  layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    model.save_pretrained(tmp_path / "unet")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2")
    scheduler.save_pretrained(tmp_path / "scheduler")
    den = load_diffusers(image_data.load_digits(), path=str(tmp_path))
    assert den.parameterization == "eps"
    assert torch.allclose(den.process.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.0, 123.0, 499.0])
    with torch.no_grad():
        eps = model(x, t).sample
        x0 = den(x, t)
    ab = scheduler.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
    assert torch.allclose(den.raw(x, t), eps, atol=1e-6)
    assert torch.allclose(x0, (x - (1 - ab).sqrt() * eps) / ab.sqrt(), rtol=1e-4, atol=1e-4)


def test_diffusers_dit_adapter_uses_the_null_label(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffbench_plugins.diffusers_adapter import load_diffusers

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=1,
                                            sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    model.save_pretrained(tmp_path)
    den = load_diffusers(image_data.load_digits(), path=str(tmp_path))
    assert (den.num_classes, den.null_class) == (10, 10)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 700.0])
    with torch.no_grad():
        ref = model(x, t, class_labels=torch.tensor([3, 10])).sample
    assert torch.allclose(den.raw(x, t, torch.tensor([3, 10])), ref, atol=1e-6)
    assert torch.allclose(den.raw(x, t), model(x, t, class_labels=torch.tensor([10, 10])).sample, atol=1e-6)
