"""The training stage: the pipeline ``finetune.py`` runs, and what it needs beyond the other stages.

- ``finetune``: arguments -> data -> model -> Trainer -> evaluate -> save (``python finetune.py``).
- ``arguments``: the flags in three dataclasses, a config file, checks before anything is loaded.
- ``checks``: every check of the flags before loading, alone, together, and against the model's config.
- ``trainer``: the Trainer that scores generation at each evaluation; ``dpo``: preference tuning on TRL.
- ``first_loss``: the first batch's loss against ln(vocab), a warning when it is far above.
- ``safety``: resume, a NaN stop, signals; ``outputs``: the output folder's lock, checks and staged save.

Imports: every other stage; nothing imports it.
"""
