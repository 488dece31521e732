"""The config schema: mergekit-moe configs are accepted as they are; mistakes are named, field by field."""
import pytest

from moeforge.config import MoEConfig
from moeforge.errors import ConfigError
from moeforge.options import parse_shard_size

MERGEKIT_EXAMPLE = """
base_model: NousResearch/Hermes-2-Pro-Mistral-7B
gate_mode: hidden
dtype: bfloat16
experts:
  - source_model: NousResearch/Hermes-2-Pro-Mistral-7B
    positive_prompts:
      - "<|im_start|>user\\nHello, who are you?<|im_end|>"
  - source_model: BioMistral/BioMistral-7B-DARE
    positive_prompts:
      - "As a doctor of medicine,"
    negative_prompts: ["Once upon a time"]
    noise_scale: 0.01
    residual_scale: 1.0
"""

UPCYCLE_EXAMPLE = """
base_model: BEE-spoke-data/smol_llama-220M-GQA
gate_mode: random
dtype: bfloat16
experts:
  - source_model: BEE-spoke-data/smol_llama-220M-GQA
  - source_model: BEE-spoke-data/smol_llama-220M-GQA
"""


def _load(tmp_path, text):
    p = tmp_path / "c.yml"
    p.write_text(text)
    return MoEConfig.from_yaml(p)


def test_mergekit_examples_are_accepted(tmp_path):
    c = _load(tmp_path, MERGEKIT_EXAMPLE)
    assert c.gate_mode == "hidden" and c.experts_per_token == 2 and c.experts[1].noise_scale == 0.01
    assert _load(tmp_path, UPCYCLE_EXAMPLE).gate_mode == "random"
    assert _load(tmp_path, MERGEKIT_EXAMPLE + "experts_per_token: 1\narchitecture: mixtral\n").experts_per_token == 1


@pytest.mark.parametrize(
    "text, needle",
    [
        (MERGEKIT_EXAMPLE + "expert_per_token: 2\n", "expert_per_token: unknown key"),
        (MERGEKIT_EXAMPLE.replace("noise_scale", "noise_scael"), "experts.1.noise_scael: unknown key"),
        (MERGEKIT_EXAMPLE.replace("gate_mode: hidden", "gate_mode: hiden"), "gate_mode: 'hiden' is not one of"),
        (MERGEKIT_EXAMPLE.replace("dtype: bfloat16", "dtype: float8"), "dtype: 'float8' is not one of"),
        (MERGEKIT_EXAMPLE + "experts_per_token: 3\n", "experts_per_token: 3 is more than the 2 experts"),
        (MERGEKIT_EXAMPLE + "experts_per_token: 0\n", "experts_per_token: must be >= 1"),
        (MERGEKIT_EXAMPLE + "experts_per_token: two\n", "experts_per_token: Input should be a valid integer"),
        (UPCYCLE_EXAMPLE.replace("random", "hidden"), "experts.0.positive_prompts: required"),
        ("base_model: a\nexperts: []\n", "experts: List should have at least 1 item"),
        ("experts:\n  - source_model: a\n", "base_model: Field required"),
        ("- just a list\n", "expected a mapping"),
        ("base_model: [unclosed\n", "invalid YAML"),
    ],
)
def test_mistakes_are_named(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_identical_prompts_are_refused(tmp_path):
    text = MERGEKIT_EXAMPLE.replace("As a doctor of medicine,", "<|im_start|>user\\nHello, who are you?<|im_end|>")
    text = text.replace('    negative_prompts: ["Once upon a time"]\n', "")
    with pytest.raises(ConfigError, match="same positive and negative prompts"):
        _load(tmp_path, text)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        MoEConfig.from_yaml(tmp_path / "nope.yml")


@pytest.mark.parametrize(
    "value, expected",
    [("5B", 5_000_000_000 * 2), ("500M", 500_000_000 * 2), ("4GB", 4_000_000_000), ("4GiB", 4 * 2**30),
     ("1000000", 1_000_000), ("100KB", 100_000), (12345, 12345), ("1.5GB", 1_500_000_000)],
)
def test_shard_sizes(value, expected):
    assert parse_shard_size(value, bytes_per_param=2) == expected


@pytest.mark.parametrize("value", ["big", "4XB", "-1", "0", "5BiB"])
def test_bad_shard_sizes(value):
    with pytest.raises(ConfigError, match="--out-shard-size"):
        parse_shard_size(value, 2)


@pytest.mark.parametrize(
    "key, where, meant",
    [("experts_per_tokens: 1\n", "experts_per_tokens", "experts_per_token"),
     ("gate-mode: random\n", "gate-mode", "gate_mode"),
     ("Gate_Mode: random\n", "Gate_Mode", "gate_mode"),
     ("shared_expert: []\n", "shared_expert", "shared_experts")],
)
def test_near_misses_are_errors_naming_the_key_meant(tmp_path, key, where, meant):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, MERGEKIT_EXAMPLE + key)
    assert str(e.value).endswith(f"{where}: unknown key; did you mean {meant}?")
    with pytest.raises(ConfigError, match="did you mean positive_prompts"):
        _load(tmp_path, MERGEKIT_EXAMPLE.replace("    positive_prompts:\n      - \"As", "    positve_prompts:\n      - \"As"))


def test_other_unknown_keys_are_ignored_with_a_warning(tmp_path, caplog):
    text = MERGEKIT_EXAMPLE + "tokenizer:\n  source: base\nname: my-moe\n"
    text = text.replace("    noise_scale: 0.01\n", "    noise_scale: 0.01\n    description: a doctor\n")
    config = _load(tmp_path, text)
    assert config.experts[1].noise_scale == 0.01
    warned = [r.getMessage() for r in caplog.records]
    for key in ("tokenizer", "name", "experts.1.description"):
        assert sum(f": {key}: unknown key, ignored" in w for w in warned) == 1, warned
    with pytest.raises(ConfigError) as e:
        MoEConfig.from_yaml(tmp_path / "c.yml", strict=True)
    assert str(e.value).splitlines() == [f"{tmp_path / 'c.yml'}: {k}: unknown key"
                                         for k in ("experts.1.description", "tokenizer", "name")]


def test_every_problem_is_listed(tmp_path):
    """Never '(and N more)': the second problem is often the useful one."""
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, "experts:\n  - source_model: a\n    noise_scale: loud\ndtype: float8\nexperts_per_tken: 2\n")
    lines = str(e.value).splitlines()
    assert [l.split(": ", 1)[1] for l in lines] == [
        "experts_per_tken: unknown key; did you mean experts_per_token?",
        "base_model: Field required",
        "experts.0.noise_scale: Input should be a valid number, unable to parse string as a number",
        "dtype: 'float8' is not one of 'float32', 'float16' or 'bfloat16'",
    ]
    assert "more)" not in str(e.value)


def test_union_errors_name_the_field_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, "base_model: b\ngate_mode: random\nexperts:\n  - source_model: [a, b]\n  - source_model: {lora: x}\n")
    assert [l.split(": ", 1)[1] for l in str(e.value).splitlines()] == [
        "experts.0.source_model: Input should be a valid string or a valid dictionary or instance of ModelSpec",
        "experts.1.source_model.model: Field required",
    ]


def test_mergekit_shapes_of_a_value(tmp_path):
    """A single prompt as a string, and mergekit's {path, revision} model form."""
    text = ("base_model: b\nexperts:\n  - source_model: {model: {path: org/a, revision: v1}}\n    positive_prompts: one\n"
            "  - source_model: c\n    positive_prompts: [two]\n    negative_prompts: one\n")
    config = _load(tmp_path, text)
    assert config.experts[0].positive_prompts == ["one"] and config.experts[1].negative_prompts == ["one"]
    assert str(config.experts[0].source_model) == "org/a@v1"
