"""JSON Schemas of the YAML recipes and the configuration reference page, both generated from the pydantic
models, so that editors, docs/configuration.md and the validator cannot disagree."""
from __future__ import annotations

import json
from typing import Dict, List, Tuple

KINDS = ("build", "wemoe")
SCHEMA_FILES = {"build": "schemas/moeforge-build.schema.json", "wemoe": "schemas/moeforge-wemoe.schema.json"}
REFERENCE_PAGE = "docs/configuration.md"
COMMANDS = {"build": "`moeforge build`, `moeforge plan`", "wemoe": "`moeforge wemoe`"}
TITLES = {"build": "MoE recipes", "wemoe": "WEMoE recipes"}


def _model(kind: str):
    if kind == "build":
        from moeforge.config import MoEConfig

        return MoEConfig
    if kind == "wemoe":
        from moeforge.wemoe.config import WEMoEConfig

        return WEMoEConfig
    raise ValueError(f"unknown schema {kind!r}: expected one of {', '.join(KINDS)}")


def json_schema(kind: str) -> dict:
    """The JSON Schema (draft 2020-12) of a recipe, as editors read it."""
    schema = _model(kind).model_json_schema(mode="validation")
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": f"moeforge {kind} recipe"}
    if kind == "build":
        # `upcycle:` derives base_model and experts (a before-validator), so a recipe has one or the other.
        schema["required"] = [r for r in schema.get("required", []) if r not in ("base_model", "experts")]
        schema["oneOf"] = [{"required": ["base_model", "experts"]}, {"required": ["upcycle"]}]
    return schema


def json_text(kind: str) -> str:
    return json.dumps(json_schema(kind), indent=2, ensure_ascii=False) + "\n"


def _walk(schema: dict, node: dict, path: str, found: Dict[str, List[str]]) -> None:
    """Record, for each $defs entry, the recipe paths where it appears."""
    if "$ref" in node:
        name = node["$ref"].split("/")[-1]
        if path not in found.setdefault(name, []):
            found[name].append(path)
            _walk(schema, schema["$defs"][name], path, found)
        return
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for sub in node.get(key, []):
            _walk(schema, sub, path, found)
    if "items" in node:
        _walk(schema, node["items"], path + "[]", found)
    for name, sub in node.get("properties", {}).items():
        _walk(schema, sub, f"{path}.{name}" if path else name, found)


def _type(node: dict) -> str:
    if "$ref" in node:
        return "mapping (below)"
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if "anyOf" in node:
        kinds = [_type(n) for n in node["anyOf"] if n.get("type") != "null"]
        return " or ".join(dict.fromkeys(kinds))
    kind = node.get("type", "any")
    if kind == "array":
        if "prefixItems" in node:
            return "[" + ", ".join(_type(n) for n in node["prefixItems"]) + "]"
        return f"list of {_type(node.get('items', {}))}"
    return kind


def _limits(node: dict) -> str:
    for sub in node.get("anyOf", []):
        if sub.get("type") != "null" and _limits(sub):
            return _limits(sub)
    marks = [("minimum", ">= {}"), ("exclusiveMinimum", "> {}"), ("maximum", "<= {}"), ("exclusiveMaximum", "< {}"),
             ("pattern", "matches `{}`")]
    found = [text.format(node[key]) for key, text in marks if key in node]
    if node.get("minLength") == 1 or (node.get("minItems") == 1 and "prefixItems" not in node):
        found.insert(0, "not empty")
    return ", ".join(found)


def _default(node: dict, required: str) -> str:
    if required:
        return required
    if "default" not in node or node["default"] is None:
        return ""
    value = node["default"]
    return "see below" if isinstance(value, dict) else f"`{json.dumps(value)}`"


def _table(node: dict) -> List[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    required = {name: "required" for name in node.get("required", [])}
    forms = [form["required"] for form in node.get("oneOf", [])]
    for form in forms:  # keys required by one form of the recipe: "required without <the other form's keys>"
        others = [key for other in forms if other is not form for key in other]
        required.update({name: "required without " + ", ".join(f"`{k}`" for k in others) for name in form})
    for name, sub in node.get("properties", {}).items():
        text = " ".join(sub.get("description", "").split()).replace("|", "\\|")
        limits = _limits(sub)
        if limits:
            text = f"{text} ({limits})" if text else limits
        rows.append(f"| `{name}` | {_type(sub)} | {_default(sub, required.get(name, ''))} | {text} |")
    return rows


def _sections(kind: str) -> List[str]:
    schema = json_schema(kind)
    found: Dict[str, List[str]] = {}
    _walk(schema, schema, "", found)
    lines = [f"## {TITLES[kind]} ({COMMANDS[kind]})", "",
             f"JSON Schema: [`{SCHEMA_FILES[kind]}`](../{SCHEMA_FILES[kind]}) (`moeforge schema {kind}`).", ""]
    if schema.get("description"):
        lines += [" ".join(schema["description"].split()), ""]
    if kind == "build":
        lines += ["A recipe has `base_model` and `experts`, or `upcycle` instead of both.", ""]
    lines += ["### Top level", "", *_table(schema), ""]
    ordered: List[Tuple[str, List[str]]] = [(name, found[name]) for name in found]
    for name, paths in ordered:
        node = schema["$defs"][name]
        lines += [f"### {', '.join(f'`{p}`' for p in paths)}", ""]
        if node.get("description"):
            lines += [" ".join(node["description"].split()), ""]
        lines += [*_table(node), ""]
    return lines


def markdown() -> str:
    """docs/configuration.md: every recipe key, its type, default, limits and description."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from moeforge/config.py and moeforge/wemoe/config.py by `python scripts/gen_config_docs.py`;"
        " edit the field descriptions there, not this page. -->",
        "",
        "Recipes are YAML. Unknown keys are errors, and every value is checked before any model is opened.",
        "Editors that read JSON Schema (VS Code's YAML extension, for example) complete and check recipes",
        "whose first line names the schema, as the files in [`examples/`](../examples) do:",
        "",
        "```yaml",
        "# yaml-language-server: $schema=../schemas/moeforge-build.schema.json",
        "```",
        "",
        "`moeforge schema build` and `moeforge schema wemoe` print the same schemas, for a recipe kept elsewhere.",
        "",
    ]
    for kind in KINDS:
        lines += _sections(kind)
    return "\n".join(lines).rstrip("\n") + "\n"


def generated_files() -> Dict[str, str]:
    """Repository path -> the text it must hold."""
    return {**{path: json_text(kind) for kind, path in SCHEMA_FILES.items()}, REFERENCE_PAGE: markdown()}
