"""Cluster settings for ``medattn submit`` and ``medattn sbatch``: flags, YAML profiles and the
checks that make a wrong setting fail at submit time instead of pending forever.

Precedence: built-in defaults < profile (``--profile FILE.yaml`` or a shipped name such as
``local``) < command-line flags. A profile is a flat YAML mapping with the keys of
:class:`ClusterSpec`; unknown keys are errors that name the file and the key.

The checks need only the SLURM client commands (``scontrol``, ``sinfo``, ``sbatch``):

* the partition exists and accepts jobs (without ``--partition``, the cluster's default one);
* nodes, CPUs per node, GPUs per node (the partition's ``Gres``), memory and time fit it;
* ``sbatch --test-only`` accepts the job (account, QOS, constraint: what only slurmctld knows);
* the run directory and the data are on a filesystem the compute nodes can see
  (:func:`check_shared_path`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from medattn.errors import ConfigError, MedattnError

PROFILE_DIR = Path(__file__).with_name("profiles")

# Paths that exist on every node but are private to it: a run dir there is invisible to the
# other nodes (and to the login node that reads the results).
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/var/run")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED_FINAL", "SPECIAL_EXIT", "REVOKED"}


class ClusterError(MedattnError):
    """A cluster setting is wrong or SLURM refused the job; the message says which and why."""


@dataclass
class ClusterSpec:
    """Where and how the job runs. ``None`` means "leave it to the cluster's default"."""

    nodes: int = 1
    tasks_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    gpus_per_node: int = 0
    cpus_per_task: int | None = None  # default: default_cpus_per_task (all the CPUs of the GPUs used)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int | None = None  # minutes (profiles and --time also take SLURM's formats, e.g. 12:00:00);
    # default: the partition's DefaultTime, else min(MaxTime, 24 h)
    mem: float | None = None  # GB per node
    constraint: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load ...)
    env: dict[str, str] = field(default_factory=dict)  # exported in the job
    sbatch: dict[str, Any] = field(default_factory=dict)  # any other #SBATCH option: name -> value|true
    signal_delay: int = 120  # seconds between USR2 and the time limit
    max_timeouts: int = 10  # requeues after a time-out (preemptions are unlimited)
    job_name: str | None = None
    python: str | None = None  # interpreter on the compute nodes (default: this one)
    allow_local_dirs: bool = False  # single-host clusters only (scripts/slurm-local.sh)

    @property
    def tasks(self) -> int:
        """Processes per node: one per GPU, or ``tasks_per_node`` (default 1) without GPUs."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks


_INT_KEYS = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": 0, "cpus_per_task": 1,
             "signal_delay": 1, "max_timeouts": 0}
TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


def time_minutes(value: Any, where: str) -> int:
    """A SLURM time limit (an integer number of minutes, or any of SLURM's time formats) ->
    whole minutes (seconds round up, as SLURM rounds them)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: time must be minutes or {TIME_FORMATS}, got {value!r}")
    if isinstance(value, int):
        minutes = value
    else:
        text = str(value).strip()
        if not re.fullmatch(r"(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})", text):
            raise ConfigError(f"{where}: time {text!r} is not a SLURM time ({TIME_FORMATS}, e.g. 720, 12:00:00 "
                              "or 1-00:00:00)")
        minutes = parse_slurm_time(text) or 0
    if minutes < 1:
        raise ConfigError(f"{where}: time must be at least one minute, got {value!r}")
    return minutes
_STR_KEYS = {"partition", "account", "qos", "constraint", "job_name", "python"}


def _check_value(key: str, value: Any, where: str) -> Any:
    """Type-check one profile/flag value; ``where`` names the file (or "flag") for the message."""
    if value is None:
        if key in ("nodes", "gpus_per_node", "signal_delay", "max_timeouts", "allow_local_dirs"):
            raise ConfigError(f"{where}: {key} must not be empty")
        return {"setup": [], "env": {}, "sbatch": {}}.get(key)
    if key == "time":
        return time_minutes(value, where)
    if key in _INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int) or value < _INT_KEYS[key]:
            raise ConfigError(f"{where}: {key} must be an integer >= {_INT_KEYS[key]}, got {value!r}")
        return value
    if key == "mem":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{where}: mem is in GB per node and must be a positive number, got {value!r}")
        return float(value)
    if key in _STR_KEYS:
        if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
            raise ConfigError(f"{where}: {key} must be a non-empty string, got {value!r}")
        return str(value)
    if key == "allow_local_dirs":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: allow_local_dirs must be true or false, got {value!r}")
        return value
    if key == "setup":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: setup must be a list of shell lines, got {value!r}")
        return list(value)
    if key in ("env", "sbatch"):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: {key} must be a mapping of names to values, got {value!r}")
        if key == "env":
            for k, v in value.items():
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                    raise ConfigError(f"{where}: env: {k!r} is not a valid environment variable name")
                if isinstance(v, (dict, list)) or v is None:
                    raise ConfigError(f"{where}: env.{k} must be a string or number, got {v!r}")
            return {k: str(v) for k, v in value.items()}
        for k, v in value.items():
            if not re.fullmatch(r"[a-z][a-z0-9-_]*", k):
                raise ConfigError(f"{where}: sbatch: {k!r} is not an sbatch option name (e.g. mail-type)")
            if isinstance(v, (dict, list)) or v is None or v is False:
                raise ConfigError(f"{where}: sbatch.{k} must be a string, a number or true, got {v!r}")
        return dict(value)
    raise AssertionError(key)


def resolve_profile_path(name: str) -> Path:
    """A profile path, or the name of a shipped profile in ``jobs/profiles``."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    shipped = PROFILE_DIR / f"{name}.yaml"
    if not p.suffix and shipped.is_file():
        return shipped
    names = sorted(x.stem for x in PROFILE_DIR.glob("*.yaml"))
    raise ConfigError(f"--profile {name}: no such file (shipped profiles: {', '.join(names) or 'none'})")


def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    """Read and type-check a profile; returns only the keys it sets."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read profile: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a profile is a mapping of settings (partition: gpu, ...), got {type(raw).__name__}")
    valid = [f.name for f in dataclasses.fields(ClusterSpec)]
    out = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        if k not in valid:
            import difflib

            close = difflib.get_close_matches(k, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(valid)})"
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        out[k] = _check_value(k, value, str(path))
    return out


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """The flags shared by ``medattn submit`` and ``medattn sbatch`` (all default to the profile)."""
    g = p.add_argument_group("cluster (flags override --profile)")
    g.add_argument("--profile", help="YAML file of cluster settings, or a shipped name (jobs/profiles)")
    g.add_argument("--nodes", type=int, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 0: CPU, gloo)")
    g.add_argument("--tasks-per-node", type=int,
                   help="processes per node (default: one per GPU, or 1 without GPUs)")
    g.add_argument("--cpus-per-task", type=int,
                   help="CPU cores per process (data loading threads); default: the CPUs that come with its "
                        "GPU (node CPUs / node GPUs), or the node's CPUs shared by its tasks without GPUs")
    g.add_argument("--partition", help="partition (default: the cluster's default partition)")
    g.add_argument("--account", help="account to charge")
    g.add_argument("--qos", help="quality of service")
    g.add_argument("--time", metavar="TIME",
                   help="time limit per job, in minutes or as SLURM writes it (12:00:00, 1-00:00:00); "
                        "jobs requeue themselves when it runs out")
    g.add_argument("--mem", type=float, metavar="GB", help="memory per node in GB")
    g.add_argument("--constraint", help="node features, e.g. a100")
    g.add_argument("--setup", action="append", metavar="CMD",
                   help="shell line run before the job starts, e.g. 'module load cuda' (repeatable)")
    g.add_argument("--signal-delay", type=int, metavar="S",
                   help="seconds before the time limit at which SLURM sends USR2 (default 120)")
    g.add_argument("--max-timeouts", type=int, metavar="N",
                   help="how many times a job may requeue itself after hitting its time limit (default 10)")
    g.add_argument("--job-name", help="job name prefix (default medattn-<run dir name>)")
    g.add_argument("--allow-local-dirs", action="store_true", default=None,
                   help="accept run/data dirs under /tmp etc. (single-host clusters only)")


def resolve_spec(args: argparse.Namespace) -> ClusterSpec:
    """Defaults < profile < flags, type-checked."""
    values: dict[str, Any] = {}
    if getattr(args, "profile", None):
        values.update(load_profile(resolve_profile_path(args.profile)))
    for f in dataclasses.fields(ClusterSpec):
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if f.name == "setup":
            v = values.get("setup", []) + list(v)  # flag lines run after the profile's
        values[f.name] = _check_value(f.name, v, f"--{f.name.replace('_', '-')}")
    spec = ClusterSpec(**values)
    if spec.gpus_per_node and spec.tasks_per_node is not None and spec.tasks_per_node != spec.gpus_per_node:
        raise ConfigError(f"--tasks-per-node {spec.tasks_per_node} with --gpus-per-node {spec.gpus_per_node}: "
                          "medattn runs one process per GPU; leave --tasks-per-node out")
    return spec


# ---------------------------------------------------------------------------------------------
# batch scripts (the one renderer of `medattn sbatch` and `medattn sweep --slurm`)
# ---------------------------------------------------------------------------------------------
def sbatch_flag(name: str, value: Any) -> str:
    return f"#SBATCH --{name}" if value is True else f"#SBATCH --{name}={shlex.quote(str(value))}"


def sbatch_header(spec: ClusterSpec, partition: Partition | None, *, job_name: str, cpus_per_task: int,
                  output: str | os.PathLike, comment: str | None = None) -> str:
    """The ``#SBATCH`` lines of a job that runs one task per node (torchrun, or a Ray node, hosts
    the node's processes), requeues itself and gets USR2 ``signal_delay`` s before its time limit
    in the batch shell, which passes it on (see the templates)."""
    lines = [sbatch_flag("job-name", job_name), sbatch_flag("nodes", spec.nodes),
             sbatch_flag("ntasks-per-node", 1), sbatch_flag("cpus-per-task", cpus_per_task)]
    if spec.gpus_per_node:
        lines.append(sbatch_flag("gpus-per-node", spec.gpus_per_node))
    lines.append(sbatch_flag("time", default_time(spec, partition)))
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(spec, key):
            lines.append(sbatch_flag(key, getattr(spec, key)))
    if spec.mem:
        lines.append(sbatch_flag("mem", f"{int(spec.mem)}G" if spec.mem == int(spec.mem) else f"{int(spec.mem * 1024)}M"))
    lines += [sbatch_flag("output", output), sbatch_flag("open-mode", "append"), sbatch_flag("requeue", True),
              sbatch_flag("signal", f"B:USR2@{spec.signal_delay}")]
    if comment:
        lines.append(sbatch_flag("comment", comment))
    lines += [sbatch_flag(k, v) for k, v in spec.sbatch.items()]
    return "\n".join(lines)


def setup_lines(spec: ClusterSpec) -> str:
    """The job's environment (profile ``env``) and setup commands, as shell lines."""
    lines = [f"export {k}={shlex.quote(str(v))}" for k, v in spec.env.items()] + list(spec.setup)
    return "\n".join(lines) if lines else "# (no setup lines: --setup / profile setup)"


def render_template(path: Path, values: dict[str, str]) -> str:
    """Fill ``{{name}}`` fields of a script template; every field must be given."""
    text = path.read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", v)
    if "{{" in text:
        raise AssertionError(f"unfilled field in {path.name}: {text[text.index('{{'):][:40]}")
    return text


# ---------------------------------------------------------------------------------------------
# shared filesystem
# ---------------------------------------------------------------------------------------------
def check_shared_path(path: str | os.PathLike, what: str, allow_local: bool, must_exist: bool) -> Path:
    """Refuse paths the compute nodes cannot see; returns the absolute path.

    A run directory must be readable and writable from every node and from the login node, so
    it must live on a shared filesystem. This cannot be proven from the login node, so the
    check refuses what is certainly wrong: node-local locations (/tmp, /var/tmp, /dev/shm,
    /run, ...) and paths whose parent does not exist (a typo would otherwise surface as a job
    that fails on the compute node with an empty log).

    Args:
        path: the directory.
        what: its flag, for the message (``--out``).
        allow_local: accept node-local prefixes (single-host clusters such as the test cluster).
        must_exist: the path itself must exist (data), not just its parent (run dir).
    """
    p = Path(path).expanduser().absolute()
    real = Path(os.path.realpath(p))
    # Node-local first: such a path is wrong whether or not it exists here.
    if not allow_local:
        for cand in {p, real}:
            for prefix in NODE_LOCAL_PREFIXES:
                if cand == Path(prefix) or Path(prefix) in cand.parents:
                    raise ClusterError(
                        f"{what} {path}: {prefix} is local to each node, so the other nodes (and the next "
                        "job of the chain) would not see it; use a directory on the shared filesystem "
                        "(home, project or scratch), or --allow-local-dirs on a single-host cluster")
    if must_exist and not real.exists():
        raise ClusterError(f"{what} {path}: does not exist")
    if not must_exist and not real.parent.is_dir():
        raise ClusterError(f"{what} {path}: parent directory {p.parent} does not exist "
                           "(create it on the shared filesystem first)")
    return p


# ---------------------------------------------------------------------------------------------
# SLURM client calls
# ---------------------------------------------------------------------------------------------
def have_slurm() -> bool:
    return all(shutil.which(t) for t in ("sbatch", "scontrol", "sinfo", "squeue", "scancel"))


def slurm_cmd(args: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """Run a SLURM client command; a failure raises :class:`ClusterError` with its stderr."""
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ClusterError(f"{args[0]} not found: run this on a SLURM login node") from None
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{' '.join(args)} did not answer in {timeout:.0f} s (is slurmctld up?)") from None
    if check and r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().replace("\n", "; ")
        raise ClusterError(f"{' '.join(args[:2])} failed: {msg}")
    return r


@contextlib.contextmanager
def clean_slurm_env() -> Iterator[None]:
    """Hide the variables of an enclosing job or torchrun while submitting.

    A job submitted from inside another job inherits its SLURM_* variables (wrong node lists,
    GPU binding) and its RANK/MASTER_* (the new job would join the old process group).
    SLURM_CONF is kept: it is how clients find the cluster.
    """
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
    saved = {k: os.environ.pop(k) for k in list(os.environ)
             if (k.startswith(("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "SUBMITIT_")) and k != "SLURM_CONF")
             or k in names}
    try:
        yield
    finally:
        os.environ.update(saved)


@dataclass
class Partition:
    name: str
    state: str
    default: bool
    total_nodes: int
    max_nodes: int | None
    max_time: int | None  # minutes; None = unlimited
    default_time: int | None
    node_groups: list[dict[str, Any]]  # from sinfo: count, cpus, gpus, mem_mb

    @property
    def max_gpus(self) -> int:
        return max((g["gpus"] for g in self.node_groups), default=0)

    def nodes_with(self, gpus: int, cpus: int, mem_mb: float) -> int:
        return sum(g["count"] for g in self.node_groups
                   if g["gpus"] >= gpus and g["cpus"] >= cpus and g["mem_mb"] >= mem_mb)


def parse_slurm_time(text: str) -> int | None:
    """SLURM time (``UNLIMITED``, ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) -> minutes."""
    t = text.strip()
    if t.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A", ""):
        return None
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        days = int(d)
        parts = [int(x) for x in t.split(":")] + [0, 0]
        h, m, s = parts[:3]
    else:
        parts = [int(x) for x in t.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts[:3]
    return days * 1440 + h * 60 + m + (1 if s else 0)


def gpu_count(gres: str) -> int:
    """GPUs per node in a sinfo ``%G`` string: ``gpu:8``, ``gpu:a100:4(S:0-1)``, ``(null)``."""
    n = 0
    for item in re.split(r",(?![^(]*\))", gres or ""):
        item = re.sub(r"\(.*\)$", "", item.strip())
        parts = item.split(":")
        if parts[0] != "gpu":
            continue
        last = parts[-1] if len(parts) > 1 else "1"
        m = re.match(r"(\d+)", last)
        n += int(m.group(1)) if m else 1
    return n


def partitions(timeout: float = 60) -> dict[str, Partition]:
    """All partitions, from ``scontrol show partition`` and ``sinfo`` (per node group)."""
    out = {}
    text = slurm_cmd(["scontrol", "show", "partition", "-o"], timeout=timeout).stdout
    for line in text.splitlines():
        kv = dict(x.split("=", 1) for x in line.split() if "=" in x)
        if "PartitionName" not in kv:
            continue
        mx = kv.get("MaxNodes", "UNLIMITED")
        out[kv["PartitionName"]] = Partition(
            name=kv["PartitionName"], state=kv.get("State", "UP"), default=kv.get("Default") == "YES",
            total_nodes=int(kv.get("TotalNodes", "0") or 0),
            max_nodes=None if mx.upper() == "UNLIMITED" else int(mx),
            max_time=parse_slurm_time(kv.get("MaxTime", "UNLIMITED")),
            default_time=parse_slurm_time(kv.get("DefaultTime", "NONE")), node_groups=[])
    text = slurm_cmd(["sinfo", "-h", "-o", "%R|%D|%c|%G|%m"], timeout=timeout).stdout
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or parts[0] not in out:
            continue
        name, count, cpus, gres, mem = parts
        try:
            out[name].node_groups.append({"count": int(count), "cpus": int(cpus.rstrip("+")), "gres": gres,
                                          "gpus": gpu_count(gres), "mem_mb": float(mem.rstrip("+") or 0)})
        except ValueError:
            continue
    return out


def default_time(spec: ClusterSpec, part: Partition | None) -> int:
    if spec.time is not None:
        return spec.time
    if part is not None and part.default_time:
        return part.default_time
    if part is not None and part.max_time:
        return min(part.max_time, 1440)
    return 240


# Used only when SLURM cannot be asked what a node has (a script written away from the cluster).
FALLBACK_CPUS_PER_GPU_TASK = 8
FALLBACK_CPUS_PER_CPU_TASK = 2


def default_cpus_per_task(spec: ClusterSpec, part: Partition | None) -> tuple[int, str]:
    """CPUs per task when ``--cpus-per-task`` is not given, and how they were derived.

    All the CPUs that come with the GPUs the job uses: a node with C CPUs and G GPUs gives each
    GPU C // G of them, so one process per GPU gets C // G (8 GPUs on a 64-core node: 8), and a
    task driving g GPUs (a sweep's Ray node) gets C * g // G. Without GPUs the node's CPUs are
    shared by its tasks. The node is the smallest one of the partition that fits the request.
    Without SLURM to ask: 8 per GPU process, 2 per CPU process.
    """
    tasks = max(1, spec.tasks)
    groups = [g for g in (part.node_groups if part else []) if g["count"] and g["gpus"] >= spec.gpus_per_node]
    if not groups:
        n = FALLBACK_CPUS_PER_GPU_TASK if spec.gpus_per_node else FALLBACK_CPUS_PER_CPU_TASK
        return n, "SLURM did not say what a node has: the documented fallback"
    node = min(groups, key=lambda g: (g["cpus"], g["gpus"]))
    c, gpus = node["cpus"], node["gpus"]
    if spec.gpus_per_node and gpus:
        share = c * spec.gpus_per_node // gpus
        how = f"{c} CPUs / {gpus} GPUs per node of {part.name}, x {spec.gpus_per_node} GPU(s), / {tasks} task(s)"
    else:
        share = c
        how = f"{c} CPUs per node of {part.name} / {tasks} task(s)"
    return max(1, share // tasks), how


def check_against_cluster(spec: ClusterSpec, parts: dict[str, Partition] | None = None) -> Partition:
    """Check the request against the partition; returns it (``spec.partition`` filled in).

    Args:
        spec: the request; a missing partition becomes the cluster's default one.
        parts: :func:`partitions` (queried when not given).
    """
    parts = partitions() if parts is None else parts
    if not parts:
        raise ClusterError("the cluster reports no partitions (scontrol show partition is empty)")
    if spec.partition is None:
        defaults = [p for p in parts.values() if p.default]
        if not defaults:
            raise ClusterError(f"no --partition given and the cluster has no default partition; "
                               f"choose one of: {', '.join(sorted(parts))}")
        spec.partition = defaults[0].name
    part = parts.get(spec.partition)
    if part is None:
        raise ClusterError(f"--partition {spec.partition}: no such partition (available: {', '.join(sorted(parts))})")
    if spec.cpus_per_task is None:
        spec.cpus_per_task, _ = default_cpus_per_task(spec, part)
    problems = []
    if part.state.upper() in ("INACTIVE", "DRAIN"):
        problems.append(f"partition {part.name} is {part.state} and accepts no jobs")
    cpus = spec.tasks * (spec.cpus_per_task or 1)
    mem_mb = (spec.mem or 0) * 1024
    if spec.nodes > part.total_nodes:
        problems.append(f"--nodes {spec.nodes}: partition {part.name} has {part.total_nodes} node(s)")
    elif part.max_nodes is not None and spec.nodes > part.max_nodes:
        problems.append(f"--nodes {spec.nodes}: partition {part.name} allows at most {part.max_nodes} per job")
    if spec.gpus_per_node and part.max_gpus == 0:
        with_gpus = sorted(f"{p.name} ({p.max_gpus}/node)" for p in parts.values() if p.max_gpus)
        problems.append(f"--gpus-per-node {spec.gpus_per_node}: partition {part.name} has no GPUs (no gpu Gres)"
                        + (f"; partitions with GPUs: {', '.join(with_gpus)}" if with_gpus
                           else "; no partition of this cluster has GPUs (use --gpus-per-node 0)"))
    elif spec.gpus_per_node > part.max_gpus:
        problems.append(f"--gpus-per-node {spec.gpus_per_node}: nodes of partition {part.name} have at most "
                        f"{part.max_gpus} GPUs")
    max_cpus = max((g["cpus"] for g in part.node_groups), default=0)
    if part.node_groups and cpus > max_cpus:
        problems.append(f"{spec.tasks} task(s) x {spec.cpus_per_task or 1} CPU(s) per node: nodes of partition "
                        f"{part.name} have at most {max_cpus} CPUs")
    max_mem = max((g["mem_mb"] for g in part.node_groups), default=0)
    if spec.mem and part.node_groups and max_mem and mem_mb > max_mem:
        problems.append(f"--mem {spec.mem:g} GB: nodes of partition {part.name} have at most {max_mem / 1024:.1f} GB")
    if not problems and part.node_groups and spec.nodes <= part.total_nodes:
        fit = part.nodes_with(spec.gpus_per_node, cpus, mem_mb)
        if fit < spec.nodes:
            problems.append(f"only {fit} node(s) of partition {part.name} have {spec.gpus_per_node} GPUs, "
                            f"{cpus} CPUs and {spec.mem or 0:g} GB; {spec.nodes} asked")
    t = default_time(spec, part)
    if part.max_time is not None and t > part.max_time:
        problems.append(f"--time {t}: partition {part.name} allows at most {part.max_time} minutes "
                        "(jobs requeue themselves, so a shorter limit loses nothing)")
    if problems:
        raise ClusterError("; ".join(problems))
    return part


def test_only(script_text: str, folder: Path) -> None:
    """``sbatch --test-only``: slurmctld checks the job (account, QOS, features) without queuing it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".test-only.sh"
    path.write_text(script_text)
    try:
        r = slurm_cmd(["sbatch", "--test-only", str(path)], check=False)
    finally:
        path.unlink(missing_ok=True)
    if r.returncode != 0:
        msg = "; ".join(line.strip() for line in (r.stderr + r.stdout).splitlines() if line.strip())
        raise ClusterError(f"SLURM refuses the job (sbatch --test-only): {msg}")


# ---------------------------------------------------------------------------------------------
# job states
# ---------------------------------------------------------------------------------------------
def job_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """``{job_id: {"state": ..., "reason": ..., "restarts": ...}}`` for the jobs SLURM still knows.

    squeue first (it also lists finished jobs for MinJobAge seconds), then sacct for the
    rest when accounting is enabled. Jobs neither knows are absent.
    """
    out: dict[str, dict[str, str]] = {}
    if not job_ids:
        return out
    r = slurm_cmd(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"], check=False)
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in job_ids:
            out[parts[0]] = {"state": parts[1], "reason": parts[2]}
    missing = [j for j in job_ids if j not in out]
    if missing and shutil.which("sacct"):
        r = slurm_cmd(["sacct", "-n", "-X", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(missing)],
                      check=False)
        if r.returncode == 0:
            for line in r.stdout.splitlines():
                parts = line.strip().split("|")
                if len(parts) >= 2 and parts[0] in missing:
                    out[parts[0]] = {"state": parts[1].split()[0], "reason": parts[2] if len(parts) > 2 else ""}
    return out


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        slurm_cmd(["scancel", *job_ids], check=False)
