"""`python -m flows.config [params.yaml]`: validate the whole params file, print one line.

dvc.yaml's ``check_params`` stage runs this whenever params.yaml changes, so a misspelt key
that no stage reads (hence no stage reruns for) still fails ``dvc repro`` in one line.
"""

import sys

from flows.config.params import load_params
from flows.config.typed import ParamsError


def main(argv: list[str]) -> int:
    path = argv[0] if argv else "params.yaml"
    try:
        load_params(path)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1  # as the stages' commands (flows/cli.py)
    print(f"{path}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
