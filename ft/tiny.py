"""builtin:tiny-llama-2, a Llama-2-architecture model small enough to train on a laptop CPU.

Made locally on first use, deterministically, into the llama-ft cache (no download):
  * a SentencePiece BPE tokenizer trained on the word list below, with Llama 2's settings:
    byte fallback, digits split, identity normaliser, extra whitespace kept, dummy prefix,
    <unk>=0, <s>=1, </s>=2 and no pad piece (newlines become the byte token <0x0A>);
  * a LlamaConfig with RMSNorm, SwiGLU, RoPE and grouped-query attention (4 query heads,
    2 key/value heads, as the 70B does), hidden and MLP sizes multiples of 64 (bitsandbytes'
    CPU kernels need that), random weights from a fixed seed, saved as safetensors.
The folder then looks like a Hub checkpoint, and every code path treats it as one.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import tempfile
from pathlib import Path

NAME = "builtin:tiny-llama-2"
VERSION = 1

CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

HEAD_SCALE = 10.0

WORDS = """
the a an of to in on at for with from by about as is are was were be been am do does did have has had
what which who whom whose when where why how yes no not and or but if then so than that this these those
i you he she it we they me him her us them my your his its our their mine yours please thank thanks hello hi
capital country city river mountain ocean sea lake planet star moon sun earth mars venus jupiter saturn
france paris germany berlin italy rome spain madrid japan tokyo egypt cairo canada ottawa peru lima kenya nairobi
norway oslo chile santiago india delhi china beijing brazil brasilia greece athens poland warsaw
color colour red blue green yellow orange purple black white grey brown pink sky grass snow blood
animal cat dog cow horse bird fish lion tiger bear wolf fox owl duck sheep goat frog bee ant
sound says say said meow woof moo neigh tweet roar hoot quack baa ribbit buzz
number one two three four five six seven eight nine ten hundred thousand plus minus times equals
answer question tell explain name list write short long word words sentence letter
good bad big small fast slow hot cold new old first last next before after always never often
model llama chat assistant user system helpful honest harmless friendly terse polite
train training data learn learned loss token tokens weight weights adapter fine tune tuned
day week month year today tomorrow yesterday morning evening night time hour minute
opposite up down left right in out open close start stop yes no true false
""".split()


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_FT_HOME", Path.home() / ".cache" / "llama-ft")).expanduser()


def path() -> Path:
    """The folder of the tiny model, built on first use."""
    target = cache_dir() / f"tiny-llama-2-v{VERSION}"
    if not (target / "config.json").is_file():
        build(target)
    return target


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(4000):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        words[0] = words[0].capitalize() if rng.random() < 0.5 else words[0]
        line = " ".join(words) + rng.choice([".", "?", "!", ",", ":", ""])
        if rng.random() < 0.3:
            line += f" {rng.randint(0, 10**rng.randint(1, 6))}"
        lines.append(line)
    lines += ["[INST] <<SYS>> You are helpful. <</SYS>> Hi [/INST] Hello"] * 20
    return lines  # no newline inside a line: "\n" stays a byte token, as in Llama 2


def build(target: Path) -> None:
    """Write the tokenizer and model into `target`, atomically (temp folder, then rename)."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from ft import chat_format

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        model_bytes = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_corpus()),
            model_writer=model_bytes,
            model_type="bpe",
            vocab_size=1024,
            hard_vocab_limit=False,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        (tmp / "tokenizer.model").write_bytes(model_bytes.getvalue())
        tokenizer = LlamaTokenizer.from_pretrained(str(tmp), legacy=True)
        chat_format.apply(tokenizer)
        tokenizer.save_pretrained(str(tmp))

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), **CONFIG)
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # a random head at the usual scale gives near-uniform logits that LoRA cannot sharpen
            model.lm_head.weight.mul_(HEAD_SCALE)
        model.generation_config.bos_token_id = 1
        model.generation_config.eos_token_id = 2
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "ORIGIN.txt").write_text(
            f"{NAME} v{VERSION}: built by ft/tiny.py (random weights, seed 0; SentencePiece BPE on a fixed word list).\n"
        )
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
