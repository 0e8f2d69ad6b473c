"""`python -m flows.report [params.yaml]` builds the data report."""

from flows.cli import run_stage
from flows.report.flow import main

if __name__ == "__main__":
    run_stage(main)
