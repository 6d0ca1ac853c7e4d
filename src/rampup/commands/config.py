"""rampup config: every config key with its default and meaning."""

from __future__ import annotations

import argparse
import typing

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rampup.commands import console
from rampup.config import RunConfig
from rampup.schedule.registry import KNOBS
from rampup.units import Duration


def run(args: argparse.Namespace) -> int:

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            ann = field.annotation
            sub = next(
                (a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None
            )
            key = f"{prefix}{field.alias or name}"
            if args.section and not key.startswith(args.section):
                continue
            if sub is not None and prefix.count(".") < 2 and name != "stages":
                console.print(f"[bold]{key}[/]: {field.description or ''}")
                walk(sub, key + ".")
            else:
                default = field.get_default(call_default_factory=True)
                console.print(f"  {key}: {_as_yaml(default)}  [dim]{field.description or ''}[/]", highlight=False)

    walk(RunConfig, "")
    console.print(
        "[bold]knobs[/] (set in schedule.knobs or in a stage; numbers may be ramps "
        "{ramp: linear|cosine|step|exponential|root, from: A, to: B}):"
    )
    for k in KNOBS.values():
        shown = f" (default {_as_yaml(k.default)})" if k.default is not None else " (no default: set it)"
        console.print(f"  {k.name}{shown}  [dim]{k.doc}[/]", highlight=False)
    return 0


def _as_yaml(value: typing.Any) -> str:
    """A default as a user writes it in YAML: '2%' for a duration, {method: base} for a model, (required)."""

    def plain(v: typing.Any) -> typing.Any:
        if isinstance(v, Duration):
            return str(v)
        if isinstance(v, BaseModel):
            return v.model_dump(mode="json", exclude_none=True)
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)

    if value is PydanticUndefined:
        return "(required)"
    text = yaml.safe_dump(plain(value), default_flow_style=True, width=10_000, sort_keys=False)
    return text.strip().removesuffix("...").strip()
