"""``python -m adloop``: the same as the ``adloop`` command (child roles start this way)."""

from adloop.cli import main

if __name__ == "__main__":
    main()
