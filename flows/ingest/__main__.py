"""`python -m flows.ingest [params.yaml]` runs the stage's Prefect flow."""

import sys

from flows.ingest.flow import main

if __name__ == "__main__":
    main(*sys.argv[1:2])
