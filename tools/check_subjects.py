"""Commit subjects fit one line (72 characters: what `git log --oneline`, GitHub and mail clients show whole).

Checks every commit made since the rule was adopted (RULE_ADOPTED_AFTER, excluded); older history is left as it
is. Run by `./dev test`. Outside a git checkout, or in a shallow clone that lacks that commit, it checks the
commits it can see (HEAD at least) and says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LIMIT = 72
RULE_ADOPTED_AFTER = "e44d20e"  # the last commit before the rule


def _git(*args: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def subjects() -> list[tuple[str, str]]:
    """(short hash, subject) of the commits the rule covers, newest first."""
    if _git("rev-parse", "--verify", "-q", "HEAD").returncode != 0:
        return []
    known = _git("rev-parse", "--verify", "-q", RULE_ADOPTED_AFTER + "^{commit}").returncode == 0
    span = [f"{RULE_ADOPTED_AFTER}..HEAD"] if known else ["-1", "HEAD"]
    log = _git("log", "--format=%h %s", *span).stdout
    return [tuple(line.split(" ", 1)) for line in log.splitlines() if line]


def main() -> int:
    too_long = [(h, s) for h, s in subjects() if len(s) > LIMIT]
    for h, s in too_long:
        print(f"commit {h}: subject is {len(s)} characters, more than {LIMIT}: {s[:LIMIT]}…", file=sys.stderr)
    if too_long:
        print(
            "Reword them (git rebase -i, reword) so the subject fits one line; details go in the body.", file=sys.stderr
        )
    return 1 if too_long else 0


if __name__ == "__main__":
    sys.exit(main())
