"""`promptkd sweep`: the paper's protocols as a graph of jobs, run where the GPUs are.

configs/protocols/*.yaml name the datasets, seeds, KD weights, distill preset and teacher of each
protocol. A sweep turns them into jobs: teachers (trained, or imported from official checkpoints;
a teacher file already in place is used as it is), class vectors, teacher caches (with
--cache-views), distillations and one report per protocol. Each job is one `promptkd` command
with its own log file; a job starts once the jobs it needs have finished.

Rerunning a sweep is how it continues: a finished job (its run.json says finished, or its file
is there) is skipped, an interrupted one continues with --resume from its checkpoint. Jobs run on
this machine, in parallel one per GPU group of --nproc GPUs, or go to Slurm through submitit (its
local executor runs the same path on one machine). Failed jobs are listed at the end with their
log paths; their dependents do not start.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from promptkd.errors import PromptKDError
from promptkd.runs import RUN_FILE, run_finished

REPO = Path(__file__).resolve().parents[3]  # a checkout: src/promptkd/stages/sweep.py
PROTOCOL_FILES = {"base2novel": "base2novel.yaml", "cross": "cross_dataset.yaml", "dg": "domain_generalisation.yaml"}
EXECUTORS = ("local", "slurm", "submitit-local")
# Commands that continue an unfinished result with --resume, and the file that marks it resumable.
RESUME_MARKERS = {"teacher": "checkpoint.safetensors", "cache": "manifest.json", "distill": "checkpoint.safetensors"}
TORCHRUN_COMMANDS = {"teacher", "class-vectors", "cache", "distill"}  # run with --nproc processes


@dataclass
class Job:
    """One `promptkd` command of the sweep: `argv` without --resume/--overwrite (decided when it starts)."""

    name: str
    argv: list[str]
    out: Path
    deps: list[str] = field(default_factory=list)
    nproc: int = 1
    product: str | None = None  # a folder's result file, where a folder may hold it without run.json

    @property
    def command_name(self) -> str:
        return self.argv[0]

    @property
    def log_name(self) -> str:
        return self.name.replace("/", "__") + ".log"

    def finished(self) -> bool:
        if self.command_name == "report":
            return (self.out / "report.json").is_file()
        if self.out.suffix == ".safetensors":  # a file written atomically: there means finished
            return self.out.is_file()
        if not (self.out / RUN_FILE).is_file():  # e.g. a teacher file put there by hand
            return self.product is not None and (self.out / self.product).is_file()
        return run_finished(self.out)

    def command(self) -> list[str]:
        """The command line as it should run now: --resume where a checkpoint is, --overwrite where a
        start left files but no checkpoint (these are the sweep's own folders)."""
        argv = list(self.argv)
        marker = RESUME_MARKERS.get(self.command_name)
        if marker and (self.out / marker).is_file():
            argv.append("--resume")
        elif self.command_name != "report" and self.out.is_dir() and any(self.out.iterdir()):
            argv.append("--overwrite")
        head = [sys.executable, "-m", "promptkd.cli"]
        if self.nproc > 1 and self.command_name in TORCHRUN_COMMANDS:
            head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
                    "-m", "promptkd.cli"]
        return [*head, "--no-progress", *argv]


def run_job(job: Job, log: str, env: dict | None = None) -> None:
    """Run one job, its output appended to `log` (also the function submitit sends to a node)."""
    cmd = job.command()
    with _open_log(log, cmd) as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}).returncode
    if rc != 0:
        raise RuntimeError(f"{job.name}: exit code {rc}; log {log}")


def _open_log(log, cmd: list[str]):
    """The job's log, appended to: each attempt starts with its time and command line."""
    f = open(log, "a")
    f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
    f.flush()
    return f


# ----------------------------------------------------------------------------------------------
# The plan


def _label(dataset: str) -> str:
    """A folder name for a dataset: the benchmark name, or the folder's own name for folder:PATH."""
    kind, sep, rest = dataset.partition(":")
    return Path(rest).stem if sep and kind in ("folder", "split", "images") else dataset


def _resolve(path: str, base: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else base / p)


def load_protocols(names: list[str], files: list[str] | None) -> list[dict]:
    """The protocol specs: `files` when given, else configs/protocols/ of this checkout for `names`.
    Relative paths in a file are relative to the repository root (configs/...), or to the file."""
    import yaml

    paths = [Path(f) for f in files] if files else [REPO / "configs" / "protocols" / PROTOCOL_FILES[n] for n in names]
    specs = []
    for path in paths:
        if not path.is_file():
            raise PromptKDError(f"{path}: protocol file not found (run from a checkout, or give --protocol-file)")
        spec = yaml.safe_load(path.read_text()) or {}
        missing = [k for k in ("protocol", "preset", "teacher", "seeds", "datasets") if k not in spec]
        if missing:
            raise PromptKDError(f"{path}: protocol file lacks {', '.join(missing)}")
        base = REPO if (REPO / spec["preset"]).is_file() else path.parent
        for key in ("preset", "teacher_config"):
            if spec.get(key):
                spec[key] = _resolve(spec[key], base)
        specs.append({**spec, "file": str(path)})
    return specs


def plan(args) -> list[Job]:
    """Every job of the sweep, dependencies first (teachers, class vectors, caches, distillations, reports)."""
    out = Path(args.out)
    jobs: dict[str, Job] = {}

    def add(job: Job) -> str:
        jobs.setdefault(job.name, job)  # a teacher, class vectors or cache shared by protocols is one job
        return job.name

    teacher_weights = ["--teacher-weights", args.teacher_weights] if args.teacher_weights else []
    for spec in load_protocols(args.protocols, args.protocol_file):
        protocol, seeds = spec["protocol"], args.seeds or spec["seeds"]
        runs = []
        for dataset, settings in spec["datasets"].items():
            label = _label(dataset)
            teacher = Path(spec["teacher"].format(teachers=args.teachers, dataset=label))
            t_label = teacher.parent.name
            needs = [add(_teacher_job(spec, teacher, dataset, args))]
            cv = out / "class_vectors" / t_label / f"{label}.safetensors"
            needs.append(add(Job(f"class-vectors/{t_label}/{label}", [
                "class-vectors", "--teacher", str(teacher), *teacher_weights, "--dataset", dataset,
                *_root(args), "--out", str(cv)], cv, needs[:1])))
            cache = None
            if args.cache_views:
                cache = out / "caches" / t_label / protocol / label
                needs.append(add(Job(f"cache/{t_label}/{protocol}/{label}", [
                    "cache", "--teacher", str(teacher), *teacher_weights, "--dataset", dataset, *_root(args),
                    "--protocol", protocol, "--views", str(args.cache_views), "--out", str(cache)],
                    cache, needs[:1], args.nproc)))
            for seed in seeds:
                run_dir = out / protocol / label / f"seed{seed}"
                argv = ["distill", "--config", spec["preset"], "--protocol", protocol, "--dataset", dataset,
                        *_root(args), "--teacher", str(teacher), *teacher_weights, "--class-vectors", str(cv),
                        "--kd-weight", str((settings or {}).get("kd_weight", 1000)), "--seed", str(seed),
                        "--out", str(run_dir)]
                argv += ["--teacher-cache", str(cache)] if cache else []
                argv += ["--student-weights", args.student_weights] if args.student_weights else []
                runs.append(add(Job(f"distill/{protocol}/{label}/seed{seed}", argv, run_dir, list(needs), args.nproc)))
        tables = out / "tables" / protocol
        add(Job(f"report/{protocol}", ["report", str(out / protocol), "--out", str(tables)],
                tables, runs))
    if getattr(args, "device", None):  # the global --device applies to every job
        for job in jobs.values():
            job.argv += ["--device", args.device]
    return list(jobs.values())


def _root(args) -> list[str]:
    return ["--root", args.root] if args.root else []


def _teacher_job(spec: dict, teacher: Path, dataset: str, args) -> Job:
    """Train the protocol's teacher with its teacher_config, or import an official checkpoint."""
    import yaml

    folder = teacher.parent
    config = spec.get("teacher_config")
    if not config:
        if not teacher.is_file():
            raise PromptKDError(f"{spec['file']}: no teacher at {teacher} and no teacher_config to train one")
        return Job(f"teacher/{folder.name}", ["teacher"], folder, product=teacher.name)
    if args.official_teachers:
        preset = yaml.safe_load(Path(config).read_text()) or {}
        checkpoint = args.official_teachers.format(teacher=folder.name)
        return Job(f"teacher/{folder.name}", [
            "import-official", "teacher", checkpoint, "--teacher-model", str(preset.get("model", "ViT-L-14")),
            "--teacher-weights", args.teacher_weights or str(preset.get("weights", "openai")), "--out", str(folder)],
            folder, product=teacher.name)
    t_dataset = str(spec.get("teacher_dataset", "{dataset}")).format(dataset=dataset)
    argv = ["teacher", "--config", config, "--dataset", t_dataset, *_root(args), "--out", str(folder)]
    argv += ["--teacher-weights", args.teacher_weights] if args.teacher_weights else []
    return Job(f"teacher/{folder.name}", argv, folder, [], args.nproc, product=teacher.name)


def print_plan(jobs: list[Job], log_dir: Path) -> None:
    for job in jobs:
        state = "finished, skipped" if job.finished() else f"log {log_dir / job.log_name}"
        after = f"; after {', '.join(job.deps)}" if job.deps else ""
        print(f"{job.name} ({state}{after})")
        print(f"    {shlex.join(job.command())}")


# ----------------------------------------------------------------------------------------------
# Running it


class _Local:
    """Jobs as processes on this machine: each takes a group of `nproc` GPUs (CUDA_VISIBLE_DEVICES),
    as many at once as there are groups; without GPUs, `parallel` at once on the CPU."""

    def __init__(self, gpus: int, nproc: int, parallel: int):
        self.groups = [list(range(i, i + nproc)) for i in range(0, gpus - nproc + 1, nproc)] if gpus else \
            [[] for _ in range(parallel)]
        self.busy: set[int] = set()

    def free(self) -> bool:
        return len(self.busy) < len(self.groups)

    def start(self, job: Job, log: Path):
        g = min(set(range(len(self.groups))) - self.busy)
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.groups[g]))} if self.groups[g] else {}
        cmd = job.command()
        f = _open_log(log, cmd)  # closed in poll
        self.busy.add(g)
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}), g, f

    def poll(self, handle) -> bool | None:
        """None while running, else whether it succeeded."""
        p, g, f = handle
        if p.poll() is None:
            return None
        f.close()
        self.busy.discard(g)
        return p.returncode == 0


class _Submitit:
    """Jobs sent through submitit: to Slurm, or to its local executor (the same code path on one machine)."""

    def __init__(self, args, folder: Path):
        try:
            import submitit
        except ImportError:
            raise PromptKDError("--executor slurm needs submitit: pip install 'promptkd[cluster]'") from None
        if args.executor == "slurm":
            try:
                ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
            except RuntimeError as e:  # no srun/sbatch here
                raise PromptKDError(f"--executor slurm: {e}") from None
            params = {"timeout_min": args.slurm_timeout, "gpus_per_node": args.nproc, "tasks_per_node": 1,
                      "nodes": 1, "name": "promptkd"}
            if args.slurm_partition:
                params["slurm_partition"] = args.slurm_partition
            for item in args.slurm_arg or []:
                key, _, value = item.partition("=")
                params[f"slurm_{key.strip()}"] = value
            ex.update_parameters(**params)
        else:
            ex = submitit.LocalExecutor(folder=folder)
            ex.update_parameters(timeout_min=args.slurm_timeout)
        self.executor, self.parallel = ex, args.parallel if args.executor == "submitit-local" else 10**6
        self.slurm = args.executor == "slurm"
        self.running = 0

    def free(self) -> bool:
        return self.running < self.parallel

    def start(self, job: Job, log: Path):
        self.running += 1
        if self.slurm:  # a job with --nproc processes asks for that many GPUs; reports and class vectors one
            self.executor.update_parameters(gpus_per_node=job.nproc)
        return self.executor.submit(run_job, job, str(log))

    def poll(self, handle) -> bool | None:
        if not handle.done():
            return None
        self.running -= 1
        try:
            return handle.exception() is None
        except Exception:  # submitit could not read the result (job killed, node lost): failed
            return False


def execute(jobs: list[Job], runner, log_dir: Path, poll_s: float = 0.5) -> tuple[list[str], list[Job], list[Job]]:
    """Run the unfinished jobs, each once its dependencies finished. Returns (ran, failed, blocked)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    for j in jobs:  # dependencies come first; a report is redone when a run it reads is redone
        if j.finished() and (j.command_name != "report" or all(d in done for d in j.deps)):
            done.add(j.name)
    pending = [j for j in jobs if j.name not in done]
    running: dict[str, tuple[Job, object]] = {}
    ran: list[str] = []
    failed: list[Job] = []
    blocked: list[Job] = []
    while pending or running:
        stopped = {j.name for j in failed + blocked}
        for job in list(pending):
            if any(d in stopped for d in job.deps):
                pending.remove(job)
                blocked.append(job)
                stopped.add(job.name)
            elif all(d in done for d in job.deps) and runner.free():
                pending.remove(job)
                print(f"start   {job.name}", flush=True)
                running[job.name] = (job, runner.start(job, log_dir / job.log_name))
        if pending and not running:
            raise PromptKDError(f"jobs wait on jobs outside the sweep: {', '.join(j.name for j in pending)}")
        time.sleep(poll_s if running else 0)
        for name, (job, handle) in list(running.items()):
            ok = runner.poll(handle)
            if ok is None:
                continue
            del running[name]
            if ok and job.finished():
                done.add(name)
                ran.append(name)
                print(f"done    {name}", flush=True)
            else:
                failed.append(job)
                print(f"FAILED  {name}: log {log_dir / job.log_name}", flush=True)
    return ran, failed, blocked


def _run(args) -> int:
    from promptkd.options import parse_set

    parse_set([s for s in args.slurm_arg or []])  # KEY=VALUE shape, one line if not
    jobs = plan(args)
    out = Path(args.out)
    log_dir = out / "logs"
    if args.dry_run:
        print_plan(jobs, log_dir)
        todo = sum(not j.finished() for j in jobs)
        print(f"{len(jobs)} jobs, {todo} to run")
        return 0
    if args.executor == "local":
        gpus = args.gpus
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if 0 < gpus < args.nproc:
            raise PromptKDError(f"--nproc {args.nproc} needs at least that many GPUs here ({gpus})")
        runner = _Local(gpus, args.nproc, args.parallel)
    else:
        runner = _Submitit(args, out / "submitit")
    skipped = sum(j.finished() for j in jobs)
    ran, failed, blocked = execute(jobs, runner, log_dir)
    print(f"sweep: {len(ran)} jobs finished now, {skipped} were finished already, {len(failed)} failed, "
          f"{len(blocked)} not started (a job they need failed)")
    for job in failed:
        print(f"  failed: {job.name}: log {log_dir / job.log_name}")
    for job in blocked:
        print(f"  not started: {job.name} (needs {', '.join(job.deps)})")
    if failed:
        print("rerun the same command to retry them: finished jobs are skipped, interrupted ones resumed")
    return 1 if failed else 0


def register(sub) -> None:
    from promptkd.options import non_negative_int, positive_int

    p = sub.add_parser(
        "sweep", help="run the paper's protocols as a graph of jobs (locally, one per GPU, or on Slurm)",
        description="Teachers, class vectors, caches, distillations and reports of configs/protocols/*.yaml as "
                    "jobs with dependencies. Rerun the same command to continue: finished jobs are skipped, "
                    "interrupted ones resumed. --dry-run prints the plan.")
    p.add_argument("--root", help="data root holding the CoOp dataset folders")
    p.add_argument("--teachers", required=True, metavar="DIR",
                   help="teacher folders (the protocol files' {teachers}); a missing teacher is trained (or imported)")
    p.add_argument("--out", default="runs/paper", metavar="DIR", help="runs, class vectors, caches, tables, logs")
    p.add_argument("--protocols", nargs="+", choices=list(PROTOCOL_FILES), default=list(PROTOCOL_FILES),
                   help="which of the paper's protocols (default: all three)")
    p.add_argument("--protocol-file", action="append", metavar="YAML",
                   help="a protocol file instead of configs/protocols/ (repeatable)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="override the protocol files' seeds")
    p.add_argument("--cache-views", type=non_negative_int, default=0, metavar="K",
                   help="build a teacher cache of K views per dataset and distil from it (default 0: online)")
    p.add_argument("--official-teachers", metavar="PATTERN",
                   help="import missing teachers from official checkpoints, e.g. 'ckpt/{teacher}/model-best.pth.tar'"
                        " ({teacher}: the teacher folder's name) instead of training them")
    p.add_argument("--teacher-weights", metavar="TAG|PATH|none", help="the teachers' CLIP weights (e.g. clip/ViT-L-14.pt)")
    p.add_argument("--student-weights", metavar="TAG|PATH|none", help="the student's CLIP weights (e.g. clip/ViT-B-16.pt)")
    p.add_argument("--nproc", type=positive_int, default=1, metavar="N", help="GPUs (torchrun processes) per job")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: processes here; slurm: submitit to Slurm; submitit-local: submitit's local executor")
    p.add_argument("--gpus", type=non_negative_int, metavar="N", help="local: GPUs to share out (default: all visible)")
    p.add_argument("--parallel", type=positive_int, default=1, metavar="N",
                   help="jobs at once without GPUs (local, submitit-local)")
    p.add_argument("--slurm-partition", metavar="NAME", help="slurm: the partition to submit to")
    p.add_argument("--slurm-timeout", type=positive_int, default=24 * 60, metavar="MIN", help="per job (default 1 day)")
    p.add_argument("--slurm-arg", action="append", metavar="KEY=VALUE",
                   help="any other submitit Slurm parameter, e.g. account=abc or constraint=a100 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print every job, its dependencies and command; run nothing")
    p.set_defaults(func=_run)
