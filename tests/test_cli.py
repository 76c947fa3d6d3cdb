"""The `surgeon` command, run in-process on a tiny saved Llama (and once as a console script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from zoo import tiny_llama

from surgeon.cli import main

SPEC = "method: lora\nrank: 4\nalpha: 8\ntargets: [q_proj, v_proj]\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text(SPEC)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "command", ["compile", "inspect", "train", "merge", "export", "estimate-memory"]
)
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert "usage: surgeon " + command in capsys.readouterr().out


def test_compile_prints_the_table_and_saves_the_fresh_adapter(
    capsys, model_dir, spec_file, tmp_path
):
    code, out, _ = run(capsys, "compile", model_dir, spec_file, "--out", tmp_path / "adapter")
    assert code == 0
    assert "model.layers.0.self_attn.q_proj" in out and "trainable params" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_inspect_shows_breaks_marked_code_diff_and_writes_the_graph(
    capsys, model_dir, spec_file, tmp_path
):
    region = "model.layers.0.self_attn.v_proj"
    graph = tmp_path / "graph.svg"
    code, out, _ = run(
        capsys, "inspect", model_dir, "--spec", spec_file, "--breaks",
        "--code", region, "--diff", region, "--graph", graph,
    )  # fmt: skip
    assert code == 0
    assert "graph breaks:" in out and "LlamaAttention" in out
    assert "# + lora[default]" in out
    assert f"--- {region} (traced)" in out and "+    add = torch.add(base" in out
    written = graph if shutil.which("dot") else graph.with_suffix(".dot")
    assert written.is_file()
    if written.suffix == ".dot":
        assert written.read_text().startswith("digraph surgeon {")
    else:
        assert "<svg" in written.read_text()


def test_inspect_call_traces_the_specialised_regions(capsys, model_dir, spec_file):
    code, out, _ = run(
        capsys, "inspect", model_dir, "--spec", spec_file, "--call", "5", "--code", ""
    )
    assert code == 0
    assert "(1.0 per decoder layer; 1 specialised at call time)" in out
    assert "# region <root> (LlamaForCausalLM, specialised)" in out and "# + lora[default]" in out
    code, _, err = run(capsys, "inspect", model_dir, "--spec", spec_file, "--call", "0")
    assert code == 1 and "--call" in err


def test_merge_writes_a_plain_model_with_the_merged_outputs(capsys, model_dir, spec_file, tmp_path):
    from transformers import LlamaForCausalLM

    import surgeon

    adapter = tmp_path / "adapter"
    cm = surgeon.compile(LlamaForCausalLM.from_pretrained(model_dir), surgeon.load_spec(spec_file))
    with torch.no_grad():
        for p in cm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    cm.save_adapters(adapter)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        expected = cm(input_ids=ids).logits

    code, out, _ = run(capsys, "merge", model_dir, adapter, "--out", tmp_path / "merged")
    assert code == 0, out
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert not any(p.name.startswith(".merge-") for p in tmp_path.iterdir())


def test_merge_refuses_a_non_empty_output_folder(capsys, model_dir, spec_file, tmp_path):
    run(capsys, "compile", model_dir, spec_file, "--out", tmp_path / "adapter")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "merge", model_dir, tmp_path / "adapter", "--out", taken)
    assert code == 1 and "exists and is not empty" in err
    assert (taken / "keep.txt").read_text() == "mine"


def test_export_writes_a_verified_onnx_file(capsys, model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    code, out, _ = run(capsys, "export", model_dir, "--out", tmp_path / "m.onnx", "--seq-len", 5)
    assert code == 0
    assert (tmp_path / "m.onnx").is_file() and "max |onnx - torch|" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compile", "{model}", "{bad_spec}"], "LoRA.targets: 'q_prj' matches no module"),
        (["compile", "{missing}", "{spec}"], "does not exist"),
        (["inspect", "{model}", "--adapter", "{missing}"], "missing"),
        (["export", "{model}", "--out", "{tmp}/m.txt"], "should end in .onnx"),
    ],
)
def test_errors_are_one_line_and_a_non_zero_exit(
    capsys, model_dir, spec_file, tmp_path, argv, message
):
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text(SPEC.replace("q_proj", "q_prj"))
    values = {
        "model": model_dir,
        "spec": spec_file,
        "bad_spec": bad_spec,
        "missing": tmp_path / "missing",
        "tmp": tmp_path,
    }
    code, _, err = run(capsys, *(a.format(**values) for a in argv))
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"surgeon {argv[0]}: error: ")
    assert message in err


def test_console_script_reports_errors_without_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "surgeon.cli", "compile", str(tmp_path / "nope"), "spec.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "does not exist" in done.stderr


def test_train_fits_an_adapter_from_a_token_file_and_saves_it(
    capsys, model_dir, spec_file, tmp_path
):
    data = tmp_path / "data.jsonl"
    rows = [{"input_ids": [1, 5 + i, 9, 3 + i, 2]} for i in range(8)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    code, stdout, err = run(
        capsys, "train", model_dir, spec_file, data, "--out", out,
        "--max-steps", 2, "--batch-size", 4, "--gradient-accumulation-steps", 1,
        "--learning-rate", 1e-2, "--warmup-steps", 0,
    )  # fmt: skip
    assert code == 0, err
    assert "trained 2 steps" in stdout
    from transformers import LlamaForCausalLM

    import surgeon

    cm = surgeon.load(LlamaForCausalLM.from_pretrained(model_dir), out)
    b = dict(cm.store.items("default"))["model.layers.0.self_attn.q_proj"].lora_B
    assert b.abs().sum() > 0  # trained: LoRA's B starts at zero


def test_train_names_the_bad_line_of_a_data_file(capsys, model_dir, spec_file, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"input_ids": [1, 2]}\n{not json\n')
    code, _, err = run(capsys, "train", model_dir, spec_file, data, "--out", tmp_path / "run")
    assert code == 1 and f"{data}:2: not valid JSON" in err


def test_estimate_memory_prints_the_three_rows_from_a_config(capsys, model_dir, spec_file):
    code, out, err = run(
        capsys, "estimate-memory", model_dir / "config.json", spec_file, "--batch-size", 2
    )
    assert code == 0, err
    assert "LoRA" in out and "QLoRA" in out and "full" in out.lower()
