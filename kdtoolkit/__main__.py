"""``python -m kdtoolkit``: the command line, also what ``torchrun -m kdtoolkit`` starts."""

from kdtoolkit.cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="kdtoolkit")
