"""GGUF files llama.cpp can read, and `llama-ft chat` in one-shot and interactive use."""

import json

import numpy as np
import pytest
import torch

from conftest import cli


@pytest.fixture(scope="module")
def merged(trained_run, tmp_path_factory):
    run, _ = trained_run
    out = tmp_path_factory.mktemp("merge-gguf") / "merged"
    result = cli("merge", run, "--output", out, "--gguf", "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, out


def fields(reader):
    return {name: field for name, field in reader.fields.items()}


def value(field):
    return field.contents()


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_gguf_structure_metadata_and_weights(merged, qtype):
    import gguf
    from safetensors.torch import load_file

    from ft import chat_format
    from ft.export_gguf import permute

    _, out = merged
    reader = gguf.GGUFReader(str(out / f"model-{qtype}.gguf"))
    meta = fields(reader)
    config = json.loads((out / "config.json").read_text())
    assert value(meta["general.architecture"]) == "llama"
    assert value(meta["llama.block_count"]) == config["num_hidden_layers"]
    assert value(meta["llama.embedding_length"]) == config["hidden_size"]
    assert value(meta["llama.attention.head_count"]) == 4 and value(meta["llama.attention.head_count_kv"]) == 2
    assert value(meta["llama.context_length"]) == 4096
    assert value(meta["tokenizer.ggml.model"]) == "llama"
    assert len(value(meta["tokenizer.ggml.tokens"])) == config["vocab_size"]
    assert value(meta["tokenizer.ggml.tokens"])[:3] == ["<unk>", "<s>", "</s>"]
    assert (value(meta["tokenizer.ggml.bos_token_id"]), value(meta["tokenizer.ggml.eos_token_id"]),
            value(meta["tokenizer.ggml.unknown_token_id"]), value(meta["tokenizer.ggml.padding_token_id"])) == (1, 2, 0, 0)
    assert value(meta["tokenizer.chat_template"]) == chat_format.TEMPLATE

    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 1 + 9 * config["num_hidden_layers"]
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight", "blk.3.ffn_down.weight"} <= set(tensors)
    weights = load_file(str(out / "model.safetensors"))
    q = tensors["blk.1.attn_q.weight"]
    assert list(reversed(q.shape.tolist())) == list(weights["model.layers.1.self_attn.q_proj.weight"].shape)
    expected = permute(weights["model.layers.1.self_attn.q_proj.weight"], 4).numpy()
    expected_k = permute(weights["model.layers.1.self_attn.k_proj.weight"], 2).numpy()
    got = gguf.quants.dequantize(q.data, q.tensor_type).reshape(expected.shape)
    got_k = gguf.quants.dequantize(tensors["blk.1.attn_k.weight"].data, tensors["blk.1.attn_k.weight"].tensor_type).reshape(expected_k.shape)
    tolerance = 1e-3 if qtype == "f16" else 2e-2 * np.abs(expected).max()
    assert np.abs(got - expected).max() < tolerance and np.abs(got_k - expected_k).max() < tolerance
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_gguf_greedy_tokens_match_transformers(merged):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = merged
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Japan?"}], return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    llm = llama_cpp.Llama(model_path=str(out / "model-f16.gguf"), n_ctx=256, verbose=False)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Japan?"}], tokenize=False)
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids  # llama.cpp's tokenizer agrees
    assert greedy_tokens(llm, ids, len(expected)) == expected


def test_one_shot_is_deterministic_and_prints_only_the_answer(trained_run):
    run, _ = trained_run
    first = cli("chat", run, "--prompt", "What does a duck say?", "--temperature", "0")
    second = cli("chat", run, "--prompt", "What does a duck say?", "--temperature", "0")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == second.stdout == "A duck says quack.\n"


def test_prompt_can_be_piped_on_stdin(trained_run):
    import subprocess
    import sys

    from conftest import ROOT

    run, _ = trained_run
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "chat", str(run), "--temperature", "0"],
                            input="What is the capital of Greece?\n", capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout == "The capital of Greece is Athens.\n"


def test_interactive_session_through_stdin(trained_run, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    run, _ = trained_run
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    script = "\n".join([
        "What is the opposite of up?",
        "And the opposite of that?",  # answerable only from the history
        f"/save {first}",
        "/system You are a terse assistant.",
        "What color is the snow?",
        "/reset",
        f"/save {second}",
        "/exit",
        "What is never asked?",
    ]) + "\n"
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "chat", str(run), "--interactive", "--temperature", "0"],
                            input=script, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    assert answers == ["The opposite of up is down.", "The opposite of down is up.", "The snow is white."]
    saved = json.loads(first.read_text())
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]
    assert saved[3]["content"] == "The opposite of down is up."
    assert json.loads(second.read_text()) == [{"role": "system", "content": "You are a terse assistant."}]
    assert "history cleared" in result.stderr and "tokens/s" in result.stderr


def test_history_is_trimmed_from_the_oldest_turn_and_keeps_the_system_prompt(tokenizer):
    from ft.chat import Session

    class Config:
        max_position_embeddings = 4096

    class FakeModel:  # only the config is read by prompt_ids
        config = Config()

    session = Session(FakeModel(), tokenizer, system="Be brief.", max_new_tokens=10, temperature=0, top_p=1)
    for i in range(6):
        session.turns += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i}"}]
    full = len(session.prompt_ids("last question")[0])
    session.context = full - 5  # a little too small for the whole history
    ids = session.prompt_ids("last question")[0].tolist()
    text = tokenizer.decode(ids)
    assert len(ids) + 10 <= session.context
    assert "question 0" not in text and "question 5" in text and "Be brief." in text
    assert len(session.turns) < 12 and session.turns[0]["content"].startswith("question 1")


def test_chat_on_a_folder_that_is_neither_run_nor_model(tmp_path):
    result = cli("chat", tmp_path, "--prompt", "hi")
    assert result.returncode == 2 and "neither an llama-ft run folder" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_ctrl_c_stops_the_answer_not_the_session(tiny_dir, tmp_path):
    """The untrained tiny model rambles (3000 tokens, many seconds): Ctrl-C (SIGINT) cuts its answer, the answer is
    marked [stopped] and kept in the dialog, and the session goes on. The chat starts with SIGINT ignored, as a
    program started in the background by a shell without job control (`make test &`, CI) inherits it: the old
    chat lost the interrupt there and ran the answer to its end (ending in a plain newline)."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from conftest import ROOT

    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "chat", "builtin:tiny-llama-2", "--interactive",
                             "--temperature", "0", "--max-new-tokens", "3000"], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    out = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    proc.stdin.write("Tell me everything.\n")
    proc.stdin.flush()
    deadline = time.time() + 120
    while not out and time.time() < deadline:  # the first piece of the answer has arrived: it is streaming
        time.sleep(0.05)
    assert out, "no streamed output"
    os.kill(proc.pid, signal.SIGINT)
    saved = tmp_path / "after.json"
    proc.stdin.write(f"/save {saved}\n/exit\n")  # read only once the stopped answer has ended
    proc.stdin.flush()
    assert proc.wait(timeout=120) == 0
    reader.join(timeout=5)
    stderr = proc.stderr.read()
    assert "".join(out).endswith(" [stopped]\n")
    tokens = int(stderr.split("(stopped after ")[1].split(" tokens")[0])
    assert 1 <= tokens < 3000  # cut by the stop, not by the token limit
    dialog = json.loads(saved.read_text())
    assert [m["role"] for m in dialog] == ["user", "assistant"] and dialog[1]["content"]  # kept as far as it got


@pytest.fixture(scope="module")
def padded(tiny_dir, tmp_path_factory):
    """The tiny model with an added <pad> token (tokenizer.json's added_tokens, id 1024) and its embeddings padded
    to a multiple of 64 (1088 rows for 1025 tokens): a vocabulary as many real checkpoints have."""
    import shutil

    from transformers import AutoModelForCausalLM

    from ft import models, tiny

    out = tmp_path_factory.mktemp("padded") / "model"
    tokenizer = models.load_tokenizer(tiny.NAME)  # Meta's token ids (legacy=True, recorded when saved)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copy(tiny_dir / "tokenizer.model", out / "tokenizer.model")  # the SentencePiece model, as merge copies it
    return out


def test_padded_vocabulary_exports_with_padding_tokens_as_llama_cpp_does(padded, tmp_path):
    import gguf

    from ft import export_gguf

    config = json.loads((padded / "config.json").read_text())
    assert config["vocab_size"] == 1088 and len(json.loads((padded / "tokenizer.json").read_text())["model"]["vocab"]) == 1024
    export_gguf.export(padded, tmp_path / "model-f16.gguf", "f16", log=lambda m: None)
    meta = fields(gguf.GGUFReader(str(tmp_path / "model-f16.gguf")))
    tokens, types = value(meta["tokenizer.ggml.tokens"]), value(meta["tokenizer.ggml.token_type"])
    assert len(tokens) == len(types) == 1088 and value(meta["llama.vocab_size"]) == 1088
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL,
                                                                     gguf.TokenType.CONTROL]
    assert tokens[1024] == "<pad>" and types[1024] == gguf.TokenType.CONTROL  # the added token, carried
    assert tokens[1025:] == [f"[PAD{i}]" for i in range(1025, 1088)]  # convert_hf_to_gguf.py's names and type
    assert set(types[1025:]) == {gguf.TokenType.UNUSED}
    assert value(meta["tokenizer.ggml.padding_token_id"]) == 1024 and value(meta["tokenizer.ggml.eos_token_id"]) == 2
    embedding = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "model-f16.gguf")).tensors}["token_embd.weight"]
    assert list(embedding.shape) == [128, 1088]


def test_padded_vocabulary_answers_in_llama_cpp_as_in_transformers(padded, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft import export_gguf

    export_gguf.export(padded, tmp_path / "model-f16.gguf", "f16", log=lambda m: None)
    tokenizer = AutoTokenizer.from_pretrained(padded)
    messages = [{"role": "user", "content": "What is the capital of Japan?"}]
    ids = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(padded, dtype=torch.float32)
    expected = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model-f16.gguf"), n_ctx=256, verbose=False)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids
    assert llm.tokenize(b"<pad>", add_bos=False, special=True) == [1024]  # the added token is one token there too
    assert greedy_tokens(llm, ids, len(expected)) == expected


def greedy_tokens(llm, ids: list[int], most: int) -> list[int]:
    """llama.cpp's greedy continuation of `ids`, up to </s> or `most` tokens."""
    got = []
    for token in llm.generate(ids, top_k=1, temp=0.0):
        got.append(token)
        if token == llm.token_eos() or len(got) == most:
            break
    return got
