"""Hugging Face Hub repo ids in `surgeon.from_pretrained`, `surgeon.load` and the command line,
without network: the repos sit in a Hub cache built in a temporary folder, in huggingface_hub's
layout (``models--org--name/{refs,snapshots,blobs}``)."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from zoo import randomize, tiny_llama

import surgeon
from surgeon.cli import main

pytest.importorskip("huggingface_hub")

MAIN = "1" * 40
V1 = "2" * 40
FP32 = surgeon.NF4(compute_dtype="float32")
SPEC = "method: lora\nrank: 4\nalpha: 8\ntargets: [q_proj, v_proj]\n"
PICKLES = ["pytorch_model.bin", "adapter_model.bin", "model.pt", "training_args.bin"]


def cache_repo(cache: Path, repo: str, commit: str, files: dict[str, bytes], *refs: str) -> None:
    """One commit of a model repo as huggingface_hub caches it: content-named blobs, snapshot
    links to them, and refs (branches, tags) naming the commit."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Local folders: two versions of a tiny Llama and a LoRA adapter for it."""
    root = tmp_path_factory.mktemp("saved")
    for seed, name in [(0, "main"), (1, "v1")]:
        torch.manual_seed(seed)
        tiny_llama().save_pretrained(root / name)
    torch.manual_seed(0)
    cm = surgeon.compile(tiny_llama(), surgeon.LoRA(rank=4, targets=["q_proj", "v_proj"]))
    randomize(cm)
    cm.save_adapters(root / "adapter")
    return root


@pytest.fixture(scope="module")
def cache(saved, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub-cache")
    cache_repo(cache, "org/tiny-llama", MAIN, folder_files(saved / "main"), "main")
    cache_repo(cache, "org/tiny-llama", V1, folder_files(saved / "v1"), "v1")
    cache_repo(cache, "org/adapter", MAIN, folder_files(saved / "adapter"), "main")
    config = (saved / "main" / "config.json").read_bytes()
    cache_repo(
        cache, "org/pickled", MAIN, {"config.json": config, "pytorch_model.bin": b"x"}, "main"
    )
    weights = (saved / "main" / "model.safetensors").read_bytes()
    cache_repo(cache, "org/no-config", MAIN, {"model.safetensors": weights}, "main")
    return cache


@pytest.fixture
def offline_hub(cache, monkeypatch):
    """The cache, named by the environment after huggingface_hub was imported (as a notebook
    does), in offline mode; every snapshot_download call's patterns are recorded."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    patterns: list[list[str]] = []
    download = huggingface_hub.snapshot_download

    def recording(*args, **kwargs):
        patterns.append(kwargs["allow_patterns"])
        return download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    return patterns


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state and, for a compiled one, its adapters'."""
    found = dict(model.state_dict())
    if isinstance(model, surgeon.CompiledModel):
        found.update({f"adapters.{k}": v for k, v in model.store.state_dict().items()})
    return found


def assert_same_model(got: torch.nn.Module, expected: torch.nn.Module) -> None:
    """Same config (where it was read from aside), tensors and adapters: so the same outputs,
    without paying for a forward of each."""
    ours, theirs = tensors(got), tensors(expected)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    config, expected_config = got.config.to_dict(), expected.config.to_dict()
    config.pop("_name_or_path"), expected_config.pop("_name_or_path")
    assert config == expected_config
    assert getattr(got, "adapters", None) == getattr(expected, "adapters", None)


def requested(patterns: list[list[str]], name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for call in patterns for p in call)


def test_from_pretrained_takes_a_hub_id_and_its_revisions(offline_hub, saved):
    torch.manual_seed(0)
    expected = surgeon.from_pretrained(saved / "main", surgeon.QLoRA(quant=FP32))
    torch.manual_seed(0)
    assert_same_model(
        surgeon.from_pretrained("org/tiny-llama", surgeon.QLoRA(quant=FP32)), expected
    )
    v1 = surgeon.from_pretrained(saved / "v1")
    for revision in ["v1", V1]:
        assert_same_model(surgeon.from_pretrained("org/tiny-llama", revision=revision), v1)
    assert requested(offline_hub, "config.json")
    assert requested(offline_hub, "model-00001-of-00002.safetensors")
    assert not any(requested(offline_hub, name) for name in PICKLES)


def test_load_takes_a_hub_adapter(offline_hub, saved):
    def base():
        torch.manual_seed(0)
        return tiny_llama()

    expected = surgeon.load(base(), saved / "adapter")
    cm = surgeon.load(base(), "org/adapter", revision="main")
    assert_same_model(cm, expected)
    cm.load_adapters("org/adapter", "again")  # what CompiledModel reads takes ids too
    assert cm.adapters == ["default", "again"]
    assert offline_hub[0] == ["adapter_config.json", "adapter_model.safetensors"]


def test_the_command_line_takes_hub_ids(offline_hub, tmp_path, capsys):
    (tmp_path / "lora.yaml").write_text(SPEC)
    argv = ["compile", "org/tiny-llama", tmp_path / "lora.yaml", "--revision", "v1"]
    assert main([str(a) for a in [*argv, "--out", tmp_path / "adapter"]]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["inspect", "org/tiny-llama", "--adapter", "org/adapter"]) == 0
    assert "model.layers.0.self_attn.q_proj" in capsys.readouterr().out
    assert requested(offline_hub, "tokenizer.json") and requested(offline_hub, "model.safetensors")
    assert not any(requested(offline_hub, name) for name in PICKLES)


def test_an_id_missing_from_the_cache_offline_is_named_with_the_fix(offline_hub, capsys):
    for load in [
        lambda: surgeon.from_pretrained("org/absent"),
        lambda: surgeon.load(tiny_llama(), "org/absent"),
    ]:
        with pytest.raises(
            FileNotFoundError, match=r"'org/absent'.*HF_HUB_OFFLINE=0.*local folder"
        ):
            load()
    with pytest.raises(FileNotFoundError, match=r"'org/tiny-llama' \(revision v2\) is not a local"):
        surgeon.from_pretrained("org/tiny-llama", revision="v2")  # offline, no revision is known
    assert main(["compile", "org/absent", "spec.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'org/absent'" in err and "HF_HUB_OFFLINE" in err


def test_an_unreachable_hub_fails_fast_naming_the_id(cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # nothing listens on the discard port: the Hub is unreachable here, network or not
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"'org/absent'.*could not be reached"):
        surgeon.from_pretrained("org/absent")
    assert time.perf_counter() - start < 30
    # a cached copy is used when the Hub cannot be reached
    assert isinstance(surgeon.from_pretrained("org/tiny-llama"), torch.nn.Module)


def test_paths_ids_and_repos_without_safetensors(offline_hub, saved, tmp_path, monkeypatch):
    for not_an_id in ["a/b/c", "./org/name", "/org/name", "org/na--me"]:
        with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
            surgeon.from_pretrained(not_an_id)
    with pytest.raises(surgeon.SpecError, match="revision='v1' applies to Hub repo ids"):
        surgeon.from_pretrained(saved / "main", revision="v1")
    with pytest.raises(surgeon.SpecError, match=r"'org/pickled'.*no safetensors.*never unpickles"):
        surgeon.from_pretrained("org/pickled")
    with pytest.raises(surgeon.SpecError, match=r"'org/no-config'.*has no config\.json"):
        surgeon.from_pretrained("org/no-config")
    # an existing folder wins over the repo of the same name
    local = tmp_path / "org" / "tiny-llama"
    shutil.copytree(saved / "v1", local)
    monkeypatch.chdir(tmp_path)
    assert_same_model(surgeon.from_pretrained("org/tiny-llama"), surgeon.from_pretrained(local))
