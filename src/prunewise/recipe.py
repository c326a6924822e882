"""The recipe: one validated object that says what to prune, how, and where to put it.

The CLI and the Python API are thin fronts over it; it round-trips to YAML.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import prunewise.allocation  # noqa: F401  (every part registered)
import prunewise.compensation  # noqa: F401
import prunewise.recovery  # noqa: F401
import prunewise.scores  # noqa: F401
import prunewise.structures  # noqa: F401

from .allocation.knapsack import parse_budget
from .core.dtypes import parse_dtype
from .core.registry import REGISTRIES, refusal
from .data.mixture import MixtureItem, mixture_items, parse_calibration
from .engine.placement import parse_device
from .errors import PrunewiseError

# Flat fields of recipes written before the per-axis recipe, and where each one went.
LEGACY_FIELDS = {
    "group": ("structure", "group"), "heads_mode": ("structure", "heads_mode"),
    "width_multiple": ("structure", "width_multiple"),
    "owl_m": ("allocation", "m"), "owl_lambda": ("allocation", "lambda"), "min_density": ("allocation", "min_density"),
    "profile_levels": ("allocation", "levels"), "profile_unit": ("allocation", "unit"),
    "profile_nsamples": ("allocation", "nsamples"), "profile_seqlen": ("allocation", "seqlen"),
    "search_generations": ("allocation", "generations"), "search_offspring": ("allocation", "offspring"),
    "search_time_limit": ("allocation", "time_limit"), "search_nsamples": ("allocation", "search_nsamples"),
    "search_seqlen": ("allocation", "search_seqlen"), "search_cache_mb": ("allocation", "cache_mb"),
    "search_actors": ("allocation", "actors"),
    "rowwise": ("allocation", "rowwise"), "damp": ("score+obs", "damp"), "blocksize": ("obs", "blocksize"),
    "bias_compensation": ("bias", None),
}


def _choice(value, axis: str) -> dict:
    """An axis entry as a mapping ``{name: ..., option: value, ...}``. A bare name is accepted and, for the score and
    the chained axes, ``name:option=value:...`` or ``name:VALUE`` for the part's ``shorthand`` option (``eora:16``)."""
    if isinstance(value, str) and axis in ("score", "compensation", "recovery") and ":" in value:
        import yaml

        name, *items = (t.strip() for t in value.split(":"))
        entry: dict = {"name": name}
        cls = REGISTRIES[axis].parts.get(name)
        for item in items:
            key, eq, text = item.partition("=")
            if not eq:
                key, text = (cls.shorthand if cls is not None else None), item
                if key is None:
                    raise ValueError(f"{axis} '{value}': write options as {name}:OPTION=VALUE")
            key = key.strip()
            if key in entry:
                raise ValueError(f"{axis} '{value}' sets {key} twice; give each option once")
            entry[key] = yaml.safe_load(text)
        return entry
    if isinstance(value, str):
        return {"name": value.strip()}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return dict(value)
    raise ValueError(f"{axis} must be a name or a mapping with a name and its options, not {value!r}")


def _entries(value, axis: str) -> list:
    """A chained axis (compensation, recovery) as a list of entries: a list, one name (``obs``), or names separated
    by commas (``obs,dsnot``, as on the command line)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.split(",") if v.strip()]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{axis} must be a part name, names separated by commas or a list of parts, not {value!r}; "
                     f"e.g. {axis}: {'obs' if axis == 'compensation' else 'lora'}")


def _duplicates(entries: list[dict], axis: str) -> None:
    """Refuse a chained axis that names one part twice (only one of them would act, both would be reported)."""
    seen: set[str] = set()
    for entry in entries:
        if entry["name"] in seen:
            raise ValueError(f"{axis} names {entry['name']} twice; give each part once, with the options you want "
                             f"(e.g. {entry['name']}:OPTION=VALUE)")
        seen.add(entry["name"])


DATA_SUFFIXES = (".txt", ".jsonl")


def absolute_data(spec):
    """A data spec with every local data file (``.txt``/``.jsonl`` that exists here) as an absolute path, so a recipe
    saved with it is found again from any folder; corpus names, missing files and mixtures' weights stay as given."""
    if not isinstance(spec, str):
        return spec

    def one(source: str) -> str:
        text = source.strip()
        if text.lower().endswith(DATA_SUFFIXES) and Path(text).expanduser().is_file():
            return os.path.abspath(os.path.expanduser(text))
        return source

    if spec.lower().endswith(DATA_SUFFIXES) or Path(spec).expanduser().exists():
        return one(spec)
    parts = []
    for part in spec.split(","):  # a mixture SOURCE:WEIGHT,...
        source, sep, weight = part.rpartition(":")
        parts.append(f"{one(source)}:{weight}" if sep else one(part))
    return ",".join(parts)


def _normalise(data: dict) -> dict:
    """Fold the flat fields of old recipes (and of the command line) into the per-axis entries."""
    data = dict(data)
    legacy = {k: data.pop(k) for k in list(data) if k in LEGACY_FIELDS}
    score = _choice(data.get("score", "wanda"), "score")
    structure = _choice(data.get("structure", "unstructured"), "structure")
    allocation = _choice(data.get("allocation", "uniform"), "allocation")
    text = structure["name"].lower()
    if ":" in text and text not in REGISTRIES["structure"].parts:  # N:M written as 2:4
        n, _, m = text.partition(":")
        if not (n.isdigit() and m.isdigit()):
            raise ValueError(f"unknown structure '{structure['name']}'; use 'unstructured', 'N:M' such as 2:4, or one of "
                             "channels, heads, width, sublayers, blocks")
        if not 0 < int(n) < int(m):
            raise ValueError(f"N:M structure '{text}' needs 0 < N < M (N zeros in every M weights), e.g. 2:4")
        structure = {**structure, "name": "n:m", "n": int(n), "m": int(m)}
    compensation = data.get("compensation")
    explicit = compensation is not None
    compensation = [_choice(c, "compensation") for c in _entries(compensation, "compensation")]
    s_cls = REGISTRIES["structure"].parts.get(structure["name"].lower())
    a_cls = REGISTRIES["allocation"].parts.get(allocation["name"])
    c_obs = {"name": "obs"}
    legacy_obs = {"damp" if k == "damp" else "blocksize" for k in legacy if k in ("damp", "blocksize")}
    for key, value in legacy.items():
        if value is None:
            continue
        axis, option = LEGACY_FIELDS[key]
        if axis == "structure":
            if s_cls is not None and option in s_cls.Config.model_fields:
                structure[option] = value
        elif axis == "allocation":
            fields = a_cls.Config.model_fields if a_cls is not None else {}
            aliases = {f.alias or n for n, f in fields.items()} | set(fields)
            name = option if option in aliases else {"m": "owl_m", "lambda": "owl_lambda"}.get(option)
            if name in aliases:
                allocation[name] = value
            if key in ("profile_nsamples", "profile_seqlen") and structure["name"] == "sublayers":
                structure[option] = value  # sublayer damage was measured on the profile windows
        elif axis == "score+obs":
            if score["name"] == "sparsegpt":
                score["damp"] = value
            c_obs["damp"] = value
        elif axis == "obs":
            c_obs["blocksize"] = value
        elif axis == "bias" and value:
            if not any(c["name"] == "bias" for c in compensation):
                compensation.append({"name": "bias"})
    if not explicit:
        s_part = REGISTRIES["score"].parts.get(score["name"])
        if s_part is not None:
            for name in s_part.requires.get("compensation", ())[:1]:
                if not any(c["name"] == name for c in compensation):
                    compensation.insert(0, c_obs if name == "obs" else {"name": name})
    for c in compensation:
        if c["name"] == "obs":
            c.update({k: v for k, v in c_obs.items() if k in legacy_obs})
    data.update(score=score, structure=structure, allocation=allocation, compensation=compensation,
                recovery=[_choice(r, "recovery") for r in _entries(data.get("recovery"), "recovery")])
    return data


def _build(axis: str, entry: dict):
    options = {k: v for k, v in entry.items() if k != "name"}
    try:
        return REGISTRIES[axis].build(entry["name"].lower() if axis == "structure" else entry["name"], **options)
    except PrunewiseError as exc:
        raise ValueError(str(exc)) from None


class Recipe(BaseModel):
    """Everything a pruning run needs. Defaults reproduce ``make demo`` minus its evaluation sets.

    One entry per axis (``score``, ``structure``, ``allocation``; lists for ``compensation`` and
    ``recovery``), each a part name with the options its part's config validates. Recipes written
    before (flat fields such as ``owl_m``, ``damp``, ``bias_compensation``) load into the same entries.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number finite

    model: str = "smollm2-135m"
    score: dict = Field(default_factory=lambda: {"name": "wanda"}, description="score part and its options")
    structure: dict = Field(default_factory=lambda: {"name": "unstructured"}, description="structure part")
    allocation: dict = Field(default_factory=lambda: {"name": "uniform"}, description="allocation part")
    compensation: list[dict] = Field(default_factory=list, description="compensation parts, in order")
    recovery: list[dict] = Field(default_factory=list, description="recovery parts, in order")
    sparsity: float | None = Field(None, description="fraction of targeted weights removed; N:M implies N/M")
    budget: str | None = Field(None, description="instead of a sparsity: KIND=VALUE with KIND keep_params, remove_params, "
                                                 "keep_bytes or remove_bytes (keep_* counts the whole model)")
    budget_dtype: str = Field("float32", description="dtype that converts bytes budgets to parameters")
    plan: str | None = Field(None, description="a plan.json to reuse instead of allocating")
    calibration: str | list[MixtureItem] = Field(
        "wiki", description="a corpus spec, or a mixture: a list of {source, weight} (or 'code:0.7,wiki:0.3')")
    general_calibration: str | list[MixtureItem] | None = Field(
        None, description="D-Pruner's general (open-domain) calibration data, any calibration spec; default wiki "
                          "(only for scores that read it)")
    nsamples: int = Field(64, ge=1)
    seqlen: int = Field(512, ge=2)
    seed: int = 0
    within_block: Literal["sequential", "parallel"] | None = Field(
        None, description="sequential: each linear sees its pruned predecessors, one pass per block; parallel: all see the "
                          "dense block, as the Wanda and SparseGPT reference code, two passes per block (default: "
                          "sequential with obs and for unstructured sparsities up to 0.5, else parallel)")
    propagate: Literal["pruned", "dense"] = Field(
        "pruned", description="what feeds the next block: the pruned block's outputs (the reference codes: two passes per "
                              "block in the parallel order) or the dense block's (every statistic from the dense model, "
                              "one pass per block; parallel order only)")
    chunk_size: int | None = Field(None, ge=1, description="calibration windows per forward chunk; default all")
    device: str = Field("auto", description="where blocks compute, one at a time: auto (the first GPU, else the CPU) | "
                                            "cpu | cuda | cuda:N | mps")
    offload: Literal["auto", "none", "disk"] = Field(
        "auto", description="disk: never build the model in memory, stream blocks from the source shards to the output "
                            "shards; auto: disk when the model would not fit in the available memory; none: in memory")
    dtype: str = Field("auto", description="dtype the model is loaded, stored and saved in: auto (the checkpoint's own; "
                                           "the named offline models float32) | float32 | bfloat16 | float16")
    ray: str | None = Field(None, description="run on Ray: local (a Ray instance on this machine's cores), auto (the "
                                              "cluster RAY_ADDRESS names or that `ray start` runs here) or an address "
                                              "such as ray://head:10001; sweeps run cells as tasks, search scores "
                                              "offspring on actors")
    num_cpus: float = Field(1.0, gt=0, description="Ray: CPUs reserved per sweep cell or search actor (its torch threads)")
    num_gpus: float = Field(0.0, ge=0, description="Ray: GPUs reserved per sweep cell or search actor")
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

    @model_validator(mode="before")
    @classmethod
    def _axes(cls, data):
        return _normalise(data) if isinstance(data, dict) else data

    @field_validator("calibration", "general_calibration", mode="before")
    @classmethod
    def _calibration(cls, v, info):
        if v is None and info.field_name == "general_calibration":
            return None
        try:
            if isinstance(v, str):
                parsed = parse_calibration(v)
                if isinstance(parsed, str):
                    return absolute_data(parsed)
                v = parsed
            if isinstance(v, (list, tuple)):
                return [MixtureItem(source=absolute_data(i.source), weight=i.weight) for i in mixture_items(v)]
        except PrunewiseError as exc:
            raise ValueError(str(exc)) from None
        raise ValueError(f"must be a corpus spec (e.g. wiki, a .txt file) or a list of {{source, weight}} items, "
                         f"not {v!r}")

    @field_validator("model")
    @classmethod
    def _model_path(cls, v: str) -> str:
        """A local model folder or .gguf file as an absolute path (the saved recipe finds it from any folder)."""
        from .models.registry import NAMED_MODELS

        if isinstance(v, str) and v.strip() and v.strip() not in NAMED_MODELS and Path(v).expanduser().exists():
            return os.path.abspath(os.path.expanduser(v.strip()))
        return v

    @field_validator("evaluation", "tasks")
    @classmethod
    def _data_files(cls, v: list[str]) -> list[str]:
        return [absolute_data(x) for x in v]

    @field_validator("nsamples", "seqlen", "seed", "eval_tokens", "eval_seqlen", "chunk_size", "task_limit",
                     mode="before")
    @classmethod
    def _not_bool(cls, v):
        if isinstance(v, bool):  # YAML's true/false would otherwise count as 1/0
            raise ValueError(f"must be a whole number, not {v}")
        return v

    @field_validator("device", "dtype")
    @classmethod
    def _placement(cls, v: str, info) -> str:
        try:
            return (parse_device if info.field_name == "device" else parse_dtype)(v)
        except PrunewiseError as exc:
            raise ValueError(str(exc)) from None

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
    def _parts(self) -> Recipe:
        parts = self.parts()
        # store every entry with all its options (defaults included): the saved recipe says everything
        self.score = {"name": parts.score.key, **parts.score.options()}
        self.structure = {"name": parts.structure.key, **parts.structure.options()}
        self.allocation = {"name": parts.allocation.key, **parts.allocation.options()}
        self.compensation = [{"name": c.key, **c.options()} for c in parts.compensation]
        self.recovery = [{"name": r.key, **r.options()} for r in parts.recovery]
        _duplicates(self.compensation, "compensation")
        for entry in self.recovery:  # recovery data found again from any folder (recover reads this recipe later)
            if entry.get("data") is not None:
                entry["data"] = absolute_data(entry["data"])
        reason = refusal(parts.chosen())
        if reason:
            raise ValueError(reason)
        struct = parts.structure
        if struct.fixed_sparsity:
            if self.sparsity is None:
                self.sparsity = struct.sparsity
            elif abs(self.sparsity - struct.sparsity) > 1e-9:
                raise ValueError(f"sparsity {self.sparsity} contradicts {struct.name} (= {struct.sparsity:g}); omit --sparsity with N:M")
        if self.plan and not struct.weight_level and struct.depth:
            raise ValueError(f"{struct.kind} are ranked by how little they change their input; leave --allocation at uniform")
        if self.plan:
            self._check_plan(struct)
        if self.budget is not None:
            if struct.fixed_sparsity:
                raise ValueError("a parameter or byte budget needs unstructured sparsity (N:M fixes the sparsity)")
            parse_budget(self.budget, self.budget_dtype)
        if self.general_calibration is not None and not parts.score.needs.general:
            raise ValueError(f"--general-calibration is read by the dpruner score only, not {parts.score.key}: drop it, "
                             "or use --score dpruner")
        if self.propagate == "dense" and self.within_block == "sequential":
            raise ValueError("--propagate dense gives every linear the dense block's inputs; it cannot be combined with "
                             "--within-block sequential (drop one of them)")
        if self.sparsity is None:
            self.sparsity = 0.5
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity {self.sparsity} is outside [0, 1); give the fraction of weights to remove, e.g. 0.5")
        return self

    @property
    def general_spec(self):
        """The general calibration data of a score that reads it (D-Pruner): the field, default ``wiki``; else None."""
        if not self.parts().score.needs.general:
            return None
        return self.general_calibration or "wiki"

    def _check_plan(self, struct) -> None:
        """A saved plan decides how much is removed: it must be readable, its levels in [0, 1), and a sparsity given
        beside it must be the plan's own (within 1e-4; a recipe prunewise saved carries it)."""
        from .allocation.plan import AllocationPlan

        if Path(self.plan).expanduser().is_file():
            self.plan = os.path.abspath(os.path.expanduser(self.plan))
        try:
            plan = AllocationPlan.load(self.plan)
        except PrunewiseError as exc:
            raise ValueError(str(exc)) from None
        if self.budget is not None:
            raise ValueError(f"the plan {self.plan} decides how much is removed; give --plan or --budget, not both")
        made_for_weights = plan.structure == "unstructured" or ":" in plan.structure
        # a per-module (weight-level) plan may set structured widths; a plan of structured widths is only for its kind
        if not made_for_weights and plan.structure != struct.name:
            raise ValueError(f"the plan {self.plan} was made for structure {plan.structure}, not {struct.name}; "
                             f"use it with --structure {plan.structure}, or allocate anew")
        if struct.fixed_sparsity:
            return
        share = plan.achieved() if set(plan.modules) <= set(plan.numels) else plan.target
        if share >= 1 - 1e-9:
            raise ValueError(f"the plan {self.plan} removes every weight of its modules (share {share:.6f}); give "
                             "levels below 1")
        if self.sparsity is None:
            self.sparsity = share
        elif min(abs(self.sparsity - share), abs(self.sparsity - plan.target)) > 1e-4:
            raise ValueError(f"sparsity {self.sparsity:g} contradicts the plan {self.plan}, which removes {share:.4f} "
                             "of its modules' weights; leave --sparsity out with --plan (the plan sets it)")

    def parts(self):
        """The recipe's parts, built (and validated) from its entries."""
        from .pipeline.parts import PartSet, default_group

        score = _build("score", self.score)
        compensation = [_build("compensation", c) for c in self.compensation]
        structure = dict(self.structure)
        if structure["name"] == "unstructured" and structure.get("group") is None:
            structure["group"] = default_group(score, compensation)
        return PartSet(score=score, structure=_build("structure", structure),
                       allocation=_build("allocation", self.allocation), compensation=compensation,
                       recovery=[_build("recovery", r) for r in self.recovery])

    @property
    def sequential(self) -> bool:
        """Within-block order: the recipe's choice; else parallel with ``propagate: dense``; else sequential with a
        reconstruction (obs) or an unstructured target of at most 50% given as a sparsity; else the reference's
        parallel order.

        Chosen on bench/results/within_block.md (Wanda, smollm2-135m, 3 seeds each) and bench/identity.py, the
        calibration domain (the user's own data) first: at 50% unstructured sequential is within the seed spread in
        domain (+0.3% mean; -0.3% in the 8 x 512 identity cell) and better out of domain, in one pass per block
        instead of two; at 70% it is +29%, -3%, -13% per seed and +14.6% in the OWL identity cell, at 2:4 +4.3%,
        +7.3%, -1.6% and +7.5%, so those keep the reference's order. With a sweeping reconstruction (SparseGPT's
        OBS) sequential always."""
        if self.within_block:
            return self.within_block == "sequential"
        if self.propagate == "dense":
            return False
        # a sweeping reconstruction (OBS) corrects each linear for its pruned predecessors; measured equal in domain
        # and better out of domain than parallel for SparseGPT (50%: 3 seeds, 2:4: 2 seeds)
        if any(getattr(REGISTRIES["compensation"].get(c["name"]), "sweeps", False) for c in self.compensation):
            return True
        # (validation always sets ``sparsity``; with a budget it is not the level pruned)
        return self.structure.get("name") == "unstructured" and self.budget is None and self.sparsity <= 0.5 + 1e-9

    @property
    def structure_obj(self):
        return self.parts().structure

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        return make_recipe(**read_recipe(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML read as data only (SafeLoader), refusing a mapping that gives one key twice (the last would win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_recipe(path: str | Path) -> dict:
    """The fields of a YAML recipe file (read as data only: no tags that build objects), or a one-line error for a
    missing, unreadable, non-UTF-8, empty or non-mapping file."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PrunewiseError(f"recipe {path} does not exist; write one with `prunewise prune ... --output DIR` (recipe.yaml)") from None
    except IsADirectoryError:
        hint = f"e.g. {path / 'recipe.yaml'}" if (path / "recipe.yaml").is_file() else "a .yaml file"
        raise PrunewiseError(f"recipe {path} is a folder; give the recipe file itself ({hint})") from None
    except OSError as exc:
        raise PrunewiseError(f"cannot read recipe {path} ({exc.strerror or exc}); check the path and its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PrunewiseError(f"recipe {path} is not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x}); save it as "
                             "UTF-8 YAML") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # safe: data only, and a key given twice is refused
    except yaml.YAMLError as exc:
        raise PrunewiseError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        raise PrunewiseError(f"recipe {path} is empty; write the recipe's fields in it (e.g. `sparsity: 0.5`), or "
                             "leave --recipe out for the defaults")
    if not isinstance(data, dict):
        raise PrunewiseError(f"recipe {path} must be a YAML mapping of recipe fields (field: value), not a "
                             f"{type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise PrunewiseError(f"recipe {path} has a field named {bad[0]!r}; field names are words such as sparsity")
    return data


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
