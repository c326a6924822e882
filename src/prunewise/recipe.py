"""The recipe: one validated object that says what to prune, how, and where to put it.

The CLI and the Python API are thin fronts over it; it round-trips to YAML.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data.mixture import MixtureItem, mixture_items, parse_calibration
from .errors import PrunewiseError
from .structured.geometry import Structured
from .structures.masks import NM, parse_structure


class Recipe(BaseModel):
    """Everything a pruning run needs. Defaults reproduce ``make demo`` minus its evaluation sets."""

    model_config = ConfigDict(extra="forbid")

    model: str = "smollm2-135m"
    score: Literal["magnitude", "wanda", "sparsegpt", "fluctuation", "taylor"] = "wanda"
    structure: str = Field("unstructured", description="unstructured | N:M | channels | heads | width (channels and heads) "
                                                       "| sublayers | blocks")
    group: Literal["row", "layer"] | None = Field(None, description="comparison group for unstructured; default per score")
    sparsity: float | None = Field(None, description="fraction of targeted weights removed; N:M implies N/M")
    budget: str | None = Field(None, description="instead of a sparsity: KIND=VALUE with KIND keep_params, remove_params, "
                                                 "keep_bytes or remove_bytes (keep_* counts the whole model)")
    budget_dtype: str = Field("float32", description="dtype that converts bytes budgets to parameters")
    allocation: Literal["uniform", "global", "owl", "profile", "search"] = "uniform"
    plan: str | None = Field(None, description="a plan.json to reuse instead of allocating")
    owl_m: float = Field(5.0, gt=0)
    owl_lambda: float = Field(0.08, ge=0, lt=0.5)
    min_density: float = Field(0.1, gt=0, le=1)
    profile_levels: list[float] | None = Field(
        None, description="profile allocation: sparsity ladder; default 0.3..0.9, or every k/M for N:M")
    profile_unit: Literal["module", "block"] = Field("block", description="profile allocation: one level per block or per module")
    profile_nsamples: int = Field(8, ge=1, description="profile allocation: calibration windows used to measure damage")
    profile_seqlen: int = Field(256, ge=2, description="profile allocation: tokens per window used to measure damage")
    search_generations: int = Field(150, ge=0, description="search allocation: generations (the time limit may stop it first)")
    search_offspring: int = Field(12, ge=1, description="search allocation: offspring per generation")
    search_time_limit: float = Field(900.0, gt=0, description="search allocation: seconds for the generation loop")
    search_nsamples: int = Field(16, ge=4, description="search allocation: calibration windows fitness is drawn from")
    search_seqlen: int = Field(256, ge=2, description="search allocation: tokens per search window")
    search_cache_mb: float = Field(3072.0, gt=0, description="search allocation: bound on cached pruned module variants")
    bias_compensation: bool = Field(False, description="structured: fold the removed inputs' mean contribution into "
                                                       "a bias of the output projection (FLAP)")
    width_multiple: int = Field(8, ge=1, description="structured: MLP widths change in multiples of this many channels")
    heads_mode: Literal["query", "group"] = Field(
        "query", description="structured heads: remove query heads evenly within key/value groups, or whole groups")
    rowwise: bool = Field(False, description="spread each module's level over its output rows (TRIM) on top of the plan")
    calibration: str | list[MixtureItem] = Field(
        "wiki", description="a corpus spec, or a mixture: a list of {source, weight} (or 'code:0.7,wiki:0.3')")
    nsamples: int = Field(64, ge=1)
    seqlen: int = Field(512, ge=2)
    seed: int = 0
    damp: float = Field(0.01, gt=0)
    blocksize: int = Field(128, ge=1)
    within_block: Literal["sequential", "parallel"] | None = Field(
        None, description="sequential: each linear sees its pruned predecessors; parallel: all see the dense block "
                          "(default: parallel for magnitude/wanda as in the Wanda paper, sequential for sparsegpt)")
    chunk_size: int | None = Field(None, ge=1, description="calibration windows per forward chunk; default all")
    targets: str = Field(r".*", description="regex a module name must match to be pruned")
    ignore: str | None = Field(None, description="regex of module names never pruned")
    evaluation: list[str] = Field(default_factory=lambda: ["wiki-test"])
    eval_tokens: int = Field(32768, ge=2)
    eval_seqlen: int = Field(512, ge=2)
    tasks: list[str] = Field(default_factory=list, description="zero-shot multiple-choice tasks evaluated dense and "
                                                                "pruned: default (the suite), bigbench/..., evals/..., a .jsonl")
    task_limit: int | None = Field(None, ge=1, description="at most this many items per task")
    completions: bool = Field(True, description="greedy completions of fixed prompts, dense vs pruned, in the report")
    output: str | None = None
    overwrite: bool = False

    @field_validator("structure")
    @classmethod
    def _structure(cls, v: str) -> str:
        parse_structure(v)
        return v.strip().lower()

    @field_validator("calibration", mode="before")
    @classmethod
    def _calibration(cls, v):
        try:
            if isinstance(v, str):
                return parse_calibration(v)
            if isinstance(v, (list, tuple)):
                return mixture_items(v)
        except PrunewiseError as exc:
            raise ValueError(str(exc)) from None
        raise ValueError(f"must be a corpus spec (e.g. wiki, a .txt file) or a list of {{source, weight}} items, "
                         f"not {v!r}")

    @field_validator("targets", "ignore")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regex {v!r}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _sparsity(self) -> "Recipe":
        struct = parse_structure(self.structure)
        if isinstance(struct, Structured):
            _check_structured(self, struct)
        elif self.score in STRUCTURED_ONLY:
            raise ValueError(f"score {self.score} ranks structured units; use it with --structure channels, heads or width")
        elif self.bias_compensation:
            raise ValueError("bias compensation applies to structured pruning (--structure channels, heads, width, "
                             "sublayers or blocks)")
        if isinstance(struct, NM):
            if self.sparsity is None:
                self.sparsity = struct.sparsity
            elif abs(self.sparsity - struct.sparsity) > 1e-9:
                raise ValueError(f"sparsity {self.sparsity} contradicts {struct.name} (= {struct.sparsity:g}); omit --sparsity with N:M")
            if self.allocation in ("global", "search"):
                raise ValueError(f"{self.allocation} allocation cannot produce N:M levels; use uniform, owl or profile with N:M")
            if self.rowwise:
                raise ValueError("row-wise allocation cannot be N:M (every N:M row has the same sparsity); use unstructured")
        if self.profile_levels is not None:
            from .allocation.profile import check_levels
            try:
                self.profile_levels = list(check_levels(self.profile_levels, struct))
            except PrunewiseError as exc:
                raise ValueError(str(exc)) from None
        if self.budget is not None:
            if isinstance(struct, NM):
                raise ValueError("a parameter or byte budget needs unstructured sparsity (N:M fixes the sparsity)")
            parse_budget(self.budget, self.budget_dtype)
        if self.sparsity is None:
            self.sparsity = 0.5
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity {self.sparsity} is outside [0, 1); give the fraction of weights to remove, e.g. 0.5")
        return self

    @property
    def sequential(self) -> bool:
        """Within-block order: the recipe's choice, else sequential only for reconstruction (sparsegpt)."""
        return (self.within_block or ("sequential" if self.score == "sparsegpt" else "parallel")) == "sequential"

    @property
    def structure_obj(self):
        return parse_structure(self.structure, self.group or _default_group(self.score))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise PrunewiseError(f"recipe {path} does not exist; write one with `prunewise prune ... --output DIR` (recipe.yaml)") from None
        except yaml.YAMLError as exc:
            raise PrunewiseError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise PrunewiseError(f"recipe {path} must be a YAML mapping of recipe fields")
        return make_recipe(**data)


def parse_budget(text: str, dtype: str = "float32", other_params: int = 0):
    """``KIND=VALUE`` (e.g. ``keep_params=90e6``, ``remove_bytes=100e6``) as a knapsack Budget."""
    from .allocation.knapsack import Budget, bytes_per_param

    kind, sep, value = text.partition("=")
    kinds = ("keep_params", "remove_params", "keep_bytes", "remove_bytes")
    if not sep or kind.strip() not in kinds:
        raise ValueError(f"budget {text!r} must be KIND=VALUE with KIND one of {', '.join(kinds)}, e.g. keep_params=90e6")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"budget value {value!r} is not a number; write e.g. keep_bytes=250e6") from None
    try:
        per = bytes_per_param(dtype)
    except PrunewiseError as exc:
        raise ValueError(str(exc)) from None
    return Budget(kind.strip(), number, per, other_params)


STRUCTURED_ONLY = ("fluctuation", "taylor")


def _check_structured(recipe: Recipe, struct: Structured) -> None:
    """Combinations structured pruning cannot do, refused at validation time."""
    if recipe.score == "sparsegpt":
        raise ValueError("sparsegpt reconstructs single weights; structured pruning scores units with magnitude, wanda, "
                         "fluctuation or taylor")
    if recipe.rowwise:
        raise ValueError("row-wise allocation is for unstructured sparsity; structured pruning removes whole units")
    if struct.kind in ("channels", "heads", "width") and recipe.allocation not in ("uniform", "global", "owl") \
            and not recipe.plan:
        raise ValueError(f"structured widths are allocated uniform, global (FLAP), owl or from --plan, not "
                         f"{recipe.allocation}; make a plan.json with an unstructured run and pass --plan")
    if struct.kind in ("sublayers", "blocks") and (recipe.allocation not in ("uniform",) or recipe.plan):
        raise ValueError(f"{struct.kind} are ranked by how little they change their input; leave --allocation at uniform")


def _default_group(score: str) -> str:
    from .scores import SCORES
    return SCORES[score].default_group if score in SCORES else "row"


def make_recipe(**fields) -> Recipe:
    """Build a Recipe, turning validation errors into a one-line PrunewiseError."""
    try:
        return Recipe(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            msg = f"{msg}, got {err['input']!r}"
        raise PrunewiseError(f"invalid recipe: {where + ': ' if where else ''}{msg}") from None
