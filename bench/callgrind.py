"""Handler CPU per reconcile pass as callgrind's instruction count: load an
N-shard record, decide, save (`flotilla-bench-sim pass N`), minus the same
run without the pass (`pass N setup`). Instruction counts do not drift with
the machine's load the way times do.

    python bench/callgrind.py <flotilla-bench-sim> [--json PATH] [N ...]
"""

import json
import re
import subprocess
import sys


def instructions(argv):
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
                         capture_output=True, text=True, check=True)
    match = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
    if not match:
        raise SystemExit(f"callgrind printed no count:\n{out.stderr[-2000:]}")
    return int(match.group(1))


def main():
    args = sys.argv[1:]
    json_path = None
    if "--json" in args:
        i = args.index("--json")
        json_path = args[i + 1]
        del args[i:i + 2]
    binary, sizes = args[0], [int(n) for n in args[1:]] or [10, 1000]
    figures = {}
    print("Handler CPU per reconcile pass (callgrind instructions: load the record, decide, save):")
    for n in sizes:
        whole = instructions([binary, "pass", str(n)])
        setup = instructions([binary, "pass", str(n), "setup"])
        figures[str(n)] = whole - setup
        print(f"  {n:>5} shards: {whole - setup:>14,} instructions ({(whole - setup) / n:,.0f} per shard)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
