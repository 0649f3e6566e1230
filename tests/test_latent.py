"""Latent diffusion and text conditioning: the shipped autoencoder's reconstructions, the latent
wrapper against pixel-space sampling, cross-attention through the Triton kernel, CFG on text,
and the shapes-text dataset's held-out split."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffbench
from diffbench.grid import build_config
from diffbench.plugins import build_registry
from diffbench.registry import Model
from diffbench.runner import GridRunner
from diffbench_plugins.guidance import CFGDenoiser
from diffbench_plugins.latent import LDM_DIT, LDM_UNET, LatentDecoder
from diffbench_plugins.text_image_data import ATTRIBUTES, attribute_indices, caption, combinations, load_shapes_text
from diffbench_plugins.unet import UNET_PLUGIN
from diffbench_plugins.vae import load_autoencoder, psnr, reconstruct


def test_shipped_vae_reconstructs_shapes():
    """Reconstruction bound of the shipped vae-shapes on held-out images of both shape datasets
    (measured: see results/reports/latent.md); latents are 8×8×4 and the stored scaling factor
    gives them unit variance."""
    from diffbench_plugins.image_data import load_shapes

    vae, scale = load_autoencoder("vae-shapes")
    for dataset, min_psnr in ((load_shapes(), 23.5), (load_shapes_text(), 20.5)):  # measured 24.5 and 21.4 dB
        x, _ = dataset.reference(256)
        assert psnr(reconstruct(vae, x), x) > min_psnr, dataset.name
        z = scale * vae.encode(x)[0]
        assert z.shape[1:] == (4, 8, 8) and 0.7 < float(z.std()) < 1.3


def test_shapes_text_captions_and_held_out_split():
    data = load_shapes_text(num=2000)
    assert data.info["captions"][0] == "a small red circle at the top left"
    idx = attribute_indices(torch.arange(len(combinations())))
    assert [caption({k: ATTRIBUTES[k][int(i)] for k, i in zip(ATTRIBUTES, row)}) for row in idx] == data.info["captions"]
    held = torch.tensor(data.held_out)
    assert len(held) == 16  # 1 in 8 of 4·4·2·4 combinations
    _, train_labels = data.train_set()
    _, ref_labels = data.reference(1000)
    assert not torch.isin(train_labels, held).any() and torch.isin(ref_labels, held).any()
    x, labels = load_shapes_text(num=50, seed=3).train_set()
    x2, labels2 = load_shapes_text(num=50, seed=3).train_set()
    assert torch.equal(x, x2) and torch.equal(labels, labels2)


class IdentityLatent:
    """``unet`` on digits, carrying an identity "autoencoder" (scale 1): a latent model whose
    latent space is pixel space."""

    @diffbench.hookimpl
    def register_models(self, register):
        def load(dataset, *, device="cpu"):
            denoiser = UNET_PLUGIN.load(dataset, device=device)
            denoiser.decoder = LatentDecoder(lambda z: z.clone(), 1.0, dataset.shape,
                                             {"autoencoder": "identity", "latent_scale": 1.0})
            return denoiser

        register(Model(name="identity-latent", description="unet with an identity decoder", family="gaussian",
                       load=load))


def test_latent_wrapper_with_identity_autoencoder_reproduces_pixel_sampler(tmp_path):
    registry = build_registry([IdentityLatent()])
    config = build_config(registry, {"models": ["unet", "identity-latent"], "samplers": ["ddim", "dpm-solver++"],
                                     "guidance": ["cfg:2.0"], "steps": [4], "datasets": ["digits"],
                                     "metrics": ["class-acc"], "num_samples": 12, "batch_size": 8, "repeats": 1,
                                     "save_samples": True})
    df = GridRunner(registry, config, tmp_path, progress=False).run()
    assert set(df["status"]) == {"ok"}
    pairs = zip(*(sorted((tmp_path / "samples").glob(f"{m}__*.safetensors")) for m in ("unet", "identity-latent")))
    for count, files in enumerate(pairs, 1):
        pixel, latent = (load_file(str(f)) for f in files)
        assert torch.equal(pixel["x_T"], latent["x_T"]) and torch.equal(pixel["x_0"], latent["x_0"])
    assert count == 2
    latent_rows = df[df["model"] == "identity-latent"]
    assert (latent_rows["autoencoder"] == "identity").all() and (latent_rows["decode_ms"] >= 0).all()
    assert df[df["model"] == "unet"]["decode_ms"].isna().all()


def randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter N(0, 0.1²): zero-initialised output layers would make every test trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("plugin", [LDM_UNET, LDM_DIT], ids=["ldm-unet", "ldm-dit"])
def test_cfg_on_text_scale_0_is_the_empty_caption_and_1_the_caption(plugin):
    from diffbench.denoiser import Denoiser

    latents = type("Latents", (), {"shape": (4, 8, 8), "num_classes": 128, "modality": "image", "name": "shapes-text",
                                   "info": load_shapes_text(num=16).info})()
    net, process, num_classes = plugin.network(latents, plugin._resolve(latents, {}))
    base = Denoiser(randomised(net).eval(), process, "v", num_classes=num_classes, null_class=num_classes)
    x, t = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(400.0)
    captions = torch.tensor([0, 5, 17, 40, 99, 127])
    with torch.no_grad():
        unconditional, conditional = base(x, t, torch.full_like(captions, num_classes)), base(x, t, captions)
        assert (unconditional - conditional).abs().max() > 1e-3  # the text does reach the network
        torch.testing.assert_close(CFGDenoiser(base, 0.0).conditioned(captions)(x, t), unconditional,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(CFGDenoiser(base, 1.0).conditioned(captions)(x, t), conditional,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base(x, t), unconditional)  # no condition = the empty caption


def cross_attention_facts() -> dict:
    """Run under TRITON_INTERPRET=1 (script mode): max |triton − sdpa| of CrossAttention and of the
    text-conditioned ldm networks, float32, tiny shapes."""
    from diffbench.kernels.attention import INTERPRETED
    from diffbench.nn.attention import CrossAttention, use_backend

    assert INTERPRETED
    g = torch.Generator().manual_seed(0)
    cross = randomised(CrossAttention(32, 24, heads=2))
    x, context = torch.randn(2, 10, 32, generator=g), torch.randn(2, 7, 24, generator=g)
    results = {}
    with torch.no_grad():
        outs = {}
        for backend in ("triton", "sdpa"):
            with use_backend(backend):
                outs[backend] = cross(x, context)
        results["cross-attention"] = (outs["triton"] - outs["sdpa"]).abs().max().item()
        latents = type("Latents", (), {"shape": (4, 8, 8), "num_classes": 128, "modality": "image",
                                       "name": "shapes-text", "info": load_shapes_text(num=16).info})()
        z, t, captions = torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 300.0), torch.tensor([3, 77])
        for plugin in (LDM_UNET, LDM_DIT):
            net = randomised(plugin.network(latents, plugin._resolve(latents, {}))[0]).eval()
            for backend in ("triton", "sdpa"):
                with use_backend(backend):
                    outs[backend] = net(z, t, captions)
            results[plugin.name] = (outs["triton"] - outs["sdpa"]).abs().max().item()
            results[plugin.name + "-scale"] = outs["sdpa"].abs().max().item()
    return results


def test_cross_attention_triton_equals_sdpa_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    facts = json.loads(run.stdout.splitlines()[-1])
    assert facts["cross-attention"] < 1e-5
    for name in ("ldm-unet", "ldm-dit"):
        assert facts[name] < 1e-4 * max(1.0, facts[name + "-scale"]), (name, facts)


if __name__ == "__main__":
    print(json.dumps(cross_attention_facts()))
