"""The contract of each plugin kind: what a third-party package implements.

A plugin is a class with

* ``Options``: a pydantic model of its recipe keys (``extra="forbid"``; give
  every field a ``description``: it feeds ``panda plugins show`` and the recipe
  reference). Subclass :class:`Options` to get those settings.
* the methods of its kind, below.

It is registered by an entry point in the package's pyproject, e.g.::

    [project.entry-points."panda.optimizers"]
    sophia = "my_pkg.sophia:Sophia"

Plugin modules must import quickly: import torch, transformers or any heavy
package *inside* methods, never at module level, because ``panda recipe
validate`` loads the plugin to validate its options and must stay light.
Raise :class:`panda.errors.PandaError` (or use :func:`panda.errors.require`)
for anything the user can fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # only for annotations; never imported at run time here
    import torch


class Options(BaseModel):
    """Base of every plugin's options: unknown keys are errors, defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class Plugin:
    """Base of every plugin kind. ``options`` is the validated ``Options`` instance."""

    Options: ClassVar[type[BaseModel]] = Options

    def __init__(self, options: BaseModel | None = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring; shown by ``panda plugins``."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def check_recipe(cls, options: BaseModel, recipe: Any) -> None:
        """Reject combinations this plugin cannot honor, at validation time.

        Raise ``ValueError("what is wrong; what to do")``; the recipe loader
        reports it with this plugin's section and file:line. Called after every
        section is validated, so ``recipe`` is the whole resolved Recipe.
        """


class ModelPlugin(Plugin):
    """Builds the model and tokenizer named in ``[model]``.

    Example::

        class Tiny(ModelPlugin):
            '''A two-layer Llama for tests.'''
            class Options(Options):
                hidden: int = 64
            presets = {"tiny": {"model_type": "llama", "hidden_size": 64}}
            def build(self, ctx):
                from transformers import LlamaConfig, LlamaForCausalLM
                return LlamaForCausalLM(LlamaConfig(hidden_size=self.options.hidden))
            def tokenizer(self, ctx): ...
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def build(self, ctx: Any) -> "torch.nn.Module":
        """Return the causal LM (a ``transformers.PreTrainedModel`` where possible)."""
        raise NotImplementedError

    def tokenizer(self, ctx: Any) -> Any:
        """Return a ``transformers`` tokenizer for this model."""
        raise NotImplementedError

    def build_empty(self, ctx: Any) -> "torch.nn.Module | None":
        """Optional: ``build``'s model on the meta device, its architecture without weights.

        A sharding backend (``fsdp``) calls it on every rank but the first, which alone
        calls ``build``; after sharding, rank 0 broadcasts the weights into everyone's
        shards, so no other rank needs memory for the whole model. The default, None,
        means every rank calls ``build``.
        """
        return None


class BadRecord(ValueError):
    """A record that cannot be used. The message says what is wrong, without the location:
    the pipeline prefixes ``path:line`` and stops, or skips it (``on_bad_record = "skip"``)."""


class DatasetPlugin(Plugin):
    """Reads one record format (``[[data.sources]] name = ...``) into token examples.

    The data pipeline (``panda.data``) does, for every file of the source:

    1. ``records(path)`` yields ``(where, record)`` with ``where = "path:line"``.
       A line that cannot be parsed is yielded as ``(where, BadRecord(why))``
       so that ``on_bad_record = "skip"`` can go on. The default reads JSON
       (``.json`` arrays or JSON lines, and ``.jsonl``).
    2. ``Record`` (a pydantic model, optional) validates each record: a missing
       field or a wrong type stops with ``path:line: ...``. Its ``model_dump()``
       is what the next step receives (aliases resolved, defaults filled).
    3. ``segments(record, ctx)`` renders the record as pieces ``(text or token
       ids, trained)``; the pipeline tokenizes the pieces of many records in
       one batched call and sets ``labels = -100`` on untrained pieces. Formats
       with a chat template use ``ctx.chat_segments(messages)``; ``ctx.bos`` and
       ``ctx.eos`` are the tokenizer's special ids as lists (empty if none).
       A ``data_format = "pair"`` plugin returns ``{"prompt": [...],
       "chosen": [...], "rejected": [...]}`` instead.
       A plugin may instead override ``encode(record, tokenizer, ctx)`` to
       return ``{"input_ids": [...], "labels": [...]}`` itself (slower: one call
       per record). Raise ``BadRecord`` for a well-formed but unusable record.

    Documents longer than ``data.max_seq_length`` are split into pieces
    (``long_documents = "split"``, for plain text) or truncated with a counted
    warning (``"truncate"``, for prompt/response data).

    Example::

        class Poems(DatasetPlugin):
            '''One poem per line, every token trained.'''
            extensions = (".txt",)
            def records(self, path):
                for i, line in enumerate(open(path, encoding="utf-8"), 1):
                    yield f"{path}:{i}", {"text": line.rstrip("\\n")}
            def segments(self, record, ctx):
                return [(record["text"], True), (ctx.eos, True)]
    """

    default_path: ClassVar[str | None] = None
    extensions: ClassVar[tuple[str, ...]] = (".json", ".jsonl")
    data_format: ClassVar[str] = "lm"  # "lm" (input_ids/labels) or "pair" (chosen/rejected)
    long_documents: ClassVar[str] = "truncate"  # or "split"
    Record: ClassVar[type[BaseModel] | None] = None

    @classmethod
    def check_recipe(cls, options: BaseModel, recipe: Any) -> None:
        """The method must want the kind of data this format gives (lm or pair)."""
        from panda import registry

        wanted = getattr(registry.get("method", recipe.method.name), "data_format", "lm")
        if cls.data_format != wanted:
            kind = {"lm": "text or prompt/response", "pair": "preference pair"}
            raise ValueError(f"this format gives {kind.get(cls.data_format, cls.data_format)} "
                             f"data but method '{recipe.method.name}' trains on "
                             f"{kind.get(wanted, wanted)} data")

    def records(self, path: str) -> Iterator[tuple[str, Any]]:
        from panda.data.readers import read_json_records

        return read_json_records(path)

    def segments(self, record: dict[str, Any], ctx: Any) -> Any:
        raise NotImplementedError

    def encode(self, record: dict[str, Any], tokenizer: Any, ctx: Any) -> dict[str, list[int]]:
        """Token lists of one record; the default tokenizes ``segments``."""
        return ctx.encode_segments([self.segments(record, ctx)])[0]


class MethodPlugin(Plugin):
    """A training objective (``[method]``): turns a batch into a loss.

    ``loss`` returns the *sum* of per-unit losses and the number of units
    (target tokens, or pairs for preference methods). The trainer divides the
    sum by the unit count of the whole optimizer step, across micro-batches and
    ranks, so gradient accumulation and data parallelism change nothing but speed.
    ``units`` gives that count *before* the forward pass, so the trainer can sum
    it over the step's micro-batches and ranks first.

    Batches are unshifted: ``labels[:, t]`` is the label of ``input_ids[:, t]``
    and ``logits[:, t]`` predicts ``labels[:, t + 1]``; ``-100`` means no loss.
    Every batch key but ``labels`` and ``_``-prefixed metadata goes to the model.

    Example::

        class Lm(MethodPlugin):
            '''Next-token prediction on every labelled token.'''
            def loss(self, model, batch):
                import torch.nn.functional as F
                logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
                labels = batch["labels"][:, 1:]
                total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                        ignore_index=-100, reduction="sum")
                return total, (labels != -100).sum(), {}
            def units(self, batch):
                return int((batch["labels"][:, 1:] != -100).sum())
    """

    data_format: ClassVar[str] = "lm"  # "lm" (input_ids/labels) or "pair" (chosen/rejected)

    def prepare(self, model: "torch.nn.Module", ctx: Any) -> "torch.nn.Module":
        """Adapt the model before the backend wraps it (a reward head, a reference copy)."""
        return model

    def before_training(self, job: Any) -> None:
        """Called once after ``backend.setup(job)``, before the first step: a pass over the
        data (``job.train_batches``, ``job.eval_batches``) through ``job.backend.eval_step``,
        say; it may replace those batch iterables with ones that add keys."""

    def loss(self, model: "torch.nn.Module", batch: dict[str, Any]
             ) -> tuple["torch.Tensor", "torch.Tensor", dict[str, "torch.Tensor"]]:
        """(fp32 sum of per-unit losses, unit count, metrics to log) of one micro-batch."""
        raise NotImplementedError

    def units(self, batch: dict[str, Any]) -> int:
        """Loss units in ``batch``, counted without a forward pass; equals ``loss``'s count.

        Call it on the host copy of the batch: counting on a GPU waits for the device.
        """
        raise NotImplementedError


class OptimizerPlugin(Plugin):
    """Builds a ``torch.optim.Optimizer`` (``[optim] name``).

    ``param_groups`` arrive split by the trainer: weight decay is already set
    to 0 for biases and norm weights. ``lr`` is the recipe's peak rate.

    Example::

        class Sgd(OptimizerPlugin):
            '''Plain SGD with momentum.'''
            class Options(Options):
                momentum: float = 0.9
            def build(self, param_groups, lr):
                import torch
                return torch.optim.SGD(param_groups, lr=lr, momentum=self.options.momentum)
    """

    def build(self, param_groups: list[dict[str, Any]], lr: float) -> "torch.optim.Optimizer":
        raise NotImplementedError


class SchedulerPlugin(Plugin):
    """A learning-rate schedule (``[schedule] name``) as a factor of the peak rate.

    Pure Python so it is trivial to test. Warm-up is the trainer's: it passes
    ``warmup_steps`` already resolved from warmup_steps / warmup_proportion.

    Example::

        class Step(SchedulerPlugin):
            '''Halve the rate every 1000 steps.'''
            def factor(self, step, total_steps, warmup_steps):
                return 0.5 ** (step // 1000)
    """

    def factor(self, step: int, total_steps: int, warmup_steps: int) -> float:
        raise NotImplementedError


class TrainBackend(Plugin):
    """Runs optimizer steps for the trainer (``[backend] name``).

    The trainer loop (``panda.train.loop``) is engine-agnostic: it hands the
    backend one optimizer step's micro-batches and gets metrics back. Backward,
    gradient synchronisation, clipping, the optimizer and the schedule all live
    behind ``train_step``, so engines that own them (DeepSpeed's
    ``engine.backward``/``engine.step``, DeepSpeed pipeline's
    ``engine.train_batch(data_iter)``) fit without special cases in the loop.
    Eager PyTorch backends (single, ddp, fsdp...) share
    :class:`panda.backends.base.TorchBackend`.

    The job calls, in this order::

        dist = backend.init_distributed()   # before anything big is built
        backend.setup(job)                  # wrap the model, build optimizer + schedule
        backend.load(checkpoint_dir)        # only when resuming
        backend.train_step(micro_batches)   # once per optimizer step
        backend.eval_step(batch)            # evaluation, summed with all_reduce_sum
        backend.save(checkpoint_dir)        # every rank calls it; see save()
        backend.export(final_dir, tokenizer)
        backend.close()

    Two optional hooks, looked up by name by ``panda.job``:
    ``build_model(model_plugin, recipe)`` for a backend that builds only its own
    part of the model (pipeline stages), and ``data_shard() -> (shard, shards)``
    for one whose data-parallel groups differ from the ranks (PP x DP).

    Loss normalisation (DESIGN section 6) is the backend's duty: the step's loss
    is the sum of ``method.loss`` sums over every micro-batch on every rank,
    divided by the step's total ``method.units`` (all-reduced before the
    forward pass), so accumulation and data parallelism change only speed.
    """

    def init_distributed(self) -> Any:
        """Join the process group if this backend needs one; return a ``DistInfo``.

        Called first, from the launched process (torchrun sets RANK, WORLD_SIZE,
        LOCAL_RANK, MASTER_ADDR and MASTER_PORT).
        """
        raise NotImplementedError

    def setup(self, job: Any) -> None:
        """Place and wrap ``job.model``, build optimizer and scheduler (or let the engine).

        ``job`` carries ``model``, ``method``, ``recipe``, ``dist``, ``tokenizer``,
        ``total_steps``, and the factories ``build_optimizer(model)`` and
        ``build_scheduler(optimizer)`` that engines owning the optimizer may ignore
        (then they must honour ``job.recipe.optim`` and ``job.schedule_factor``).
        """
        raise NotImplementedError

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step over this rank's ``micro_batches``.

        Returns numbers that are equal on every rank: ``loss`` (normalised over
        the step's units), ``grad_norm`` (before clipping), ``lr`` (used by
        this step), ``units`` and ``tokens`` (totals over ranks, ints), and
        ``nonfinite`` (1.0 when the loss or gradients were not finite and the
        update was skipped; a loss-scale overflow in fp16 is not counted), plus
        any metrics of the method.

        Each may be a float or a 0-d tensor still being computed on the device
        (``units`` and ``tokens`` excepted): the loop reads tensors with
        :func:`step_values_on_host` only after it has queued the next step, so
        the device never idles while the host waits on a number. A backend that
        returns tensors must therefore not need the host to know them before the
        update (e.g. it skips a non-finite update on the device).
        """
        raise NotImplementedError

    def eval_step(self, batch: dict[str, Any]) -> tuple[float, int]:
        """(loss sum, unit count) of one batch on this rank, without gradients."""
        raise NotImplementedError

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over ranks (identity on one process)."""
        return list(values)

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""

    def save(self, path: str) -> None:
        """Write the full resumable engine state (model, optimizer, schedule, scaler) under ``path``.

        Every rank calls it with the same (shared) folder; write what each rank
        owns (rank 0 alone for replicated state, every rank its shard).
        """
        raise NotImplementedError

    def load(self, path: str) -> None:
        """Restore what ``save`` wrote; called after ``setup``."""
        raise NotImplementedError

    def export(self, path: str, tokenizer: Any) -> None:
        """Write a Hugging Face folder (weights, config, tokenizer, generation config) under ``path``."""
        raise NotImplementedError

    def close(self) -> None:
        """Leave the process group and free what ``setup`` built."""


def step_values_on_host(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every tensor replaced by its float, fetched in one device sync."""
    import torch

    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        return dict(values)
    try:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([v.detach().reshape(()).to(device, torch.float64)
                               for v in tensors.values()])
        fetched = dict(zip(tensors, stacked.tolist()))
    except (RuntimeError, TypeError):  # e.g. a sharded (DTensor) norm: one by one
        fetched = {k: float(v) for k, v in tensors.items()}
    return {k: fetched.get(k, v) for k, v in values.items()}


class InferBackend(Plugin):
    """Loads a trained model and generates text (``panda infer/chat --backend``).

    The commands call, in this order::

        backend = Backend(options)              # from --option KEY=VALUE (this Options model)
        backend.load(model_path, adapter=None)  # sets backend.tokenizer
        for index, piece in backend.generate(prompts, max_new_tokens=64, temperature=0):
            ...                                 # each prompt's pieces arrive in order
        backend.close()

    ``prompts`` holds raw text (tokenize it with the tokenizer's special tokens)
    or lists of token ids that panda already built (it applies the chat
    template itself). Sampling keywords are those of
    ``panda.infer.sampling.Sampling``: max_new_tokens, temperature (0 = greedy),
    top_p, top_k, repetition_penalty, seed, stop_at_eos. A backend that runs
    one process per GPU (tensor parallel) sets ``multi_process = True``: every
    rank makes the same calls and only the rank with ``is_main_process`` prints.

    Example::

        class Echo(InferBackend):
            '''Repeats each prompt.'''
            def load(self, model_path, adapter=None):
                from transformers import AutoTokenizer
                self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            def generate(self, prompts, **sampling):
                for index, prompt in enumerate(prompts):
                    text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
                    yield index, text
    """

    multi_process: ClassVar[bool] = False
    tokenizer: Any = None
    is_main_process: bool = True

    def load(self, model_path: str, adapter: str | None = None) -> None:
        """Load weights from a local folder; merge the peft adapter folder ``adapter`` if given."""
        raise NotImplementedError

    def generate(self, prompts: list[str | list[int]], **sampling: Any
                 ) -> Iterator[tuple[int, str]]:
        """Yield (prompt index, text piece); pieces of one prompt come in order."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model and leave any process group."""


KIND_BASES: dict[str, type[Plugin]] = {
    "model": ModelPlugin,
    "dataset": DatasetPlugin,
    "method": MethodPlugin,
    "optimizer": OptimizerPlugin,
    "scheduler": SchedulerPlugin,
    "backend": TrainBackend,
    "infer_backend": InferBackend,
}
