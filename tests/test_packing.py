"""Packed examples never attend to each other: packed and unpacked logits agree.

Uses TRL's own packing (best-fit decreasing) and padding-free collator, exactly as the SFT
stage does, and the SDPA attention the stage loads on a T4.
"""

import torch
from transformers import AutoModelForCausalLM
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ft import data


def dialogs():
    texts = [("What is the capital of France?", "The capital of France is Paris."),
             ("Hi", "Hello."),
             ("What does a cow say? Tell me in a long sentence please.", "A cow says moo, and it says it often."),
             ("One two three", "Four five six seven eight nine ten.")]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "origin": f"row {i}"}
            for i, (q, a) in enumerate(texts)]


def test_packed_logits_equal_unpacked(tiny_dir, tokenizer):
    import datasets

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    examples = data.tokenize(dialogs(), tokenizer, 4096, data.Report())
    packed = pack_dataset(datasets.Dataset.from_list(examples), seq_length=128, strategy="bfd")
    assert len(packed) == 1 and len(packed[0]["seq_lengths"]) == len(examples)  # all four in one pack

    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)([packed[0]])
    assert "attention_mask" not in batch and batch["position_ids"][0].tolist().count(0) == len(examples)
    with torch.no_grad():  # use_cache=False as TRL's compute_loss passes it: a cache disables packed-mask detection
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]

    offset = 0
    by_ids = {tuple(e["input_ids"]): e for e in examples}
    for length in packed[0]["seq_lengths"]:
        ids = batch["input_ids"][0, offset : offset + length]
        assert tuple(ids.tolist()) in by_ids
        with torch.no_grad():
            alone = model(input_ids=ids[None]).logits[0]
        torch.testing.assert_close(packed_logits[offset : offset + length], alone, atol=1e-4, rtol=1e-4)
        offset += length


def test_without_position_ids_packed_examples_would_leak(tiny_dir, tokenizer):
    """The control: the same pack fed as one plain sequence gives different logits after the first example."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    first, second = data.tokenize(dialogs()[:2], tokenizer, 4096, data.Report())
    ids = torch.tensor([first["input_ids"] + second["input_ids"]])
    with torch.no_grad():
        joined = model(input_ids=ids).logits[0, len(first["input_ids"]) :]
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
    assert (joined - alone).abs().max() > 1e-2
