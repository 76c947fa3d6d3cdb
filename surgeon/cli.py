"""The ``surgeon`` command: compile, inspect, train, merge, export and estimate memory from a shell.

Models are local transformers folders (``config.json`` + weights, as ``save_pretrained`` writes
them) or Hugging Face Hub repo ids (``org/name``, at ``--revision``), fetched into huggingface_hub's
cache (config, safetensors and tokenizer files only; ``HF_HUB_OFFLINE=1`` uses the cache alone);
adapters likewise. Every error is one line on stderr and a non-zero exit code
(``SURGEON_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",  # transformers 5 keeps the chat template apart
)
_HUB_TOKENIZER_FILES = (*_TOKENIZER_FILES, "generation_config.json")


class CommandError(Exception):
    """A problem with the command line's arguments or files, reported as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("surgeon: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("SURGEON_DEBUG"):
            raise
        print(f"surgeon {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgeon",
        description="Graft adapters (LoRA, DoRA, IA3, ...) into a local transformers model.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text, configure, run in _COMMANDS:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        configure(sub)
        sub.set_defaults(run=run)
    return parser


# -- compile ----------------------------------------------------------------------------------


def _configure_compile(p: argparse.ArgumentParser) -> None:
    _model_argument(p)
    p.add_argument("spec", type=Path, help="spec file (.yaml, .json or .toml)")
    p.add_argument("--out", type=Path, help="save the freshly initialised adapter here")


def _run_compile(args: argparse.Namespace) -> None:
    import surgeon

    model = load_model(args.model, args.task, args.num_labels, args.revision)
    cm = surgeon.compile(model, surgeon.load_spec(args.spec))
    print(cm.inspect())
    if args.out is not None:
        cm.save_adapters(args.out)
        print(f"\nadapter saved to {args.out}")


# -- inspect ----------------------------------------------------------------------------------


def _configure_inspect(p: argparse.ArgumentParser) -> None:
    _model_argument(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--spec", type=Path, help="spec file to compile onto the model")
    source.add_argument("--adapter", type=Path, help="saved adapter directory (surgeon or PEFT)")
    p.add_argument("--breaks", action="store_true", help="list graph breaks with their reasons")
    p.add_argument(
        "--code",
        metavar="REGION",
        help="print a region's code (module path, '' for the root) with inserted lines marked",
    )
    p.add_argument("--diff", metavar="REGION", help="print a region's traced-vs-rewritten diff")
    p.add_argument(
        "--call",
        type=int,
        metavar="SEQ_LEN",
        help="run one forward on random token ids of this length first, so the modules plain "
        "torch.fx cannot trace are traced for it (specialised regions) and the report shows "
        "the regions calls run through",
    )
    p.add_argument(
        "--graph",
        type=Path,
        metavar="FILE",
        help="write the graph: FILE.svg (graphviz when installed, DOT text otherwise) or FILE.dot",
    )


def _run_inspect(args: argparse.Namespace) -> None:
    import torch

    from surgeon.train import no_cache_arguments

    cm = _compiled(args, args.spec, args.adapter)
    if args.call is not None:
        _positive("--call", args.call)
        inputs = _token_inputs(cm, "inspect --call", batch=2, seq_len=args.call)
        with torch.no_grad():
            cm(**inputs, **no_cache_arguments(cm.model))
    report = cm.inspect()
    print(report)
    if args.breaks:
        print(f"\ngraph breaks:\n{report.breaks_table(limit=len(report.breaks) or 1)}")
    if args.code is not None:
        print(f"\n{cm.graph.code(args.code, marked=True)}")
    if args.diff is not None:
        print(f"\n{cm.graph.diff(args.diff)}")
    if args.graph is not None:
        written = cm.graph.render(args.graph)
        kind = "SVG" if written.suffix == ".svg" else "DOT text"
        note = " (graphviz's `dot` is not installed)" if written != args.graph else ""
        print(f"\ngraph written to {written} as {kind}{note}")


# -- train ------------------------------------------------------------------------------------


def _configure_train(p: argparse.ArgumentParser) -> None:
    _model_argument(p)
    p.add_argument("spec", type=Path, help="spec file (.yaml, .json or .toml)")
    p.add_argument(
        "data",
        type=Path,
        help="training data, .jsonl (one object per line) or .csv/.tsv (a header row): 'text' + "
        "'label' (classification), 'text' (causal LM), 'prompt' + 'completion' (loss on the "
        "completion), 'messages' (chat template; loss on assistant turns) or token fields",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output directory (adapter, checkpoints)"
    )
    p.add_argument("--eval-data", type=Path, help="evaluation data, same format as DATA")
    p.add_argument("--epochs", type=float, help="passes over the data (default: TrainingConfig's)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--learning-rate", "--lr", type=float, dest="learning_rate")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--gradient-accumulation-steps", type=int)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens")
    p.add_argument(
        "--packing",
        action="store_true",
        help="pack causal-LM samples into rows of up to --max-length tokens (no attention "
        "across samples)",
    )
    p.add_argument(
        "--resume", action="store_true", help="resume from the latest checkpoint in --out"
    )


def _run_train(args: argparse.Namespace) -> None:
    import surgeon
    from surgeon.textdata import read_text_dataset

    model_dir = _model_dir(args.model, args.revision)
    model = load_model(model_dir, args.task, args.num_labels)

    def tokenizer() -> Any:
        return load_tokenizer(model_dir)

    _positive("--max-length", args.max_length)
    train_data = read_text_dataset(args.data, tokenizer, args.max_length, args.packing)
    eval_data = (
        read_text_dataset(args.eval_data, tokenizer, args.max_length, args.packing)
        if args.eval_data
        else None
    )
    overrides = {
        field: getattr(args, field)
        for field in (
            "epochs",
            "max_steps",
            "learning_rate",
            "batch_size",
            "gradient_accumulation_steps",
            "warmup_steps",
            "seed",
        )
        if getattr(args, field) is not None
    }
    config = surgeon.TrainingConfig(output_dir=str(args.out), **overrides)
    cm = surgeon.compile(model, surgeon.load_spec(args.spec))
    result = surgeon.train(
        cm, train_data, config, eval_data=eval_data, resume_from=args.out if args.resume else None
    )
    cm.save_adapters(args.out)
    _copy_tokenizer(model_dir, args.out)
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(f"trained {result.steps} steps, final loss {last}; adapter saved to {args.out}")
    for plot in result.plots:
        print(f"loss and learning-rate curves: {plot}")
    if result.trainer_state is not None:
        print(f"training history (transformers' trainer_state.json): {result.trainer_state}")


# -- merge ------------------------------------------------------------------------------------


def _configure_merge(p: argparse.ArgumentParser) -> None:
    _model_argument(p)
    p.add_argument("adapter", type=Path, help="saved adapter directory (surgeon or PEFT)")
    p.add_argument("--out", type=Path, required=True, help="directory for the merged model")


def _run_merge(args: argparse.Namespace) -> None:
    model_dir = _model_dir(args.model, args.revision)
    cm = _compiled(args, None, args.adapter)
    merged = cm.merge_and_unload()
    if args.out.exists() and any(args.out.iterdir()):
        raise CommandError(f"--out {str(args.out)!r} exists and is not empty")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=".merge-") as tmp:
        staged = Path(tmp) / "model"
        merged.save_pretrained(staged, safe_serialization=True)
        _copy_tokenizer(model_dir, staged)
        if args.out.exists():
            args.out.rmdir()
        os.replace(staged, args.out)
    print(f"merged model written to {args.out}")


# -- export -----------------------------------------------------------------------------------


def _configure_export(p: argparse.ArgumentParser) -> None:
    _model_argument(p)
    p.add_argument("--adapter", type=Path, help="adapter to merge in before exporting")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write (.onnx)")
    p.add_argument("--seq-len", type=int, default=16, help="example sequence length (default 16)")
    p.add_argument(
        "--no-verify", action="store_true", help="skip the onnxruntime check against PyTorch"
    )


def _run_export(args: argparse.Namespace) -> None:

    import surgeon

    _positive("--seq-len", args.seq_len)
    cm = _compiled(args, None, args.adapter)
    inputs = _token_inputs(cm, "export", batch=1, seq_len=args.seq_len)
    report = surgeon.export_onnx(cm, args.out, inputs, verify=not args.no_verify)
    print(report)


def _token_inputs(cm: Any, command: str, batch: int, seq_len: int) -> dict[str, Any]:
    """Seeded random token ids (and an all-ones mask) for a model with a vocabulary."""
    import torch

    vocab = getattr(cm.config, "vocab_size", None)
    if vocab is None:
        raise CommandError(f"{command} needs a token model (its config has no vocab_size)")
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, vocab, (batch, seq_len), generator=generator),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
    }


# -- estimate-memory --------------------------------------------------------------------------


def _configure_estimate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", type=Path, help="model folder or its config.json (no weights are loaded)"
    )
    p.add_argument("spec", type=Path, help="spec file (.yaml, .json or .toml)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)


def _run_estimate(args: argparse.Namespace) -> None:
    import surgeon

    config = load_config(args.model)
    report = surgeon.estimate_memory(
        config, surgeon.load_spec(args.spec), batch_size=args.batch_size, seq_len=args.seq_len
    )
    print(report)


_COMMANDS: list[tuple[str, str, Callable, Callable]] = [
    ("compile", "compile a spec onto a model and show what was grafted", _configure_compile, _run_compile),
    ("inspect", "show adapters, graph breaks, region code, diffs and the graph", _configure_inspect, _run_inspect),
    ("train", "fine-tune the adapters of a spec on a data file", _configure_train, _run_train),
    ("merge", "fold a saved adapter into the weights and save the plain model", _configure_merge, _run_merge),
    ("export", "export a model (with an adapter merged in) to ONNX, checked in onnxruntime", _configure_export, _run_export),
    ("estimate-memory", "training memory: full fine-tune vs adapter vs QLoRA", _configure_estimate, _run_estimate),
]  # fmt: skip


# -- models -----------------------------------------------------------------------------------


def _model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        type=Path,
        help="transformers model folder (config.json + weights) or Hugging Face Hub repo id "
        "(org/name; only config, safetensors and tokenizer files are downloaded)",
    )
    p.add_argument("--revision", help="Hub branch, tag or commit of MODEL (default: main)")
    p.add_argument(
        "--task",
        choices=list(TASKS),
        default="auto",
        help="model class to load: the one its config names (auto), or one with the task's head",
    )
    p.add_argument("--num-labels", type=int, help="classes of a new classification head")


TASKS = {
    "auto": None,
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "base": "AutoModel",
}


def _model_dir(
    path: Path, revision: str | None = None, *, weights: bool = True, tokenizer: bool = True
) -> Path:
    """The local folder of a model: ``path`` itself, or the cached snapshot of Hub repo ``path``
    holding its config (plus, when asked, its safetensors and tokenizer files)."""
    from surgeon.hub import MODEL_WEIGHTS, local_folder

    path = local_folder(
        path,
        ["config.json"],
        weights=MODEL_WEIGHTS if weights else (),
        extras=_HUB_TOKENIZER_FILES if tokenizer else (),
        revision=revision,
    )
    if not path.is_dir():
        raise CommandError(f"model folder {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise CommandError(f"{str(path)!r} is not a transformers model folder (no config.json)")
    return path


def load_config(path: Path) -> Any:
    """A transformers config from a model folder or a config.json file."""
    from transformers import AutoConfig

    if path.is_file() and path.name == "config.json":
        return AutoConfig.from_pretrained(str(path.parent))
    return AutoConfig.from_pretrained(str(_model_dir(path, weights=False, tokenizer=False)))


def load_model(
    path: Path, task: str = "auto", num_labels: int | None = None, revision: str | None = None
) -> Any:
    """The model class its config names (``architectures``), or the task's auto class, with
    its weights, in eval mode (from a folder or a Hub repo id)."""
    # resolved first: disabling transformers' progress bars disables the Hub's download bars too
    path = _model_dir(path, revision)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    extra = {} if num_labels is None else {"num_labels": _positive("--num-labels", num_labels)}
    if TASKS[task] is not None:
        return getattr(transformers, TASKS[task]).from_pretrained(str(path), **extra).eval()
    config = transformers.AutoConfig.from_pretrained(str(path))
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    cls = cls or transformers.AutoModel
    return cls.from_pretrained(str(path), **extra).eval()


def _positive(flag: str, value: int) -> int:
    if value < 1:
        raise CommandError(f"{flag} must be at least 1, got {value}")
    return value


def load_tokenizer(path: Path, revision: str | None = None) -> Any:
    """The tokenizer saved in a folder, or in a Hub repo (its config and tokenizer files)."""
    from transformers import AutoTokenizer

    from surgeon.hub import local_folder

    path = local_folder(path, [], extras=["config.json", *_HUB_TOKENIZER_FILES], revision=revision)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise CommandError(f"no tokenizer in {str(path)!r} ({_one_line(err)})") from None


def _compiled(args: argparse.Namespace, spec: Path | None, adapter: Path | None) -> Any:
    import surgeon
    from surgeon.io import adapter_folder

    # before the model: a bad adapter id fails fast, and its download shows progress bars
    adapter = adapter_folder(adapter) if adapter is not None else None
    base = load_model(args.model, args.task, args.num_labels, args.revision)
    if adapter is not None:
        return surgeon.load(base, adapter)
    return surgeon.compile(base, surgeon.load_spec(spec) if spec is not None else None)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (OSError, KeyError)) and not isinstance(err, FileNotFoundError):
        return f"{type(err).__name__}: {text}"
    return text


if __name__ == "__main__":
    sys.exit(main())
