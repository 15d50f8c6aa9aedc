"""``python -m tucker_peft.cli``: the same as the ``tucker-peft`` command."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
