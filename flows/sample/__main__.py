"""``python -m flows.sample [params.yaml]``: generate the sample data set with the Prefect flow."""

from __future__ import annotations

import sys

from flows import runtime

runtime.configure()  # before prefect is imported

from flows.sample.flow import sample_flow  # noqa: E402


def main(argv: list[str]) -> int:
    sample_flow(params_path=argv[0] if argv else "params.yaml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
