"""4M's decoding schedules: how many tokens each step commits, and at what temperature.

The arithmetic follows ml-4m (fourm/utils/generation.py and build_chained_generation_schedules in
fourm/models/generate.py) operation for operation, in float64 numpy, so the tables match the
reference's to the last bit (tests/test_generate.py checks shared/parity/schedules.json).
Quirks kept on purpose, because 4M's released settings depend on them:

- cosine: per-step counts are Python's round() (half to even) of the drop in a cosine curve; the
  last step takes whatever is left, so with more steps than tokens it can be larger than its
  neighbours (196 steps of 196 tokens end with a 2), some steps commit 0 tokens, and for some
  settings the rounding overshoots and the last count is negative (per_sample_table caps those).
- linear: counts in descending order with trailing zero steps dropped, so more steps than tokens
  gives one token per step and fewer steps than asked.
- onex: the 1/x^power curve is sampled at sum(tokens) points but only the first len(schedule) of
  them are used (4M zips the two lists).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOKEN_SCHEDULES = ("cosine", "linear")
SCHEMES = ("maskgit", "roar", "autoregressive")


def _check_counts(n_steps: int, n_tokens: int, who: str) -> None:
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"{who}: n_steps must be an integer >= 1, got {n_steps!r}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < 0:
        raise ValueError(f"{who}: n_tokens must be an integer >= 0, got {n_tokens!r}")


def cosine_schedule(n_steps: int, n_tokens: int) -> np.ndarray:
    """Tokens per step (int64 [n_steps]) following 0.5 (1 + cos(pi i / n_steps)); sums to n_tokens."""
    _check_counts(n_steps, n_tokens, "cosine_schedule")
    curve = np.array([0.5 * (1 + math.cos(math.pi * i / n_steps)) for i in range(n_steps)])
    counts = [round(n_tokens * d) for d in curve[:-1] - curve[1:]]
    counts.append(n_tokens - sum(counts))
    return np.array(counts, dtype=np.int64)


def linear_schedule(n_steps: int, n_tokens: int) -> np.ndarray:
    """Tokens per step in descending order, trailing zero steps dropped; sums to n_tokens."""
    _check_counts(n_steps, n_tokens, "linear_schedule")
    edges = np.linspace(0, n_tokens, n_steps + 1, dtype=int)
    counts = np.sort(np.diff(edges))[::-1]
    nonzero = np.flatnonzero(counts)
    return counts[: nonzero[-1] + 1 if nonzero.size else 0].astype(np.int64)


def token_schedule(kind: str, n_steps: int, n_tokens: int) -> np.ndarray:
    if kind == "cosine":
        return cosine_schedule(n_steps, n_tokens)
    if kind == "linear":
        return linear_schedule(n_steps, n_tokens)
    raise ValueError(f"unknown token schedule {kind!r}; choose from {TOKEN_SCHEDULES}")


def linear_temp_schedule(temp: float, tokens: np.ndarray) -> np.ndarray:
    """temp at the first step, then temp * (share of tokens still to decode), floored at 1e-9."""
    tokens = np.asarray(tokens)
    total = tokens.sum()
    rest = temp * (total - tokens.cumsum()) / total
    return np.concatenate([[temp * 1.0], rest[:-1]]).clip(min=1e-9)


def onex_temp_schedule(max_t: float, min_t: float, tokens: np.ndarray, power: float = 0.5,
                       min_linspace: float = 1, max_linspace: float = 100) -> np.ndarray:
    """4M's "one over x" decay from max_t towards min_t, floored at 1e-9."""
    tokens = np.asarray(tokens)
    x = np.linspace(min_linspace, max_linspace, num=int(tokens.sum()))
    y = 1 / (x ** power)
    y = y - min(y)
    if len(y) == 1:  # one token: 4M's 0 / 0 gives NaN; its only step is the last, at min_t
        y = np.zeros(1)
    else:
        y = y / max(y)
    done = np.cumsum(tokens) / np.sum(tokens)
    shaped = [(1 - d) * u for u, d in zip(y, done)]
    return np.array([min_t + (max_t - min_t) * s for s in shaped]).clip(min=1e-9)


def temperature_schedule(kind: str, temp: float, tokens: np.ndarray) -> np.ndarray:
    """"constant", "linear", or "onex:MIN_T:POWER" (4M's names) over a token schedule."""
    tokens = np.asarray(tokens)
    if kind == "constant":
        return temp * np.ones(len(tokens))
    if kind == "linear":
        return linear_temp_schedule(temp, tokens)
    min_t, power = _onex_params(kind)
    return onex_temp_schedule(temp, min_t, tokens, power)


def _onex_params(kind: str) -> tuple[float, float]:
    parts = kind.split(":")
    if parts[0] != "onex":
        raise ValueError(f"unknown temperature schedule {kind!r}; choose constant, linear or onex:MIN_T:POWER")
    try:
        min_t, power = (float(p) for p in parts[1:])
    except ValueError:
        raise ValueError(f"temperature schedule {kind!r}: write onex:MIN_T:POWER, e.g. onex:0.5:0.5") from None
    # a NaN, inf or negative MIN_T is no temperature; POWER 0 makes the curve flat, and 4M's
    # normalisation then divides 0 by 0 (a negative POWER is a rising curve 4M also computes)
    if not (math.isfinite(min_t) and min_t >= 0 and math.isfinite(power) and power != 0):
        raise ValueError(f"temperature schedule {kind!r}: MIN_T must be finite and >= 0 and POWER finite and not 0, "
                         f"e.g. onex:0.5:0.5")
    return min_t, power


def _integer(value, who: str):
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{who} must be an integer, got {value!r}")
    return value


def _real(value, who: str) -> float | int:
    if isinstance(value, (np.integer, np.floating)) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
        value = value.item()  # numpy scalars and 0-d tensors
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{who} must be a number, got {value!r}")
    return value


def _names(mods, who: str) -> list[str]:
    """A list of modality names; a bare string would be read letter by letter."""
    if isinstance(mods, str) or not all(isinstance(m, str) for m in mods):
        raise ValueError(f"{who}: a list of modality names, got {mods!r}")
    return list(mods)


@dataclass
class TargetSpec:
    """How one target modality is generated.

    scheme: "maskgit" (commit the most confident samples each step), "roar" (random order) or
    "autoregressive" (sequences). steps / token_schedule / temp_schedule as in 4M.
    cfg_scale with cfg_conditions: classifier-free guidance that removes those modalities in the
    unconditional pass (None: every modality given or generated before this target).
    guidance: multi-condition guidance, a list of (modalities, weight) pairs:
    logits = u + sum_i w_i (c_i - u), where c_i sees condition i and u sees neither (overrides
    cfg_scale). top_k / top_p / min_p: filters of sample_tokens: top_k 0 (off), a count >= 1 or a
    fraction of the vocabulary in (0, 1); top_p in [0, 1], 0 or 1 is off; min_p in [0, 1].
    Autoregressive targets decode one token per step at ``temperature``: steps, token_schedule and
    temp_schedule apply to MaskGIT / ROAR only (as in 4M). With maskgit, a step's confidence is
    the sampled token's probability at that step's temperature; at temperature 0 every such
    probability is 1, so the step commits the lowest unknown positions (4M's top-k meets the same tie).
    """

    name: str
    scheme: str = "maskgit"
    steps: int = 8
    token_schedule: str = "cosine"
    temperature: float = 1.0
    temp_schedule: str = "constant"
    cfg_scale: float = 1.0
    cfg_conditions: list[str] | None = None
    guidance: list[tuple[list[str], float]] | None = None
    top_k: float = 0
    top_p: float = 0.0
    min_p: float = 0.0
    # autoregressive: cap on generated tokens (at most, and by default, the modality's max_length - 1, as 4M)
    max_length: int | None = None

    def __post_init__(self):
        who = f"target {self.name!r}"
        # numpy scalars (from a config or an array) become Python numbers; the op takes no others
        if self.scheme != "autoregressive":  # autoregressive targets ignore steps
            self.steps = _integer(self.steps, f"{who}: steps")
        self.temperature = _real(self.temperature, f"{who}: temperature")
        self.cfg_scale = _real(self.cfg_scale, f"{who}: cfg_scale")
        self.top_k = _real(self.top_k, f"{who}: top_k")
        if not (self.top_k == 0 or 0 < self.top_k < 1 or (self.top_k >= 1 and float(self.top_k).is_integer())):
            raise ValueError(f"{who}: top_k must be 0 (off), a whole count >= 1 or a fraction in (0, 1), got {self.top_k}")
        if self.top_k >= 1:
            self.top_k = int(self.top_k)
        self.top_p = _real(self.top_p, f"{who}: top_p")
        if not 0 <= self.top_p <= 1:  # 0.9, not 90: a value outside used to turn the filter off unnoticed
            raise ValueError(f"{who}: top_p must be in [0, 1] (0 or 1: off), got {self.top_p}")
        self.min_p = _real(self.min_p, f"{who}: min_p")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"{who}: min_p must be in [0, 1] (0: off), got {self.min_p}")
        if self.max_length is not None:
            self.max_length = _integer(self.max_length, f"{who}: max_length")
            if self.max_length < 1:
                raise ValueError(f"{who}: max_length must be >= 1, got {self.max_length}")
        if self.cfg_conditions is not None:
            self.cfg_conditions = _names(self.cfg_conditions, f"{who}: cfg_conditions")
        if self.guidance is not None:
            self.guidance = [(_names(mods, f"{who}: guidance"), w) for mods, w in self.guidance]
        if self.scheme not in SCHEMES:
            raise ValueError(f"target {self.name!r}: scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.scheme != "autoregressive":
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                raise ValueError(f"target {self.name!r}: steps must be an integer >= 1, got {self.steps!r}")
            token_schedule(self.token_schedule, 1, 1)  # validates the name
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"target {self.name!r}: temperature must be finite and >= 0, got {self.temperature}")
        if self.temp_schedule not in ("constant", "linear"):
            _onex_params(self.temp_schedule)
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"target {self.name!r}: cfg_scale must be finite, got {self.cfg_scale}")
        if self.guidance is not None:
            for mods, w in self.guidance:
                if not mods or not math.isfinite(float(w)):
                    raise ValueError(f"target {self.name!r}: each guidance entry needs modalities and a finite weight, got {(mods, w)}")


def build_chained_schedule(cond_domains: list[str], targets: list[TargetSpec], tokens_per_target: list[int],
                           cfg_grow_conditioning: bool = False) -> list[dict]:
    """The flat per-step schedule 4M's build_chained_generation_schedules returns, from our specs:
    one dict per step with target_domain, scheme, num_tokens (None for autoregressive),
    temperature, cfg_scale, cfg_cond_domains. The generator computes the same tables per sample
    (per_sample_table), except where 4M's onex gives fewer temperatures than there are steps
    (more steps than tokens): 4M's zip drops the steps past them, the generator keeps them at
    onex's last temperature. This function states the batch-level schedule for comparison with
    the reference."""
    if len(targets) != len(tokens_per_target):
        raise ValueError("build_chained_schedule: one token count per target")
    cond = list(cond_domains)
    steps: list[dict] = []
    for spec, n in zip(targets, tokens_per_target):
        if spec.scheme == "autoregressive":
            steps.append({"target_domain": spec.name, "scheme": spec.scheme, "num_tokens": None,
                          "temperature": spec.temperature, "cfg_scale": spec.cfg_scale, "cfg_cond_domains": list(cond)})
            continue
        kind = "linear" if spec.scheme == "roar" else spec.token_schedule
        tokens = token_schedule(kind, spec.steps, n)
        temps = temperature_schedule(spec.temp_schedule, spec.temperature, tokens)
        steps.extend({"target_domain": spec.name, "scheme": spec.scheme, "num_tokens": int(k),
                      "temperature": float(t), "cfg_scale": spec.cfg_scale, "cfg_cond_domains": list(cond)}
                     for k, t in zip(tokens, temps))
        if cfg_grow_conditioning:
            cond.append(spec.name)
    return steps


@dataclass
class StepTable:
    """Per-sample schedule of one image target: counts[s, b] tokens at temps[s, b] in step s."""

    counts: np.ndarray
    temps: np.ndarray


def per_sample_table(spec: TargetSpec, unknown: list[int]) -> StepTable:
    """Each sample's own schedule over its own number of unknown tokens (4M uses sample 0's count
    for the whole batch); shorter schedules are padded with zero-token steps."""
    kind = "linear" if spec.scheme == "roar" else spec.token_schedule
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for n in set(unknown):
        tok = token_schedule(kind, spec.steps, n) if n else np.zeros(0, np.int64)
        temp = temperature_schedule(spec.temp_schedule, spec.temperature, tok) if n else np.zeros(0)
        cache[n] = (tok, temp)
    S = max((len(t) for t, _ in cache.values()), default=0)
    counts = np.zeros((S, len(unknown)), np.int64)
    temps = np.full((S, len(unknown)), spec.temperature, np.float64)
    for b, n in enumerate(unknown):
        tok, temp = cache[n]
        counts[: len(tok), b] = _feasible(tok, n)
        temps[: len(temp), b] = temp[: len(tok)]
        if 0 < len(temp) < len(tok):
            # 4M's onex gives one temperature per token; with more steps than tokens the steps past
            # them (4M's zip drops them) still commit tokens here, at the curve's last value (the
            # coolest for a positive POWER); they took spec.temperature, the curve's start
            temps[len(temp): len(tok), b] = temp[-1]
    return StepTable(counts, temps)


def _feasible(tokens: np.ndarray, n: int) -> np.ndarray:
    """4M's cosine rounding can overshoot: with 40 steps over 25 tokens its counts reach 26 before a
    final -1 (4M's top-k then fails). Capping the running total at n keeps every step the same
    until the overshoot, commits what is left there, and makes the rest 0."""
    return np.diff(np.minimum(np.cumsum(tokens), n), prepend=0)
