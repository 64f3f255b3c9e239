"""What the preference methods (rm, dpo, orpo, simpo) share: pair batches in, per-pair losses out.

A ``pair`` batch (see ``panda.data``) holds B preference pairs: ``chosen_*`` and
``rejected_*`` tensors of shape [B, T], right-padded, with labels -100 on the
prompt (system, history, question, template) and on padding. Each pair goes
through the model in one forward: chosen rows then rejected rows, stacked into
[2B, T], so both sides see the same weights, dropout state and kernels.

Loss units (DESIGN section 6): a unit is one *pair*. ``loss`` returns the sum
of the per-pair losses of the micro-batch and the number of real pairs; the
backend divides the step's sum by the step's pairs over every micro-batch and
rank. A rank left without pairs in an epoch's last step gets one padding pair
(``_num_pairs`` = 0): it runs the forward (so collectives stay in step) and
adds 0 to the loss.

Per-pair log-probs (:class:`PairLogps`) are *sums* over the reply's labelled
tokens; ``average()`` divides them by the reply's token count for methods whose
paper averages (SimPO, ORPO, IPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from panda.plugins.api import MethodPlugin

if TYPE_CHECKING:
    import torch


def stacked_pairs(batch: dict[str, Any]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(input ids, labels) of shape [2B, T]: the chosen rows, then the rejected rows."""
    import torch

    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    return input_ids, labels


def forward_logits(model: Any, input_ids: "torch.Tensor", **kwargs: Any) -> "torch.Tensor":
    """Logits of a causal model on right-padded rows.

    No attention mask is sent: padding sits after every real token, so causal
    attention already keeps it out of every position that carries a label, and
    without a mask SDPA and flash attention keep their fast causal path. Position
    ids default to 0..T-1, which is right for right padding. ``use_cache=False``:
    training builds no KV cache.
    """
    return model(input_ids=input_ids, use_cache=False, **kwargs).logits


def labelled_row_logps(model: Any, input_ids: "torch.Tensor", labels: "torch.Tensor"
                       ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(per-row summed log-probs of the labelled tokens, their counts), in one forward.

    Only the positions that predict a labelled token go through the LM head when the
    model can be asked to (transformers' ``logits_to_keep`` with a boolean [rows, T]
    mask returns their logits flattened, [N, V]): the prompt and the padding then
    cost no LM-head projection and no logits, which for long prompts and a large
    vocabulary is most of the logits' memory. Other models return all logits. A frozen
    head is folded into the log-prob kernel (:mod:`panda.plugins.methods.lm_head`), so
    even the kept positions' logits exist only a chunk at a time.
    """
    from panda.plugins.methods.lm_head import folded_head
    from panda.plugins.methods.token_logps import kept_row_logps, predicting_positions, row_logps

    if not keeps_logits_by_mask(model):
        with folded_head(model) as head:
            outputs = forward_logits(model, input_ids)
        return row_logps(outputs, labels, head=head)
    kept = predicting_positions(labels)
    with folded_head(model) as head:
        outputs = forward_logits(model, input_ids, logits_to_keep=kept)
    return kept_row_logps(outputs, labels, kept, head=head)


_KEEPS_BY_MASK: dict[type, bool] = {}


def keeps_logits_by_mask(model: Any) -> bool:
    """Whether ``model``'s forward takes a boolean ``logits_to_keep`` mask (transformers 5's
    causal LMs do; older versions took an int or index list only)."""
    import inspect

    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    from panda.plugins.methods.reference import bare_module

    causal = bare_module(model)
    get_base = getattr(causal, "get_base_model", None)  # a peft model: the transformers one
    causal = get_base() if callable(get_base) else causal
    kind = type(causal)
    if kind not in _KEEPS_BY_MASK:
        takes_it = "logits_to_keep" in inspect.signature(kind.forward).parameters
        _KEEPS_BY_MASK[kind] = takes_it and "boolean" in (slice_logits_to_keep.__doc__ or "")
    return _KEEPS_BY_MASK[kind]


def real_pairs(batch: dict[str, Any], device: Any) -> "torch.Tensor":
    """[B] bool: which rows are real pairs (not a padding pair of a rank without data)."""
    import torch

    rows = batch["chosen_input_ids"].shape[0]
    return torch.arange(rows, device=device) < int(batch["_num_pairs"])


@dataclass
class PairLogps:
    """Per-pair sequence log-probs of the replies, fp32, each [B]."""

    chosen: "torch.Tensor"  # sum of log p over the chosen reply's labelled tokens
    rejected: "torch.Tensor"
    chosen_tokens: "torch.Tensor"  # labelled tokens of each reply
    rejected_tokens: "torch.Tensor"

    def average(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(chosen, rejected) log-probs per reply token (length-normalised)."""
        return (self.chosen / self.chosen_tokens.clamp(min=1),
                self.rejected / self.rejected_tokens.clamp(min=1))

    def detached(self) -> "PairLogps":
        return PairLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_tokens,
                         self.rejected_tokens)


def split_pairs(sums: "torch.Tensor", counts: "torch.Tensor") -> PairLogps:
    """Per-pair log-probs from per-row ones of :func:`stacked_pairs` rows ([2B])."""
    pairs = sums.shape[0] // 2
    return PairLogps(sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:])


def policy_pair_logps(model: Any, batch: dict[str, Any]) -> PairLogps:
    """The model's per-pair log-probs of both replies, in one forward over [2B, T]."""
    input_ids, labels = stacked_pairs(batch)
    return split_pairs(*labelled_row_logps(model, input_ids, labels))


def masked_mean(values: "torch.Tensor", real: "torch.Tensor") -> "torch.Tensor":
    """Mean of ``values`` over real pairs (0 when there is none), detached, for logging."""
    import torch

    values = values.detach().float()
    count = real.sum()
    return torch.where(real, values, 0.0).sum() / count.clamp(min=1)


class PreferenceMethod(MethodPlugin):
    """Base of the pair methods: units are pairs; subclasses give per-pair losses.

    Subclasses implement ``pair_losses(model, batch, real) -> (losses [B], metrics)``
    where each metric is a [B] tensor and ``real`` ([B] bool) marks real pairs;
    ``loss`` sums the losses of real pairs and logs each metric's mean over them.
    A padding row must not make a loss or gradient that is not finite: replace
    its inputs by harmless values with :func:`where_real`.
    """

    data_format: ClassVar[str] = "pair"

    def units(self, batch: dict[str, Any]) -> int:
        """Real pairs in the batch (a padding pair counts 0)."""
        return int(batch["_num_pairs"])

    def pair_losses(self, model: Any, batch: dict[str, Any], real: "torch.Tensor"
                    ) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        raise NotImplementedError

    def loss(self, model: Any, batch: dict[str, Any]
             ) -> tuple["torch.Tensor", "torch.Tensor", dict[str, "torch.Tensor"]]:
        real = real_pairs(batch, batch["chosen_input_ids"].device)
        losses, metrics = self.pair_losses(model, batch, real)
        # where, not multiply: a padding row's loss must add exactly 0, gradient included.
        total = where_real(real, losses.float(), 0.0).sum()
        return total, real.sum(), {name: masked_mean(value, real)
                                   for name, value in metrics.items()}


def where_real(real: "torch.Tensor", values: "torch.Tensor", fill: float) -> "torch.Tensor":
    """``values`` on real pairs, ``fill`` on padding rows (a value the loss is finite at)."""
    import torch

    return torch.where(real, values, fill)


def reward_metrics(chosen_rewards: "torch.Tensor", rejected_rewards: "torch.Tensor"
                   ) -> dict[str, "torch.Tensor"]:
    """rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin, per pair."""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/accuracy": (chosen > rejected).float(), "rewards/margin": chosen - rejected}
