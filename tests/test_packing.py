"""Packed examples never attend to each other: packed and unpacked logits agree.

Uses TRL's best-fit-decreasing packing and llama-ft's PackedCollator, as the SFT stage does,
with the SDPA attention the stage loads on a T4.
"""

import torch
from transformers import AutoModelForCausalLM
from trl.data_utils import pack_dataset

from ft import data


def dialogs():
    texts = [("What is the capital of France?", "The capital of France is Paris."),
             ("Hi", "Hello."),
             ("What does a cow say? Tell me in a long sentence please.", "A cow says moo, and it says it often."),
             ("One two three", "Four five six seven eight nine ten.")]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "origin": f"row {i}"}
            for i, (q, a) in enumerate(texts)]


def test_without_position_ids_packed_examples_would_leak(tiny_dir, tokenizer):
    """The control: the same pack fed as one plain sequence gives different logits after the first example."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    first, second = data.tokenize(dialogs()[:2], tokenizer, 4096, data.Report())
    ids = torch.tensor([first["input_ids"] + second["input_ids"]])
    with torch.no_grad():
        joined = model(input_ids=ids).logits[0, len(first["input_ids"]) :]
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
    assert (joined - alone).abs().max() > 1e-2


def test_packed_collator_keeps_rows_and_masks_padding(tiny_dir, tokenizer):
    """llama-ft's collator: one row per pack, positions restart per example, pad is a separate block."""
    import datasets

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    examples = data.tokenize(dialogs(), tokenizer, 4096, data.Report())
    packed = pack_dataset(datasets.Dataset.from_list(examples), seq_length=60, strategy="bfd")
    assert len(packed) >= 2
    batch = data.PackedCollator(tokenizer.pad_token_id)([packed[i] for i in range(len(packed))])
    assert batch["input_ids"].shape[0] == len(packed) and "attention_mask" not in batch
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "padding_tokens")}, use_cache=False).logits
    # the padding is counted by the collator (the SFT stage's padding fraction), not found by comparing ids
    assert int(batch["padding_tokens"]) == batch["input_ids"].numel() - sum(len(packed[i]["input_ids"]) for i in range(len(packed)))
    by_ids = {tuple(e["input_ids"]): e for e in examples}
    checked = 0
    for row in range(len(packed)):
        offset = 0
        for length in packed[row]["seq_lengths"]:
            ids = batch["input_ids"][row, offset : offset + length]
            example = by_ids[tuple(ids.tolist())]
            assert batch["labels"][row, offset : offset + length].tolist() == example["labels"]
            with torch.no_grad():
                alone = model(input_ids=ids[None]).logits[0]
            torch.testing.assert_close(logits[row, offset : offset + length], alone, atol=1e-4, rtol=1e-4)
            offset += length
            checked += 1
        assert (batch["labels"][row, offset:] == -100).all() and (batch["input_ids"][row, offset:] == tokenizer.pad_token_id).all()
    assert checked == len(examples)
