"""Aliases: the other names people type resolve to one canonical component, with preset options;
collisions are refused naming both owners; rows and `diffbench list` show them."""
import pytest
from click.testing import CliRunner

import diffbench
from diffbench.cli import main
from diffbench.plugins import PluginError, build_registry
from diffbench.registry import Sampler


def _noop_sampler(denoiser, x, timesteps, *, generator, callback=None):
    return x


def _plugin(**sampler):
    class Plugin:
        @diffbench.hookimpl
        def register_samplers(self, register):
            register(Sampler(description="test", family="gaussian", fn=_noop_sampler, **sampler))
    return Plugin()


@pytest.fixture(scope="module")
def registry():
    return build_registry()


@pytest.mark.parametrize("typed, canonical", [
    ("dpm", "dpm-solver++"),  # diffusers' "DPM" = DPM-Solver++ 2M (the default variant: no option in the label)
    ("dpm++", "dpm-solver++"), ("DPM++", "dpm-solver++"), ("dpmpp_2m", "dpm-solver++"),
    ("dpmpp-3m", "dpm-solver++[variant=3m]"), ("dpmpp-2s", "dpm-solver++[variant=2s]"),
    ("dpmpp-2m-karras", "dpm-solver++[spacing=karras]"),
    ("dpmpp-3m[variant=2s]", "dpm-solver++[variant=2s]"),  # the user's option beats the alias's preset
    ("dpmpp-3m:2s", "dpm-solver++[variant=2s]"),
    ("dpmpp-3m[lower_order_final=false]", "dpm-solver++[lower_order_final=false,variant=3m]"),
    ("dpm-solver-3", "dpm-solver[method=singlestep,order=3]"), ("edm", "heun"), ("DDIM", "ddim"),
])
def test_alias_resolves_to_the_canonical_name_with_its_presets(registry, typed, canonical):
    assert registry.resolve("samplers", typed).label == canonical


def test_get_accepts_an_alias_and_unknown_names_suggest_close_ones(registry):
    assert registry.get("samplers", "dpm").name == "dpm-solver++"
    with pytest.raises(Exception, match=r"unknown sampler 'dpmm'; valid samplers: .*ddim.*aliases: .*dpm.*did you mean 'dpm'"):
        registry.get("samplers", "dpmm")


@pytest.mark.parametrize("sampler, message", [
    (dict(name="mine", aliases=("dpm",)), r"sampler alias 'dpm' of 'mine' \(plugin .*Plugin\) collides with an alias "
                                          r"of sampler 'dpm-solver\+\+' \(plugin samplers"),
    (dict(name="mine", aliases=("ddim",)), r"alias 'ddim' of 'mine' .* collides with the name \(plugin samplers"),
    (dict(name="dpmpp-2m"), r"sampler name 'dpmpp-2m' of 'dpmpp-2m' .* collides with an alias of sampler 'dpm-solver\+\+'"),
    (dict(name="mine", aliases={"mine-fast": {"nope": 1}}), r"alias 'mine-fast' presets unknown option 'nope'"),
])
def test_alias_collisions_and_bad_presets_are_refused_naming_both_owners(sampler, message):
    with pytest.raises(PluginError, match=message):
        build_registry([_plugin(**sampler)])


def test_list_shows_aliases_and_their_presets():
    result = CliRunner().invoke(main, ["list", "samplers"])
    assert result.exit_code == 0
    assert "aliases" in result.output and "dpmpp-3m" in result.output
    assert "dpm                = dpm-solver++[variant=2m]" in result.output


def test_run_records_the_canonical_name(tmp_path):
    result = CliRunner().invoke(main, ["run", "--models", "gmm-oracle", "--samplers", "dpm,dpmpp-3m", "--steps", "5",
                                       "--datasets", "gmm-2d", "--metrics", "swd", "--num-samples", "64",
                                       "--repeats", "1", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    import pandas as pd
    df = pd.read_csv(tmp_path / "results.csv")
    assert sorted(df["sampler"]) == ["dpm-solver++", "dpm-solver++[variant=3m]"]
    assert (df["status"] == "ok").all()
