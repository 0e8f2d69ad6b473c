"""`python -m flows.filtering [params.yaml]` runs the stage's Prefect flow."""

import sys

from flows.filtering.flow import main

if __name__ == "__main__":
    main(*sys.argv[1:2])
