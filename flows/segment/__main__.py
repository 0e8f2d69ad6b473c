"""`python -m flows.segment [params.yaml]` runs the stage's Prefect flow."""

from flows.cli import run_stage
from flows.segment.flow import main

if __name__ == "__main__":
    run_stage(main)
