"""CloudWatch embedded metric format, checked on the functions' real output:
reads the local stack's function log (.flotilla/logs/cargo-lambda-watch.log,
the binaries' stdout under AWS_LAMBDA_LOG_FORMAT=JSON, as Lambda runs them)
and checks every line carrying metrics against the EMF specification:

- the line is one top-level JSON object (CloudWatch extracts nothing from
  a metric nested inside another line, such as a tracing JSON log line);
- `_aws.Timestamp` is epoch milliseconds; `_aws.CloudWatchMetrics` is a list
  of directives, each with a Namespace, Dimensions (a list of up to 30-key
  dimension sets) and Metrics (at most 100, each a Name and an optional Unit
  CloudWatch knows);
- every dimension key is a string member of the root object, every metric
  name a number (or a list of at most 100 numbers) there; the line is under
  1 MB.

Exits 1 on any violation, or when a metric named on the command line never
appeared.

    .venv/bin/python tools/emf_check.py [LOG] --expect JobsSucceeded JobsFailed ...
"""

import argparse
import json
import sys

UNITS = {"Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes",
         "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second",
         "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second",
         "Kilobits/Second", "Megabits/Second", "Gigabits/Second", "Terabits/Second", "Count/Second", "None"}


def problems_of(root):
    found = []
    aws = root.get("_aws")
    if not isinstance(aws, dict):
        return ["_aws is not an object"]
    if not isinstance(aws.get("Timestamp"), int) or aws["Timestamp"] < 10 ** 12:
        found.append(f"_aws.Timestamp {aws.get('Timestamp')!r} is not epoch milliseconds")
    directives = aws.get("CloudWatchMetrics")
    if not isinstance(directives, list) or not directives:
        return found + ["_aws.CloudWatchMetrics is not a non-empty list"]
    for directive in directives:
        if not isinstance(directive.get("Namespace"), str) or not directive["Namespace"]:
            found.append("a directive has no Namespace")
        for dimension_set in directive.get("Dimensions", []):
            if not isinstance(dimension_set, list) or len(dimension_set) > 30:
                found.append(f"dimension set {dimension_set!r} is not a list of at most 30 keys")
                continue
            for key in dimension_set:
                if not isinstance(root.get(key), str):
                    found.append(f"dimension {key!r} is not a string member of the root")
        metrics = directive.get("Metrics")
        if not isinstance(metrics, list) or not 0 < len(metrics) <= 100:
            found.append("Metrics is not a list of 1-100 metrics")
            continue
        for metric in metrics:
            name = metric.get("Name")
            value = root.get(name)
            numbers = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) or len(numbers) > 100:
                found.append(f"metric {name!r} has no numeric value at the root ({value!r})")
            if "Unit" in metric and metric["Unit"] not in UNITS:
                found.append(f"metric {name!r} has unit {metric['Unit']!r}, not one CloudWatch knows")
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("log", nargs="?", default=".flotilla/logs/cargo-lambda-watch.log")
    parser.add_argument("--expect", nargs="*", default=[])
    args = parser.parse_args()
    seen, lines, failures = set(), 0, 0
    with open(args.log, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if "CloudWatchMetrics" not in line:
                continue
            try:
                root = json.loads(line)
            except json.JSONDecodeError:
                print(f"FAIL line {number}: metrics in a line that is not one JSON object: {line[:160]!r}")
                failures += 1
                continue
            if "_aws" not in root:
                print(f"FAIL line {number}: metrics nested in another line are not extracted: {line[:160]!r}")
                failures += 1
                continue
            lines += 1
            problems = problems_of(root)
            if len(line.encode()) > 1024 * 1024:
                problems.append("over 1 MB")
            for problem in problems:
                print(f"FAIL line {number}: {problem}")
            failures += bool(problems)
            for directive in root["_aws"].get("CloudWatchMetrics", []):
                seen.update(m.get("Name") for m in directive.get("Metrics", []))
    missing = [name for name in args.expect if name not in seen]
    if missing:
        print(f"FAIL no EMF line had {', '.join(missing)}")
        failures += 1
    print(f"{'ok  ' if not failures else 'FAIL'} {lines} EMF line(s) in {args.log}; metrics seen: {', '.join(sorted(seen))}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
