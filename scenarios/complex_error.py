"""`python -m teamorch.scenarios.complex_error [--team TEAM.yaml] [--json OUT.json]` — see complex_error.yaml."""

import sys

from teamorch.scenarios import run

if __name__ == "__main__":
    sys.exit(run("complex_error"))
