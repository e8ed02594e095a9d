"""A/B of memfit's AdamW8bit step between versions of the code, against torch's fused AdamW, interleaved.

Each version (a git ref, or `.` for the working tree with its uncommitted changes) runs in its own worker process
that imports memfit from that version's `src` (extracted with `git archive`), builds its kernel and holds its own
parameters, gradients and states (the same seed in each: 50M fp32 values in 10 tensors by default, as in
bench/optim.py; `--tensors` splits them finer, as a real model is). A further worker steps torch's fused AdamW.
The controller asks the workers for one step at a time, round-robin, with a pause between steps so that no
worker's OpenMP threads still spin on the cores; each worker runs an untimed torch op on all threads right before
its timed `optimizer.step()`, as the backward pass does in training (torch's OpenMP workers spin for a few ms
after it). The medians, each version's step ÷ fused AdamW's within every round and each version's commit go to a
table and to results/optim_ab.json. This is how a kernel change is measured before it is committed.

    .venv/bin/python bench/optim_ab.py HEAD~1 .                  # the last commit against the working tree
    .venv/bin/python bench/optim_ab.py ba2794d~1 "ba2794d:no prefetch"   # REF:LABEL names a row; ~1 min
    .venv/bin/python bench/optim_ab.py . --params 5e6 --rounds 3       # smoke run
    .venv/bin/python bench/optim_ab.py HEAD~1 . --params 35136 --tensors 61 --name optim_ab_small
        # 61 tensors of 576 values (SmolLM2's norms), all below min_8bit_size: the fp32-state path
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, print_readme_tables, report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FUSED = "torch AdamW fused"
PAUSE_S = 0.2  # between steps: libgomp's workers spin a few ms after a parallel region


def _fail(message: str) -> None:
    print(f"optim_ab: {message}", file=sys.stderr)
    sys.exit(2)


def extract(ref: str, into: Path) -> Path:
    """The `src` folder of `ref` (`.`: this working tree's own), as a path to put first on PYTHONPATH; a ref's is
    extracted into the new folder `into`."""
    if ref == ".":
        return ROOT / "src"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True)
    if archive.returncode:
        _fail(f"{ref!r} is not a git ref of this repository ({archive.stderr.decode().strip()}); name a commit, a "
              "branch or '.' for the working tree.")
    into.mkdir(parents=True)
    with tempfile.TemporaryFile() as f:
        f.write(archive.stdout)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    return into / "src"


def _commit(ref: str) -> str:
    """The commit a ref named when it ran (HEAD moves on); for the working tree HEAD's, with "+changes" when its
    `src` differs from it (the code the worker imported)."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD" if ref == "." else ref], capture_output=True,
                            text=True).stdout.strip()
    changed = ref == "." and subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True,
                                            text=True).stdout.strip()
    return commit + ("+changes" if changed else "")


def worker(kind: str, params: int, tensors: int) -> None:
    """Serve steps on stdin ("step" -> one line: the step's seconds) until it closes. `kind`: FUSED, or the `src`
    folder memfit must be imported from."""
    import torch

    torch.manual_seed(0)
    n_each = params // tensors
    ps = [torch.nn.Parameter(torch.randn(n_each) * 0.02) for _ in range(tensors)]
    for p in ps:
        p.grad = torch.randn(n_each) * 1e-3
    if kind == FUSED:
        opt = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, fused=True)
    else:
        import memfit
        from memfit.optim import AdamW8bit, kernels

        assert Path(memfit.__file__).resolve().is_relative_to(Path(kind).resolve()), memfit.__file__
        opt = AdamW8bit(ps, lr=1e-4, weight_decay=0.01)
        print(json.dumps({"kernel": kernels.vector_path()}), flush=True)
    opt.step()  # warm-up: allocates the states, builds the kernel
    a, b = torch.rand(params // 10), torch.empty(params // 10)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        torch.mul(a, 2.0, out=b)  # the op before the step (in training: the backward pass)
        t0 = time.perf_counter()
        opt.step()
        print(json.dumps({"step_s": time.perf_counter() - t0}), flush=True)


def _start(src: Path | None, params: int, tensors: int) -> subprocess.Popen:
    """A worker stepping fused AdamW (`src` None) or the AdamW8bit of memfit imported from `src`."""
    env = dict(os.environ, PYTHONPATH=str(src)) if src else dict(os.environ)
    cmd = [sys.executable, __file__, "--worker", FUSED if src is None else str(src), "--params", str(params),
           "--tensors", str(tensors)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _read(proc: subprocess.Popen, name: str) -> dict:
    line = proc.stdout.readline()
    if not line:
        _fail(f"the worker for {name} ended before it answered (see its error above).")
    return json.loads(line)


def readme_tables(payload: dict) -> dict[str, str]:
    """README.md's table, from results/optim_ab.json alone (bench/readme_check.py compares the two)."""
    rows = []
    for name, r in payload["results"].items():
        ratios = r["within_round"]
        rows.append([name, f"{r['step_s'] * 1e3:.1f}", f"{r['vs_fused']:.2f}", f"{min(ratios):.2f}-{max(ratios):.2f}"])
    return {"ab": md_table(["version", "step ms", "step ÷ fused AdamW", "within-round range"], "lrrr", rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("refs", nargs="*", help="versions of memfit to compare: git refs, '.' for the working tree, "
                    "each optionally REF:LABEL (git refs never contain ':')")
    ap.add_argument("--params", type=float, default=50e6, help="total parameters")
    ap.add_argument("--tensors", type=int, default=10, help="equal tensors they are split into")
    ap.add_argument("--rounds", type=int, default=9, help="timed steps per version, interleaved")
    ap.add_argument("--name", default="optim_ab", help="results file: results/NAME.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    params = int(args.params)
    if args.worker:
        worker(args.worker, params, args.tensors)
        return
    if not args.refs:
        ap.error("name at least one version to time, e.g. `HEAD~1 .`")
    with tempfile.TemporaryDirectory(prefix="memfit-optim-ab-") as tmp:
        versions = [(ref, f"AdamW8bit @ {ref}" + (f": {label}" if label else ""))
                    for ref, _, label in (arg.partition(":") for arg in args.refs)]
        names = [FUSED, *(name for _, name in versions)]
        if len(set(names)) < len(names):
            _fail("a version is named twice; give each its own REF or REF:LABEL.")
        procs, kernels, commits = {}, {}, {}
        for i, (ref, name) in enumerate([(None, FUSED), *versions]):  # one at a time: each builds and warms up alone
            procs[name] = _start(None if ref is None else extract(ref, Path(tmp) / str(i)), params, args.tensors)
            if ref is not None:
                kernels[name] = _read(procs[name], name)["kernel"]
                commits[name] = _commit(ref)
            _read(procs[name], name)  # ready: warmed up
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                time.sleep(PAUSE_S)
                procs[name].stdin.write("step\n")
                procs[name].stdin.flush()
                times[name].append(_read(procs[name], name)["step_s"])
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    fused = statistics.median(times[FUSED])
    rows, results = [], {}
    for name in names:
        ratios = [a / b for a, b in zip(times[name], times[FUSED], strict=True)]
        step = statistics.median(times[name])
        results[name] = {"step_s": step, "vs_fused": step / fused, "within_round": ratios, "all_s": times[name],
                         "kernel": kernels.get(name), "commit": commits.get(name)}
        rows.append([name, step * 1e3, step / fused, f"{min(ratios):.2f}-{max(ratios):.2f}"])
    stepped = params // args.tensors * args.tensors
    title = (f"AdamW8bit step by version, {stepped:,} fp32 params in {args.tensors} tensors, median of "
             f"{args.rounds} interleaved steps")
    path = report(args.name, title, ["version", "step ms", "÷ fused AdamW", "within-round range"], rows,
                  {"params": stepped, "tensors": args.tensors, "rounds": args.rounds, "refs": args.refs,
                   "results": results})
    print_readme_tables(readme_tables, path)


if __name__ == "__main__":
    main()
