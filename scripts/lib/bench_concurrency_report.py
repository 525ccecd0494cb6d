#!/usr/bin/env python3
"""The table and chart of scripts/bench-concurrency, from its results directory.

Usage: bench_concurrency_report.py OUT_DIR REPORT_MD CHART_PNG [BASELINE_DIR]

OUT_DIR holds results.jsonl (JSON lines of examples/bench), meta.json and commands (written
by scripts/bench-concurrency). The section goes into REPORT_MD between "<!-- concurrency:begin -->"
and "<!-- concurrency:end -->": replaced when the markers are there, else inserted before
"<!-- analysis:begin -->", else appended. BASELINE_DIR (optional, another run's OUT_DIR) adds its
llm-pool figures as "before".
"""
import json
import os
import sys

BEGIN, END = "<!-- concurrency:begin -->", "<!-- concurrency:end -->"
NAMES = {"smollm2": "SmolLM2-135M Q4_1", "gemma3": "Gemma-3-270M Q4_K_M"}
# Prompts that scripts/bench-concurrency gives as the ids of a text.
PROMPT_TEXT = {"gemma3": '"<bos>The history of the Roman Empire begins"; the default ids get end of sequence at once'}
# (key, label, in the chart: colour, line style). The first three are the headline: llm-pool at
# compute_nice 0 (the priority llama-server's threads run at) and llama-server with as many
# slots as streams. The last two are secondary: llm-pool HTTP at its default compute_nice 5, and
# llama-server with 4 slots whatever the streams.
IMPLS = [
    ("inproc", "llm-pool in-process", "tab:blue", "-"),
    ("http", "llm-pool HTTP", "tab:orange", "-"),
    ("llama", "llama-server -np N", "tab:green", "-"),
    ("http5", "llm-pool HTTP, compute_nice 5", "tab:orange", ":"),
    ("llama4", "llama-server -np 4", "tab:green", ":"),
]
# results.jsonl's `impl` of each HTTP key.
HTTP_IMPLS = {"llm-pool-r1": "http", "llm-pool-r1-nice5": "http5", "llama-server": "llama",
              "llama-server-np4": "llama4"}


def load(out):
    rows = []
    path = os.path.join(out, "results.jsonl")
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def figures(rows, model):
    """{impl key: {streams: {"agg": row, "ttft": row}}} for one model."""
    res = {k: {} for k, _, _, _ in IMPLS}
    for r in rows:
        if r.get("model") != model or "median" not in r or "streams" not in r:
            continue
        n, test = r["streams"], r.get("test", "")
        if r.get("bench") == "concurrency" and r.get("impl") == "llm-pool" and r.get("replicas") == 1:
            key = "inproc"
            test = test.replace("_r1_", "_")
        elif r.get("bench") == "http" and r.get("impl") in HTTP_IMPLS:
            key = HTTP_IMPLS[r["impl"]]
        else:
            continue
        if test == f"c{n}_aggregate":
            res[key].setdefault(n, {})["agg"] = r
        elif test == f"c{n}_ttft":
            res[key].setdefault(n, {})["ttft"] = r
    return res


def skips(rows, model):
    return [f"{r['impl']} {r['bench']}: {r['skipped']}" for r in rows
            if r.get("model") == model and "skipped" in r]


def agg(fig, key, n):
    r = fig[key].get(n, {}).get("agg")
    return r["median"] if r else None


def ttft(fig, key, n, p):
    r = fig[key].get(n, {}).get("ttft")
    return r[p] if r else None


def cell_agg(fig, key, n):
    r = fig[key].get(n, {}).get("agg")
    if r is None:
        return "n/a"
    if r.get("n", 1) > 1:
        return f"{r['median']:.1f} ({r['min']:.0f}-{r['max']:.0f})"
    return f"{r['median']:.1f}"


def cell_ttft(fig, key, n):
    r = fig[key].get(n, {}).get("ttft")
    if r is None:
        return "n/a"
    return f"{r['median']:.0f} / {r['p99']:.0f}"


def ratio(a, b):
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def other_cpu(out):
    """{(model, sweep key): (mean, max, attempts)}: the CPU share of other processes during the
    (last attempt of the) sweep, and how many attempts there were. Sweep keys are the IMPLS keys,
    but llama-server with as many slots as streams runs one sweep per streams value, `llamaN`."""
    try:
        samples = [line.split() for line in open(os.path.join(out, "cpu-other.log"))]
        phases = [line.split() for line in open(os.path.join(out, "phases"))]
    except OSError:
        return {}
    samples = [(float(s[0]), float(s[1])) for s in samples if len(s) >= 2]
    begins, attempts, res = {}, {}, {}
    for p in phases:
        t, m, key, what = float(p[0]), p[1], p[2], p[3]
        if what == "begin":
            begins[(m, key)] = t
            attempts[(m, key)] = attempts.get((m, key), 0) + 1
        elif (m, key) in begins:
            # A sample covers the 2 s before its time.
            xs = [v for ts, v in samples if begins[(m, key)] + 1 < ts <= t + 1]
            res[(m, key)] = (sum(xs) / len(xs) if xs else 0.0, max(xs) if xs else 0.0, attempts[(m, key)])
    return res


def chart(path, models, figs, before, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    for row, m in enumerate(models):
        f = figs[m]
        ax_t, ax_l = axes[row]
        for key, label, colour, style in IMPLS:
            secondary = style != "-"
            ns = sorted(n for n in f[key] if "agg" in f[key][n])
            if ns:
                ax_t.plot(ns, [agg(f, key, n) for n in ns], "o" + style, color=colour, label=label,
                          alpha=0.6 if secondary else 1.0)
            ns = sorted(n for n in f[key] if "ttft" in f[key][n])
            # The TTFT panel keeps to the headline, which is readable at five lines' worth.
            if ns and not secondary:
                ax_l.plot(ns, [ttft(f, key, n, "median") for n in ns], "o-", color=colour,
                          label=f"{label} p50")
                ax_l.plot(ns, [ttft(f, key, n, "p99") for n in ns], "s--", color=colour,
                          alpha=0.7, label=f"{label} p99")
        if before:
            b = before[m]
            for key, label, colour, _ in IMPLS[:2]:
                ns = sorted(n for n in b[key] if "agg" in b[key][n])
                if ns:
                    ax_t.plot(ns, [agg(b, key, n) for n in ns], ":", color=colour, alpha=0.6,
                              label=f"{label} (before)")
        for ax in (ax_t, ax_l):
            ax.set_xscale("log", base=2)
            ns = meta["streams"]
            ax.set_xticks(ns)
            ax.set_xticklabels([str(n) for n in ns])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("concurrent streams")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_ylim(bottom=0)
        ax_t.set_ylabel("aggregate tok/s")
        ax_t.set_title(f"{NAMES.get(m, m)}: aggregate throughput")
        ax_t.legend(fontsize=8)
        ax_l.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax_l.yaxis.set_major_formatter(plain)
        ax_l.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax_l.set_ylabel("TTFT ms (log)")
        ax_l.set_title(f"{NAMES.get(m, m)}: time to first token")
        ax_l.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{meta['threads']} threads each, {meta['gen']} tokens per stream, 8-token prompts "
                 f"of their own, llm-pool at compute_nice 0 unless labelled ({meta['cpu']})",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


def section(out, report, chart_path, meta, models, figs, rows, before, baseline):
    L = []
    A = L.append
    el = meta["elapsed_s"]
    t = meta["threads"]
    A(BEGIN)
    A(f"## Concurrent streams: llm-pool against llama-server ({t} threads)")
    A("")
    A("Generated by `scripts/bench-concurrency`" +
      (" in **smoke mode** (few tokens, 1 repetition: not meaningful figures)" if meta["smoke"] else "") +
      f" on {meta['date']}; the measurements took {el // 60} min {el % 60} s. "
      "Every figure in this section comes from that one run on this one machine.")
    A("")
    A(f"- Machine: {meta['cpu']} ({meta['nproc']} logical cores); load average (1/5/15 min) at start / end: "
      f"{meta['loadavg_start_end']}.")
    nice = meta.get("compute_nice", {"headline": 0, "secondary": 5})
    A(f"- Both at **{t} threads**: llm-pool with `CANDLE_NUM_THREADS={t} RAYON_NUM_THREADS={t}`, "
      f"llama.cpp with `llama-server -t {t}`. The benchmark client runs on the same cores.")
    A(f"- **Both at the same priority in the headline columns**: llm-pool with `[pool] compute_nice = "
      f"{nice['headline']}` (`bench --compute-nice {nice['headline']}`), so its compute threads run at the "
      "nice value llama-server's run at. By default llm-pool runs them at nice 5 below its HTTP threads, "
      "and a benchmark client on the same cores then preempts llm-pool's compute but not llama-server's. "
      f"The secondary column `llm-pool HTTP, compute_nice {nice['secondary']}` is the default.")
    ctx = meta.get("context", {})
    A(f"- llm-pool commit {meta['commit']}{' (with uncommitted changes)' if meta['dirty'] else ''}, one replica"
      + (", with model config " + ", ".join(f"`{c}`" for c in meta["model_config"]) if meta["model_config"] else "")
      + f"; llama.cpp {meta['llama_cpp_source']} ({meta['llama_cpp_version']}). **llama-server gets as many "
      "slots as streams** in the headline (`-np N` for N streams, one server per streams value), each slot "
      "with the context llm-pool gives one sequence: `-c` = N x "
      + (", ".join(f"{c} ({NAMES.get(m, m)})" for m, c in ctx.items()) if ctx else "that context")
      + " (`bench context`), since llama-server divides `-c` among its slots. The secondary column "
      "`llama-server -np 4` is one server with 4 slots (`-c` = 4 x the same) for every streams value, "
      "so streams beyond 4 wait for a free slot.")
    if os.path.exists(os.path.join(out, "llama-cpp-note")):
        A("- llama.cpp ran with weight repacking off (`--no-repack`): its native build dies with SIGILL on "
          "AMX instructions on this VM (see the main report).")
    prompts = []
    for m in models:
        aggs = [r for r in rows if r.get("model") == m and str(r.get("test", "")).endswith("_aggregate")]
        ps = {json.dumps(r["prompt_ids"]) for r in aggs if "prompt_ids" in r}
        # Every implementation must have sent the same prompts for the same streams value.
        sent = {}
        for r in aggs:
            if "prompts_fingerprint" in r:
                sent.setdefault(r.get("streams"), set()).add(r["prompts_fingerprint"])
        differ = sorted(n for n, fps in sent.items() if len(fps) > 1)
        if len(ps) == 1:
            ids = json.loads(ps.pop())
            prompts.append(f"{NAMES.get(m, m)} `{','.join(map(str, ids))}`" + (f" ({PROMPT_TEXT[m]})" if m in PROMPT_TEXT else ""))
        elif ps:
            prompts.append(f"{NAMES.get(m, m)}: **different prompts across implementations** ({', '.join(sorted(ps))})")
        if differ:
            prompts.append(f"{NAMES.get(m, m)}: **different prompts across implementations at {differ} streams**")
    A(f"- Method: N concurrent streamed requests, each with **a prompt of its own**: the model's 8-token base "
      f"({'; '.join(prompts)}) with its first id replaced by one that no other request of the run starts with, chosen "
      "by streams value, burst and stream, so that every implementation gets the same prompts (checked by a "
      "fingerprint of every prompt sent) and no prompt shares a prefix with another. **No prefill is served from a "
      "prefix cache**: the run fails when llm-pool (`CacheUse::PrefixHit`, `usage.prompt_tokens_details.cached_tokens`) "
      "or llama-server (`cached_tokens`, `timings.cache_n`) reports a reused prompt token. "
      f"`max_tokens` {meta['gen']}, temperature 0. **Aggregate tok/s** = all generated tokens / wall time "
      f"of the burst, the median over {meta['reps']} bursts after 1 warm-up burst (min-max in brackets). "
      "**TTFT** p50 / p99 in ms over every stream of every measured burst, from sending the request to "
      "the first token (in-process: the first `Token` event; HTTP: the first non-empty text chunk). "
      "`in-process` is the `Pool` API (`Pool::generate_stream`); the HTTP columns use the same client "
      "(`bench http`, streamed `/v1/completions`, a new connection per request) against `llm-pool serve` and "
      "`llama-server`.")
    w = meta.get("waited_s")
    if w:
        A(f"- Before each sweep the run waited for other processes to use under 10% of the CPUs "
          f"({w // 60} min {w % 60} s of waiting in all, included in the time above).")
    if before:
        A(f"- `before`: llm-pool's figures from the earlier run in `{baseline}` "
          f"(commit {before['meta'].get('commit', '?')}, {before['meta'].get('date', '?')}).")
    A("")
    rel = os.path.relpath(os.path.abspath(chart_path), os.path.dirname(os.path.abspath(report)))
    A(f"![aggregate tok/s and TTFT against concurrent streams]({rel})")
    A("")
    for m in models:
        f = figs[m]
        A(f"### {NAMES.get(m, m)}")
        A("")
        head = ["streams", "llm-pool in-process tok/s", "TTFT p50 / p99", "llm-pool HTTP tok/s", "TTFT p50 / p99",
                "llama-server -np N tok/s", "TTFT p50 / p99", "llm-pool HTTP / llama-server",
                "llm-pool HTTP N / 1",
                f"secondary: llm-pool HTTP, compute_nice {nice['secondary']}, tok/s", "TTFT p50 / p99",
                "secondary: llama-server -np 4 tok/s", "TTFT p50 / p99"]
        if before:
            head += ["in-process / before", "HTTP / before"]
        A("| " + " | ".join(head) + " |")
        A("|" + " --- |" * len(head))
        ns = sorted({n for k in f for n in f[k]})
        for n in ns:
            cells = [str(n), cell_agg(f, "inproc", n), cell_ttft(f, "inproc", n), cell_agg(f, "http", n),
                     cell_ttft(f, "http", n), cell_agg(f, "llama", n), cell_ttft(f, "llama", n),
                     ratio(agg(f, "http", n), agg(f, "llama", n)), ratio(agg(f, "http", n), agg(f, "http", 1)),
                     cell_agg(f, "http5", n), cell_ttft(f, "http5", n), cell_agg(f, "llama4", n),
                     cell_ttft(f, "llama4", n)]
            if before:
                b = before[m]
                cells += [ratio(agg(f, "inproc", n), agg(b, "inproc", n)), ratio(agg(f, "http", n), agg(b, "http", n))]
            A("| " + " | ".join(cells) + " |")
        A("")
        short = []
        for r in rows:
            if r.get("model") == m and str(r.get("test", "")).endswith("_aggregate") \
                    and r.get("tokens_per_stream") is not None and r["tokens_per_stream"] < meta["gen"] - 1e-9:
                short.append(f"{r['impl']} {r['test'].split('_')[0]}: {r['tokens_per_stream']:.1f}")
        if short:
            A(f"Some streams ended before {meta['gen']} tokens (end of sequence); mean tokens per stream: "
              + ", ".join(short) + ". Aggregate tok/s counts the tokens actually generated.")
            A("")
        oc = other_cpu(out)
        labels = {key: label for key, label, _, _ in IMPLS}
        shares = []
        for (om, key), share in oc.items():
            if om != m:
                continue
            if key.startswith("llama") and key[5:].isdigit():
                label = f"llama-server -np {key[5:]}"
            else:
                label = labels.get(key, key)
            shares.append((label, share))
        if shares:
            bad = any(mean > 0.05 for _, (mean, _, _) in shares)
            A(("**Other work on the machine disturbed these figures**: " if bad else "")
              + "CPU share used by other processes during each sweep (mean, max over 2 s): "
              + "; ".join(f"{label} {mean:.0%} ({mx:.0%})" + (f", measured {n} times, the last counts" if n > 1 else "")
                          for label, (mean, mx, n) in shares) + ".")
            A("")
        for s in skips(rows, m):
            A(f"Not measured: {s}")
            A("")
    A("Reproduce (the whole run, then the commands it ran; `target/release` is the cargo target directory"
      + (f", `{meta['cargo_target_dir']}` in this run" if meta.get("cargo_target_dir") else "") + "):")
    A("")
    A("```sh")
    cmd = "scripts/bench-concurrency" + (" --smoke" if meta["smoke"] else "")
    for c in meta["model_config"]:
        cmd += f" --model-config '{c}'"
    A(cmd)
    try:
        A(open(os.path.join(out, "commands")).read().rstrip())
    except OSError:
        pass
    A("```")
    A("")
    rout = os.path.relpath(os.path.abspath(out))
    A(f"Raw results: `{rout}/results.jsonl` (JSON lines; TTFT rows also carry p10/p50/p90 and min/max), "
      f"the run's log in `{rout}/bench.log`.")
    A(END)
    return "\n".join(L)


def write_section(report, text):
    old = open(report).read() if os.path.exists(report) else ""
    if BEGIN in old and END in old and old.index(BEGIN) < old.index(END):
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    elif "<!-- analysis:begin -->" in old:
        i = old.index("<!-- analysis:begin -->")
        new = old[:i] + text + "\n\n" + old[i:]
    elif old:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    else:
        new = "# Benchmarks\n\n" + text + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    with open(report, "w") as f:
        f.write(new)


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    out, report, chart_path = sys.argv[1:4]
    baseline = sys.argv[4] if len(sys.argv) == 5 and sys.argv[4] else None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("bench-concurrency: the Python package matplotlib is missing; "
                 "install it with: python3 -m pip install matplotlib")
    meta = json.load(open(os.path.join(out, "meta.json")))
    rows = load(out)
    models = meta["models"]
    figs = {m: figures(rows, m) for m in models}
    if not any(f[k] for f in figs.values() for k in f):
        sys.exit(f"bench-concurrency: no concurrency figures in {out}/results.jsonl")
    before = None
    if baseline:
        brows = load(baseline)
        before = {m: figures(brows, m) for m in models}
        try:
            before["meta"] = json.load(open(os.path.join(baseline, "meta.json")))
        except OSError:
            before["meta"] = {}
    chart(chart_path, models, figs, before, meta)
    write_section(report, section(out, report, chart_path, meta, models, figs, rows, before, baseline))
    print(f"bench-concurrency: wrote {chart_path} and the section of {report}", file=sys.stderr)


if __name__ == "__main__":
    main()
