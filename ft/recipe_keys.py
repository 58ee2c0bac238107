"""The recipe-key reference, made from the schema in ft/recipe.py: `llama-ft keys` (a terminal list) and
`llama-ft keys --markdown` (docs/recipe-keys.md; tests/test_docs.py checks the committed page is the generated one).
Every key with its type, default and meaning, straight from the pydantic fields and their descriptions."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from ft.recipe import DataSource, Recipe, Section, section_type


def field_docs() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every stage recipe key: shown by `llama-ft keys` (a pipeline recipe's
    keys are on the Markdown page)."""
    return [(key, _default(field), field.description or "") for key, field, section in _walk(Recipe, "") if section is None]


def keys_markdown() -> str:
    """The recipe-key reference as a Markdown page (docs/recipe-keys.md, `llama-ft keys --markdown`): one table per
    top-level section, every key with its type, default and meaning, straight from this schema."""
    lines = ["# Recipe keys", "",
             "<!-- Generated from the schema in ft/recipe.py by `llama-ft keys --markdown > docs/recipe-keys.md`: "
             "edit the field descriptions there and regenerate; tests/test_docs.py checks the two agree. -->", "",
             "Every key a recipe may set, with its type, its default and what it does; `llama-ft keys` prints the same "
             "list in a terminal. Unknown keys are errors with a \"did you mean\" hint, wrong types name the key and "
             "the value, and `--set dotted.key=value` overrides any key (the value is YAML). A stage's own section "
             "(`reward:`, `dpo:`, `rejection:`, `ppo:`, `gatt:`) belongs only to a recipe of that stage.", ""]
    header = ["| key | type | default | meaning |", "|---|---|---|---|"]
    top = [(key, field) for key, field, section in _walk(Recipe, "") if "." not in key and section is None]
    lines += ["## Top level", "", *header, *(_key_row(key, field) for key, field in top), ""]
    for name, field in Recipe.model_fields.items():
        section = section_type(field.annotation)
        if section is None:
            continue
        see = f" More in [{_GUIDES[name][1]}]({_GUIDES[name][0]})." if name in _GUIDES else ""
        lines += [f"## `{name}`", "", _escape(field.description or "") + see, "", *header]
        lines += [_key_row(key, sub) for key, sub, _ in _walk(section, f"{name}.")]
        lines.append("")
    from ft.pipeline_recipe import PipelineRecipe

    lines += ["## Pipeline recipes (`stage: pipeline`)", "",
              "The keys of a `llama-ft pipeline` recipe, a kind of its own; more in [the pipeline](pipeline.md). A "
              "stage block's `rejection:` and `ppo:` take the keys of the sections above, less the reward models the "
              "pipeline fills in.", "", *header]
    lines += [_key_row(key, field) for key, field, section in _walk(PipelineRecipe, "") if section is None]
    lines.append("")
    return "\n".join(lines)


# The docs page (relative to docs/) that explains each section, linked from its table.
_GUIDES = {"data": ("data.md", "Data formats"),
           "reward": ("stages/reward-dpo.md", "Reward models and DPO"), "dpo": ("stages/reward-dpo.md", "Reward models and DPO"),
           "rejection": ("stages/rejection.md", "Rejection sampling"), "ppo": ("stages/ppo.md", "PPO"),
           "gatt": ("stages/gatt.md", "Ghost Attention"), "output": ("hub.md", "Publishing to the Hub")}


def _walk(model: type[BaseModel], prefix: str):
    """(dotted key, field, its Section class or None) for every field of `model`, depth first: a field holding a
    section (or a list of them, as data.train) comes just before its own keys."""
    for name, field in model.model_fields.items():
        section = section_type(field.annotation)
        yield f"{prefix}{name}", field, section
        if section is not None:
            yield from _walk(section, f"{prefix}{name}.")


def _default(field) -> str:
    return "required" if field.is_required() else repr(field.get_default(call_default_factory=True))


def _key_row(key: str, field) -> str:
    default = "required" if field.is_required() else f"`{_yaml_value(field.get_default(call_default_factory=True))}`"
    kind = _type_text(field.annotation)
    if kind.endswith(", or null"):  # the limits are the number's: "integer (> 0), or null"
        kind = kind.removesuffix(", or null") + _bounds(field) + ", or null"
    else:
        kind += _bounds(field)
    return f"| `{key}` | {kind} | {default} | {_escape(field.description or '')} |"


def _yaml_value(value: Any) -> str:
    """A default as it is written in a recipe: null, true, 0.0002, 1e-05, [q_proj, v_proj]."""
    if isinstance(value, float):
        return repr(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()


_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean"}
_PLURAL = {str: "strings", int: "integers", float: "numbers", DataSource: "sources (path, format, split, data_dir)"}


def _type_text(annotation) -> str:
    """A field's type in words: "integer", "one of `4bit`, `8bit`, `none`", "list of strings, or null"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        text = " or ".join(_type_text(a) for a in kept)
        return f"{text}, or null" if len(kept) < len(args) else text
    if origin is list:
        return "list of " + _PLURAL.get(args[0], _type_text(args[0]))
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return "section"
    return _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(field) -> str:
    """The field's numeric limits (pydantic's gt/ge/lt/le) as " (> 0)" or " (≥ 0, ≤ 1)"; "" without any."""
    limits = {}
    for item in field.metadata:
        for name in ("gt", "ge", "lt", "le"):
            if getattr(item, name, None) is not None:
                limits[name] = getattr(item, name)
    words = [f"{sign} {limits[name]}" for name, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))
             if name in limits]
    return f" ({', '.join(words)})" if words else ""


def _escape(text: str) -> str:
    """Description text safe in a Markdown table cell: no column breaks, no HTML tags (</s>), no emphasis (**kwargs)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")
