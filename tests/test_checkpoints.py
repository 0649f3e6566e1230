"""One checkpoint locator: names derived from the train command, the user cache before the
shipped files, and training that writes to the user cache only."""
import pytest

from diffbench.checkpoints import checkpoint_name, locate_checkpoint, shipped_dir, train_command, user_cache
from diffbench.plugins import build_registry
from diffbench.registry import Incompatible


@pytest.mark.parametrize("options, name", [
    ({}, "flow-mlp-moons"),
    ({"ot": False, "hidden": 128, "checkpoint": "x"}, "flow-mlp-moons"),  # defaults and load-only options: no change
    ({"reflow": True, "ot": True}, "flow-mlp-moons[ot=true,reflow=true]"),  # sorted, bools lower-case
    ({"hidden": 64}, "flow-mlp-moons[hidden=64]"),
])
def test_checkpoint_name_is_the_train_command(options, name):
    defaults = {"hidden": 128, "depth": 3, "ot": False, "reflow": False, "checkpoint": ""}
    assert checkpoint_name("flow-mlp", "moons", options, defaults) == name
    assert train_command("flow-mlp", "moons", {"ot": True}, defaults) == "diffbench train --model flow-mlp --dataset moons --set ot=true"


def test_a_slash_in_a_value_cannot_make_a_subdirectory():
    assert checkpoint_name("dit", "digits", {"config": "DiT-S/2"}, {"config": ""}) == "dit-digits[config=DiT-S_2]"


def test_every_shipped_model_checkpoint_is_found_under_its_train_command_name():
    for name in ("unet-digits", "flow-mlp-moons[ot=true]", "consistency-mlp-moons[method=ct]", "edm-mlp-moons"):
        assert locate_checkpoint(name).parent == shipped_dir()


def test_missing_checkpoint_names_where_it_looked_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path))
    with pytest.raises(Incompatible, match=r"no checkpoint 'mlp-moons\[depth=2\]' at .*checkpoints.* or .*plugins.*; "
                                           r"run: diffbench train --model mlp --dataset moons --set depth=2"):
        registry = build_registry()
        moons = registry.get("datasets", "moons").load()
        registry.get("models", "mlp").load(moons, depth=2)


def test_training_writes_to_the_user_cache_which_load_prefers(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    shipped_before = sorted(p.name for p in shipped_dir().iterdir())
    registry = build_registry()
    moons = registry.get("datasets", "moons").load()
    mlp = registry.get("models", "mlp")
    path = mlp.train(moons, device="cpu", steps=3, batch_size=16, progress=False)
    assert path == user_cache() / "mlp-moons.safetensors" and path.is_file()
    assert str(user_cache()).startswith(str(tmp_path))
    assert locate_checkpoint("mlp-moons") == user_cache() / "mlp-moons"  # the cache shadows the shipped file
    assert sorted(p.name for p in shipped_dir().iterdir()) == shipped_before  # nothing written into the package
