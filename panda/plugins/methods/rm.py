"""``rm``: a reward model trained on preference pairs (Bradley-Terry, as in InstructGPT).

``prepare`` turns the causal LM into its transformers ``...ForSequenceClassification``
counterpart with ``num_labels = 1``: the transformer body is moved over as is
(no copy), the LM head is dropped, and a new scalar head ``score`` is
initialised (normal, std = ``initializer_range``, as transformers initialises a
missing head). The exported folder is therefore a plain
``AutoModelForSequenceClassification`` checkpoint.

The reward of a sequence is the head's output at its last token that is not
the pad token: transformers' own rule (``config.pad_token_id``, rightmost
non-pad token), used both here in training and by anyone who loads the export,
so training and inference score identically. panda pads pair batches with the
tokenizer's pad token (else EOS), and ``prepare`` writes that id into
``config.pad_token_id``. When the pad token *is* EOS, a trailing EOS counts as
padding and the reward is read at the token before it, in training and after.

Per pair: ``loss = -log sigmoid(r_chosen - r_rejected - margin)``, ``margin``
a constant (0 by default; LLaMA-Factory/TRL take it per pair from the data).
One pair is one unit: the step's loss is the mean over its pairs across
micro-batches and ranks. Logged: ``rewards/chosen``, ``rewards/rejected`` (mean
scores), ``rewards/accuracy`` (share of pairs with r_chosen > r_rejected) and
``rewards/margin`` (mean r_chosen - r_rejected).

With ``[lora]``, the adapter is re-targeted at the reward model (peft task
``SEQ_CLS``) and the new head is trained in full and saved with the adapter.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field

from panda.errors import PandaError
from panda.plugins.api import Options
from panda.plugins.methods.preference import PreferenceMethod, stacked_pairs


class RewardModelOptions(Options):
    margin: float = Field(0.0, description="Required reward gap: loss = -log sigmoid(r_chosen - "
                          "r_rejected - margin).")


def pad_token_id(tokenizer: Any) -> int:
    """The id panda pads pair batches with (the same rule as the data pipeline)."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def to_sequence_classifier(causal_lm: Any, pad_id: int) -> Any:
    """The ``AutoModelForSequenceClassification`` (num_labels = 1) sharing ``causal_lm``'s body.

    The shell is built on the meta device, so no second copy of the weights is
    ever allocated; only the head gets real storage.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.pad_token_id = pad_id
    config.architectures = None  # save_pretrained writes the new class's name
    body = causal_lm.get_submodule(causal_lm.base_model_prefix)
    reference = next(body.parameters())
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config, dtype=reference.dtype)
    except ValueError as exc:
        raise PandaError(f"method 'rm' needs a sequence-classification version of "
                         f"{type(causal_lm).__name__}; transformers has none: {exc}") from None
    setattr(model, model.base_model_prefix, body)
    for name, module in model.named_modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=reference.device, recurse=False)
            with torch.no_grad():
                for parameter in module.parameters(recurse=False):
                    parameter.normal_(0.0, config.initializer_range)
    # Activation checkpointing and attention settings live in the shared body; the flag that
    # says whether it is on is read through the model.
    return model


def rewards(model: Any, input_ids: Any) -> Any:
    """[rows] fp32 reward of each right-padded row: the score at its last non-pad token."""
    return model(input_ids=input_ids, use_cache=False).logits[:, 0].float()


class RewardModel(PreferenceMethod):
    """Reward model: a scalar head trained so chosen replies outscore rejected ones."""

    Options = RewardModelOptions

    @classmethod
    def check_recipe(cls, options: Any, recipe: Any) -> None:
        from panda.recipe_schema import InvalidKey

        if recipe.lora is not None and "lm_head" in recipe.lora.modules_to_save:
            raise InvalidKey(("lora", "modules_to_save"), "the reward model has no lm_head (rm "
                             "replaces it by a scalar score head, which is trained and saved "
                             "in full anyway); remove \"lm_head\"")

    def prepare(self, model: Any, ctx: Any) -> Any:
        """Replace the LM head by a scalar ``score`` head (see the module docstring)."""
        from panda.plugins.methods.reference import peft_model_of

        pad_id = pad_token_id(getattr(ctx, "tokenizer", None))
        peft = peft_model_of(model)
        if peft is None:
            return to_sequence_classifier(model, pad_id)
        return _retarget_lora(peft, pad_id)

    def pair_losses(self, model: Any, batch: dict[str, Any], real: Any) -> Any:
        import torch.nn.functional as F

        input_ids, _ = stacked_pairs(batch)
        scores = rewards(model, input_ids)
        pairs = scores.shape[0] // 2
        chosen, rejected = scores[:pairs], scores[pairs:]
        losses = -F.logsigmoid(chosen - rejected - self.options.margin)
        chosen, rejected = chosen.detach(), rejected.detach()
        return losses, {"rewards/chosen": chosen, "rewards/rejected": rejected,
                        "rewards/accuracy": (chosen > rejected).float(),
                        "rewards/margin": chosen - rejected}


def _retarget_lora(peft: Any, pad_id: int) -> Any:
    """A LoRA reward model: the same adapter settings on the sequence classifier, head trained.

    The causal adapter was just created (B = 0, nothing learnt), so it is taken off
    and put back on the new model with peft's SEQ_CLS task, which also trains and
    saves the ``score`` head in full.
    """
    import torch
    from peft import get_peft_model

    lora_config = copy.deepcopy(peft.peft_config[peft.active_adapter])
    base = peft.unload()
    lora_config.task_type = "SEQ_CLS"
    lora_config.modules_to_save = sorted(set(lora_config.modules_to_save or []) | {"score"})
    model = get_peft_model(to_sequence_classifier(base, pad_id), lora_config)
    for parameter in model.parameters():  # trainable weights in fp32, as apply_lora keeps them
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()
    return model
