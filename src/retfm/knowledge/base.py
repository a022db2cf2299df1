"""The disease knowledge base: fundus conditions, what each looks like per modality, and the texts made from them.

``knowledge.yaml`` (package data) is read and validated once. Extra YAML files in the same layout can add
conditions, label maps and templates (``load_knowledge("site.yaml")``). From it come:

- ``condition("BRVO")``: a lookup over keys, names and synonyms that ignores case, '-', '_' and apostrophes;
- ``prompts(condition, modality)``: the prompt ensemble of a zero-shot classifier, every template rendered with the
  name, each synonym and the signs, in a fixed order without repeats;
- ``class_prompts(label_column, values, modality)``: one ensemble per label value, through the label maps;
- ``describe`` and ``caption``: one text per image for image-text training, varied by a random generator.

The texts are written for retfm and are not clinically reviewed (docs/zeroshot.md).
"""

from __future__ import annotations

import difflib
import functools
import re
import string
import typing
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from retfm.errors import RetfmError

Modality = Literal["cfp", "uwf", "oct", "fa"]
Category = Literal["vascular", "diabetic", "glaucoma_optic_nerve", "macular", "retinal_detachment",
                   "inflammatory_infectious", "tumour", "congenital_hereditary", "myopia", "media", "normal", "other"]
MODALITIES: tuple[str, ...] = typing.get_args(Modality)
CATEGORIES: tuple[str, ...] = typing.get_args(Category)
PLACEHOLDERS = ("name", "synonym", "sign")
BUILTIN = "knowledge.yaml"
SECTIONS = {"conditions": list, "label_maps": dict, "templates": dict}


def lookup_key(text: object) -> str:
    """How names are compared: case, '-', '_', apostrophes and repeated spaces do not matter."""
    return " ".join(re.sub(r"[-_']", " ", str(text).lower()).split())


def label_value_key(value: object) -> str:
    """How label values are compared: 1, 1.0, "1" and True are one value; text is compared like names."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return lookup_key(text)
    return str(int(number)) if number.is_integer() else text


def template_fields(template: str) -> set[str]:
    """The placeholders of a template; ValueError unless they are all known and one of them names the condition."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        raise ValueError(f"template {template!r}: {exc}") from None
    for name, spec, conversion in fields:
        if name not in PLACEHOLDERS or spec or conversion:
            raise ValueError(f"template {template!r}: {{{name}}} is not one of "
                             f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    names = {name for name, _, _ in fields}
    if not names & {"name", "synonym"}:
        raise ValueError(f"template {template!r} must name the condition with {{name}} or {{synonym}}")
    return names


class Condition(BaseModel):
    """One fundus condition: its names, its category and what is visible of it on each modality."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(pattern=r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
    name: str = Field(min_length=1)
    synonyms: list[str] = Field(default_factory=list)
    category: Category
    signs: dict[Modality, str] = Field(min_length=1)

    @field_validator("synonyms")
    @classmethod
    def _no_blank_synonym(cls, synonyms):
        if any(not s.strip() for s in synonyms):
            raise ValueError("a synonym is blank")
        return synonyms

    @field_validator("signs")
    @classmethod
    def _signs_are_phrases(cls, signs):
        for modality, text in signs.items():
            if not text.strip():
                raise ValueError(f"the {modality} sign is blank")
            if text.rstrip().endswith("."):
                raise ValueError(f"the {modality} sign ends with a full stop; write a phrase so templates can embed it")
        return signs

    @property
    def terms(self) -> list[str]:
        """The name, then each synonym: what ``{synonym}`` ranges over."""
        return list(dict.fromkeys([self.name, *self.synonyms]))


class KnowledgeBase(BaseModel):
    """Conditions, label maps (label column -> value -> condition key) and prompt templates per modality."""

    model_config = ConfigDict(extra="forbid")

    conditions: list[Condition] = Field(min_length=1)
    label_maps: dict[str, dict[str, str]] = Field(default_factory=dict)
    templates: dict[Modality, list[str]]
    _by_key: dict[str, Condition] = PrivateAttr(default_factory=dict)
    _by_term: dict[str, Condition] = PrivateAttr(default_factory=dict)

    @field_validator("label_maps", mode="before")
    @classmethod
    def _normalise_values(cls, maps):
        if not isinstance(maps, dict):
            return maps
        normalised = {}
        for column, mapping in maps.items():
            if not isinstance(mapping, dict):
                raise ValueError(f"label map {column!r} must map values to condition keys")
            normalised[str(column)] = {}
            for value, target in mapping.items():
                key = label_value_key(value)
                if key in normalised[str(column)]:
                    raise ValueError(f"label map {column!r}: value {value!r} is given twice")
                normalised[str(column)][key] = target
        return normalised

    @field_validator("templates")
    @classmethod
    def _valid_templates(cls, templates):
        missing = [m for m in MODALITIES if not templates.get(m)]
        if missing:
            raise ValueError(f"no templates for modality {', '.join(missing)}")
        for modality_templates in templates.values():
            for template in modality_templates:
                template_fields(template)
        return templates

    @model_validator(mode="after")
    def _consistent(self):
        for condition in self.conditions:
            if condition.key in self._by_key:
                raise ValueError(f"condition key {condition.key!r} is defined twice")
            self._by_key[condition.key] = condition
        for condition in self.conditions:
            for term in (condition.key, *condition.terms):
                owner = self._by_term.setdefault(lookup_key(term), condition)
                if owner is not condition:
                    raise ValueError(f"{term!r} of condition {condition.key!r} already names {owner.key!r}")
        for column, mapping in self.label_maps.items():
            for value, target in mapping.items():
                if target not in self._by_key:
                    raise ValueError(f"label map {column!r}: value {value!r} points at unknown condition {target!r}")
        return self

    # ---------------------------------------------------------------- lookups

    def condition(self, key_or_name: str | Condition) -> Condition:
        """The condition with this key, name or synonym (case, '-', '_' and apostrophes ignored)."""
        if isinstance(key_or_name, Condition):
            return key_or_name
        found = self._by_term.get(lookup_key(key_or_name))
        if found is None:
            close = difflib.get_close_matches(lookup_key(key_or_name), list(self._by_term), n=3, cutoff=0.7)
            keys = list(dict.fromkeys(self._by_term[c].key for c in close))
            hint = f"; did you mean {', '.join(keys)}?" if keys else ""
            raise RetfmError(f"unknown condition {key_or_name!r}{hint} (all conditions: retfm knowledge list)")
        return found

    def resolve(self, label_column: str, value: object) -> Condition | None:
        """The condition a label value stands for: through the column's label map, else by name; None if neither."""
        target = self.label_maps.get(label_column, {}).get(label_value_key(value))
        if target is not None:
            return self._by_key[target]
        return self._by_term.get(lookup_key(value))

    def label_values(self, key: str) -> list[str]:
        """``map=value`` for every label-map entry that points at this condition key."""
        return [f"{column}={value}" for column, mapping in self.label_maps.items()
                for value, target in mapping.items() if target == key]

    # ---------------------------------------------------------------- texts

    def prompts(self, condition: str | Condition, modality: str = "cfp") -> list[str]:
        """Each template of the modality rendered with the name, each synonym and the signs; fixed order, no repeats."""
        found, modality, sign = self._visible(condition, modality)
        rendered = []
        for template in self.templates[modality]:
            terms = found.terms if "synonym" in template_fields(template) else [found.name]
            rendered += [template.format(name=found.name, synonym=term, sign=sign) for term in terms]
        return list(dict.fromkeys(rendered))

    def class_prompts(self, label_column: str, values, modality: str = "cfp",
                      label_map: str | None = None) -> dict[object, list[str]]:
        """``{value: prompts}`` for the values of a label column, resolved through the label map named
        ``label_map`` (default: the column's own name) or by condition name. Unknown values: one RetfmError."""
        map_name = label_map or label_column
        resolved = {value: None if _missing(value) else self.resolve(map_name, value) for value in values}
        unknown = [repr(value) for value, found in resolved.items() if found is None]
        if unknown:
            covered = (f"label map {map_name!r} covers {', '.join(self.label_maps[map_name])}"
                       if map_name in self.label_maps else f"there is no label map {map_name!r}")
            raise RetfmError(f"label {label_column!r}: no condition for value(s) {', '.join(unknown)} ({covered}); "
                             "name the classes with --classes (conditions: retfm knowledge list)")
        return {value: self.prompts(found, modality) for value, found in resolved.items()}

    def describe(self, condition: str | Condition, modality: str = "cfp", rng=None) -> str:
        """One sentence about the condition on this modality: the canonical one (the modality's first template,
        with the name) when ``rng`` is None, else a template and a name or synonym drawn from ``rng``
        (a numpy Generator or a seed)."""
        found, modality, sign = self._visible(condition, modality)
        templates = self.templates[modality]
        if rng is None:
            template, term = templates[0], found.name
        else:
            rng = np.random.default_rng(rng)
            template = templates[int(rng.integers(len(templates)))]
            term = found.terms[int(rng.integers(len(found.terms)))]
        return template.format(name=found.name, synonym=term, sign=sign)

    def caption(self, labels: dict, modality: str = "cfp", rng=None) -> str:
        """A text for one image from its labels (``{column: value}``), for image-text training: one sentence per
        condition of ``caption_conditions``. ``rng`` (a numpy Generator or a seed) varies the templates and
        synonyms."""
        modality = _modality(modality)
        rng = None if rng is None else np.random.default_rng(rng)
        return " ".join(self.describe(c, modality, rng) for c in self.caption_conditions(labels, modality))

    def caption_conditions(self, labels: dict, modality: str = "cfp") -> list[Condition]:
        """The conditions a caption of these labels names: missing values are skipped, "normal fundus" gives way to
        any other condition, and conditions not visible on the modality are left out."""
        conditions: dict[str, Condition] = {}
        for column, value in labels.items():
            if _missing(value):
                continue
            found = self.resolve(column, value)
            if found is None:
                raise RetfmError(f"label {column}={value!r}: no condition for this value "
                                 f"(label maps and conditions: retfm knowledge list)")
            conditions.setdefault(found.key, found)
        if len(conditions) > 1:
            conditions = {key: c for key, c in conditions.items() if c.category != "normal"}
        modality = _modality(modality)
        visible = [c for c in conditions.values() if modality in c.signs]
        if not visible:
            raise RetfmError(f"labels {labels}: no labelled condition is visible on {modality}")
        return visible

    def _visible(self, condition: str | Condition, modality: str) -> tuple[Condition, str, str]:
        found, modality = self.condition(condition), _modality(modality)
        if modality not in found.signs:
            raise RetfmError(f"condition {found.key!r} is not visible on {modality} in the knowledge base "
                             f"(its signs are given for {', '.join(found.signs)})")
        return found, modality, found.signs[modality]


def _modality(modality: str) -> str:
    if str(modality).lower() not in MODALITIES:
        raise RetfmError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    return str(modality).lower()


def _missing(value: object) -> bool:
    """Manifest convention: unknown values are null (None, NaN, pd.NA)."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


# -------------------------------------------------------------------- loading


def _read_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RetfmError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or set(data) - set(SECTIONS):
        raise RetfmError(f"{source}: a knowledge file is a mapping with the sections {', '.join(SECTIONS)}")
    for section, kind in SECTIONS.items():
        if data.get(section) is not None and not isinstance(data[section], kind):
            raise RetfmError(f"{source}: {section} must be a {'list' if kind is list else 'mapping'}")
    for column, mapping in (data.get("label_maps") or {}).items():
        if not isinstance(mapping, dict):
            raise RetfmError(f"{source}: label map {column!r} must map values to condition keys")
    for modality, templates in (data.get("templates") or {}).items():
        if not isinstance(templates, list):
            raise RetfmError(f"{source}: templates of {modality!r} must be a list")
    return data


def _merge(base: dict, extra: dict) -> dict:
    """Extra conditions and templates are appended; extra label-map entries add to (or override) a map's values."""
    merged_maps = {}
    for column, mapping in [*(base.get("label_maps") or {}).items(), *(extra.get("label_maps") or {}).items()]:
        merged_maps[column] = {**merged_maps.get(column, {}),
                               **{label_value_key(value): target for value, target in mapping.items()}}
    templates = dict(base.get("templates") or {})
    for modality, extra_templates in (extra.get("templates") or {}).items():
        templates[modality] = [*templates.get(modality, []), *extra_templates]
    return {"conditions": [*(base.get("conditions") or []), *(extra.get("conditions") or [])],
            "label_maps": merged_maps, "templates": templates}


def _location(loc: tuple, data: dict) -> str:
    """A pydantic error location as a person reads it: ``conditions[3] (glaucoma).signs.cfp``."""
    where = ".".join(map(str, loc))
    if len(loc) >= 2 and loc[0] == "conditions" and isinstance(loc[1], int):
        entry = data["conditions"][loc[1]]
        key = entry.get("key") if isinstance(entry, dict) else None
        where = f"conditions[{loc[1]}] ({key})" + "".join(f".{part}" for part in loc[2:])
    return where


@functools.lru_cache(maxsize=8)
def _load(extra: tuple[Path, ...]) -> KnowledgeBase:
    data = _read_yaml(resources.files("retfm.knowledge").joinpath(BUILTIN).read_text(encoding="utf-8"), BUILTIN)
    for path in extra:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RetfmError(f"{path}: cannot read knowledge file ({getattr(exc, 'strerror', None) or exc})") from None
        data = _merge(data, _read_yaml(text, str(path)))
    sources = " + ".join([BUILTIN, *map(str, extra)])
    try:
        return KnowledgeBase.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _location(first["loc"], data)
        message = first["msg"].removeprefix("Value error, ")
        raise RetfmError(f"{sources}: {where + ': ' if where else ''}{message} "
                         f"({exc.error_count()} problem(s))") from None


def load_knowledge(*extra: str | Path) -> KnowledgeBase:
    """The built-in knowledge base, with the given extra YAML files merged onto it; validated once and cached."""
    return _load(tuple(Path(path).resolve() for path in extra))


def condition(key_or_name: str) -> Condition:
    """The built-in condition with this key, name or synonym."""
    return load_knowledge().condition(key_or_name)


def prompts(condition: str | Condition, modality: str = "cfp") -> list[str]:
    """The prompt ensemble of a built-in condition on a modality (see ``KnowledgeBase.prompts``)."""
    return load_knowledge().prompts(condition, modality)


def class_prompts(label_column: str, values, modality: str = "cfp", label_map: str | None = None) -> dict:
    """``{value: prompts}`` through the built-in label maps (see ``KnowledgeBase.class_prompts``)."""
    return load_knowledge().class_prompts(label_column, values, modality, label_map)


def describe(condition: str | Condition, modality: str = "cfp", rng=None) -> str:
    """A caption sentence for a built-in condition (see ``KnowledgeBase.describe``)."""
    return load_knowledge().describe(condition, modality, rng)


def caption(labels: dict, modality: str = "cfp", rng=None) -> str:
    """A caption for one image from its labels (see ``KnowledgeBase.caption``)."""
    return load_knowledge().caption(labels, modality, rng)
