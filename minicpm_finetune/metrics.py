"""``minicpm_finetune.metrics``, as code written for the flat layout imports it: the scores live in
``minicpm_finetune.evaluation.metrics``."""

from .evaluation.metrics import *  # noqa: F401,F403
