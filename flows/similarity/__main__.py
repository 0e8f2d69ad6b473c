"""`python -m flows.similarity [params.yaml]` runs the stage's Prefect flow."""

from flows.cli import run_stage
from flows.similarity.flow import main

if __name__ == "__main__":
    run_stage(main)
