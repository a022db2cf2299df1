"""Configs are data: pydantic models, filled from defaults < YAML file < command-line options < ``--set k=v``.

Each stage's options live beside its code (``retfm.data.config``, ``retfm.pretrain.config``, ``retfm.adapt.config``,
``retfm.synth.config``, ``retfm.retrieval.config``, ``retfm.federated.config``, ``retfm.serve.config``); what they
share is here: the base that refuses unknown keys, the run options every training or inference stage takes, and
loading and saving. The resolved config is saved next to every output so a run can be repeated exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from retfm.errors import RetfmError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class Options(BaseModel):
    """A block of options: unknown keys are refused, so a typo is an error, never a silently ignored option."""

    model_config = ConfigDict(extra="forbid")


def decoding_workers() -> int:
    return min(4, max(1, (os.cpu_count() or 2) // 2))


# the run options shared by the stages that train or run a model
Device = Annotated[Literal["cpu", "cuda"], Field(description="where the model runs")]
Seed = Annotated[int, Field(description="seed of every random draw")]
Workers = Annotated[int, Field(default_factory=decoding_workers, ge=0,
                               description="decoding processes beside the model (default: half the cores, at most 4)")]
Engine = Annotated[Literal["auto", "torch", "onnxruntime", "openvino"], Field(
    description="inference engine; auto: the fastest whose features match PyTorch eager fp32")]


def comma_separated(value):
    """A string of comma-separated items (the command line's form of a list: site,sex or 0.7,0.3) -> its items,
    stripped, empty ones left out; any other value as it is."""
    return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value


CommaSeparated = BeforeValidator(comma_separated)  # a list or tuple field that also takes one such string


def parse_set(assignment: str) -> tuple[list[str], object]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML, so numbers, booleans and lists work)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RetfmError(f"--set {assignment!r}: expected key=value")
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:  # a tag safe loading refuses (!!python/...), or broken YAML
        raise RetfmError(f"--set {assignment!r}: not a plain YAML value ({str(exc).splitlines()[0]})") from None


def load_config(model: type[ConfigT], path: Path | None = None, options: dict | None = None,
                sets: list[str] | None = None) -> ConfigT:
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise RetfmError(f"{path}: cannot read config ({exc.__class__.__name__}: {exc})".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise RetfmError(f"{path}: a config must be a mapping of option: value")
    data.update({k: v for k, v in (options or {}).items() if v is not None})
    for assignment in sets or []:
        keys, value = parse_set(assignment)
        target = data
        for key in keys[:-1]:
            if target.get(key) is None:  # absent, or null in the file (e.g. dp: null, then --set dp.delta=...)
                target[key] = {}
            target = target[key]
        target[keys[-1]] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        origin = f"{path}: " if path else ""
        raise RetfmError(f"{origin}option {where}: {first['msg']} ({len(exc.errors())} problem(s))") from None


def save_config(config: BaseModel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path
