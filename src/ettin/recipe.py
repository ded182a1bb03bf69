"""Multi-stage recipes: pretrain -> extension -> decay (-> cross-objective), one command.

A recipe file (`recipes/ettin-<size>.yaml`) lists run files; a stage may start from an earlier
stage's final weights (`start_from`). `ettin recipe FILE` prints the plan, then runs each stage
in order as its own process, skipping finished stages (a `DONE` marker in the run folder) and
resuming an interrupted one (Composer autoresume from its checkpoints).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ettin.config import ConfigError, RunConfig, load_config

DONE = "DONE"


@dataclass(kw_only=True)
class StageSpec:
    run: str
    """Run file, e.g. yamls/encoder-150m-extension.yaml (relative to the repository root)."""
    start_from: str | None = None
    """run_name of an earlier stage whose final weights this stage starts from."""


@dataclass(kw_only=True)
class RecipeSpec:
    name: str
    """Name of the recipe (printed in the plan)."""
    stages: list[StageSpec] = field(default_factory=list)
    """Stages in the order they run."""


@dataclass
class Stage:
    """One stage of a recipe, resolved: its config and where it stands."""

    run_file: Path
    cfg: RunConfig
    overrides: list[str]
    status: str  # "done", "partial" or "pending"


def read_recipe(path: str | Path) -> RecipeSpec:
    """Parse and validate a recipe file."""
    try:
        raw = OmegaConf.load(path)
        merged = OmegaConf.merge(OmegaConf.structured(RecipeSpec), raw)
        spec = OmegaConf.to_object(merged)
    except FileNotFoundError as err:
        raise ConfigError(f"recipe not found: {path}") from err
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {err}") from err
    assert isinstance(spec, RecipeSpec)
    return spec


def _status(run_dir: Path) -> str:
    if (run_dir / DONE).exists():
        return "done"
    if any((run_dir / "checkpoints").glob("*.pt")):
        return "partial"
    return "pending"


def plan(
    recipe_path: str | Path, overrides: list[str] | None = None, runs_root: str | None = None
) -> list[Stage]:
    """Resolve every stage's config: common overrides, run folders, and start-from checkpoints."""
    spec = read_recipe(recipe_path)
    root = Path(recipe_path).resolve().parents[1]
    stages: list[Stage] = []
    by_name: dict[str, RunConfig] = {}
    for s in spec.stages:
        run_file = (root / s.run) if not Path(s.run).is_absolute() else Path(s.run)
        extra = list(overrides or [])
        if runs_root:
            name = load_config(run_file, extra).run_name
            extra.append(f"run_dir={Path(runs_root) / name}")
        if s.start_from:
            if s.start_from not in by_name:
                raise ConfigError(
                    f"{recipe_path}: stage {s.run} starts from '{s.start_from}', which is not an earlier "
                    f"stage; earlier stages: {', '.join(by_name) or 'none'}"
                )
            extra.append(
                f"init_from={Path(by_name[s.start_from].run_dir) / 'checkpoints' / 'latest-rank0.pt'}"
            )
        cfg = load_config(run_file, extra)
        by_name[cfg.run_name] = cfg
        stages.append(Stage(run_file, cfg, extra, _status(Path(cfg.run_dir))))
    return stages


def _steps(cfg: RunConfig) -> str:
    """Optimiser steps of a stage (token durations assume full-length sequences: a lower bound)."""
    from composer.core import Time, TimeUnit

    t = Time.from_timestring(cfg.max_duration.replace("_", ""))
    if t.unit == TimeUnit.BATCH:
        return f"{t.value:,}"
    if t.unit == TimeUnit.TOKEN:
        return f">= {t.value // (cfg.global_train_batch_size * cfg.data.max_seq_len):,}"
    return "?"


def _checkpoints(cfg: RunConfig) -> str:
    from composer.core import Time

    total = Time.from_timestring(cfg.max_duration.replace("_", ""))
    every = Time.from_timestring(cfg.save_interval.replace("_", ""))
    if total.unit == every.unit and every.value:
        return f"{total.value // every.value + 1}"
    return "?"


def format_plan(name: str, stages: list[Stage]) -> str:
    """A table of the stages: what, how long, from where, and whether it is done."""
    lines = [f"recipe {name}: {len(stages)} stages"]
    header = f"  {'#':>2} {'stage':<28} {'obj':<4} {'tokens':>22} {'steps':>14} {'ckpts':>6}  {'status':<8} start from"
    lines.append(header)
    for i, st in enumerate(stages, 1):
        c = st.cfg
        start = c.init_from or "scratch"
        lines.append(
            f"  {i:>2} {c.run_name:<28} {c.objective.name:<4} {c.max_duration:>22} {_steps(c):>14} "
            f"{_checkpoints(c):>6}  {st.status:<8} {start}"
        )
    return "\n".join(lines)


def run_stage(stage: Stage, nproc: int = 1) -> None:
    """Train one stage in its own process (Composer's launcher for several ranks)."""
    args = [str(stage.run_file), *stage.overrides]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "composer.cli.launcher",
            "-n",
            str(nproc),
            "-m",
            "ettin.train",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "ettin.train", *args]
    subprocess.run(cmd, check=True)


def run_recipe(
    recipe_path: str | Path,
    overrides: list[str] | None = None,
    *,
    runs_root: str | None = None,
    nproc: int = 1,
    dry_run: bool = False,
) -> list[Stage]:
    """Print the plan and run every unfinished stage in order."""
    stages = plan(recipe_path, overrides, runs_root)
    print(format_plan(read_recipe(recipe_path).name, stages), flush=True)
    if dry_run:
        return stages
    for st in stages:
        if st.status == "done":
            print(f"[skip] {st.cfg.run_name}: finished", flush=True)
            continue
        verb = "resume" if st.status == "partial" else "start"
        print(f"[{verb}] {st.cfg.run_name}", flush=True)
        run_stage(st, nproc)
        st.status = _status(Path(st.cfg.run_dir))
    return stages


def cmd_recipe(args: argparse.Namespace) -> None:
    run_recipe(
        args.recipe,
        args.overrides,
        runs_root=args.runs_root,
        nproc=args.nproc,
        dry_run=args.dry_run,
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "recipe",
        help="run a multi-stage recipe (pretrain -> extension -> decay -> cross-objective)",
        description="Run the stages of a recipe in order, skipping finished ones and resuming an "
        "interrupted one. Prints the plan first.",
    )
    p.add_argument("recipe", help="recipe file, e.g. recipes/ettin-150m.yaml")
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides applied to every stage (key=value)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    p.add_argument("--runs-root", help="put each stage's run folder under this directory")
    p.add_argument(
        "--nproc", type=int, default=1, help="processes (GPUs) per stage, via Composer's launcher"
    )
    p.set_defaults(func=cmd_recipe)


def run_files(root: Path | None = None) -> list[Path]:
    """Every run file of the suite: yamls/*.yaml (per size, objective, phase) and yamls/cross/*.yaml."""
    from ettin.config import yamls_root

    root = root or yamls_root()
    files = [p for p in sorted(root.glob("*.yaml")) if p.name != "base.yaml"]
    return files + sorted((root / "cross").glob("*.yaml"))


def suite_table() -> str:
    """The Markdown table of every run's key numbers, read from the run files themselves."""
    head = (
        "| run | obj | size | data | seq | lr | wd | micro | batch | tokens | warm-up | decay | "
        "alpha_f | shape | RoPE g/l | mask | seed | starts from |\n"
        "|" + "---|" * 18
    )
    sizes = ["17m", "32m", "68m", "150m", "400m", "1b"]
    phases = ["pretrain", "extension", "decay"]
    configs = [(p, load_config(p)) for p in run_files()]
    configs.sort(
        key=lambda pc: (
            sizes.index(pc[1].model.size) if pc[1].model.size in sizes else len(sizes),
            pc[0].parent.name == "cross",
            pc[1].objective.name,
            phases.index(Path(pc[1].data.path).name) if Path(pc[1].data.path).name in phases else 0,
        )
    )
    rows = [head]
    for _, c in configs:
        start = Path(c.init_from).parts[1] if c.init_from else "scratch"
        theta = f"{c.model.global_rope_theta / 1000:g}k/{c.model.local_rope_theta / 1000:g}k"
        mask = f"{c.objective.mlm_probability:g}" if c.objective.name == "mlm" else "-"
        rows.append(
            f"| {c.run_name} | {c.objective.name} | {c.model.size} | {Path(c.data.path).name} | "
            f"{c.data.max_seq_len} | {c.optim.lr:g} | {c.optim.weight_decay:g} | "
            f"{c.device_train_microbatch_size} | {c.global_train_batch_size} | {c.max_duration} | "
            f"{c.scheduler.t_warmup} | {c.scheduler.t_decay} | {c.scheduler.alpha_f:g} | "
            f"{c.scheduler.decay_shape} | {theta} | {mask} | {c.seed} | {start} |"
        )
    return "\n".join(rows) + "\n"


TABLE_START, TABLE_END = "<!-- suite-table:start -->", "<!-- suite-table:end -->"


def write_suite_table(doc: Path) -> bool:
    """Refresh the generated table inside docs/recipe.md; True if the file changed."""
    text = doc.read_text()
    before, rest = text.split(TABLE_START, 1)
    _, after = rest.split(TABLE_END, 1)
    new = f"{before}{TABLE_START}\n{suite_table()}{TABLE_END}{after}"
    if new != text:
        doc.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m ettin.recipe: regenerate docs/recipe.md's table
    target = Path(__file__).resolve().parents[2] / "docs" / "recipe.md"
    print(("updated " if write_suite_table(target) else "up to date: ") + str(target))
