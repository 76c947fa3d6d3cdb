"""Multitask prompt tuning (Wang et al., 2023, "Multitask Prompt Tuning Enables
Parameter-Efficient Transfer Learning"): one prompt shared by all tasks, modulated per task by a
rank-``num_ranks`` product, ``P_t = P* ⊙ (U_t · V_t)``, prepended to the input embeddings.

``P*`` is (virtual tokens x hidden), ``U`` (tasks x tokens x ranks), ``V`` (tasks x ranks x
hidden): PEFT's ``prompt_embeddings``, ``prefix_task_cols`` and ``prefix_task_rows``. Every call
takes ``task_ids`` (one task index per batch row), in ``forward`` and ``generate`` alike; the
rest of the call rewrite is prompt tuning's.

Initialisation (PEFT's ``prompt_tuning_init``): ``random`` (``P*`` standard normal, ``U`` and
``V`` normal with std 0.02), ``text`` (``P*`` the model's embeddings of ``init_text``), or from a
source adapter's safetensors file (``source_path``, as PEFT's MPT saves it; pickles are never
read): ``only_source_shared`` takes its ``P*``, ``average_source_tasks`` also the mean of its
tasks' ``U`` and ``V``, ``exact_source_task`` those of task ``source_task``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.adapter import ModelCall
from surgeon.checks import check_choice, check_int
from surgeon.errors import SpecError
from surgeon.graph import Graph
from surgeon.io import read_safetensors
from surgeon.passes.prompt.common import (
    SIZE_KEYS,
    PromptMethod,
    adapter_factory,
    check_file_sizes,
    input_embeddings,
    peft_sizes,
)
from surgeon.passes.prompt.prompt_tuning import PromptAdapter, check_text_init, text_embeddings
from surgeon.peft import INT, REQUIRED, STRING, PeftFormat, PeftKey, one_of, task_type
from surgeon.spec import MethodSpec

INITS = ("random", "text", "average_source_tasks", "exact_source_task", "only_source_shared")
FROM_SOURCE = INITS[2:]
TASK_STD = 0.02
"""PEFT's std of the initial task factors U and V."""


def _lower(value: Any, config: Mapping[str, Any], where: str) -> str:
    return str(value).lower()


def _kept_if(init: str | tuple[str, ...]):
    """A setting the file's weights make irrelevant unless its init is one of ``init``: kept
    as a record for those, dropped otherwise (PEFT ignores it too)."""
    inits = (init,) if isinstance(init, str) else init

    def load(value: Any, config: Mapping[str, Any], where: str) -> Any:
        return value if str(config.get("prompt_tuning_init")).lower() in inits else None

    return load


PEFT_FORMAT = PeftFormat(
    "MULTITASK_PROMPT_TUNING",
    keys=(
        PeftKey("num_virtual_tokens", "num_virtual_tokens", REQUIRED, INT),
        PeftKey("num_tasks", "num_tasks", 1, INT),
        PeftKey("num_ranks", "num_ranks", 1, INT),
        PeftKey(
            "prompt_tuning_init",
            "init",
            "RANDOM",
            one_of(*(i.upper() for i in INITS)),
            save=lambda spec, paths: spec.init.upper(),
            load=_lower,
        ),
        PeftKey(
            "prompt_tuning_init_text", "init_text", None, STRING.optional(), load=_kept_if("text")
        ),
        PeftKey(
            "tokenizer_name_or_path",
            "tokenizer_path",
            None,
            STRING.optional(),
            load=_kept_if("text"),
        ),
        PeftKey(
            "prompt_tuning_init_state_dict_path",
            "source_path",
            None,
            STRING.optional(),
            load=_kept_if(FROM_SOURCE),
        ),
        PeftKey("prompt_tuning_init_task", "source_task", 0, INT.optional()),
        *SIZE_KEYS,
    ),
    constants={"tokenizer_kwargs": None},
)


@dataclass(frozen=True)
class MultitaskPromptTuning(PromptMethod):
    """A shared prompt times a low-rank task matrix per task; calls take ``task_ids``."""

    name = "multitask_prompt_tuning"
    peft_format = PEFT_FORMAT

    num_virtual_tokens: int = 10
    num_tasks: int = 1
    num_ranks: int = 1
    init: str = "random"
    init_text: str | None = None
    tokenizer_path: str | None = None
    source_path: str | None = None
    """A source MPT adapter: its ``adapter_model.safetensors`` or the folder holding it."""
    source_task: int = 0

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "num_virtual_tokens", self.num_virtual_tokens)
        check_int(owner, "num_tasks", self.num_tasks)
        check_int(owner, "num_ranks", self.num_ranks)
        check_choice(owner, "init", self.init, INITS)
        check_int(owner, "source_task", self.source_task, minimum=0)
        check_text_init(self)
        if (self.init == "text") != (self.init_text is not None):
            raise SpecError(
                f"{owner}.init={self.init!r} with init_text={self.init_text!r}: init='text' "
                f"and init_text (with tokenizer_path) go together"
            )
        if (self.init in FROM_SOURCE) != (self.source_path is not None):
            raise SpecError(
                f"{owner}.init={self.init!r} with source_path={self.source_path!r}: the inits "
                f"{', '.join(FROM_SOURCE)} read a source adapter's file, and only they do"
            )
        if self.init in ("average_source_tasks", "exact_source_task") and self.num_tasks != 1:
            raise SpecError(
                f"{owner}.num_tasks={self.num_tasks}: init={self.init!r} gives one task's U and V "
                f"(as PEFT, which fails on more); use num_tasks=1 or init='only_source_shared'"
            )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "three-tasks": cls(num_virtual_tokens=3, num_tasks=3, num_ranks=2),
            "one-task": cls(num_virtual_tokens=2),
        }

    def create_call_adapter(self, model: nn.Module, graph: Graph, from_file: bool) -> TaskPrompts:
        owner = type(self).__name__
        embeddings = input_embeddings(model, owner)
        sizes = peft_sizes(model, owner, embeddings.embedding_dim)
        check_file_sizes(
            getattr(self, "_file_sizes", None), {"token_dim": sizes["token_dim"]}, owner
        )
        adapter = TaskPrompts(
            embeddings,
            self.num_virtual_tokens,
            self.num_tasks,
            self.num_ranks,
            {**sizes, "task_type": task_type(model)},
            **adapter_factory(model),
        )
        if not from_file:
            with torch.no_grad():
                self._initialise(adapter, embeddings)
        return adapter

    def _initialise(self, adapter: TaskPrompts, embeddings: nn.Embedding) -> None:
        nn.init.normal_(adapter.embeddings)  # PEFT's: nn.Embedding's default init
        nn.init.normal_(adapter.prefix_task_cols, std=TASK_STD)
        nn.init.normal_(adapter.prefix_task_rows, std=TASK_STD)
        if self.init == "text":
            adapter.embeddings.copy_(text_embeddings(self, embeddings))
        elif self.init in FROM_SOURCE:
            params = adapter.peft_tensors()
            for name, value in self._source_tensors(adapter).items():
                params[name].copy_(value)

    def _source_tensors(self, adapter: TaskPrompts) -> dict[str, torch.Tensor]:
        """What the init takes from the source file, in the shapes of ``adapter``."""
        owner = f"{type(self).__name__}.source_path={self.source_path!r}"
        source = _read_source(owner, Path(self.source_path))
        taken = {"prompt_embeddings": source["prompt_embeddings"]}
        if self.init != "only_source_shared":
            cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
            if self.init == "average_source_tasks":
                cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
            else:
                if self.source_task >= cols.shape[0]:
                    raise SpecError(
                        f"{type(self).__name__}.source_task={self.source_task}: the source "
                        f"adapter has {cols.shape[0]} tasks"
                    )
                cols, rows = (
                    cols[self.source_task : self.source_task + 1],
                    rows[self.source_task : self.source_task + 1],
                )
            taken.update(prefix_task_cols=cols, prefix_task_rows=rows)
        params = adapter.peft_tensors()
        for name, value in taken.items():
            expected = tuple(params[name].shape)
            if tuple(value.shape) != expected:
                raise SpecError(
                    f"{owner}: its {name} has shape {tuple(value.shape)}, this adapter needs "
                    f"{expected} (virtual tokens, ranks and the model's hidden size must match)"
                )
        return taken


def _read_source(owner: str, path: Path) -> dict[str, torch.Tensor]:
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise SpecError(f"{owner}: no such file (expected an MPT adapter's .safetensors)")
    if file.suffix != ".safetensors":
        raise SpecError(
            f"{owner}: only .safetensors files are read (a pickled checkpoint could run code); "
            f"convert it with safetensors.torch.save_file"
        )
    tensors = read_safetensors(file)
    missing = {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"} - set(tensors)
    if missing:
        raise SpecError(f"{owner}: the file lacks {sorted(missing)}; is it an MPT adapter?")
    return tensors


class TaskPrompts(PromptAdapter):
    """The shared prompt (``embeddings``) and every task's factors; each batch row gets its
    task's prompt."""

    method = "multitask_prompt_tuning"
    call_arguments = ("task_ids",)

    def __init__(
        self,
        embeddings: nn.Embedding,
        n: int,
        tasks: int,
        ranks: int,
        peft_config: dict[str, Any],
        **factory,
    ) -> None:
        super().__init__(embeddings, n, peft_config, **factory)
        width = embeddings.embedding_dim
        self.prefix_task_cols = nn.Parameter(torch.empty(tasks, n, ranks, **factory))
        self.prefix_task_rows = nn.Parameter(torch.empty(tasks, ranks, width, **factory))
        self.target = f"input embeddings (+{n} virtual tokens, {tasks} tasks)"

    def batch_prompts(self, call: ModelCall, batch: int) -> torch.Tensor:
        tasks = self._task_ids(call, batch)
        modulation = self.prefix_task_cols[tasks] @ self.prefix_task_rows[tasks]
        return self.prompts().unsqueeze(0) * modulation

    def _task_ids(self, call: ModelCall, batch: int) -> torch.Tensor:
        task_ids = call.extras.get("task_ids")
        if task_ids is None:
            raise SpecError(
                "multitask prompt tuning: pass task_ids= (one task index per batch row) to the "
                "compiled model's call or generate"
            )
        task_ids = torch.as_tensor(task_ids).long()
        if task_ids.shape != (batch,):
            raise SpecError(
                f"multitask prompt tuning: task_ids has shape {tuple(task_ids.shape)}, expected "
                f"({batch},): one task index per batch row"
            )
        tasks = self.prefix_task_cols.shape[0]
        checkable = not (task_ids.is_meta or torch.compiler.is_compiling())
        if checkable and bool(((task_ids < 0) | (task_ids >= tasks)).any()):
            raise SpecError(
                f"multitask prompt tuning: task_ids {task_ids.tolist()} outside 0..{tasks - 1}"
            )
        task_ids = task_ids.to(self.prefix_task_cols.device)
        return task_ids

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeddings": self.embeddings,
            "prefix_task_cols": self.prefix_task_cols,
            "prefix_task_rows": self.prefix_task_rows,
        }
