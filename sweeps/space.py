"""Search spaces: ``--space 'NAME=FUNC(ARGS)'`` parsed, checked against the config, and mapped
to config overrides and Ray Tune domains.

Grammar (one ``--space`` per parameter)::

    uniform(a, b)         float in [a, b)
    loguniform(a, b)      float in [a, b), log-uniform; 0 < a
    quniform(a, b, q)     a multiple of q in [a, b]
    randint(a, b)         integer in [a, b)  (b excluded, as in Python's range)
    choice(v1, v2, ...)   one of the values (random/optuna), or every value (--search grid)
    grid(v1, v2, ...)     every value (a grid axis; random search crosses it with the samples)

NAME is an alias or a full dotted config key (``stages.local.optimizer.lr``, ``stages.*.epochs``).
The aliases belong to the methods (``Method.sweep_aliases`` / ``alias_settings``):

    tau    agcnn.tau (AG-CNN's attention threshold); for dualattendmed the crop threshold
           theta: dualattendmed.crop_theta=[tau, tau] and dualattendmed.eval_crop_theta=tau
    lam    gradcam_loss.lam; the value ``adaptive`` means gradcam_loss.adaptive=true
    gamma  focal.gamma (methods with a focal section; needs a stage with ``loss: focal``)

Everything a trial could get wrong is checked here, before any trial starts: unknown names,
empty ranges, values of the wrong type, and parameters the config does not use. Errors are
:class:`~medattn.errors.ConfigError` and name the parameter.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

from medattn.config import Config, get_key, set_key, validate
from medattn.errors import ConfigError, MedattnError

FUNCS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")


def known_aliases() -> dict[str, tuple[str, list[str]]]:
    """Every method's sweep aliases: alias -> (what it is, the methods that have it)."""
    from medattn.methods import method_class, method_names

    out: dict[str, tuple[str, list[str]]] = {}
    for m in method_names():  # registered methods too (medattn.methods.register_method)
        for alias, (noun, _) in method_class(m).all_sweep_aliases().items():
            out.setdefault(alias, (noun, []))[1].append(m)
    return out
_SPEC = re.compile(r"^\s*([A-Za-z_][\w.*]*)\s*=\s*([a-z]+)\s*\((.*)\)\s*$", re.S)


@dataclass
class Param:
    """One swept parameter.

    Attributes:
        name: as written on the command line (an alias or a dotted key).
        func: uniform | loguniform | quniform | randint | choice | grid.
        args: the numeric bounds (range functions) or the values (choice, grid).
        keys: the config keys the parameter sets (for work reuse and error messages).
    """

    name: str
    func: str
    args: list[Any]
    text: str
    keys: list[str] = field(default_factory=list)
    _method: str = ""

    @property
    def discrete(self) -> bool:
        return self.func in ("choice", "grid")

    def overrides(self, value: Any) -> list[tuple[str, Any]]:
        """The config settings for one sampled ``value`` (``[(dotted key, value), ...]``)."""
        if "." not in self.name and self._method:
            from medattn.methods import method_class

            cls = method_class(self._method)
            if self.name in cls.all_sweep_aliases():
                return cls.alias_settings(self.name, value)
        return [(self.name, value)]

    def candidates(self) -> list[Any]:
        """Values that stand for the whole range when checking types and bounds."""
        if self.discrete:
            return list(self.args)
        a, b = self.args[0], self.args[1]
        if self.func == "randint":
            return [a, b - 1]
        if self.func == "quniform":  # Ray snaps the bounds inwards to multiples of q
            q = self.args[2]
            snap = lambda x, f: round(x / q) * q if math.isclose(x / q, round(x / q)) else f(x / q) * q  # noqa: E731
            return [snap(a, math.ceil), snap(b, math.floor)]
        return [a, math.nextafter(b, a)]  # b itself is never sampled

    def tune_domain(self, grid_search: bool = False):
        """The Ray Tune domain (``tune.uniform(...)`` etc.)."""
        from ray import tune

        f, a = self.func, self.args
        if f == "grid" or (f == "choice" and grid_search):
            return tune.grid_search(list(a))
        if f == "choice":
            return tune.choice(list(a))
        if f == "uniform":
            return tune.uniform(a[0], a[1])
        if f == "loguniform":
            return tune.loguniform(a[0], a[1])
        if f == "quniform":
            return tune.quniform(a[0], a[1], a[2])
        return tune.randint(a[0], a[1])


@dataclass
class SearchSpace:
    params: list[Param]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def get(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def overrides(self, sample: dict[str, Any]) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for p in self.params:
            out += p.overrides(sample[p.name])
        return out

    def keys(self) -> list[str]:
        return [k for p in self.params for k in p.keys]


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
def _split_args(text: str, where: str) -> list[str]:
    """Split on top-level commas (not inside brackets or quotes)."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if quote or depth:
        raise ConfigError(f"{where}: unbalanced quotes or brackets")
    last = "".join(cur).strip()
    if last or parts:
        parts.append(last)
    if any(p == "" for p in parts):
        raise ConfigError(f"{where}: empty value in the argument list")
    return parts


def parse_scalar(tok: str) -> Any:
    """``'0.5'`` -> 0.5, ``'3'`` -> 3, ``'1e-4'`` -> 0.0001, ``'true'`` -> True, ``'adaptive'`` -> 'adaptive',
    ``'[1, 2]'`` -> [1, 2], quoted text -> the text."""
    import yaml

    t = tok.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    if t[:1] in "[{":
        try:
            return yaml.safe_load(t)
        except yaml.YAMLError:
            return t
    if re.fullmatch(r"[+-]?\d+", t):
        return int(t)
    try:
        return float(t)
    except ValueError:
        pass
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    return t


def _number(v: Any, where: str, integer: bool = False) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ConfigError(f"{where}: {v!r} is not {'an integer' if integer else 'a number'}")
    if not math.isfinite(v):
        raise ConfigError(f"{where}: {v!r} is not finite")
    return v


def parse_param(text: str) -> Param:
    """Parse one ``NAME=FUNC(ARGS)`` (syntax and ranges only; :func:`build_space` checks the rest)."""
    m = _SPEC.match(text)
    if not m:
        name = text.split("=", 1)[0].strip() if "=" in text else text
        raise ConfigError(f"--space {text!r}: expected NAME=FUNC(ARGS), e.g. tau=uniform(0.5,0.9) or "
                          f"gamma=choice(0,1,2); parameter {name!r}")
    name, func, body = m.group(1), m.group(2), m.group(3)
    where = f"--space {name}"
    if func not in FUNCS:
        raise ConfigError(f"{where}: unknown function {func}(...); use one of {', '.join(f + '()' for f in FUNCS)}")
    args = [parse_scalar(t) for t in _split_args(body, where)]
    if func in ("choice", "grid"):
        if not args:
            raise ConfigError(f"{where}: {func}() needs at least one value")
        seen = []
        for v in args:
            if v in seen and type(v) is type(seen[seen.index(v)]):
                raise ConfigError(f"{where}: value {v!r} appears twice in {func}(...)")
            seen.append(v)
        return Param(name, func, args, text)
    need = 3 if func == "quniform" else 2
    if len(args) != need:
        sig = "quniform(a, b, q)" if func == "quniform" else f"{func}(a, b)"
        raise ConfigError(f"{where}: {sig} takes {need} numbers, got {len(args)}")
    nums = [_number(v, where, integer=func == "randint") for v in args]
    a, b = nums[0], nums[1]
    if not a < b:
        raise ConfigError(f"{where}: empty range {func}({a}, {b}): the lower bound must be below the upper")
    if func == "loguniform" and a <= 0:
        raise ConfigError(f"{where}: loguniform needs a positive lower bound, got {a}")
    if func == "quniform":
        q = nums[2]
        if q <= 0 or q > b - a:
            raise ConfigError(f"{where}: quniform step q={q} must be in (0, {b - a}]")
    return Param(name, func, [float(x) for x in nums] if func != "randint" else nums, text)


# --------------------------------------------------------------------------------------------
# checks against the config
# --------------------------------------------------------------------------------------------
def key_exists(cfg: Config, key: str) -> bool:
    """Whether a dotted key names a setting (``stages.*.x`` must exist in every stage)."""
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) >= 3:
        names = list(cfg.stages) if parts[1] == "*" else [parts[1]]
        if not names or any(n not in cfg.stages for n in names):
            return False
        for n in names:
            try:
                v = get_key(cfg.stages[n], ".".join(parts[2:]))  # type: ignore[arg-type]
            except ConfigError:
                return False
            if _is_section(v):
                return False
        return True
    try:
        v = get_key(cfg, key)
    except ConfigError:
        return False
    return not _is_section(v)


def _is_section(v: Any) -> bool:
    """A dataclass section or the ``stages`` mapping: not something one value can replace."""
    import dataclasses

    return dataclasses.is_dataclass(v) or (isinstance(v, dict) and bool(v)
                                           and all(dataclasses.is_dataclass(x) for x in v.values()))


def focal_stages(cfg: Config, space: SearchSpace | None = None) -> list[str]:
    """Stages that use focal loss in the config, or in any swept value of their ``loss``."""
    out = []
    for name, st in cfg.stages.items():
        uses = st.loss == "focal"
        for p in space.params if space else []:
            for k in p.keys:
                if k in (f"stages.{name}.loss", "stages.*.loss") and p.discrete and "focal" in p.args:
                    uses = True
        if uses:
            out.append(name)
    return out


def _resolve_keys(p: Param, cfg: Config) -> list[str]:
    from medattn.methods import method_class

    where = f"--space {p.name}"
    if "." not in p.name and p.name not in ("seed",):
        method = method_class(cfg.method)
        if p.name in method.all_sweep_aliases():
            keys: dict[str, None] = {}
            for v in p.candidates():
                keys.update(dict.fromkeys(k for k, _ in method.alias_settings(p.name, v)))
            return list(keys)
        aliases = known_aliases()
        if p.name in aliases:
            noun, owners = aliases[p.name]
            raise ConfigError(f"{where}: method {cfg.method!r} has no {noun} ({p.name} applies to "
                              f"{', '.join(owners)}; this config's method is {cfg.method!r})")
        raise ConfigError(f"{where}: unknown parameter {p.name!r}; use an alias ({', '.join(aliases)}) "
                          f"or a dotted config key (e.g. stages.local.optimizer.lr)")
    if not key_exists(cfg, p.name):
        # get_key's message suggests the closest valid key
        try:
            if not p.name.startswith("stages."):
                get_key(cfg, p.name)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        raise ConfigError(f"{where}: {p.name!r} is not a setting of this config"
                          + (f" (its stages are {', '.join(cfg.stages)})" if p.name.startswith("stages.") else ""))
    return [p.name]


def _check_used(p: Param, cfg: Config, space: SearchSpace) -> None:
    """Reject parameters that cannot change what this config trains (the method says which
    stages a key affects)."""
    from medattn.methods import method_class

    method = method_class(cfg.method)
    for key in p.keys:
        stages, why = method.key_effect(cfg, key, focal_stages(cfg, space))
        if not stages:
            raise ConfigError(f"--space {p.name}: {why}")


def _apply(cfg: Config, settings: list[tuple[str, Any]]) -> Config:
    out = copy.deepcopy(cfg)
    for k, v in settings:
        set_key(out, k, v)
    validate(out)
    return out


def build_space(specs: list[str], cfg: Config, *, method_check=None) -> SearchSpace:
    """Parse ``--space`` strings and check them against the resolved base config.

    Args:
        specs: the ``--space`` values, e.g. ``["tau=uniform(0.5,0.9)", "gamma=choice(0,1,2)"]``.
        cfg: the base config (shipped name or YAML + ``key=value`` overrides), resolved.
        method_check: optional ``f(cfg)`` that raises ConfigError when the method rejects a config
            (e.g. builds the method's validation against the dataset).

    Raises:
        ConfigError: naming the parameter, for any problem.
    """
    if not specs:
        raise ConfigError("--space: give at least one parameter, e.g. --space 'tau=uniform(0.5,0.9)'")
    params = [parse_param(s) for s in specs]
    space = SearchSpace(params)
    names = [p.name for p in params]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"--space {dup}: given twice")
    for p in params:
        p._method = cfg.method
        p.keys = _resolve_keys(p, cfg)
    owners: dict[str, str] = {}
    for p in params:
        for k in p.keys:
            if k in owners:
                raise ConfigError(f"--space {p.name}: sets {k}, which --space {owners[k]} also sets")
            owners[k] = p.name
    for p in params:
        _check_used(p, cfg, space)
    # Types and bounds: every candidate value must make a valid config (others at base values).
    for p in params:
        for i, v in enumerate(p.candidates()):
            what = f"value {v!r}" if p.discrete else f"{('lower', 'upper')[i]} end {p.args[i]!r} of {p.func}()"
            if p.name == "lam" and isinstance(v, str) and v.lower() != "adaptive":
                raise ConfigError(f"--space lam: {v!r} is neither a number nor 'adaptive'")
            if p.name == "lam" and not isinstance(v, str) and not (isinstance(v, (int, float))
                                                                   and not isinstance(v, bool) and 0 <= v <= 1):
                raise ConfigError(f"--space lam: {v!r} is not a weight in [0, 1] (or 'adaptive')")
            try:
                trial_cfg = _apply(cfg, p.overrides(v))
                if method_check is not None:
                    method_check(trial_cfg)
            except MedattnError as e:
                raise ConfigError(f"--space {p.name}: {what} is not valid: {e}") from None
    return space
