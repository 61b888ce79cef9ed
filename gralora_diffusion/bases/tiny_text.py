"""Offline tokenizers and text encoders for the tiny families: T5 (SD3, FLUX.1) and Qwen-style
byte-level BPE with a chat template (FLUX.2 [klein], Qwen-Image). Every character is a token, as
in `tiny.build_tokenizer`'s CLIP vocabulary: enough to turn any prompt into ids, and no download."""

from __future__ import annotations

import string

from transformers.convert_slow_tokenizer import bytes_to_unicode

# Qwen's chat markup, reduced to what the pipelines' templates use.
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def t5_tokenizer(model_max_length: int = 512):
    """A T5 (Unigram) tokenizer over single characters; pad 0, eos 1, unk 2 as in T5's vocabulary."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def t5_encoder(tokenizer, d_model: int = 32, num_layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=8, num_heads=d_model // 8,
                                   num_layers=num_layers, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))


def qwen_tokenizer(model_max_length: int = 1024):
    """A byte-level BPE tokenizer with no merges (every byte one token), Qwen's special tokens and a
    chat template, as `Qwen2TokenizerFast`."""
    from transformers import Qwen2TokenizerFast

    vocab = {s: i for i, s in enumerate(bytes_to_unicode().values())}
    vocab.update({tok: len(vocab) + i for i, tok in enumerate(QWEN_SPECIAL)})
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL[1:])})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer
