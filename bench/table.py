"""The results table of `make bench`: every figure beside its baseline, the
ratio, the goal from the issue, and whether it is met.

    python bench/table.py <startup.json> <sim.json> <callgrind.json>
"""

import json
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def main():
    startup, sim, cpu = (load(p) for p in sys.argv[1:4])
    rows = []

    def row(figure, measured, against, ratio, goal, met):
        rows.append((figure, measured, against, ratio, goal, "met" if met else "MISSED"))

    results = startup.get("results", {})
    floor, boto3 = results.get("floor", {}), results.get("boto3", {})
    med = lambda r: (r.get("init_ms") or {}).get("median")
    rss = lambda r, n: (r.get("rss_mib") or {}).get(str(n))
    for name in ("intake", "reconcile", "tick", "notify"):
        r = results.get(name)
        if not r or not med(r) or not med(floor):
            continue
        row(f"init {name}", f"{med(r):.1f} ms", f"floor {med(floor):.1f} ms", f"{med(r) / med(floor):.2f}x",
            "<= 1.5x floor", med(r) <= 1.5 * med(floor))
        if med(boto3):
            row(f"init {name} vs boto3", f"{med(r):.1f} ms", f"boto3 {med(boto3):.0f} ms",
                f"{med(boto3) / med(r):.0f}x faster", ">= 50x faster", med(boto3) / med(r) >= 50)
        for n in sorted({1, startup.get("invocations", 1000)} if name != "tick" else {1}):
            mine, base = rss(r, n), rss(floor, n)
            if mine and base:
                row(f"peak RSS {name} after {n}", f"{mine:.1f} MiB", f"floor {base:.1f} MiB", f"{mine / base:.2f}x",
                    "<= 2x floor", mine <= 2 * base)
        boto_rss = rss(boto3, 1)
        if boto_rss and rss(r, 1):
            rows.append((f"peak RSS {name} vs boto3", f"{rss(r, 1):.1f} MiB", f"boto3 {boto_rss:.1f} MiB",
                         f"{boto_rss / rss(r, 1):.1f}x less", "-", "-"))
    for name, size in (startup.get("zip_mb") or {}).items():
        if size is not None:
            row(f"zip {name} (x86_64)", f"{size:.2f} MB", "-", "-", "<= 5 MB", size <= 5.0)
    for key, value in sim.items():
        if key.startswith("calls_"):
            n = key.split("_")[1]
            row(f"EC2+SSM calls, {n} instance(s)", f"{value['ec2_ssm']:,}", f"floor {value['floor']:,}",
                f"{value['ratio']:.2f}x", "<= 1.2x floor", value["ratio"] <= 1.2)
            row(f"simulated throttles, {n} instance(s)", str(value["throttled"]), "-", "-", "0",
                value["throttled"] == 0)
    many = sim.get("fifty_jobs")
    if many:
        row("50 x 100 instances: launch rate", f"{many['rate']:.2f}/s", "sustained 2/s",
            f"{many['share_of_sustained']:.0f}%", ">= 95%", many["share_of_sustained"] >= 95)
        row("50 x 100 instances: throttles", str(many["throttled"]), "-", "-", "0", many["throttled"] == 0)
        rows.append(("50 x 100 instances: fleets complete within", f"{many['spread_s']:.0f} s", "-", "-", "-", "-"))
    on, off = sim.get("overhead_events"), sim.get("overhead_polls")
    if on:
        row("overhead of a 1-hour job, events", f"{on['overhead_s']:.1f} s",
            f"polls only {off['overhead_s']:.1f} s" if off else "-", f"{on['overhead_pct']:.2f}%", "<= 2%",
            on["overhead_pct"] <= 2)
        row("idle instance time, command done to terminate", f"{on['idle_max_s']:.1f} s max",
            f"polls only {off['idle_max_s']:.1f} s" if off else "-", f"mean {on['idle_mean_s']:.1f} s", "<= 10 s",
            on["idle_max_s"] <= 10)
    # SSM lists a new command 0-60 s late in the simulator (AWS promises no
    # read-after-write): a command's end is seen at most one 15 s look
    # after its listing catches up.
    on, off = sim.get("overhead_events_lagged"), sim.get("overhead_polls_lagged")
    if on:
        row("idle to terminate, SSM listing lag 0-60 s", f"{on['idle_max_s']:.1f} s max",
            f"polls only {off['idle_max_s']:.1f} s" if off else "-", f"mean {on['idle_mean_s']:.1f} s",
            "<= 60 + 15 s", on["idle_max_s"] <= 75)
    # Flotilla's own cost per fault-free job (own_cost.rs's prices, events on).
    for key in sorted((k for k in sim if k.startswith("own_cost_")), key=lambda k: int(k.split("_")[-1])):
        own, n = sim[key], key.split("_")[-1]
        cost = own["cost"]
        share = cost["s3_writes_usd"] / cost["total_usd"] * 100 if cost["total_usd"] else 0
        label = f"Flotilla's own cost, {n} instance(s)"
        if n == "10":
            row(label, f"${cost['total_usd']:.5f}", f"record alone ${own['from_record_usd']:.5f}",
                f"{share:.0f}% S3 PUTs", f"<= ${own['goal_usd']}", cost["total_usd"] <= own["goal_usd"])
        else:
            rows.append((label, f"${cost['total_usd']:.5f}", f"record alone ${own['from_record_usd']:.5f}",
                         f"{share:.0f}% S3 PUTs", "-", "-"))
    for n, count in cpu.items():
        rows.append((f"CPU per pass, {n} shards", f"{count:,} instr", "-", f"{count / int(n):,.0f}/shard", "-", "-"))

    head = ("figure", "measured", "against", "ratio", "goal", "")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(6)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    missed = [r[0] for r in rows if r[5] == "MISSED"]
    print(f"\n{len(rows)} figures; goals missed: {len(missed)}" + (f" ({', '.join(missed)})" if missed else ""))


if __name__ == "__main__":
    main()
