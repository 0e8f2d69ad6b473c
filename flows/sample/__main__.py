"""`python -m flows.sample [params.yaml]` generates the sample data set with the Prefect flow."""

from flows.cli import run_stage
from flows.sample.flow import main

if __name__ == "__main__":
    run_stage(main)
