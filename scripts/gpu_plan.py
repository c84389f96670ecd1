"""The prepared GPU run (scripts/gpu_check.sh runs it): every figure the first lent GPU should bring back,
in two device calls sized to the device budget, each figure kept the moment it is measured; and the same
plan rehearsed on a CPU with tiny sizes (``--rehearse``), so it cannot rot between lent devices.

    python3 scripts/gpu_plan.py --call 1 --out DIR [--rehearse] [--resume] [--commit REV]
    python3 scripts/gpu_plan.py --list            the stages, their timeouts, and the device calls to make

Each stage is one command (or several at once) under ``timeout -k``, its timeout cut to what is left of
the call's budget, so the call always ends in time to send $OUT back. Every JSON line a stage prints is
written at once, with the card, driver, versions and commit, to OUT/rows.jsonl; its other output goes to
OUT/log.txt; a stage's own row says how it ended, and where a timeout cut it, after which row and line.
OUT/summary.md is the table for BENCHMARKS.md. At most 8 files come back from a call: these three and the
compile cache (OUT/inductor_cache.tar.xz, when small), which the next lent session carries back to start
warm. Finished stages are recorded under runs/gpu_plan/ (kept on a warm machine): ``--resume`` reruns
only what did not finish.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE = os.path.join(ROOT, "runs", "gpu_plan")
CACHE = "/tmp/maskco-inductor"  # a fixed path: Inductor's cache entries name their folder
CARRIED_CACHE = os.path.join(ROOT, ".carry", "inductor_cache.tar.xz")  # from a previous lent session
DALI_SITE = "/tmp/maskco-dali"
KILL_AFTER = 10  # seconds between timeout's SIGTERM and its SIGKILL (a compile may ignore the first)
RESERVE = 20  # seconds of each call kept for the summary and the compile cache
CACHE_LIMIT = 15 << 20  # the compile cache comes back only when smaller (a file may be 16 MiB)
MAX_FILES = 8  # what a device call sends back


@dataclass
class Stage:
    name: str
    call: int
    timeout: int  # seconds; the device's allowance (cold compiles included), used by the rehearsal too
    why: str
    commands: list = field(default_factory=list)  # several: run at once
    env: dict = field(default_factory=dict)  # added to the environment of its commands


@dataclass
class Sizes:
    """The plan's sizes: ResNet-50 at 224 px on the GPU; tiny CPU stand-ins in the rehearsal."""

    small: int = 32
    large: int = 128
    images: int = 4096  # 128 batches of 32, 32 of 128: a warm-up round and 3 repeats from one epoch
    data_procs: int = 8
    threads: int = 14
    model: tuple = ()  # extra bench options
    steps: tuple = ("--steps=20", "--repeats=3", "--batches=30")
    steps_large: tuple = ("--steps=10", "--repeats=3", "--batches=8")
    modes: str = "eager,graphs,compiled"
    e2e_mode: str = "graphs"
    compile_sets: tuple = (("steps", "compiled"), ("steps", "graphs"), ("prefetch", "graphs"))
    compile_backend: str = "inductor"
    pretrain: tuple = ("--max_steps=40", "--log_every=10", "--compile=true", "--compile_mode=reduce-overhead")
    dali: str = "dali"
    tests: tuple = ("tests/test_roi.py", "tests/test_loss.py", "tests/test_boxes.py", "tests/test_augment.py",
                    "tests/test_model.py", "tests/test_step.py", "tests/test_bench_show.py")
    dali_tests: tuple = ("tests/test_dali.py",)


DEVICE = Sizes()
REHEARSAL = Sizes(  # CPU stand-ins: ResNet-18 at 64 px with the CPU demo's heads, a step or two, eager where
    # CUDA graphs mean nothing, dynamo alone (backend "eager") for the compiled mode, DALI's CPU mode
    small=4, large=8, images=96, data_procs=2, threads=2,
    model=("--config=cpu_demo", "--arch=resnet18", "--image-size=64"),
    steps=("--steps=1", "--repeats=1", "--batches=2"), steps_large=("--steps=1", "--repeats=1", "--batches=2"),
    modes="eager,compiled", e2e_mode="eager", compile_sets=(("steps", "compiled"),), compile_backend="eager",
    pretrain=("--max_steps=3", "--log_every=1", "--arch=resnet18", "--image_size=64", "--box_min_size=8",
              "--batch_size=8", "--virtual_gpus=2", "--compile=false", "--device=cpu"),
    dali="dali-cpu", tests=("tests/test_roi.py", "tests/test_loss.py"), dali_tests=())


def plan(rehearse: bool, py: str) -> list[Stage]:
    """The stages in the order they run: per call, the figures most worth having first."""
    s = REHEARSAL if rehearse else DEVICE
    data = os.path.join(ROOT, "data", "gpu_plan" + ("_rehearsal" if rehearse else ""))
    listing = os.path.join(data, "list.txt")
    bench = [py, "-m", "maskco.bench", *s.model, f"--threads={s.threads}", f"--compile-backend={s.compile_backend}",
             f"--data={listing}"]
    quiet = "decode,baseline,roi"

    def at(batch, *extra):
        return [*bench, f"--batch-size={batch}", f"--out-dir={STATE}/bench{batch}", f"--jsonl={STATE}/bench.jsonl",
                *extra]

    per = s.images // s.data_procs
    make = ("import sys; from pipelines.sample_data import make_sample_data as m; "
            "m(sys.argv[1], num_images=int(sys.argv[2]), seed=int(sys.argv[3]))")
    wheels = [py, "scripts/gpu_wheels.py"]
    return [
        # ---- call 1: torch only
        Stage("env", 1, 30, "imports torch, asks the driver", [[py, "-c", ENV]]),
        Stage("data", 1, 60, f"{s.images} JPEGs, {s.data_procs} writers at once",
              [[py, "-c", make, os.path.join(data, f"s{k}"), str(per), str(k)] for k in range(s.data_procs)]),
        Stage("compile", 1, 110, "every graph set of call 1 compiled cold at once, one process each (60-100 s "
              "each alone): the timed stages then load them from Inductor's cache",
              [at(batch, f"--compile-only={what}", f"--modes={mode}", f"--e2e-mode={mode}")
               for batch in (s.small, s.large) for what, mode in s.compile_sets],
              env={"TORCHINDUCTOR_COMPILE_THREADS": "4"}),  # 6 x 4 compile workers on 16 cores, not 6 x 16
        Stage("bench32", 1, 100, f"step at {s.small} in {s.modes} (cached: ~15 s of tracing each), boxes + "
              "augmentation + masking, e2e torch without and with prefetch, then MaskCo against MoCo v2",
              [at(s.small, "--backend=torch", f"--modes={s.modes}", f"--e2e-mode={s.e2e_mode}", f"--skip={quiet}",
                  *s.steps)]),
        Stage("pretrain", 1, 50, "the trainer, preset quality_gpu, graph-captured: its prefetch pair at "
              f"{s.large} is cached", [[py, "-m", "maskco.train", "quality_gpu", f"--data={listing}", *s.pretrain,
                                        "--knn_every=0", "--resume=none", "--export=false", f"--workers={s.threads}",
                                        f"--out_dir={STATE}/pretrain", "--json"]]),
        # ---- call 2: DALI (carried as parts, see scripts/gpu_wheels.py), then what call 1 left
        Stage("env", 2, 30, "the environment again: this call may run on another machine", [[py, "-c", ENV]]),
        Stage("dali", 2, 40, "join, check and unpack the carried parts; import DALI",
              [[*wheels, "rehearse", ".whl", f"--images={data}"] if rehearse else
               [*wheels, "unpack", ".whl", f"--target={DALI_SITE}", "--check-import"]]),
        Stage("bench128", 2, 90, f"step at {s.large} in {s.modes}, e2e torch and DALI (cached when the machine "
              "stayed warm)", [at(s.large, f"--backend=torch,{s.dali}", f"--modes={s.modes}", "--hw-decoder-load=0.9",
                                  f"--e2e-mode={s.e2e_mode}", f"--skip={quiet},variants", *s.steps_large)]),
        Stage("dali32", 2, 45, f"DALI's two views at {s.small} with 90 % of JPEGs on the hardware decoder, then "
              "e2e (the graph-captured step at 32 is cached from call 1)",
              [at(s.small, f"--backend={s.dali}", f"--modes={s.e2e_mode}", f"--skip={quiet},step",
                  "--hw-decoder-load=0.9", *s.steps)]),
        Stage("dali32_hw65", 2, 30, "DALI's two views at 0.65 on the hardware decoder (DALI's A100-era default)",
              [at(s.small, f"--backend={s.dali}", f"--modes={s.e2e_mode}", f"--skip={quiet},step,e2e",
                  "--hw-decoder-load=0.65", *s.steps)]),
        Stage("tests", 2, 40, "the CUDA tests (DALI's GPU pipeline, RoI pool, loss, the captured step); "
              "on a CPU they skip", [[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                                      "cuda or gpu", *s.tests, *s.dali_tests]]),
    ]


ENV = """
import json, torch
from maskco.bench.report import environment
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(json.dumps({"figure": "env", **environment(device, 0)}))
"""


# ---- output
class Output:
    """OUT/rows.jsonl (every JSON row, flushed as it comes), OUT/log.txt (everything), a line per row on stdout."""

    def __init__(self, out: str, env: dict):
        os.makedirs(out, exist_ok=True)
        self.out, self.env, self.lock, self.rows = out, env, threading.Lock(), []
        self.log = open(os.path.join(out, "log.txt"), "a", encoding="utf-8")

    def line(self, stage: str, text: str) -> None:
        text = text.rstrip("\n")
        row = _json(text)
        with self.lock:
            self.log.write(f"[{stage}] {text}\n")
            self.log.flush()
            if row is not None:
                self.row(stage, row)

    def row(self, stage: str, row: dict) -> None:
        if row.get("figure") == "env" or ("machine" in row and "figure" not in row):
            self.env.update({k: v for k, v in row.items() if k not in ("figure", "threads", "date")})
            row = {**row, "figure": "env"}
        row = {"stage": stage, "figure": row.get("figure", "train" if "step" in row else "log"), **row}
        self.rows.append(row)
        with open(os.path.join(self.out, "rows.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({**self.env, **row}) + "\n")
        print(f"  {stage}: {describe(row)}", flush=True)


def _json(text: str):
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def describe(row: dict) -> str:
    figure, name = row.get("figure", ""), row.get("name", "")
    if "img_per_s" in row and figure != "train":
        extra = "".join(f" {k} {row[k]:.3g}" for k in ("warmup_s", "data_wait") if k in row)
        extra += "".join(f" {k} {row[k]}" for k in ("cudagraph_skips", "cuda_graphs", "batches") if k in row)
        return f"{figure} {name}: {row['img_per_s']:.1f} img/s ({row['min']:.1f}-{row['max']:.1f}){extra}"
    if figure == "train":
        return "train " + " ".join(f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}"
                                   for k in ("step", "loss", "img_per_s") if k in row)
    if figure == "stage":
        return (f"STAGE {name} {row['status']} in {row['seconds']:.0f} s (timeout {row['timeout']} s), "
                f"{row['rows']} rows" + (f"; stopped after: {row['stopped_after']}" if row.get("stopped_after")
                                         else ""))
    keys = [k for k in row if k not in ("stage", "figure", "name")][:6]
    return f"{figure} {name} " + ", ".join(f"{k}={str(row[k])[:60]}" for k in keys)


# ---- stages
def run_stage(stage: Stage, output: Output, seconds: float, env: dict) -> dict:
    """Run the stage's commands at once, each under ``timeout -k``; -> its stage row."""
    timeout = max(1, int(min(stage.timeout, seconds)))
    started, first = time.monotonic(), len(output.rows)
    last_line = [""]
    env = {**env, **stage.env}
    procs = [subprocess.Popen(["timeout", "-k", str(KILL_AFTER), str(timeout), *command], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                              bufsize=1) for command in stage.commands]

    def pump(proc):
        for text in proc.stdout:
            output.line(stage.name, text)
            if text.strip():
                last_line[0] = text.strip()[:200]

    threads = [threading.Thread(target=pump, args=(proc,), daemon=True) for proc in procs]
    for thread in threads:
        thread.start()
    codes = [proc.wait() for proc in procs]
    for thread in threads:
        thread.join(timeout=30)
    rows = [r for r in output.rows[first:] if r.get("figure") not in ("env", "log")]
    cut = any(code in (124, 137) for code in codes)
    status = "cut by its timeout" if cut else ("ok" if not any(codes) else "failed")
    result = {"figure": "stage", "name": stage.name, "call": stage.call, "status": status, "returncodes": codes,
              "seconds": time.monotonic() - started, "timeout": timeout, "planned_timeout": stage.timeout,
              "rows": len(rows), "why": stage.why}
    if status != "ok":
        where = rows[-1] if rows else None
        result["stopped_after"] = (f"row {where['figure']} {where.get('name', '')}".strip() if where else "no row") + \
            f"; last line: {last_line[0]}"
    if stage.name == "tests":
        result.update(_pytest_counts(last_line[0]))
    return result


def _pytest_counts(line: str) -> dict:
    return {word: int(count) for count, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", line)}


def write_listing(root: str) -> None:
    """data/.../list.txt: every JPEG the data stage wrote (a list is a source every backend reads)."""
    paths = sorted(os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(root)
                   for name in names if name.endswith(".jpg"))
    with open(os.path.join(root, "list.txt"), "w", encoding="utf-8") as handle:
        handle.writelines(f"{path}\n" for path in paths)


# ---- one call
def run_call(call: int, out: str, rehearse: bool, budget: float, resume: bool, commit: str, py: str) -> int:
    began = time.monotonic()
    os.makedirs(STATE, exist_ok=True)
    output = Output(out, {"commit": commit, "plan_call": call, "rehearsal": rehearse})
    env = child_env(call, rehearse, commit)
    state_path = os.path.join(STATE, f"call{call}{'_rehearsal' if rehearse else ''}.json")
    done = _load(state_path) if resume else {}
    if not resume and os.path.exists(os.path.join(STATE, "bench.jsonl")):
        os.remove(os.path.join(STATE, "bench.jsonl"))
    if os.path.exists(CARRIED_CACHE) and not os.path.exists(CACHE) and not rehearse:
        with tarfile.open(CARRIED_CACHE) as tar:  # a previous session's compiled code: start warm
            tar.extractall(CACHE)
    print(f"call {call}{' (rehearsal on this CPU)' if rehearse else ''}: budget {budget:.0f} s", flush=True)
    failed = False
    for stage in [s for s in plan(rehearse, py) if s.call == call]:
        if stage.name in done:
            for row in done[stage.name]:
                output.row(stage.name, {**row, "resumed": True})
            continue
        left = budget - RESERVE - (time.monotonic() - began)
        if left < 5:
            output.row(stage.name, {"figure": "stage", "name": stage.name, "call": call, "status": "not reached",
                                    "seconds": 0.0, "timeout": 0, "rows": 0, "why": stage.why})
            failed = True
            continue
        result = run_stage(stage, output, left, env)
        if stage.name == "data" and result["status"] == "ok":
            write_listing(os.path.dirname(stage.commands[0][-3]))
        output.row(stage.name, result)
        failed |= result["status"] != "ok"
        if result["status"] == "ok":
            done[stage.name] = [r for r in output.rows if r["stage"] == stage.name and r.get("figure") != "stage"]
            _save(state_path, done)
    if not rehearse:
        bundle_cache(output)
    write_summary(output)
    files = os.listdir(out)
    print(f"{len(files)} files in {out}: {', '.join(sorted(files))}")
    if len(files) > MAX_FILES:
        print(f"ERROR: more than {MAX_FILES} files in {out}; a device call returns {MAX_FILES}", file=sys.stderr)
        return 1
    return 1 if failed else 0


def child_env(call: int, rehearse: bool, commit: str) -> dict:
    env = dict(os.environ)
    path = [ROOT] + ([DALI_SITE] if call == 2 and not rehearse else [])
    env.update(PYTHONPATH=os.pathsep.join(path + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                  if p and p not in path]),
               PYTHONUNBUFFERED="1", MASKCO_COMMIT=commit, TORCHINDUCTOR_FX_GRAPH_CACHE="1",
               TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    if rehearse:  # a small shared CPU: one intra-op thread each (two spinning on a busy core run 3x slower)
        env.update(OMP_NUM_THREADS="1")
    else:  # the rehearsal leaves this machine's cache where it is
        env["TORCHINDUCTOR_CACHE_DIR"] = CACHE
    return env


def _load(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _save(path: str, done: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(done, handle)
    os.replace(path + ".tmp", path)


def bundle_cache(output: Output) -> None:
    """OUT/inductor_cache.tar.xz when small: the next lent session carries it as .carry/ and starts warm."""
    if not os.path.isdir(CACHE):
        return
    raw = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(CACHE) for n in names)
    path = os.path.join(output.out, "inductor_cache.tar.xz")
    started, done = time.monotonic(), False
    if raw <= 40 * CACHE_LIMIT:  # else it would not compress under the limit in the time kept for it
        try:
            done = subprocess.run(["tar", "-C", CACHE, "--use-compress-program=xz -T0 -3", "-cf", path, "."],
                                  capture_output=True, timeout=RESERVE - 8).returncode == 0
        except subprocess.TimeoutExpired:
            done = False
    size = os.path.getsize(path) if os.path.exists(path) else 0
    kept = done and 0 < size <= CACHE_LIMIT
    if not kept and os.path.exists(path):
        os.remove(path)  # a partial or too large archive never goes back
    output.row("cache", {"figure": "compile_cache", "name": "inductor", "raw_bytes": raw, "bytes": size,
                         "kept": kept, "seconds": time.monotonic() - started})


# ---- the table for BENCHMARKS.md
def write_summary(output: Output) -> None:
    rows, env = output.rows, output.env
    lines = [f"# GPU plan, call {env.get('plan_call')}: {env.get('gpu') or 'CPU'} "
             f"(driver {env.get('driver')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, DALI {env.get('dali')}), "
             f"commit {env.get('commit')}{' - a rehearsal on a CPU' if env.get('rehearsal') else ''}", "",
             "| stage | status | seconds | timeout | rows |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']}{' (resumed)' if r.get('resumed') else ''} | {r['seconds']:.0f} | "
              f"{r['timeout']} | {r['rows']} |" for r in rows if r.get("figure") == "stage"]
    lines += ["", "| stage | figure | name | batch | img/s (min-max) | warm-up s | data wait | graphs / skips |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "img_per_s" in r and r.get("figure") not in ("train", "stage"):
            graphs = f"{r['cuda_graphs']} / {r['cudagraph_skips']}" if "cuda_graphs" in r else ""
            wait = f"{r['data_wait']:.0%}" if "data_wait" in r else ""
            warm = f"{r['warmup_s']:.0f}" if "warmup_s" in r else ""
            lines.append(f"| {r['stage']} | {r['figure']} | {r['name']} | {r.get('batch_size', '')} | "
                         f"{r['img_per_s']:.1f} ({r['min']:.1f}-{r['max']:.1f}) | {warm} | {wait} | {graphs} |")
    trained = [r for r in rows if r.get("figure") == "train" and "img_per_s" in r]
    if trained:
        lines += ["", "pretrain (quality_gpu): " + ", ".join(f"step {r['step']} loss {r.get('loss', float('nan')):.3f} "
                                                             f"{r['img_per_s']:.0f} img/s" for r in trained)]
    lines += ["", *[f"- {line}" for r in rows if r.get("figure") == "targets" for line in r.get("lines", [])]]
    lines += ["", *goals(rows)]
    with open(os.path.join(output.out, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def goals(rows: list[dict]) -> list[str]:
    """The issue's GPU targets (benchmarks, not tests), from this call's rows, where it has them."""
    get = {(r["stage"], r["figure"], r.get("name", "")): r["img_per_s"] for r in rows
           if "img_per_s" in r and r.get("figure") != "train"}
    out = []
    best = max((v for (st, f, n), v in get.items() if st == "bench32" and f == "step" and n.startswith("ready+maskco")),
               default=None)
    if best:
        out.append(f"R50 MaskCo step at 32 img/GPU, best mode: {best:.0f} img/s "
                   "(target >= 2,000 on an H100; aim 3,000)")
    ready = get.get(("bench32", "ready_synthetic", "boxes+augment+mask"))
    if best and ready:
        out.append(f"boxes + augmentation + masking: {best / ready:.1%} of the step (target <= 3 %)")
    for (st, f, n), v in get.items():
        if f == "loader" and n == "dali":
            out.append(f"DALI two views ({st}): {v:.0f} img/s (target >= 5,000)")
        if f == "e2e" and n.startswith("dali"):
            step = max((w for (s2, f2, n2), w in get.items() if s2 == st and f2 == "step" and "graph" in n2), default=0)
            out.append(f"e2e {n} ({st}): {v:.0f} img/s" + (f" = {v / step:.0%} of the step (target >= 95 %)"
                                                           if step else ""))
    return out


def listing(py: str) -> str:
    """The stages and the device calls that run them (what gpu_check.sh's header summarises)."""
    lines = []
    for stage in plan(False, py):
        lines.append(f"call {stage.call}  {stage.name:<9} timeout {stage.timeout:>4} s  x{len(stage.commands)}  "
                     f"{stage.why}")
    commit = _revision()
    for call in (1, 2):
        total = sum(s.timeout for s in plan(False, py) if s.call == call)
        lines.append(f"call {call}: stage timeouts add up to {total} s, cut to its budget of {BUDGETS[call]} s")
    carry = {1: ', carry=[".carry"]' if os.path.exists(CARRIED_CACHE) else "", 2: ', carry=[".whl"]'}
    for call in (1, 2):
        lines.append(f'run(command="bash scripts/gpu_check.sh --call {call} --commit {commit}"{carry[call]}, '
                     f"timeout_s={BUDGETS[call] + 15})")
    return "\n".join(lines)


BUDGETS = {1: 255, 2: 195}  # seconds inside a call of timeout_s 270 / 210 (the rest: start-up, sending $OUT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--call", default="1", help="1, 2 or all")
    parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "runs", "gpu_check")))
    parser.add_argument("--rehearse", action="store_true", help="every stage on this CPU, tiny sizes")
    parser.add_argument("--resume", action="store_true", help="skip the stages this machine already finished")
    parser.add_argument("--budget", type=float, default=0, help="seconds for the call (default: the plan's)")
    parser.add_argument("--commit", default=os.environ.get("MASKCO_COMMIT", ""))
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    py = sys.executable
    if args.list:
        print(listing(py))
        return 0
    commit = args.commit or _revision()
    if shutil.which("timeout") is None:
        parser.error("needs coreutils' timeout")
    calls = (1, 2) if args.call == "all" else (int(args.call),)
    code = 0
    for call in calls:
        out = args.out if len(calls) == 1 else os.path.join(args.out, f"call{call}")
        code |= run_call(call, out, args.rehearse, args.budget or BUDGETS[call], args.resume, commit, py)
    return code


def _revision() -> str:
    sys.path.insert(0, ROOT)
    from maskco.runlog import git_revision

    return git_revision()


if __name__ == "__main__":
    sys.exit(main())
