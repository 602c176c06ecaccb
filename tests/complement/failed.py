#!/usr/bin/env python3
"""Prints the tests of a COMPLEMENT_ONLY list that did not pass in a run (run.sh's log folder), one per line,
in the same format, for a second run of just those (.ci/run retries them once; see tests/README.md).

Usage: tests/complement/failed.py LOGS LIST
A listed test failed when it, or one of its subtests, failed, or when it did not run at all.
"""
import os
import re
import sys

RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): (\S+) \(")


def listed(path):
    names = []
    with open(path) as f:
        for line in f:
            # as run.sh reads it: "#" starts a comment at a line's start or after a space
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            if line:
                names.append(line)
    return names


def main():
    logs, only = sys.argv[1], sys.argv[2]
    results = {}
    for log in os.listdir(logs):
        if log.endswith(".log"):
            with open(os.path.join(logs, log), errors="replace") as f:
                for line in f:
                    m = RESULT.match(line)
                    if m:
                        results[m.group(2)] = m.group(1)
    for name in listed(only):
        failed_below = any(r == "FAIL" and n.startswith(name + "/") for n, r in results.items())
        if name not in results or results[name] == "FAIL" or failed_below:
            print(name)


if __name__ == "__main__":
    main()
