"""Tiny models built from a config for tests: a BERT reward model and a Llama causal LM, saved to a folder."""
from __future__ import annotations

from pathlib import Path

from rewards.embedded import minilm_path, smollm2_tokenizer_path


def tiny_reward_model(tmp_path: Path, *, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) with one output and the MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    path = Path(tmp_path) / "tiny-reward-bert"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_causal_lm(tmp_path: Path, *, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama (hidden 32) with the real SmolLM2 tokenizer and chat template.

    The tokenizer is read from the packaged SmolLM2 GGUF once and cached (see rewards.embedded), so this works
    offline; the weights are random, so generations are gibberish but shapes and templates are the real ones.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path = Path(tmp_path) / "tiny-causal-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# A chat template as Gemma's and Mistral's are: it refuses a conversation it does not support by raising.
USER_ASSISTANT_ONLY_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def with_strict_chat_template(folder: Path) -> Path:
    """The model folder, its tokenizer given USER_ASSISTANT_ONLY_TEMPLATE."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = USER_ASSISTANT_ONLY_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder
