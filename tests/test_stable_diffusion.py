"""The ``diffusers`` adapter on a Stable-Diffusion directory, against diffusers' own pipeline.

As diffusers' own tests do, the components are tiny and randomly initialised, built here and
saved offline (nothing is downloaded): a UNet2DConditionModel, an AutoencoderKL, a CLIPTextModel
from a tiny CLIPTextConfig and a CLIPTokenizer over a handwritten word vocabulary, written by
``StableDiffusionPipeline.save_pretrained`` (safetensors, model_index.json). From the same x_T and
the same DDIM grid (``leading-offset`` is Stable Diffusion's "leading" with steps_offset=1),
diffbench's DDIM on the adapter must give the pipeline's latents and images to 1e-4.

Also the host changes the adapter needed: models' ``validate`` (bad directories are exit 2 before
any work), ``--prompts``, short sample file names for long model paths, caption-acc on one group.

The pipeline runs DDIM with ``set_alpha_to_one=True``: its last step then lands on clean data,
diffbench's t = −1 (SD's shipped config has ``false``, which stops at ᾱ_0 = 1 − β_0 instead).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from diffbench.cli import main
from diffbench.generate import generate
from diffbench.metrics import MetricContext
from diffbench.registry import Incompatible
from diffbench.results import load_rows
from diffbench_plugins.guidance import CFGDenoiser
from diffbench_plugins.image_metrics import compute_nll_bpd
from diffbench_plugins.samplers import sample_ddim
from diffbench_plugins.text_image_data import load_shapes_text

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
from diffbench_plugins.diffusers_adapter import load_diffusers  # noqa: E402  (after the importorskips)

TOL = 1e-4
STEPS = 4
WORDS = "a small large red green blue yellow circle square triangle cross at the top bottom left right".split()
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1, clip_sample=False)  # Stable Diffusion's


def word_tokenizer(folder):
    """A CLIP BPE tokenizer whose merges build each of ``WORDS`` from its letters (so a caption is a
    handful of tokens), written as vocab.json + merges.txt."""
    vocab, merges = {"<|startoftext|>": 0, "<|endoftext|>": 1}, []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        while len(pieces) > 1:  # merge left to right: "r e", "re d</w>"
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A Stable-Diffusion directory of tiny random components: latents 4×8×8, images 3×16×16."""
    tmp = tmp_path_factory.mktemp("sd")
    tokenizer = word_tokenizer(tmp / "words")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        layers_per_block=1, sample_size=16)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler(**SCHEDULE, set_alpha_to_one=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp / "sd", safe_serialization=True)
    return tmp / "sd"


def with_scheduler(sd_dir, tmp_path, **fields):
    """A copy of the directory with ``fields`` changed in scheduler/scheduler_config.json."""
    root = shutil.copytree(sd_dir, tmp_path / "sd")
    file = root / "scheduler" / "scheduler_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **fields}))
    return root


def pipeline_output(root, prompts, x_T, guidance_scale):
    """diffusers' own loop from latents x_T: (final latents, images in [-1, 1])."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(root))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=STEPS, guidance_scale=guidance_scale, eta=0.0)
    latents = pipe(prompts, latents=x_T.clone(), output_type="latent", **run).images
    images = pipe(prompts, latents=x_T.clone(), output_type="pt", **run).images  # (x + 1) / 2, clamped
    return latents, images * 2 - 1


def max_diff(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("scale,prediction", [(1.0, "epsilon"), (3.0, "epsilon"), (3.0, "v_prediction")])
def test_sd_ddim_matches_the_diffusers_pipeline(sd_dir, tmp_path, scale, prediction):
    """Captions of shapes-text as prompts (sample i: caption i), the schedule and prediction type
    from the directory's scheduler config, CFG with the empty prompt: latents and decoded images."""
    root = with_scheduler(sd_dir, tmp_path, prediction_type=prediction)
    dataset = load_shapes_text(num=64, size=16)
    den = load_diffusers(dataset, path=str(root))
    assert den.parameterization == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    assert den.decoder.latent_shape == (4, 8, 8) and den.decoder.scaling_factor == 0.18215
    timesteps = den.process.timesteps(STEPS, "leading-offset")
    out = generate(CFGDenoiser(den, scale), sample_ddim, timesteps, range(3), den.decoder.latent_shape, eta=0.0)
    images = den.decoder(out.samples)
    prompts = [dataset.info["captions"][i] for i in range(3)]
    assert out.labels.tolist() == [0, 1, 2]
    latents, their_images = pipeline_output(root, prompts, out.x_T, scale)
    print(f"cfg {scale} {prediction}: latents {max_diff(out.samples, latents):.2e} "
          f"(max |z| {float(latents.abs().max()):.1f}), images {max_diff(images, their_images):.2e}")
    assert max_diff(out.samples, latents) <= TOL and max_diff(images, their_images) <= TOL
    assert max_diff(images, their_images.flip(0)) > 100 * TOL  # the test can tell samples apart


def test_sd_run_with_a_prompts_file_matches_the_pipeline(sd_dir, tmp_path):
    """End to end: `diffbench run --prompts FILE` (cycled over sample indices; forwarded to the model's
    prompts option), CFG 7.5, --save-samples; the saved decoded images are the pipeline's from the
    saved x_T; the row records the autoencoder, its scaling factor and decode_ms; caption-acc does
    not read the file's labels."""
    prompts = ["a red circle at the top left", "a large blue square"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "run", "--models", f"diffusers[path={sd_dir}]", "--prompts", str(tmp_path / "prompts.txt"),
        "--samplers", "ddim[spacing=leading-offset]", "--guidance", "cfg:7.5",
        "--steps", str(STEPS), "--datasets", "shapes-text[size=16,num=64]", "--metrics", "caption-acc",
        "--num-samples", "3", "--repeats", "1", "--save-samples", "--in-process", "--quiet", "--no-report",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = load_rows(out)[0]
    assert row["status"] == "ok", row["reason"]
    assert row["model"] == f"diffusers[path={sd_dir},prompts={tmp_path / 'prompts.txt'}]"
    assert row["autoencoder"] == "AutoencoderKL (f=2)" and row["latent_scale"] == 0.18215 and row["decode_ms"] > 0
    assert "caption-acc[seen]" not in row  # labels index the prompts file, not shapes-text's attributes
    saved = load_file(next((out / "samples").glob("*.safetensors")))
    _, their_images = pipeline_output(sd_dir, [prompts[i % 2] for i in range(3)], saved["x_T"], 7.5)
    print(f"run, prompts file, cfg 7.5: images {max_diff(saved['x_0'], their_images):.2e}")
    assert max_diff(saved["x_0"], their_images) <= TOL


def test_sd_images_are_resized_to_the_datasets_size(sd_dir):
    """16-px SD images against 32-px shapes-text: the metrics see 32 px; the row keeps decoded_size 16x16.
    The pixel likelihood bound does not apply to a latent model."""
    dataset = load_shapes_text(num=64, size=32)
    den = load_diffusers(dataset, path=str(sd_dir))
    images = den.decoder(torch.randn(2, *den.decoder.latent_shape))
    assert images.shape == (2, 3, 32, 32) and den.decoder.info["decoded_size"] == "16x16"
    assert float(images.abs().max()) <= 1.0
    ctx = MetricContext(dataset=dataset, reference=images, reference_labels=None, labels=None, denoiser=den,
                        device=torch.device("cpu"), seed=0)
    with pytest.raises(Incompatible, match="latent model"):
        compute_nll_bpd(images, ctx)


def _drop(name):
    return lambda root: shutil.rmtree(root / name)


def _edit_json(file, **fields):
    def edit(root):
        path = root / file
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return edit


def _pickle_only(root):
    for file in (root / "unet").glob("*.safetensors"):
        file.rename(file.with_suffix(".bin"))


BROKEN = {
    "no model_index.json": (lambda root: (root / "model_index.json").unlink(), "unet/config.json: _class_name "
                            "'UNet2DConditionModel' is not supported"),
    "missing vae": (_drop("vae"), "vae is missing"),
    "missing tokenizer files": (lambda root: [f.unlink() for f in (root / "tokenizer").iterdir()],
                                "neither vocab.json + merges.txt nor tokenizer.json"),
    "pickle-only weights": (_pickle_only, "only pickle weights (diffusion_pytorch_model.bin)"),
    "unknown component class": (_edit_json("model_index.json", unet=["diffusers", "UNet3DConditionModel"]),
                                "unet is 'UNet3DConditionModel'; supported: UNet2DConditionModel"),
    "unknown schedule": (_edit_json("scheduler/scheduler_config.json", beta_schedule="sigmoid"),
                         "beta_schedule = 'sigmoid' is not supported"),
    "mismatched components": (_edit_json("unet/config.json", cross_attention_dim=32),
                              "cross_attention_dim vs text_encoder hidden_size = 32 vs 16"),
    "no scheduler": (_drop("scheduler"), "scheduler/scheduler_config.json is missing"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_sd_directory_is_bad_input(sd_dir, tmp_path, case):
    """Exit 2 before any work (no output directory), naming what is wrong."""
    breaks, message = BROKEN[case]
    root = shutil.copytree(sd_dir, tmp_path / "sd")
    breaks(root)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--models", f"diffusers[path={root}]", "--samplers", "ddim",
                                       "--steps", "2", "--datasets", "shapes-text", "--out", str(out)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


def test_a_missing_prompts_file_is_bad_input(sd_dir, tmp_path):
    result = CliRunner().invoke(main, ["run", "--models", f"diffusers[path={sd_dir},prompts={tmp_path / 'no.txt'}]",
                                       "--samplers", "ddim", "--steps", "2", "--datasets", "shapes-text"])
    assert result.exit_code == 2 and "option prompts" in result.output and "no.txt" in result.output, result.output


def test_a_long_model_path_gives_a_short_distinct_sample_file_name():
    """A model path in a cell's key (diffusers[path=...,prompts=...]) can pass the 255-byte file-name limit."""
    from diffbench.grid import MAX_SLUG, cell_slug

    keys = [(f"diffusers[path=/{'d' * 300}/{i}]", "ddim", "none", "shapes-text", 10) for i in range(2)]
    slugs = [cell_slug(key) for key in keys]
    assert all(len(s) == MAX_SLUG for s in slugs) and slugs[0] != slugs[1]
    assert cell_slug(("unet", "ddim", "none", "digits", 10)) == "unet__ddim__none__digits__10"


def test_without_transformers_an_sd_directory_is_bad_input(sd_dir, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    result = CliRunner().invoke(main, ["run", "--models", f"diffusers[path={sd_dir}]", "--samplers", "ddim",
                                       "--steps", "2", "--datasets", "shapes-text"])
    assert result.exit_code == 2 and "needs the transformers package" in result.output, result.output


def test_prompts_without_a_model_that_takes_them_is_bad_input(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    result = CliRunner().invoke(main, ["run", "--models", "mlp", "--prompts", str(tmp_path / "prompts.txt"),
                                       "--samplers", "ddim", "--steps", "2", "--datasets", "moons"])
    assert result.exit_code == 2 and "run.prompts: no model of the grid takes option 'prompts' (mlp)" in result.output


def test_a_dataset_without_captions_needs_a_prompts_file(sd_dir, tmp_path):
    """Skipped with the reason (a cell, not bad input: another dataset of the grid may have captions);
    with a prompts file, digits' single channel is the next reason."""
    from diffbench_plugins.image_data import load_digits

    with pytest.raises(Incompatible, match="needs prompts: 'digits' has no captions; give a file of prompts"):
        load_diffusers(load_digits(), path=str(sd_dir))
    (tmp_path / "prompts.txt").write_text("a digit\n")
    with pytest.raises(Incompatible, match="decodes 3-channel images; 'digits' has 1×8×8"):
        load_diffusers(load_digits(), path=str(sd_dir), prompts=str(tmp_path / "prompts.txt"))


def test_caption_acc_leaves_out_a_group_without_samples():
    """One sample of a held-out combination (label 0: a real-size SD run with --num-samples 1): only the
    held-out column, not a NaN seen column that would fail the cell."""
    from diffbench_plugins.caption_metric import compute_caption_acc

    dataset = load_shapes_text(num=64)
    images, labels = dataset.reference(64)
    held_out = torch.isin(labels, torch.tensor(dataset.held_out))
    ctx = MetricContext(dataset=dataset, reference=images, reference_labels=labels, labels=labels[held_out],
                        denoiser=None, device=torch.device("cpu"), seed=0)
    assert held_out.any() and set(compute_caption_acc(images[held_out], ctx)) == {"caption-acc[held-out]"}


def test_a_model_validate_that_raises_is_bad_input_naming_the_plugin():
    """A third-party ``validate`` that crashes is still exit 2 before any work, naming the model and plugin."""
    import diffbench
    from diffbench.grid import build_config, validate_models
    from diffbench.plugins import build_registry
    from diffbench.registry import ConfigError, Model

    class Plugin:
        @diffbench.hookimpl
        def register_models(self, register):
            register(Model(name="fragile", family="gaussian", load=None, validate=lambda **_: 1 / 0,
                           description="validate raises"))

    registry = build_registry([Plugin()])
    config = build_config(registry, {"models": "fragile", "samplers": "ddim", "steps": [2], "datasets": "moons"})
    with pytest.raises(ConfigError, match="model 'fragile' .* could not be checked: ZeroDivisionError"):
        validate_models(registry, config)
