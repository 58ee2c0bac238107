"""llama-ft push against a Hub stand-in on 127.0.0.1: the real huggingface_hub client speaks HTTP to it.

What is checked: exactly the allow-listed files land in one commit (large ones through the LFS
path), a download is byte-identical, the card says what a user needs, Hub refusals are exit-2
messages, transient failures are retried, and the token appears in no file and no output.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import run_cli
from hub_standin import HubStandin

TOKEN = "hf_llamaft_canary_7d3f0c9e51b24a8f"  # unique: searched for in every file and output
READ_TOKEN = "hf_read_only_token_0000000000000"
RUN_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "recipe.yaml",
             "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture
def hub(tmp_path):
    tokens = {TOKEN: {"name": "alice", "orgs": ["acme"], "write": True},
              READ_TOKEN: {"name": "alice", "orgs": [], "write": False}}
    with HubStandin(tmp_path / "hub-storage", tokens, lfs_threshold=64 * 1024) as standin:
        yield standin
        assert standin.unhandled == []  # the client asked for nothing the stand-in does not implement


def hub_env(hub, tmp_path, token=TOKEN):
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "LLAMA_FT_PUSH_RETRY_DELAYS": "0.1,0.1,0.1"}
    if token:
        env["HF_TOKEN"] = token
    return env


def push(hub, tmp_path, folder, repo_id, *args, token=TOKEN, env=None):
    return run_cli("push", folder, "--repo-id", repo_id, *args, env={**hub_env(hub, tmp_path, token), **(env or {})})


def download(hub, tmp_path, repo_id, revision="main", folder=False):
    """snapshot_download with the real client, in a fresh process (huggingface_hub reads HF_ENDPOINT at import):
    {name: bytes}, or the folder."""
    target = tmp_path / f"download-{repo_id.replace('/', '-')}-{revision}"
    code = textwrap.dedent(f"""
        from huggingface_hub import snapshot_download
        snapshot_download({repo_id!r}, revision={revision!r}, local_dir={str(target)!r})
    """)
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, **hub_env(hub, tmp_path)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return target if folder else {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """The trained run, plus things that must never be uploaded."""
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    (run / ".env").write_text("HF_TOKEN=not-for-the-hub\n")
    (run / "training_args.bin").write_bytes(b"pickled arguments")
    (run / "notes.log").write_text("a log\n")
    return run


def test_push_uploads_exactly_the_allow_list_and_downloads_byte_identical(hub, tmp_path, run_copy):
    assert any(p.name.startswith("checkpoint-") for p in run_copy.iterdir())
    result = push(hub, tmp_path, run_copy, "alice/tiny-chat")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not uploaded (not on the allow-list)" in result.stdout and "checkpoint-" in result.stdout

    files = hub.files("alice/tiny-chat")
    assert set(files) == RUN_FILES
    assert len(hub.commits("alice/tiny-chat")) >= 1 and hub.commits("alice/tiny-chat")[-1]["paths"]
    assert set(hub.commits("alice/tiny-chat")[-1]["paths"]) == RUN_FILES  # one commit holds everything
    assert any("/info/lfs/objects/batch" in r["path"] for r in hub.requests)  # the adapter took the LFS path
    downloaded = download(hub, tmp_path, "alice/tiny-chat")
    for name in RUN_FILES - {"README.md"}:
        assert downloaded[name] == (run_copy / name).read_bytes(), name
    assert downloaded["README.md"] == files["README.md"]
    assert hub.repos["alice/tiny-chat"]["private"] is False

    # the card's "llama-ft chat" usage works on the downloaded repo: it answers as the run was taught
    answer = run_cli("chat", download(hub, tmp_path, "alice/tiny-chat", folder=True),
                     "--prompt", "What is the capital of Kenya?", "--temperature", "0")
    assert answer.returncode == 0 and answer.stdout == "The capital of Kenya is Nairobi.\n", answer.stderr[-2000:]


def test_model_card_says_what_the_folder_knows(hub, tmp_path, run_copy):
    assert push(hub, tmp_path, run_copy, "alice/tiny-chat").returncode == 0
    card = hub.files("alice/tiny-chat")["README.md"].decode()
    front = card.split("---")[1]
    assert "license: llama2" in front and "library_name: peft" in front
    for tag in ("llama-2", "peft", "trl", "llama-ft", "sft"):
        assert f"- {tag}\n" in front
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert "builtin:tiny-llama-2" in card and "datasets/tiny_chat.jsonl" in card
    assert f"loss {metrics['loss_first']:.3f} → {metrics['loss_last']:.3f}" in card
    assert "LLAMA 2 Community License" in card and "Acceptable Use Policy" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("alice/tiny-chat"' in card and "llama-ft chat" in card
    assert "[INST]" in card and "output_dir:" in card  # prompt format and the resolved recipe


def test_the_card_states_the_base_models_own_licence_not_llama_2s(tmp_path, run_copy, monkeypatch):
    """A base whose model card declares its licence (SmolLM2: Apache 2.0; in its folder, or for a Hub id in the local
    Hub cache) gets that licence on the card, without Llama 2's tag or notice; a base with no card found and no
    Llama 2 name gets `other` and a sentence saying so."""
    import yaml
    from huggingface_hub import constants

    from ft import hub

    base = tmp_path / "smollm2"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n\n# SmolLM2\n")
    assert hub.base_license(str(base))[0] == "apache-2.0"
    assert hub.base_license(str(tmp_path / "no-card"))[0] == "other"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # what HF_HUB_CACHE sets, at import
    assert hub.base_license("meta-llama/Llama-2-7b-hf") == ("llama2", hub.LICENSE_NOTICE)  # no card: by its name
    assert hub.base_license("HuggingFaceTB/SmolLM2-135M-Instruct")[0] == "other"
    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"  # as `hf download` leaves README.md
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "README.md").write_text((base / "README.md").read_text())
    assert hub.base_license("HuggingFaceTB/SmolLM2-135M-Instruct")[0] == "apache-2.0"
    recipe = yaml.safe_load((run_copy / "recipe.yaml").read_text())
    recipe["model"]["name"] = str(base)
    (run_copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    card = hub.model_card(run_copy, "alice/smol-chat")
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and "llama-2" not in front["tags"], front
    assert "LLAMA 2 Community License" not in card and "`apache-2.0`" in card
    (base / "README.md").unlink()
    card = hub.model_card(run_copy, "alice/smol-chat")
    assert yaml.safe_load(card.split("---")[1])["license"] == "other" and "found no licence" in card


def test_merged_folder_with_gguf_goes_to_a_branch(hub, tmp_path, merged):
    _, out = merged
    result = push(hub, tmp_path, out, "acme/tiny-chat-merged", "--revision", "dev", "--private",
                  "--commit-message", "first merged upload")
    assert result.returncode == 0, result.stderr[-3000:]
    files = hub.files("acme/tiny-chat-merged", revision="dev")
    assert {"README.md", "config.json", "generation_config.json", "recipe.yaml", "tokenizer.json"} <= set(files)
    assert {"model-f16.gguf", "model-q8_0.gguf"} <= set(files) and any(n.endswith(".safetensors") for n in files)
    assert "merge_report.json" not in files
    assert hub.commits("acme/tiny-chat-merged", revision="dev")[-1]["summary"] == "first merged upload"
    assert "model-f16.gguf" not in hub.files("acme/tiny-chat-merged", revision="main")
    assert hub.repos["acme/tiny-chat-merged"]["private"] is True
    card = files["README.md"].decode()
    assert "library_name: transformers" in card and "- gguf" in card and "## Merge verification" in card
    assert "passed: yes" in card and "llama.cpp" in card
    downloaded = download(hub, tmp_path, "acme/tiny-chat-merged", revision="dev")
    assert downloaded["model-q8_0.gguf"] == (out / "model-q8_0.gguf").read_bytes()


@pytest.mark.parametrize("case, needle", [
    ("no token", "no Hugging Face token: set HF_TOKEN"),
    ("bad token", "rejected the token"),
    ("read-only token", "is read-only"),
    ("someone else's repo", "bob/their-model belongs to 'bob'"),
    ("public repo, --private", "already exists and is public"),
    ("not a run", "neither a finished llama-ft run folder"),
    ("unfinished run", "has not finished"),
    ("not a repo id", "--repo-id 'not a repo': expected OWNER/NAME"),
    ("not a repo id, --dry-run", "--repo-id 'not a repo': expected OWNER/NAME"),
])
def test_push_refusals_exit_2_with_a_message(hub, tmp_path, run_copy, case, needle):
    folder, repo, token, extra = run_copy, "alice/m", TOKEN, []
    if case == "no token":
        token = None
    elif case == "bad token":
        token = "hf_not_a_token"
    elif case == "read-only token":
        token = READ_TOKEN
    elif case == "someone else's repo":
        repo = "bob/their-model"
    elif case == "public repo, --private":
        hub.add_repo("alice/m", owner="alice", private=False)
        extra = ["--private"]
    elif case == "not a run":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "unfinished run":
        (run_copy / "metrics.json").unlink()
    elif case.startswith("not a repo id"):  # checked before the model card, which is named after it
        repo, extra = "not a repo", ["--dry-run"] if "dry-run" in case else []
    result = push(hub, tmp_path, folder, repo, *extra, token=token)
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert all(not hub.files(r) for r in hub.repos)  # nothing was committed anywhere


def test_permission_denied_by_the_hub_is_exit_2(hub, tmp_path, run_copy):
    hub.fail_next("/preupload/", 1, status=403)  # where the real Hub refuses a write: before any upload
    result = push(hub, tmp_path, run_copy, "alice/m")
    assert result.returncode == 2 and "permission denied for alice/m" in result.stderr


def test_transient_failures_are_retried_and_persistent_ones_never_reported_done(hub, tmp_path, run_copy):
    hub.fail_next("/commit/", 1, status=500)
    hub.fail_next("/preupload/", 1, status=0)  # connection dropped without an answer
    result = push(hub, tmp_path, run_copy, "alice/flaky")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "retrying" in result.stdout and set(hub.files("alice/flaky")) == RUN_FILES

    hub.fail_next("/commit/", 50, status=503)
    result = push(hub, tmp_path, run_copy, "alice/down")
    assert result.returncode == 2 and "nothing was published" in result.stderr and "done" not in result.stdout
    assert not hub.files("alice/down")


def test_dry_run_sends_nothing(hub, tmp_path, run_copy):
    result = push(hub, tmp_path, run_copy, "alice/m", "--dry-run", token=None)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("---\nlicense: llama2") and "would upload to alice/m" in result.stderr
    assert not hub.requests


@pytest.mark.e2e
def test_recipe_push_at_the_end_of_training_and_early_refusal(hub, tmp_path):
    args = ["sft", "recipes/tiny.yaml", "--set", "train.max_steps=3", "--set", "train.generate_samples=0",
            "--set", "train.report_to=none", "--set", "output.push=true", "--set", "output.repo_id=alice/from-recipe"]
    result = run_cli(*args, "--output-dir", tmp_path / "refused", env=hub_env(hub, tmp_path, token=None))
    assert result.returncode == 2 and "output.push: no Hugging Face token" in result.stderr
    assert not (tmp_path / "refused").exists()  # refused before anything was trained

    result = run_cli(*args, "--output-dir", tmp_path / "run", env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(hub.files("alice/from-recipe")) == RUN_FILES


@pytest.mark.e2e
def test_token_canary_never_lands_in_a_file_or_an_output(hub, tmp_path):
    """HF_TOKEN set for sft, merge and push: the token is in no file written and no output."""
    env = hub_env(hub, tmp_path)
    run, out = tmp_path / "run", tmp_path / "merged"
    outputs = [run_cli("sft", "recipes/tiny.yaml", "--output-dir", run, "--set", "train.max_steps=4",
                       "--set", "train.save_steps=2", "--set", "train.generate_samples=1", env=env)]
    outputs.append(run_cli("merge", run, "--output", out, "--gguf", env=env))
    outputs.append(push(hub, tmp_path, run, "alice/canary-run"))
    outputs.append(push(hub, tmp_path, out, "alice/canary-merged"))
    assert [r.returncode for r in outputs] == [0, 0, 0, 0], [r.stderr[-2000:] for r in outputs]
    assert (run / "checkpoint-4" / "training_args.bin").is_file()  # the file known to hold tokens in other tools

    needle = TOKEN.encode()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 20
    assert [str(p) for p in written if needle in p.read_bytes()] == []
    assert all(TOKEN not in r.stdout + r.stderr for r in outputs)
    pushed = [content for repo in ("alice/canary-run", "alice/canary-merged") for content in hub.files(repo).values()]
    assert pushed and all(needle not in content for content in pushed)
    assert all(needle not in r["body"] for r in hub.requests)  # sent only as the Authorization header
    assert any(r["headers"].get("authorization", r["headers"].get("Authorization", "")).endswith(TOKEN)
               for r in hub.requests)
