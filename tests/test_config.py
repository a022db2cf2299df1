from pathlib import Path

import pytest

from retfm.config import load_config, save_config
from retfm.data.config import IngestConfig
from retfm.errors import RetfmError


def test_precedence_defaults_yaml_options_sets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("size: 128\nsite: yaml-site\nseed: 3\ncolumns: {level: dr_grade}\n")
    config = load_config(IngestConfig, path, {"site": "cli-site", "seed": None}, ["seed=9", "split=0.8,0.1,0.1"])
    assert (config.size, config.site, config.seed) == (128, "cli-site", 9)
    assert config.split == (0.8, 0.1, 0.1) and config.columns == {"level": "dr_grade"}
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(IngestConfig, tmp_path / "resolved.yaml") == config


@pytest.mark.parametrize("sets, message", [
    (["split=0.5,0.1,0.1"], "option split: .*sum to 1"),
    (["split=0.7,0.3"], "option split: .*three fractions"),
    (["split=0.7,x,0.2"], "option split.1: .*valid number"),
    (["size=huge"], "option size"),
    (["colour=red"], "option colour: Extra inputs are not permitted"),
    (["novalue"], "expected key=value"),
])
def test_bad_values_give_one_line(sets, message):
    with pytest.raises(RetfmError, match=message) as info:
        load_config(IngestConfig, None, {}, sets)
    assert "\n" not in str(info.value)


def test_unreadable_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("size: [1, 2\n")
    with pytest.raises(RetfmError, match="bad.yaml: cannot read config"):
        load_config(IngestConfig, path)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    from retfm.adapt.config import StudyConfig
    from retfm.federated.config import FederatedConfig
    from retfm.pretrain.config import PretrainConfig

    model = {"pretrain": PretrainConfig, "federated": FederatedConfig, "study": StudyConfig}[path.name.split("-")[0]]
    data = ["data/site1"] if model is PretrainConfig else "data/site1"  # a recipe leaves the data to its command line
    config = load_config(model, path, {"data": data})
    if model is PretrainConfig and config.teacher:  # a teacher named in a recipe is a registry model
        from retfm.models import spec

        assert spec(config.teacher).package_file
