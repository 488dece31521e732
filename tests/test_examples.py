"""The recipes in examples/ validate against the JSON Schemas and plan on tiny local stand-ins of the models they
name; the schemas and docs/configuration.md are what the pydantic models generate."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moeforge.schema import SCHEMA_FILES, generated_files

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yml"))
SCHEMA_LINE = "# yaml-language-server: $schema=../{}"

# Each public model an example names -> (family, layers) of its local stand-in. Stand-ins of one family share a
# tokenizer, so they fit together as the real models do; the layer count matters where `sources` split layers.
LLAMA32 = ("llama", 16)
STAND_INS = {
    "openchat/openchat-3.5-1210": ("mistral", 2),
    "beowolx/CodeNinja-1.0-OpenChat-7B": ("mistral", 2),
    "maywell/PiVoT-0.1-Starling-LM-RP": ("mistral", 2),
    "WizardLMTeam/WizardMath-7B-V1.1": ("mistral", 2),
    "Qwen/Qwen2.5-1.5B-Instruct": ("qwen2", 2),
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": ("qwen2", 2),
    "Qwen/Qwen2.5-Math-1.5B-Instruct": ("qwen2", 2),
    "meta-llama/Llama-2-7b-hf": ("llama", 2),
    "meta-llama/Llama-2-7b-chat-hf": ("llama", 2),
    "lmsys/vicuna-7b-v1.5": ("llama", 2),
    "meta-math/MetaMath-7B-V1.0": ("llama", 2),
    "allenai/tulu-2-7b": ("llama", 2),
    "meta-llama/Llama-3.2-1B": LLAMA32,
    "meta-llama/Llama-3.2-1B-Instruct": LLAMA32,
    "./adapters/sql-lora": ("lora", "meta-llama/Llama-3.2-1B-Instruct"),
    "./adapters/medical-lora": ("lora", "meta-llama/Llama-3.2-1B-Instruct"),
    "openai/clip-vit-base-patch32": ("clip", 0),
    "tanganke/clip-vit-base-patch32_mnist": ("clip", 1),
    "tanganke/clip-vit-base-patch32_svhn": ("clip", 2),
    "tanganke/clip-vit-base-patch32_eurosat": ("clip", 3),
    "Qwen/Qwen2.5-0.5B": ("qwen2", 2),
    "Qwen/Qwen2.5-0.5B-Instruct": ("qwen2", 2),
    "Qwen/Qwen2.5-Coder-0.5B": ("qwen2", 2),
}
MODEL_KEYS = ("base_model", "source_model", "model", "lora")


def _recipe(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _kind(recipe: dict) -> str:
    return "wemoe" if "family" in recipe else "build"


def test_every_required_recipe_is_there():
    names = {p.stem for p in EXAMPLES}
    assert {"mixtral-4x7b-fitted", "qwen2-moe-shared-expert", "deepseek-moe-shared-experts", "lora-experts",
            "per-layer-sources", "drop-upcycling", "wemoe-clip-vit-b32", "wemoe-causal-lm"} <= names


def test_generated_schemas_and_reference_are_checked_in():
    stale = [rel for rel, text in generated_files().items()
             if not (ROOT / rel).is_file() or (ROOT / rel).read_text(encoding="utf-8") != text]
    assert not stale, f"regenerate with `python scripts/gen_config_docs.py`: {stale}"


@pytest.mark.parametrize("kind", ["build", "wemoe"])
def test_schema_command_prints_the_file_without_torch(kind):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom moeforge.cli import cli\n"
            f"r = CliRunner().invoke(cli, ['schema', '{kind}'])\nassert r.exit_code == 0, r.output\n"
            "sys.stdout.write(r.output)\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\nassert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (ROOT / SCHEMA_FILES[kind]).read_text(encoding="utf-8")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_names_its_schema_and_validates(path):
    jsonschema = pytest.importorskip("jsonschema")
    recipe = _recipe(path)
    assert path.read_text(encoding="utf-8").splitlines()[0] == SCHEMA_LINE.format(SCHEMA_FILES[_kind(recipe)])
    schema = json.loads((ROOT / SCHEMA_FILES[_kind(recipe)]).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(recipe)


def test_schema_rejects_what_the_models_reject():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / SCHEMA_FILES["build"]).read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    upcycle = {"upcycle": {"source_model": "m", "num_experts": 4}}
    assert validator.is_valid(upcycle)
    assert not validator.is_valid({**upcycle, "base_model": "m", "experts": [{"source_model": "m"}]})
    assert not validator.is_valid({"base_model": "m"})
    assert not validator.is_valid({"base_model": "m", "experts": [{"source_model": "m"}], "gate_mod": "hidden"})


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict:
    """Public name -> local path of a tiny model of the same family (and, for WEMoE data, a tiny data set)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moeforge.toy import make_dense
    from moeforge.wemoe.toy import make_clip

    root = tmp_path_factory.mktemp("stand-ins")
    paths = {}
    for i, (name, (family, size)) in enumerate(STAND_INS.items()):
        path = root / name.replace("/", "--").strip(".-")
        if family == "clip":
            make_clip(path, seed=size)
        elif family != "lora":
            extra = {"sliding_window": 4} if family == "mistral" else {}  # Mistral-7B-v0.1: window < context
            make_dense(path, family=family, seed=i, hidden_size=16, intermediate_size=32, num_layers=size, **extra)
        paths[name] = str(path)
    for name, (family, base) in STAND_INS.items():
        if family == "lora":
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(paths[base], dtype=torch.float32)
            get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                                             init_lora_weights=False)).save_pretrained(paths[name])
    return paths


def _localize(value, paths: dict, data_dir: Path, task=None):
    """The recipe with every model name replaced by its stand-in and every task's data by a tiny local set."""
    if isinstance(value, list):
        return [_localize(v, paths, data_dir, task) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, v in value.items():
        if key in MODEL_KEYS and isinstance(v, str):
            parts = v.split("+")
            missing = [p for p in parts if p not in paths]
            assert not missing, f"no stand-in for {missing}: add it to STAND_INS"
            v = "+".join(paths[p] for p in parts)
        elif key == "data":
            v = _task_data(data_dir / value["name"], value, v)
        elif key == "sources":
            v = [{**s, "model": _localize({"source_model": s["model"]}, paths, data_dir)["source_model"]}
                 if isinstance(s.get("model"), str) else _localize(s, paths, data_dir) for s in v]
        else:
            v = _localize(v, paths, data_dir)
        out[key] = v
    return out


def _task_data(where: Path, task: dict, data: str) -> str:
    """An image folder with one small image per class, or a few texts in the recipe's file format."""
    if task.get("classes"):
        from PIL import Image

        for i, cls in enumerate(task["classes"]):
            (where / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (20 * i, 100, 200)).save(where / cls / "0.png")
        return str(where)
    where.mkdir(parents=True, exist_ok=True)
    texts = ["def add(a, b): return a + b", "Once upon a time there was a dragon"]
    path = where / Path(data).name
    lines = [json.dumps({"text": t}) for t in texts] if path.suffix == ".jsonl" else texts
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_plans_on_stand_ins(path, stand_ins, tmp_path):
    recipe = _recipe(path)
    local = _localize(recipe, stand_ins, tmp_path / "data")
    if _kind(recipe) == "wemoe":
        from moeforge.wemoe import check

        sizes = check(local)
        assert set(sizes) == {t["name"] for t in recipe["experts"]} and all(sizes.values())
        return
    from moeforge.builder import dry_run

    report = dry_run(local, tmp_path / "out")
    text = "\n".join(report.lines())
    if recipe.get("architecture"):
        assert recipe["architecture"] in text, text


def test_readme_quickstart_recipe_plans_on_stand_ins(stand_ins, tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    recipe = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    from moeforge.builder import dry_run

    assert "mixtral" in "\n".join(dry_run(_localize(recipe, stand_ins, tmp_path / "data"), tmp_path / "out").lines())
