"""`python -m teamorch.scenarios.code_review_pipeline [--team TEAM.yaml] [--json OUT.json]` — see code_review_pipeline.yaml."""

import sys

from teamorch.scenarios import run

if __name__ == "__main__":
    sys.exit(run("code_review_pipeline"))
