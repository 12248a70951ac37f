import pytest

from evocomp.config import Config, load_config, parse_overrides
from evocomp.errors import EvocompError
from evocomp.search import Chain, GeneticAlgorithm
from evocomp.supernet.compressors import SparseGPT


def test_builtin_quickstart_loads_and_resolves_component_options():
    cfg = load_config("quickstart")
    assert cfg.model.name == "smollm2-135m"
    assert isinstance(cfg.compressor.params, SparseGPT.Params)
    assert isinstance(cfg.search.params, Chain.Params)
    assert [step.name for step in cfg.search.params.steps] == ["ga", "evopress"]
    dumped = cfg.dump()
    assert dumped["compressor"] == {"name": "sparsegpt", "nm_group": None, "dampening": 0.01,
                                    "blocksize": 128, "propagate": "level"}
    assert Config.model_validate(dumped).dump() == dumped  # the run dir's config round-trips


def test_overrides_are_yaml_values_in_nested_sections():
    assert parse_overrides(["search.generations=5", "units.ignore=[down_proj]", "a.b.c=true"]) == {
        "search": {"generations": 5},
        "units": {"ignore": ["down_proj"]},
        "a": {"b": {"c": True}},
    }
    cfg = load_config("depth", ["search.stages=[{tokens: 64, keep: 1}]", "seed=7"])
    assert cfg.search.params.stages[0].tokens == 64 and cfg.seed == 7
    with pytest.raises(EvocompError, match="key=value"):
        parse_overrides(["generations"])


def test_a_number_in_an_override_addresses_a_list_item():
    cfg = load_config("quickstart", ["search.steps.1.generations=3", "search.steps.0.tokens=1024"])
    ga, evopress = (step.params() for step in cfg.search.params.steps)
    assert (ga.tokens, ga.population) == (1024, 8)
    assert evopress.generations == 3
    assert evopress.stages[1].tokens == 2048  # the step's other options are kept
    # An item naming another component replaces the item, as it replaces a section.
    cfg = load_config("quickstart", ["search.steps.1={name: ga, generations: 2}"])
    assert cfg.search.params.steps[1].params() == GeneticAlgorithm.Params(generations=2)
    with pytest.raises(EvocompError, match=r"search\.steps\.2: search\.steps has 2 items"):
        load_config("quickstart", ["search.steps.2.generations=3"])
    # A list given by an earlier --set of the same command line.
    assert parse_overrides(["a=[{b: 1}, 2]", "a.0.b=3"]) == {"a": [{"b": 3}, 2]}
    with pytest.raises(EvocompError, match=r"--set a\.0: a has no items"):
        parse_overrides(["a=[]", "a.0=1"])


def test_unknown_component_options_name_the_allowed_ones():
    with pytest.raises(EvocompError) as err:
        load_config("quickstart", ["compressor.block_size=64"])
    assert "compressor" in str(err.value)
    assert "'blocksize', 'dampening', 'nm_group'" in str(err.value)


def test_unknown_builtin_config_lists_the_builtin_ones():
    with pytest.raises(EvocompError, match="'quickstart'"):
        load_config("quickstrat")


def test_bad_yaml_and_non_mapping_files_are_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(EvocompError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(EvocompError, match="mapping"):
        load_config(bad)


def test_naming_another_component_replaces_its_section():
    cfg = load_config("depth", ["search.name=sleb"])
    assert cfg.search.name == "sleb" and cfg.search.dump() == {"name": "sleb", "tokens": 2048}
    cfg = load_config("depth", ["search={name: drop-last, tokens: 512}"])
    assert cfg.search.params.tokens == 512
    # Same component: options merge with the file's.
    cfg = load_config("depth", ["search.name=evopress", "search.offspring=3"])
    assert cfg.search.params.offspring == 3 and cfg.search.params.generations == 20
