"""The GPU acceptance run (``make bench-gpu``, i.e. scripts/gpu_check.sh): every GPU figure of BENCHMARKS.md
on this machine's first GPU, in one run of a few minutes, each figure kept the moment it is measured; and
the same plan rehearsed on a CPU with tiny sizes (``--rehearse``), so that it keeps working between GPU runs.

    python3 scripts/gpu_plan.py [--out DIR] [--resume] [--rehearse] [--commit REV]
    python3 scripts/gpu_plan.py --list            the stages, their time limits and what each measures

Each stage is one command (or several at once) under ``timeout -k``, with its own time limit, so that a
hung compile or loader costs that stage and not the run. Every JSON line a stage prints is written at once,
with the card, driver, versions and commit, to OUT/rows.jsonl; all its output goes to OUT/log.txt; a stage's
own row says how it ended, and where its time limit cut it, after which row and line. OUT/summary.md (also
printed) is the table for BENCHMARKS.md with the targets. Finished stages are recorded in OUT/stages.json:
``--resume`` reruns only the stages that did not finish. A stage that needs DALI is skipped, with the
reason, where DALI is not installed (``make venv EXTRAS=dev,dali``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_AFTER = 10  # seconds between timeout's SIGTERM and its SIGKILL (a compile may ignore the first)
CPUS = os.cpu_count() or 2
NO_DALI = "DALI is not installed (make venv EXTRAS=dev,dali installs nvidia-dali-cuda130)"


@dataclass
class Stage:
    name: str
    timeout: int  # seconds: the GPU's allowance (cold compiles included), the rehearsal's too
    why: str
    commands: list = field(default_factory=list)  # several: run at once
    env: dict = field(default_factory=dict)  # added to the environment of its commands
    needs: str = ""  # a module without which the stage is skipped, with the reason


@dataclass
class Sizes:
    """The plan's sizes: ResNet-50 at 224 px on the GPU; tiny CPU stand-ins in the rehearsal."""

    small: int = 32
    large: int = 128
    images: int = 4096  # 128 batches of 32, 32 of 128: a warm-up round and 3 repeats from one epoch
    data_procs: int = min(8, CPUS)
    threads: int = max(2, min(14, CPUS - 2))  # loader threads; two cores left to the step's own thread
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


GPU = Sizes()
REHEARSAL = Sizes(  # CPU stand-ins: ResNet-18 at 64 px with the CPU demo's heads, a step or two, eager where
    # CUDA graphs mean nothing, dynamo alone (backend "eager") for the compiled mode, DALI's CPU mode
    small=4, large=8, images=96, data_procs=2, threads=2,
    model=("--config=cpu_demo", "--arch=resnet18", "--image-size=64"),
    steps=("--steps=1", "--repeats=1", "--batches=2"), steps_large=("--steps=1", "--repeats=1", "--batches=2"),
    modes="eager,compiled", e2e_mode="eager", compile_sets=(("steps", "compiled"),), compile_backend="eager",
    pretrain=("--max_steps=3", "--log_every=1", "--arch=resnet18", "--image_size=64", "--box_min_size=8",
              "--batch_size=8", "--virtual_gpus=2", "--compile=false", "--device=cpu"),
    dali="dali-cpu", tests=("tests/test_roi.py", "tests/test_loss.py"), dali_tests=())


def data_dir(rehearse: bool) -> str:
    return os.path.join(ROOT, "data", "gpu_check" + ("_rehearsal" if rehearse else ""))


def plan(rehearse: bool, py: str, out: str) -> list[Stage]:
    """The stages in the order they run: the figures most worth having first, DALI's after torch's."""
    s = REHEARSAL if rehearse else GPU
    data = data_dir(rehearse)
    listing = os.path.join(data, "list.txt")
    bench = [py, "-m", "maskco.bench", *s.model, f"--threads={s.threads}", f"--compile-backend={s.compile_backend}",
             f"--data={listing}"]
    quiet = "decode,baseline,roi"

    def at(batch, stage, *extra):
        return [*bench, f"--batch-size={batch}", f"--out-dir={os.path.join(out, stage)}", *extra]

    per = s.images // s.data_procs
    make = ("import sys; from pipelines.sample_data import make_sample_data as m; "
            "m(sys.argv[1], num_images=int(sys.argv[2]), seed=int(sys.argv[3]))")
    compiles = [at(batch, "compile", f"--compile-only={what}", f"--modes={mode}", f"--e2e-mode={mode}")
                for batch in (s.small, s.large) for what, mode in s.compile_sets]
    return [
        Stage("env", 60, "imports torch, asks the driver", [[py, "-c", ENV]]),
        Stage("data", 90, f"{per * s.data_procs} JPEGs, {s.data_procs} writers at once",
              [[py, "-c", make, os.path.join(data, f"s{k}"), str(per), str(k)] for k in range(s.data_procs)]),
        Stage("compile", 240, f"the {len(compiles)} graph sets at {s.small} and {s.large} (compiled, graph-captured, "
              "the prefetch pair) compiled cold at once, one process each: the timed stages then load them from "
              "Inductor's cache", compiles,
              env={"TORCHINDUCTOR_COMPILE_THREADS": str(max(1, CPUS // len(compiles)))}),  # not N x all cores
        Stage("bench32", 180, f"step at {s.small} in {s.modes}, boxes + augmentation + masking, e2e torch without "
              "and with prefetch, then MaskCo against MoCo v2",
              [at(s.small, "bench32", "--backend=torch", f"--modes={s.modes}", f"--e2e-mode={s.e2e_mode}",
                  f"--skip={quiet}", *s.steps)]),
        Stage("bench128", 150, f"step at {s.large} in {s.modes}, e2e torch and DALI (DALI skipped, with the reason, "
              "where it is not installed)",
              [at(s.large, "bench128", f"--backend=torch,{s.dali}", f"--modes={s.modes}", "--hw-decoder-load=0.9",
                  f"--e2e-mode={s.e2e_mode}", f"--skip={quiet},variants", *s.steps_large)]),
        Stage("pretrain", 150, "the trainer, preset quality_gpu (ResNet-18 at 32 px, 8 virtual GPUs of 32), "
              "graph-captured: its own graphs compiled cold, then its steps",
              [[py, "-m", "maskco.train", "quality_gpu", f"--data={listing}", *s.pretrain, "--knn_every=0",
                "--resume=none", "--export=false", f"--workers={s.threads}",
                f"--out_dir={os.path.join(out, 'pretrain')}", "--json"]]),
        Stage("dali32", 90, f"DALI's two views at {s.small} with 90 % of JPEGs on the hardware decoder, then e2e",
              [at(s.small, "dali32", f"--backend={s.dali}", f"--modes={s.e2e_mode}", f"--skip={quiet},step",
                  "--hw-decoder-load=0.9", *s.steps)], needs="nvidia.dali"),
        Stage("dali32_hw65", 60, "DALI's two views at 0.65 on the hardware decoder (DALI's A100-era default)",
              [at(s.small, "dali32_hw65", f"--backend={s.dali}", f"--modes={s.e2e_mode}",
                  f"--skip={quiet},step,e2e", "--hw-decoder-load=0.65", *s.steps)], needs="nvidia.dali"),
        Stage("tests", 120, "the CUDA tests (DALI's GPU pipeline, RoI pool, loss, the captured step); on a CPU "
              "they skip", [[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or gpu", *s.tests,
                             *s.dali_tests]]),
    ]


ENV = """
import json, torch
from maskco.bench.report import environment
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(json.dumps({"figure": "env", **environment(device, 0)}))
"""


def missing(module: str) -> str:
    """Why a stage that needs ``module`` cannot run here, or "" where it can."""
    if not module:
        return ""
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing too
        found = False
    return "" if found else (NO_DALI if module.startswith("nvidia.dali") else f"{module} is not installed")


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
        if row["status"] == "skipped":
            return f"STAGE {name} skipped: {row['reason']}"
        return (f"STAGE {name} {row['status']} in {row['seconds']:.0f} s (limit {row['timeout']} s), "
                f"{row['rows']} rows" + (f"; stopped after: {row['stopped_after']}" if row.get("stopped_after")
                                         else ""))
    keys = [k for k in row if k not in ("stage", "figure", "name")][:6]
    return f"{figure} {name} " + ", ".join(f"{k}={str(row[k])[:60]}" for k in keys)


# ---- stages
def run_stage(stage: Stage, output: Output, env: dict, kill_after: int = KILL_AFTER) -> dict:
    """Run the stage's commands at once, each under ``timeout -k``; -> its stage row."""
    started, first = time.monotonic(), len(output.rows)
    last_line = [""]
    env = {**env, **stage.env}
    procs = [subprocess.Popen(["timeout", "-k", str(kill_after), str(stage.timeout), *command], cwd=ROOT, env=env,
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
    status = "cut by its time limit" if cut else ("ok" if not any(codes) else "failed")
    result = {"figure": "stage", "name": stage.name, "status": status, "returncodes": codes,
              "seconds": time.monotonic() - started, "timeout": stage.timeout, "rows": len(rows), "why": stage.why}
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


# ---- one run
def run_plan(out: str, rehearse: bool, resume: bool, commit: str, py: str) -> int:
    """Every stage in order (those ``resume`` finds finished are replayed from OUT/stages.json); -> 0, 1 when a
    stage failed or was cut, 2 when there is no GPU to measure (without ``rehearse``)."""
    state_path = os.path.join(out, "stages.json")
    state = _load(state_path) if resume else {}
    if state.get("rehearsal", rehearse) != rehearse:
        print(f"{state_path} is from a {'rehearsal' if state['rehearsal'] else 'GPU run'}: starting over")
        state = {}
    done = state.get("stages", {})
    if not os.path.exists(os.path.join(data_dir(rehearse), "list.txt")):
        done.pop("data", None)  # the images are gone: write them again
    # rows.jsonl holds this run's rows (a finished stage's replayed); log.txt keeps every run's lines on resume
    clear(out, ["rows.jsonl", "summary.md"] + ([] if done else ["log.txt", "stages.json"]))
    stages = plan(rehearse, py, out)
    output = Output(out, {"commit": commit, "rehearsal": rehearse})
    env = child_env(rehearse, commit)
    print(f"GPU acceptance run{' (rehearsal on this CPU)' if rehearse else ''}: {len(stages)} stages, at most "
          f"{sum(s.timeout for s in stages) / 60:.0f} min; rows in {out}", flush=True)
    failed = False
    for stage in stages:
        if stage.name in done:
            for row in done[stage.name]:
                output.row(stage.name, {**row, "resumed": True})
            continue
        clear(out, [stage.name])  # its folder (bench.jsonl, chart, trainer's log) from an earlier run
        reason = missing(stage.needs)
        if reason:
            output.row(stage.name, {"figure": "stage", "name": stage.name, "status": "skipped", "reason": reason,
                                    "seconds": 0.0, "timeout": stage.timeout, "rows": 0, "why": stage.why})
            continue
        result = run_stage(stage, output, env)
        if stage.name == "data" and result["status"] == "ok":
            write_listing(data_dir(rehearse))
        output.row(stage.name, result)
        failed |= result["status"] != "ok"
        if stage.name == "env" and not rehearse and not output.env.get("gpu"):
            print("ERROR: no CUDA device here: make bench-gpu measures a GPU (bash scripts/gpu_check.sh --rehearse "
                  "runs every stage on this CPU, tiny sizes)" if result["status"] == "ok" else
                  f"ERROR: the env stage {result['status']}: {os.path.join(out, 'log.txt')} says why", file=sys.stderr)
            write_summary(output)
            return 2
        if result["status"] == "ok" and stage.name != "env":  # the environment is asked again on every run
            done[stage.name] = [r for r in output.rows if r["stage"] == stage.name]  # its stage row last
            _save(state_path, {"rehearsal": rehearse, "stages": done})
    print(write_summary(output))
    print(f"written: {', '.join(sorted(os.listdir(out)))} in {out}")
    return 1 if failed else 0


def clear(out: str, names: list[str]) -> None:
    """Remove these files or folders of OUT that an earlier run wrote (nothing else of OUT is touched)."""
    for name in names:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def child_env(rehearse: bool, commit: str) -> dict:
    """The stages' environment: this tree first on the path, the commit (for a tree without .git), and
    Inductor's caches on, so that the timed stages load what the compile stage compiled."""
    env = dict(os.environ)
    paths = [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != ROOT]
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", MASKCO_COMMIT=commit,
               TORCHINDUCTOR_FX_GRAPH_CACHE="1", TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    if rehearse:  # a small shared CPU: one intra-op thread each (two spinning on a busy core run 3x slower)
        env.update(OMP_NUM_THREADS="1")
    return env


def _load(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _save(path: str, state: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    os.replace(path + ".tmp", path)


# ---- the table for BENCHMARKS.md
def write_summary(output: Output) -> str:
    """OUT/summary.md: the environment, each stage's end, every measured figure, the pretrain and the
    targets; -> its text."""
    rows, env = output.rows, output.env
    lines = [f"# GPU acceptance run: {env.get('gpu') or 'CPU'} "
             f"(driver {env.get('driver')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, DALI {env.get('dali')}), "
             f"commit {env.get('commit')}{' - a rehearsal on a CPU' if env.get('rehearsal') else ''}", "",
             "| stage | status | seconds | limit | rows |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("figure") == "stage":
            status = f"skipped: {r['reason']}" if r["status"] == "skipped" else r["status"]
            lines.append(f"| {r['name']} | {status}{' (resumed)' if r.get('resumed') else ''} | {r['seconds']:.0f} | "
                         f"{r['timeout']} | {r['rows']} |")
    lines += ["", "| stage | figure | name | batch | img/s (min-max) | warm-up s | data wait | graphs / skips |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "img_per_s" in r and r.get("figure") not in ("train", "stage"):
            graphs = f"{r['cuda_graphs']} / {r['cudagraph_skips']}" if "cuda_graphs" in r else ""
            wait = f"{r['data_wait']:.0%}" if "data_wait" in r else ""
            warm = f"{r['warmup_s']:.0f}" if "warmup_s" in r else ""
            lines.append(f"| {r['stage']} | {r['figure']} | {r['name']} | {r.get('batch_size', '')} | "
                         f"{r['img_per_s']:.1f} ({r['min']:.1f}-{r['max']:.1f}) | {warm} | {wait} | {graphs} |")
    lines += [f"| {r['stage']} | skipped | {r['name']} | | {r['reason']} | | | |" for r in rows
              if r.get("figure") == "skipped"]
    trained = [r for r in rows if r.get("figure") == "train" and "img_per_s" in r]
    if trained:
        lines += ["", "pretrain (quality_gpu): " + ", ".join(f"step {r['step']} loss {r.get('loss', float('nan')):.3f} "
                                                             f"{r['img_per_s']:.0f} img/s" for r in trained)]
    lines += ["", *[f"- {line}" for r in rows if r.get("figure") == "targets" for line in r.get("lines", [])]]
    lines += ["", *goals(rows)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(output.out, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    return text


def goals(rows: list[dict]) -> list[str]:
    """The GPU targets of BENCHMARKS.md (benchmarks, not tests), from this run's rows, where it has them."""
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


def listing(py: str, out: str) -> str:
    """The stages, their time limits and what each measures (what gpu_check.sh's header summarises)."""
    stages = plan(False, py, out)
    lines = [f"{stage.name:<11} limit {stage.timeout:>4} s  x{len(stage.commands)}  {stage.why}"
             + (f" [needs {stage.needs}]" if stage.needs else "") for stage in stages]
    lines.append(f"the limits add up to {sum(s.timeout for s in stages) / 60:.0f} min")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description="The GPU acceptance run: every GPU "
                                     "figure of BENCHMARKS.md, each stage under its own time limit.")
    parser.add_argument("--out", default="", help="where rows.jsonl, log.txt and summary.md go (default: "
                        "runs/gpu_check, or runs/gpu_check_rehearsal with --rehearse)")
    parser.add_argument("--rehearse", action="store_true", help="every stage on this CPU, tiny sizes")
    parser.add_argument("--resume", action="store_true", help="rerun only the stages that did not finish in OUT")
    parser.add_argument("--commit", default=os.environ.get("MASKCO_COMMIT", ""),
                        help="the revision to record (default: git's; for a copy of the tree without .git)")
    parser.add_argument("--list", action="store_true", help="print the stages and their time limits")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out or os.path.join(ROOT, "runs", "gpu_check" + ("_rehearsal" if args.rehearse else "")))
    py = sys.executable
    if args.list:
        print(listing(py, out))
        return 0
    if shutil.which("timeout") is None:
        parser.error("needs coreutils' timeout")
    return run_plan(out, args.rehearse, args.resume, args.commit or _revision(), py)


def _revision() -> str:
    sys.path.insert(0, ROOT)
    from maskco.runlog import git_revision

    return git_revision()


if __name__ == "__main__":
    sys.exit(main())
