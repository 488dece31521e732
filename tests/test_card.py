"""The model card (README.md): written by every build, parsed back with huggingface_hub's ModelCard."""
import pytest
from conftest import CODE, STORY, expert_config
from hub_cache import hub_cache

APACHE = "---\nlicense: apache-2.0\nlanguage: en\n---\n# a model\n"


@pytest.fixture(scope="module")
def hub_build(models, tmp_path_factory):
    """A build whose sources are Hub ids (resolved offline from a cache), the base also serving as an expert."""
    import huggingface_hub.constants as constants

    import moeforge

    root = tmp_path_factory.mktemp("card")
    cache = root / "hub"
    commits = {
        "tiny-org/base": hub_cache(cache, "tiny-org/base", models["base"], APACHE),
        "tiny-org/code": hub_cache(cache, "tiny-org/code", models["code"], APACHE.replace("# a", "# the code")),
    }
    cfg = expert_config("tiny-org/base", ["tiny-org/code", "tiny-org/base@main", models["story"]])
    cfg["experts"][1]["negative_prompts"] = ["a | pipe", "x" * 300]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_CACHE", str(cache))
        result = moeforge.build(cfg, root / "out", random_seed=3, quiet=True)
    return result, commits


def load_card(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def test_card_front_matter_parses_back(hub_build):
    result, _ = hub_build
    card = load_card(result.out_dir / "README.md")
    data = card.data
    # local sources cannot be Hub lineage; the base appears once although it is also an expert (with @main)
    assert data.base_model == ["tiny-org/base", "tiny-org/code"]
    assert data.base_model_relation == "merge"
    assert data.library_name == "transformers"
    assert {"moe", "merge", "moeforge", "mixtral"} <= set(data.tags)
    assert len(data.tags) == len(set(data.tags))
    # the local story expert has no license, so the Hub sources' apache-2.0 is not carried over
    assert data.license is None and "license" not in data.to_dict()


def test_card_summary_has_layout_params_experts_gate_and_exact_config(hub_build):
    result, commits = hub_build
    text = load_card(result.out_dir / "README.md").text
    config_text = (result.out_dir / "moeforge_config.yml").read_text()
    assert config_text.rstrip("\n") in text  # the exact recipe, seed line included
    assert f"{result.total_params:,}" in text and f"{result.active_params:,}" in text
    assert result.total_params != result.active_params  # top-2 of 3: the two numbers must both be there
    assert "| layout | mixtral |" in text and "`hidden`" in text and "top-2" in text
    for prompt in CODE + STORY:
        assert prompt in text
    table = text.split("## Experts")[1].split("## Sources")[0]
    assert "a &#124; pipe" in table and "x" * 200 + "…" in table and "x" * 201 not in table
    for commit in commits.values():
        assert commit in text  # provenance: the exact Hub revision of each source
    assert 'model_id = "path/to/this/model"' in text
    assert text.count("| 0 |") == 1 and "| 2 |" in text


def test_license_carried_over_only_when_all_sources_agree(models, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    import moeforge

    cache = tmp_path / "hub"
    hub_cache(cache, "tiny-org/base", models["base"], APACHE)
    hub_cache(cache, "tiny-org/code", models["code"], APACHE)
    hub_cache(cache, "tiny-org/story", models["story"], APACHE.replace("apache-2.0", "mit"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    agree = expert_config("tiny-org/base", ["tiny-org/code", "tiny-org/base"], gate_mode="random")
    moeforge.build(agree, tmp_path / "agree", random_seed=0, quiet=True)
    assert load_card(tmp_path / "agree" / "README.md").data.license == "apache-2.0"
    differ = expert_config("tiny-org/base", ["tiny-org/code", "tiny-org/story"], gate_mode="random")
    moeforge.build(differ, tmp_path / "differ", random_seed=0, quiet=True)
    card = load_card(tmp_path / "differ" / "README.md")
    assert card.data.license is None and "apache-2.0" in card.text and "mit" in card.text
    assert "random router rows" in card.text


def test_make_card_from_plain_data_for_other_exporters():
    """What the WEMoE export calls: no prompts, its own usage text and tags, an 'other' license."""
    from huggingface_hub import ModelCard

    from moeforge.card import CardExpert, CardSource, License, make_card

    lic = License("other", "custom-terms", "https://example.org/terms")
    card = make_card(
        base_model="org/base",
        experts=[CardExpert("org/task-a"), CardExpert("org/task-b"), CardExpert("org/base")],
        sources=[CardSource(r, lic) for r in ("org/base", "org/task-a", "org/task-b")],
        layout="wemoe", total_params=1000, active_params=1000, config_text="routers: 2\nnote: ```fence```\n",
        config_name="wemoe.yml", gate_mode="trained", usage="Load with `moeforge wemoe load`.", tags=["wemoe"],
        pipeline_tag=None,
    )
    parsed = ModelCard(str(card))
    assert parsed.data.base_model == ["org/base", "org/task-a", "org/task-b"]
    assert parsed.data.license == "other" and parsed.data.license_name == "custom-terms"
    assert parsed.data.license_link == "https://example.org/terms"
    assert parsed.data.tags == ["moe", "merge", "moeforge", "wemoe"]
    assert "pipeline_tag" not in parsed.data.to_dict()
    assert "````yaml\nrouters: 2\nnote: ```fence```\n````" in parsed.text  # a fence the config cannot close
    assert "Load with `moeforge wemoe load`." in parsed.text and "AutoModelForCausalLM" not in parsed.text


def test_local_sources_give_no_lineage_keys():
    from huggingface_hub import ModelCard

    from moeforge.card import CardExpert, make_card

    card = ModelCard(str(make_card(
        base_model="/nonexistent/dir/base", experts=[CardExpert("./a", ["p"]), CardExpert("./b", ["q"])], sources=[],
        layout="mixtral", total_params=10, active_params=5, config_text="x: 1", experts_per_token=1,
    )))
    assert "base_model" not in card.data.to_dict() and "base_model_relation" not in card.data.to_dict()
    assert card.data.license is None and "licenses are unknown" in card.text
