"""Registries of parts: one per axis (score, structure, allocation, compensation, recovery).

A part is a class with a ``name``, a one-line ``description``, a small pydantic ``Config`` (its
options, validated) and ``works_with``: for another axis, the part names it can be combined with.
The registry builds parts from recipe entries, checks combinations (a refused one gets a
one-line reason built from the declarations), and feeds the CLI's choices and ``prunewise parts``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import PrunewiseError

AXES = ("score", "structure", "allocation", "compensation", "recovery")


class PartConfig(BaseModel):
    """Options of a part; parts without options use this empty one. Every number must be finite."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class Part:
    """A registered part. Subclasses set ``name``, ``description``, ``Config`` and ``works_with``."""

    axis: ClassVar[str] = ""
    key: ClassVar[str] = ""  # the registry name (``name`` may say more, e.g. "2:4" for the part "n:m")
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[PartConfig]] = PartConfig
    # other axis -> part names this part combines with (absent: any); "structure" names are part names
    works_with: ClassVar[dict[str, tuple[str, ...]]] = {}
    # other axis -> part names that must be chosen with this one
    requires: ClassVar[dict[str, tuple[str, ...]]] = {}
    hint: ClassVar[str] = ""  # appended to a refusal: what to use instead
    shorthand: ClassVar[str | None] = None  # the option a bare value sets in ``name:VALUE`` (eora:16 -> rank)

    def __init__(self, config: PartConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_config(cls, config: PartConfig) -> Part:
        return cls(config)

    def conflicts(self, chosen: dict[str, list[Part]]) -> str | None:
        """A refusal that depends on this part's options (declared by the part, checked by the registry)."""
        return None

    def options(self) -> dict[str, Any]:
        return self.config.model_dump(by_alias=True)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.axis}:{self.name}({opts})"


class Registry:
    """The named parts of one axis."""

    def __init__(self, axis: str) -> None:
        self.axis = axis
        self.parts: dict[str, type[Part]] = {}

    def register(self, cls: type[Part]) -> type[Part]:
        key = cls.__dict__.get("key") or cls.__dict__.get("name")
        if not isinstance(key, str) or not key or key in self.parts:
            raise RuntimeError(f"{self.axis} part {cls.__name__} needs a unique key (got {key!r})")
        cls.axis, cls.key = self.axis, key
        self.parts[key] = cls
        return cls

    def names(self) -> list[str]:
        return list(self.parts)

    def get(self, name: str) -> type[Part]:
        if name not in self.parts:
            raise PrunewiseError(f"unknown {self.axis} '{name}'; choose one of: {', '.join(self.parts) or '(none yet)'}")
        return self.parts[name]

    def build(self, name: str, **options) -> Part:
        cls = self.get(name)
        try:
            config = cls.Config(**options)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise PrunewiseError(f"{self.axis} {name}: {where + ': ' if where else ''}"
                                 f"{err['msg'].removeprefix('Value error, ')}") from None
        return cls.from_config(config)


REGISTRIES: dict[str, Registry] = {axis: Registry(axis) for axis in AXES}


def register(axis: str):
    """Class decorator: ``@register("score")`` adds the part to that axis's registry."""
    return REGISTRIES[axis].register


def refusal(chosen: dict[str, list[Part]]) -> str | None:
    """Why this combination of parts cannot run (one line), or None. Only the parts' declarations decide."""
    for axis, parts in chosen.items():
        for part in parts:
            for other, allowed in part.works_with.items():
                for got in chosen.get(other, []):
                    if got.key not in allowed:
                        said = f"works with {other} {', '.join(allowed)}" if allowed else f"takes no {other}"
                        return (f"{axis} {part.name} {said}, not {got.name}"
                                + (f"; {part.hint}" if part.hint else ""))
            for other, needed in part.requires.items():
                names = [p.key for p in chosen.get(other, [])]
                if not any(n in names for n in needed):
                    return (f"{axis} {part.name} needs {other} {' or '.join(needed)}"
                            + (f"; {part.hint}" if part.hint else ""))
            reason = part.conflicts(chosen)
            if reason:
                return reason
    return None


def listing() -> str:
    """Every registered part per axis with its options and one-line description (``prunewise parts``)."""
    lines = []
    for axis, reg in REGISTRIES.items():
        lines.append(f"{axis}:")
        if not reg.parts:
            lines.append("  (none yet)")
        for name, cls in reg.parts.items():
            opts = ", ".join(f"{f.alias or k}={f.default!r}" for k, f in cls.Config.model_fields.items())
            lines.append(f"  {name:<12} {cls.description}" + (f" [{opts}]" if opts else ""))
            for other, allowed in cls.works_with.items():
                lines.append(f"  {'':<12}   " + (f"only with {other} {', '.join(allowed)}" if allowed else f"no {other}"))
            for other, needed in cls.requires.items():
                lines.append(f"  {'':<12}   needs {other} {' or '.join(needed)}")
    return "\n".join(lines)
