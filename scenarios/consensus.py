"""`python -m teamorch.scenarios.consensus [--team TEAM.yaml] [--json OUT.json]` — see consensus.yaml."""

import sys

from teamorch.scenarios import run

if __name__ == "__main__":
    sys.exit(run("consensus"))
