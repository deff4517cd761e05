"""Console commands (pyproject.toml) for modules whose main() returns something other than an exit status."""


def finetune() -> int:
    """`minicpm-finetune`: finetune.main() returns the Trainer (for callers in Python); a command returns 0."""
    from .finetune import main

    main()
    return 0
