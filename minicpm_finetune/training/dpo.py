"""DPO (``finetune.py --stage dpo``) on TRL's ``DPOTrainer``, fed with pairs encoded by ``preference.py``.

TRL supplies the loss (``--dpo_loss_type``, ``--dpo_beta``; ``--sft_loss_weight`` adds TRL's ``sft`` term: the
mean negative log-likelihood of the chosen replies' scored tokens), the reference forward passes (with LoRA the
model itself with the adapter disabled: no second copy) and the reward metrics. What is ours:

- the data: TRL's own tokenization is replaced by ours (``_prepare_dataset`` passes the encoded pairs through),
  so chosen and rejected are rendered with the SFT chat template and scored with the SFT masks;
- full fine-tuning's reference model, loaded by us (``load_reference_model``): a frozen second copy of the
  starting model, sharded like the policy under ZeRO-3;
- the metric names: TRL names evaluation metrics ``eval_*`` whatever the prefix; the test set's are ``test_*``;
- the NaN/inf guard of SFT training (``NonFiniteLossGuard``).

Checked with TRL 1.16, transformers 5.24 and PEFT 0.21. TRL scores replies with its own fused LM head, which
finds a model's logit scale only under certain config names; MiniCPM's is exposed as
``MiniCPMConfig.logits_scaling`` for it (tests/training/test_dpo.py checks TRL's log-probabilities and loss against
ones computed by hand from the model's logits).

Logged at each training log and evaluation (mean over batches): ``rewards/accuracies`` (share of pairs whose
chosen reward is above the rejected one), ``rewards/margins`` (chosen minus rejected reward),
``rewards/chosen`` and ``rewards/rejected`` (beta * (policy - reference) log-probability of the reply),
``logps/chosen``/``logps/rejected`` and TRL's others.
"""

from __future__ import annotations

from dataclasses import MISSING, fields, replace

from trl import DPOConfig, DPOTrainer  # --stage dpo checks that TRL is installed before anything loads

from ..data.preference import PreferenceCollator
from ..export.portable import PortableSaves
from .safety import NonFiniteLossGuard


def add_dpo_settings(args, beta: float, loss_type: str, sft_loss_weight: float) -> None:
    """Give our TrainingArguments the DPOConfig fields TRL reads, in place (the object keeps its device,
    DeepSpeed and our own settings): DPOConfig's defaults, then ours."""
    for f in fields(DPOConfig):
        if not hasattr(args, f.name):
            setattr(args, f.name, f.default_factory() if f.default is MISSING else f.default)
    args.beta = beta
    args.loss_type = [loss_type] + (["sft"] if sft_loss_weight else [])
    args.loss_weights = [1.0] + ([sft_loss_weight] if sft_loss_weight else [])
    args.max_length = None  # pairs are already encoded within --model_max_length (preference.py)
    args.pad_to_multiple_of = None


def load_reference_model(model_args, training_args):
    """The reference of full fine-tuning: the starting model loaded again as load_model loads it (dtype,
    attention; under ZeRO-3 sharded), frozen. (TRL's own loader cannot find the class of a natively
    registered MiniCPM; with LoRA there is no reference to load: the adapter is switched off.)"""
    from ..models.loading import load_model

    model = load_model(replace(model_args, use_lora=False, qlora=False), training_args)
    return model.requires_grad_(False).eval()


class PreferenceTrainer(PortableSaves, NonFiniteLossGuard, DPOTrainer):
    """TRL's DPOTrainer on datasets from ``preference.tokenize_pairs``."""

    def __init__(self, *, model, args, train_dataset, eval_dataset, processing_class, ref_model=None, beta=0.1,
                 loss_type="sigmoid", sft_loss_weight=0.0, callbacks=None):
        add_dpo_settings(args, beta, loss_type, sft_loss_weight)
        super().__init__(model=model, ref_model=ref_model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         data_collator=PreferenceCollator(processing_class.pad_token_id))
        if ref_model is None and "ref" in getattr(self.model, "peft_config", {}):
            # TRL copies an adapter it did not create into a frozen "ref" adapter (to re-train a trained one).
            # Ours is fresh (LoRA B = 0: the base model's function), so the reference is the base with the
            # adapter off, as TRL does for adapters it wraps itself: no copy, and no ref/ folder in the output.
            self.model.delete_adapter("ref")

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset  # encoded by preference.tokenize_pairs with the SFT template and masks

    def _set_signature_columns_if_needed(self):
        # The columns PreferenceCollator reads ("length" feeds group_by_length); the rest would be dropped.
        self._signature_columns = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",
                                   "length", "ref_chosen_logps", "ref_rejected_logps"]

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # TRL collects the reward metrics of the evaluation's batches and adds them in log() as eval_*, whatever
        # the split. Taken here instead, they are named after the split (test_rewards/accuracies, ...) and still
        # join the loss in the one log entry that evaluate() writes and hands to the callbacks.
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        collected = self._metrics["eval"]
        output.metrics.update({f"{metric_key_prefix}_{key}": sum(values) / len(values)
                               for key, values in collected.items() if values})
        collected.clear()
        return output
