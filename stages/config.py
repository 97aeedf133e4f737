"""The run config: one small typed model per component, composed, loaded from YAML.

`load_config("configs/demo.yaml", ["rollout.n=4", "train.lr=2e-6"])` reads the file (following
`base:` to the file it extends), applies `key.sub=value` overrides (values parsed as YAML) and
validates everything before any work starts. Each component owns its model (trainer/config.py,
stages/engines/config.py, ...); this file only composes them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trace_rl.testbed.config import TestbedConfig
from trace_rl.stages.annotators.config import AnnotateConfig
from trace_rl.stages.engines.config import RolloutConfig
from trace_rl.stages.sources import AnswerFormat
from trace_rl.stages.verifiers.config import VerifyConfig
from trace_rl.trainer.config import TrainConfig

from trace_rl.data_schemas.errors import ConfigError
from trace_rl.pipeline.layout import RESOLVED_CONFIG

DEFAULT_INSTRUCTION = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."


class _Strict(BaseModel):
    # hide_input_in_errors: a secret pasted into the wrong field must not be echoed back.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)


class RunConfig(_Strict):
    name: str = Field("demo", pattern=r"^[^/.][^/]*$",
                      description="a plain directory name such as 'demo' (no '/', not hidden)")
    root: str | None = Field(None, description="run directory (local path or fsspec URL); default runs/<name>")
    seed: int = Field(0, ge=0)
    rounds: int = Field(3, ge=1)

    @property
    def run_root(self) -> str:
        return self.root or os.path.join("runs", self.name)


class ModelConfig(_Strict):
    path: str = Field("testbed", description="'testbed' or a local HF model dir / hub name")
    testbed_dir: str | None = Field(None, description="where the testbed build is cached")
    testbed: TestbedConfig = Field(default_factory=TestbedConfig)


class DataConfig(_Strict):
    source: str = Field(
        "testbed",
        description="'testbed', a named public source (docs/data.md, e.g. math_train_lvl3to5), "
        "a .jsonl/.json/.parquet file, or a HF dataset id",
    )
    split: str | None = Field(None, description="default: the named source's split, else 'train'")
    configs: tuple[str, ...] = Field((), description="HF config names (several are concatenated)")
    revision: str | None = Field(None, description="HF commit sha; default: the named source's pin")
    answer_format: AnswerFormat | None = Field(None, description="plain|gsm8k|dollar|boxed|gpqa (stages/sources.py)")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="contract column -> source column (prompt_id, problem, answer, solution)",
    )
    instruction: str = Field(DEFAULT_INSTRUCTION, description="str.format template with {problem}")
    limit: int | None = Field(None, ge=1)
    testbed_prompts: int = Field(2048, ge=1, description="training prompts generated for the testbed")

    @field_validator("instruction")
    @classmethod
    def _has_problem(cls, v: str) -> str:
        if "{problem}" not in v:
            raise ValueError("must contain the field {problem} (use {{ }} for literal braces)")
        return v


class EvalConfig(_Strict):
    benchmarks: list[str] = Field(default_factory=lambda: ["testbed"])
    data_dir: str | None = Field(
        None, description="local copies: <data_dir>/<benchmark>/test.jsonl; None = public HF datasets"
    )
    k: int = Field(4, ge=1, description="samples per problem (avg@k)")
    temperature: float = Field(0.6, gt=0, description="> 0: avg@k needs sampling")
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = 20
    max_tokens: int = Field(32768, ge=1)
    enable_thinking: bool = True
    limit: int | None = Field(None, ge=1, description="problems per benchmark (None = all)")
    bootstrap: int = Field(1000, ge=0)
    every_round: bool = Field(False, description="evaluate each round's checkpoint in the training flow")
    initial: bool = Field(True, description="evaluate the initial policy too (the baseline every "
                                           "later policy is compared with), before round 0")
    sources: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="benchmarks by name: {source, split, configs, revision, columns, answer_format, "
        "verifier, template}",
    )


class TraceConfig(_Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def section(self, name: str) -> dict[str, Any]:
        return getattr(self, name).model_dump(mode="json")

    @model_validator(mode="after")
    def _testbed_teacher_is_the_trainers(self) -> TraceConfig:
        # The testbed is warm-started on the teacher messages the trainer later distils from.
        if self.model.path == "testbed" and self.model.testbed.teacher_template != self.train.teacher_template:
            raise ValueError(
                "model.testbed.teacher_template and train.teacher_template differ: the testbed is "
                "warm-started on the teacher prompt the trainer uses; set both to the same template"
            )
        return self

    @model_validator(mode="after")
    def _engine_logprobs_of_the_trained_distribution(self) -> TraceConfig:
        # The trainer scores softmax(logits / rollout temperature); truncated sampling's engine
        # log-probs belong to a renormalised distribution it never computes
        # (trainer/round_setup.py `rollout_temperature`).
        truncated = self.rollout.top_p < 1.0 or self.rollout.top_k > 0
        if self.train.old_logprobs == "engine" and truncated:
            raise ValueError(
                f"train.old_logprobs=engine with rollout.top_p={self.rollout.top_p} / "
                f"rollout.top_k={self.rollout.top_k}: the engine's log-probs are of the truncated "
                "distribution, the trainer's of the full one; set train.old_logprobs: recompute, "
                "or rollout.top_p: 1.0 and rollout.top_k: -1"
            )
        return self


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config path as given, a run directory's own `config.yaml`, or a bare name looked up in
    the packaged configs/ folder."""
    p = Path(path)
    if p.is_dir():  # a run directory: the run's own resolved config
        own = p / RESOLVED_CONFIG
        if own.is_file():
            return own
        # A bare name that is also some unrelated folder in cwd (`demo/`) still names the
        # packaged config; `./demo` or `demo/` says the folder is meant, and is refused.
        packaged = _packaged(path) if _bare_name(path) else None
        if packaged is not None:
            return packaged
        raise ConfigError(f"{str(path)!r} is a directory without {RESOLVED_CONFIG}: give a run "
                          "directory (one `trace-rl run` made), a config file or a packaged name")
    if p.exists():
        return p
    packaged = _packaged(path)
    if packaged is not None:
        return packaged
    known = sorted(c.stem for c in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"{str(path)!r} is neither a config file, a run directory nor a packaged "
                      f"config; packaged configs: {known}")


def _bare_name(path: str | os.PathLike) -> bool:
    return "/" not in str(path) and os.sep not in str(path)


def _packaged(path: str | os.PathLike) -> Path | None:
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def describe_config_arg(path: str | os.PathLike) -> str:
    """How a command read its config argument, for the log: "run directory runs/demo
    (runs/demo/config.yaml)", "config file x.yaml" or "packaged config demo (.../demo.yaml)"."""
    resolved = resolve_config_path(path)
    if resolved.parent == CONFIG_DIR and not Path(path).is_file():
        shadow = f"; ./{path} is a directory without {RESOLVED_CONFIG}" if Path(path).is_dir() else ""
        return f"packaged config {path} ({resolved}{shadow})"
    if Path(path).is_dir():
        return f"run directory {path} ({resolved})"
    return f"config file {resolved}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping: plain YAML keeps the last
    value silently, so a setting written twice would be half-ignored."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"key {key!r} appears twice (first at line {seen[key].line + 1}); keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base:' chain loops back on itself")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    target = Path(base) if Path(str(base)).is_absolute() else path.parent / str(base)
    try:
        resolved = resolve_config_path(target)
    except ConfigError:
        raise ConfigError(f"{path}: its 'base: {base}' names {target}, which does not exist "
                          "(a path relative to this file)") from None
    parent = _read_yaml(resolved, seen + (path.resolve(),))
    return _merge(parent, data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings; values are parsed as YAML (so `8`, `1e-6`, `null`, `[a,b]`)."""
    data = _merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. rollout.n=8")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = value
    return data


def _explain(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {where}: unknown key (misspelt? see `trace-rl config show` for valid keys)")
        else:
            got = err.get("input")
            secretish = any(w in where.lower() for w in ("key", "token", "secret", "password"))
            got_s = "" if isinstance(got, dict) or secretish else f" (got {got!r})"
            lines.append(f"  - {where}: {err['msg']}{got_s}")
    lines.append("Fix the value in the file or override it on the command line: section.key=value")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> TraceConfig:
    try:
        return TraceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TraceConfig:
    """Load, merge overrides and validate. `path=None` gives the embedded default (the testbed)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        resolved = resolve_config_path(path)
        data = _read_yaml(resolved)
        source = str(resolved)
    data = apply_overrides(data, overrides or [])
    # A run's config.yaml is a full dump (every section); a user's own config.yaml rarely is.
    dumped = set(TraceConfig.model_fields) <= set(data)
    cfg = config_from_dict(data, source)
    return _rooted_at_run_dir(cfg, path, dumped) if path is not None else cfg


def _rooted_at_run_dir(cfg: TraceConfig, path: str | os.PathLike, dumped: bool) -> TraceConfig:
    """A run directory (or the config.yaml inside one) IS the run, wherever the command runs.
    Its config.yaml keeps `run.root: null` (runs/<name>, relative to the launch's cwd), so
    without this `trace-rl status /abs/runs/demo` from another folder read ./runs/demo instead,
    and `stage` started a new run there. Set only when the two differ, so the usual case (cwd is
    the launch folder) keeps its relative paths."""
    given = Path(path)
    if (given / RESOLVED_CONFIG).is_file():
        run_dir = given
    elif given.name == RESOLVED_CONFIG and dumped and _holds_a_run(given.parent, cfg.run.name):
        run_dir = given.parent  # <run>/config.yaml; a user's own (partial) config.yaml is not a run
    else:
        return cfg
    root = cfg.run.root
    if root is not None and "://" in root:  # a remote run: the local copy is not where it lives
        return cfg
    if os.path.realpath(cfg.run.run_root) != os.path.realpath(run_dir):
        cfg.run.root = str(run_dir.resolve())
    return cfg


def _holds_a_run(folder: Path, name: str) -> bool:
    """A folder is a run when it carries the run's name or a run's outputs: a copied or renamed
    run (`cp -r runs/demo /scratch/run`) is still that run, not the folder its config.yaml once
    named (the flow re-reads `<run>/config.yaml`, and read the original run's outputs)."""
    return folder.name == name or (folder / "prompts").is_dir() or (folder / "checkpoints").is_dir()


def dump_config(cfg: TraceConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
