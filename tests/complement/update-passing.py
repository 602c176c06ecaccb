#!/usr/bin/env python3
"""Writes tests/complement/passing.txt from the logs of a Complement run (run.sh's log folder).

Usage: tests/complement/update-passing.py [LOGS]   (default: $COMPLEMENT_WORK/logs/latest)

Lists every leaf test (a test without subtests) that passed, grouped by package, so that CI
(`COMPLEMENT_ONLY=tests/complement/passing.txt run.sh ...`) keeps them green. Tests named in
tests/complement/flaky.txt are left out even when they passed.
"""
import os
import re
import sys

RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): (\S+) \(")
HERE = os.path.dirname(os.path.abspath(__file__))


def results(log_path):
    out = {}
    with open(log_path, errors="replace") as f:
        for line in f:
            m = RESULT.match(line)
            if m:
                out[m.group(2)] = m.group(1)
    return out


def main():
    work = os.environ.get("COMPLEMENT_WORK", os.path.expanduser("~/.cache/hearth-complement"))
    logs = sys.argv[1] if len(sys.argv) > 1 else os.path.join(work, "logs", "latest")
    flaky_file = os.path.join(HERE, "flaky.txt")
    flaky = set()
    if os.path.exists(flaky_file):
        for line in open(flaky_file):
            name = line.split("#", 1)[0].strip()
            if name:
                flaky.add(name)
    lines = ["# Complement tests that pass against Hearth and must stay green (CI runs exactly these).",
             "# Regenerate after a full run: tests/complement/update-passing.py (see tests/README.md)."]
    for log in sorted(f for f in os.listdir(logs) if f.endswith(".log")):
        res = results(os.path.join(logs, log))
        parents = {"/".join(n.split("/")[:i]) for n in res for i in range(1, len(n.split("/")))}
        passing = sorted(n for n, r in res.items() if r == "PASS" and n not in parents and n not in flaky)
        if passing:
            lines.append(f"# {log[:-4].replace('_', '/', 1) if log.startswith('tests_') else log[:-4]}")
            lines.extend(passing)
    with open(os.path.join(HERE, "passing.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(lines) - 2} lines to tests/complement/passing.txt")


if __name__ == "__main__":
    main()
