"""The grid runner end to end on the exact GMM denoiser: tables, artefacts, seeds, NFE and
what happens to bad cells."""
import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import diffbench
from diffbench.denoiser import Denoiser
from diffbench.grid import build_config
from diffbench.plugins import build_registry
from diffbench.process import make_process
from diffbench.registry import Model, Sampler
from diffbench.runner import GridRunner

SMALL = ["--num-samples", 200, "--repeats", 1, "--quiet"]


def test_run_writes_every_artefact(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("run", "--models", "gmm-oracle", "--samplers", "ddim,ddpm", "--steps", "5,10",
                 "--datasets", "gmm-2d,mog-1d", "--metrics", "swd,logp", "--save-samples", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / "results.csv")
    for column in ["model", "sampler", "guidance", "dataset", "steps", "nfe", "status", "reason", "wall_s",
                   "step_ms", "peak_mem_mb", "spacing", "swd", "logp"]:
        assert column in df.columns
    assert len(df) == 8 and set(df["status"]) == {"ok"}
    assert (df["nfe"] == df["steps"]).all()  # one model call per DDIM / DDPM step
    rows = json.loads((out / "results.json").read_text())
    assert rows["columns"]["metrics"]["logp"] is True and rows["columns"]["metrics"]["swd"] is False
    for name in ["results.md", "config.json", "env.json", "run.log", "plot_swd_vs_nfe.png", "samples_gmm-2d.png",
                 "samples_mog-1d.png"]:
        assert (out / name).is_file(), name
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "git_commit" in env
    saved = load_file(str(out / "samples" / "gmm-oracle__ddim__none__gmm-2d__5.safetensors"))
    assert saved["x_T"].shape == saved["x_0"].shape == (200, 2)


def test_default_out_is_a_new_run_dir_with_latest_link(cli, tmp_path):
    result = cli("run", "--models", "gmm-oracle", "--samplers", "ddim", "--steps", "3", "--datasets", "mog-1d",
                 "--metrics", "swd", *SMALL)
    assert result.exit_code == 0, result.output
    latest = tmp_path / "results" / "latest"
    assert latest.is_symlink() and (latest / "results.csv").is_file()


def test_samples_do_not_depend_on_batch_size(cli, tmp_path):
    """x_T and the ancestral noise of sample i depend only on (seed, i)."""
    outs = []
    for batch in (200, 64):
        out = tmp_path / f"b{batch}"
        result = cli("run", "--models", "gmm-oracle", "--samplers", "ddpm", "--steps", "8", "--datasets", "gmm-2d",
                     "--metrics", "swd", "--batch-size", batch, "--save-samples", "--out", out, *SMALL)
        assert result.exit_code == 0, result.output
        outs.append(load_file(str(out / "samples" / "gmm-oracle__ddpm__none__gmm-2d__8.safetensors")))
    assert torch.equal(outs[0]["x_T"], outs[1]["x_T"])
    assert torch.allclose(outs[0]["x_0"], outs[1]["x_0"], atol=1e-5)


class CountingModel:
    """A throwaway model plugin whose network counts its own calls."""

    calls = 0

    @diffbench.hookimpl
    def register_models(self, register):
        def load(dataset, *, device="cpu"):
            process = make_process("vp-linear")

            def net(x, t, cond):
                CountingModel.calls += 1
                return torch.zeros_like(x)

            return Denoiser(net, process, "eps", name="counting")

        register(Model(name="counting", description="zero ε-predictor that counts calls", family="gaussian", load=load))


class ExplodingSampler:
    @diffbench.hookimpl
    def register_samplers(self, register):
        def boom(denoiser, x, timesteps, *, generator, callback=None):
            raise RuntimeError("sampler exploded")

        register(Sampler(name="exploding", description="always raises", family="gaussian", fn=boom))
        register(Sampler(name="needs-head", description="requires a consistency head", family="gaussian",
                         fn=boom, requires=frozenset({"consistency"})))


def _run(tmp_path, plugins, **settings):
    registry = build_registry(plugins)
    config = build_config(registry, {"datasets": ["gmm-2d"], "metrics": ["swd"], "num_samples": 60, "repeats": 2,
                                     "batch_size": 25, **settings})
    return GridRunner(registry, config, tmp_path / "out", progress=False).run()


def test_nfe_column_is_the_true_number_of_model_calls(tmp_path):
    CountingModel.calls = 0
    df = _run(tmp_path, [CountingModel()], models=["counting"], samplers=["ddim"], steps=[7])
    assert df["nfe"].tolist() == [7]
    # warm-up + 2 timed repeats of batch 0 + batches 1 and 2 (60 samples in batches of 25)
    assert CountingModel.calls == 7 * (1 + 2 + 2)


def test_a_failing_plugin_fails_its_cell_only(tmp_path):
    df = _run(tmp_path, [ExplodingSampler()], models=["gmm-oracle"], samplers=["ddim", "exploding", "needs-head"],
              steps=[4])
    status = dict(zip(df["sampler"], df["status"]))
    assert status == {"ddim": "ok", "exploding": "failed", "needs-head": "skipped"}
    reason = dict(zip(df["sampler"], df["reason"]))
    assert "exploding" in reason["exploding"] and "ExplodingSampler" in reason["exploding"]
    assert "RuntimeError: sampler exploded" in reason["exploding"]
    assert "needs a model with consistency" in reason["needs-head"]
    log = (tmp_path / "out" / "run.log").read_text()
    assert "Traceback" in log and "sampler exploded" in log


def test_failed_cell_gives_exit_status_1(cli, tmp_path):
    plugin = tmp_path / "exploding_plugin.py"
    plugin.write_text(
        "import diffbench\nfrom diffbench.registry import Sampler\n"
        "def boom(denoiser, x, timesteps, *, generator, callback=None):\n    raise ValueError('nope')\n"
        "@diffbench.hookimpl\ndef register_samplers(register):\n"
        "    register(Sampler(name='boom', description='raises', family='gaussian', fn=boom))\n")
    result = cli("run", "--plugin", plugin, "--models", "gmm-oracle", "--samplers", "ddim,boom", "--steps", "3",
                 "--datasets", "gmm-2d", "--metrics", "swd", "--out", tmp_path / "o", *SMALL)
    assert result.exit_code == 1
    df = pd.read_csv(tmp_path / "o" / "results.csv")
    assert dict(zip(df["sampler"], df["status"])) == {"ddim": "ok", "boom": "failed"}


def test_incompatible_cells_are_skipped_with_a_reason(tmp_path):
    df = _run(tmp_path, [], models=["gmm-oracle"], samplers=["ddim"], steps=[3], datasets=["moons", "gmm-2d"])
    by_data = dict(zip(df["dataset"], zip(df["status"], df["reason"].fillna(""))))
    assert by_data["gmm-2d"][0] == "ok"
    assert by_data["moons"][0] == "skipped" and "Gaussian-mixture" in by_data["moons"][1]


def test_resume_keeps_finished_cells(cli, tmp_path):
    out = tmp_path / "r"
    args = ["--models", "gmm-oracle", "--samplers", "ddim", "--datasets", "gmm-2d", "--metrics", "swd", "--out", out,
            *SMALL]
    assert cli("run", "--steps", "3", *args).exit_code == 0
    payload = json.loads((out / "results.json").read_text())
    payload["rows"][0]["wall_s"] = 12345.0  # a marker: a re-run cell would overwrite it
    (out / "results.json").write_text(json.dumps(payload))
    result = cli("run", "--steps", "3,5", "--resume", *args)
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / "results.csv").set_index("steps")
    assert df.loc[3, "wall_s"] == 12345.0 and df.loc[5, "status"] == "ok"
    changed = cli("run", "--steps", "3", "--resume", *args[:-len(SMALL)], "--num-samples", 50, "--quiet")
    assert changed.exit_code == 2 and "run.num_samples" in changed.output


def test_families_meet_only_their_own_samplers(tmp_path):
    """A masked model runs with a masked sampler (and guidance none); a continuous sampler on it,
    or a masked sampler on a Gaussian model, is skipped with the reason."""
    registry = build_registry()
    config = build_config(registry, {"models": ["mdlm", "gmm-oracle"], "samplers": ["mdlm-ancestral", "ddim"],
                                     "datasets": ["markov-text", "gmm-2d"], "steps": [4], "metrics": ["entropy", "swd"],
                                     "num_samples": 16, "repeats": 1})
    df = GridRunner(registry, config, tmp_path / "out", progress=False).run()
    cells = {(r.model, r.sampler, r.dataset): (r.status, str(r.reason)) for r in df.itertuples()}
    assert cells["mdlm", "mdlm-ancestral", "markov-text"][0] == "ok"
    assert cells["gmm-oracle", "ddim", "gmm-2d"][0] == "ok"
    assert cells["mdlm", "ddim", "markov-text"] == ("skipped", "sampler ddim works on gaussian models; mdlm is a masked model")
    status, reason = cells["gmm-oracle", "mdlm-ancestral", "gmm-2d"]
    assert status == "skipped" and "masked models" in reason


def test_one_dataset_with_two_option_sets_has_two_references(tmp_path):
    """Metrics compare against the reference of the dataset as configured, not of its name."""
    both = _run(tmp_path / "both", [], models=["gmm-oracle"], samplers=["ddim"], steps=[4],
                datasets=["gmm-2d", "gmm-2d[modes=4]"]).set_index("dataset")
    alone = _run(tmp_path / "alone", [], models=["gmm-oracle"], samplers=["ddim"], steps=[4],
                 datasets=["gmm-2d[modes=4]"]).set_index("dataset")
    assert both.loc["gmm-2d[modes=4]", "swd"] == pytest.approx(alone.loc["gmm-2d[modes=4]", "swd"], rel=1e-6)
    assert (tmp_path / "both" / "out" / "samples_gmm-2d-modes=4.png").is_file()


def test_resume_keeps_metric_directions_for_compare(cli, tmp_path):
    out = tmp_path / "r"
    args = ["--models", "gmm-oracle", "--datasets", "gmm-2d", "--metrics", "swd", "--steps", "3", "--out", out, *SMALL]
    assert cli("run", "--samplers", "ddim", *args).exit_code == 0
    assert cli("run", "--samplers", "ddim,mdlm-ancestral", "--resume", *args).exit_code == 0
    assert json.loads((out / "results.json").read_text())["columns"]["metrics"] == {"swd": False}
