"""``python -m portpool``: the ``portpool`` command, for this interpreter's portpool."""

from portpool.cli import main

if __name__ == "__main__":
    main()
