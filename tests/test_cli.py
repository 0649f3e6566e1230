"""Bad input gets a clear error and exit status 2, before any work."""
import pytest


def test_unknown_sampler_lists_the_valid_ones(cli):
    result = cli("run", "--models", "gmm-oracle", "--samplers", "nope", "--steps", "10", "--datasets", "gmm-2d")
    assert result.exit_code == 2
    assert "unknown sampler 'nope'" in result.output and "ddim" in result.output and "ddpm" in result.output


def test_unknown_option_lists_the_valid_options(cli):
    result = cli("run", "--models", "gmm-oracle", "--samplers", "ddim[etta=1]", "--steps", "10", "--datasets", "gmm-2d")
    assert result.exit_code == 2 and "no option 'etta'" in result.output and "eta" in result.output


@pytest.mark.parametrize("toml, expected", [
    ("[run]\nmodels = [\"gmm-oracle\"\n", "malformed TOML"),
    ("[run]\nmodels = [\"gmm-oracle\"]\nsamplers = [\"ddim\"]\ndatasets = [\"gmm-2d\"]\nsteps = [10]\nnum_sample = 5\n",
     "unknown key run.num_sample"),
    ("[run]\nmodels = [\"gmm-oracle\"]\nsamplers = [\"ddim\"]\ndatasets = [\"gmm-2d\"]\nsteps = [\"ten\"]\n",
     "run.steps: 'ten' must be an integer"),
    ("[run]\nmodels = [\"gmm-oracle\"]\nsamplers = [\"ddim\"]\ndatasets = [\"gmm-2d\"]\nsteps = [10]\nseed = \"x\"\n",
     "seed='x' must be an integer"),
    ("[run]\nmodels = [\"gmm-oracle\"]\nsamplers = [\"ddim\"]\ndatasets = [\"gmm-2d\"]\nsteps = [10]\ndevice = \"tpu\"\n",
     "device='tpu' must be one of auto, cpu, cuda"),
    ("[runn]\nmodels = []\n", "unknown table [runn]"),
])
def test_bad_config_names_the_key(cli, tmp_path, toml, expected):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    result = cli("run", "--config", path)
    assert result.exit_code == 2
    assert expected in result.output


def test_flags_override_the_config_file(cli, tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text("[run]\nmodels = [\"gmm-oracle\"]\nsamplers = [\"nope\"]\ndatasets = [\"gmm-2d\"]\nsteps = [2]\n"
                    "metrics = [\"swd\"]\nnum_samples = 50\nrepeats = 1\n")
    result = cli("run", "--samplers", "ddim", "--out", tmp_path / "o", "--quiet")  # ./bench.toml is the default
    assert result.exit_code == 0, result.output


def test_unwritable_out_fails_before_any_work(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = cli("run", "--models", "gmm-oracle", "--samplers", "ddim", "--steps", "3", "--datasets", "gmm-2d",
                 "--out", blocker / "out")
    assert result.exit_code == 2 and "is not writable" in result.output


def test_list_shows_every_kind_with_descriptions(cli):
    result = cli("list")
    assert result.exit_code == 0
    for heading in ("models", "samplers", "guidance", "datasets", "metrics"):
        assert heading in result.output
    assert "exact posterior-mean denoiser" in result.output


def test_train_unknown_model(cli):
    result = cli("train", "--model", "nope", "--dataset", "moons")
    assert result.exit_code == 2 and "unknown model 'nope'" in result.output and "mlp" in result.output


def test_unknown_spacing_is_bad_input(cli):
    result = cli("run", "--models", "gmm-oracle", "--samplers", "ddim[spacing=karas]", "--steps", "3",
                 "--datasets", "gmm-2d")
    assert result.exit_code == 2 and "spacing='karas' must be one of" in result.output and "karras" in result.output
