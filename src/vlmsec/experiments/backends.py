"""Where a study's independent stages run: one after another in this process (`SerialBackend`,
the default), or as Ray tasks on a local or remote cluster (`RayBackend`, `vlmsec run --backend ray`).

The independent stages: each inference attack's crafting against the deployed victim (its
inputs go to the run folder's `adversarial/<key>/`, where the run's own `run_attacks` reads them
and answers them in turn; a victim behind an API is left to the driver, whose request budget and
cost counter it is), each attack that learns its trigger (against the base victim; the
trigger goes to the cache, where the run's own `Runner.prepare_attacks` reads it), then each
tuned model (`Runner.model_stage`: tune, generate, the inference attacks' transfer, the clean
model's shift sizes), which depends only on stages built before it; then, after the undefended
side of the attack x defense matrix, each defense's column (`DefenseMatrix.column`: its answers,
scores, repaired or refiltered models go to the run folder, where the driver's matrix reads them
back; an API victim's matrix stays in the driver). A Ray task gets the config
as its JSON dump, the run and cache folders, the plan's (or attack's) name, the base stage and
what the driver measured that is not derivable from the config (the safety test sets, the
inference attacks' saved inputs); it rebuilds the splits, attacks and test sets (deterministic
from the config and seed; once per worker process), runs the model's stage and returns its
records, which the driver merges in plan order, so metrics.json is the serial run's.

Determinism: floating-point results depend on the number of torch threads, so every task and
the driver pin the same number (`threads`); a serial run given the same number gives the same
metrics.json. The frozen tower's features of the clean tuning set are computed once by the
driver before the models, in the batches the serial run's clean model computes them in.
Concurrency: each model writes its own checkpoint, poisoned ids and generation files; the shared
files (the feature cache) are written under a lock and merged (`FeatureCache.save`). A worker
killed midway leaves a temporary checkpoint that no stage reads (`save_stage` moves a stage into
place whole); Ray runs the task again (`max_retries`), which removes what dead processes left
and builds the stage again. A killed driver resumes as a serial run does: finished stages are reused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from vlmsec.attacks import Attack, create_attack
from vlmsec.defenses import Defense, create_defense
from vlmsec.errors import VlmsecError
from vlmsec.eval.generation import TestSet
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.inference import InferenceResults, InferenceStage, inference_attacks
from vlmsec.experiments.plan import ModelPlan, TestSets, plan_models
from vlmsec.experiments.splits import Splits, build_splits
from vlmsec.experiments.stages import remove_leftovers
from vlmsec.progress import console
from vlmsec.victims.base import Victim, fit_answers
from vlmsec.victims.features import FeatureCache

if TYPE_CHECKING:
    from vlmsec.attacks.inference import AttackRequest, InferenceAttack
    from vlmsec.experiments.runner import Runner

BACKENDS = ("serial", "ray")


@dataclass
class ModelInputs:
    """What every tuned model of a study needs, built by the driver before the models."""

    splits: Splits
    attacks: dict[str, Attack]
    tests: TestSets
    base: tuple[Path, str]
    inference: dict[str, InferenceAttack]
    inference_results: InferenceResults | None
    safety_tests: list[TestSet]


@dataclass
class ModelResult:
    """What one tuned model adds to the run: its generation records, the transfer records of the
    inference attacks' inputs answered on it, the shift sizes (the clean model's), stage times."""

    records: list[dict[str, Any]] = field(default_factory=list)
    transfer: list[dict[str, Any]] = field(default_factory=list)
    shift_sizes: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


Crafts = Mapping[str, "tuple[list[AttackRequest], list[AttackRequest]]"]  # per attack: its requests, what it learns on


class Backend(Protocol):
    """Runs the independent stages of a study: the inference attacks' crafting, the attacks' learned
    triggers, each tuned model, each defense's column of the matrix."""

    def craft_inputs(self, runner: Runner, crafts: Crafts, deployed: tuple[Path, str], victim_name: str) -> None:
        """Craft each inference attack's inputs for its requests (`crafts`, by config label) on the deployed
        victim into the run folder before the run's own `run_attacks`, which then reads them; or leave them to it."""

    def prepare_attacks(self, runner: Runner, attacks: Mapping[str, Attack], base: tuple[Path, str]) -> None:
        """Learn the triggers of `attacks` (by config label) into the cache before the run's own
        `Runner.prepare_attacks`, which then reads them; or leave them to it."""

    def run_models(self, runner: Runner, plans: Sequence[ModelPlan], inputs: ModelInputs) -> list[ModelResult]:
        """`runner.model_stage` of every plan, in plan order."""

    def defense_columns(self, runner: Runner, defenses: Mapping[str, Defense], inputs: ModelInputs) -> None:
        """Compute each defense's column of the matrix (by config label) into the run folder before the
        run's own matrix, which then reads them; or leave them to it."""


def pin_threads(threads: int | None) -> None:
    """Pin this process's torch threads (floating-point results depend on their number); None leaves them."""
    if threads is None:
        return
    if threads < 1:
        raise VlmsecError(f"--threads-per-task: {threads}; give 1 or more")
    torch.set_num_threads(threads)


class SerialBackend:
    """The serial loop: each model in turn in this process (and in step across `accelerate launch` processes)."""

    def __init__(self, threads: int | None = None) -> None:
        pin_threads(threads)

    def craft_inputs(self, runner: Runner, crafts: Crafts, deployed: tuple[Path, str], victim_name: str) -> None:
        """Nothing ahead: `run_attacks` crafts each attack in turn."""

    def prepare_attacks(self, runner: Runner, attacks: Mapping[str, Attack], base: tuple[Path, str]) -> None:
        """Nothing ahead: the run's `Runner.prepare_attacks` learns each trigger in turn."""

    def run_models(self, runner: Runner, plans: Sequence[ModelPlan], inputs: ModelInputs) -> list[ModelResult]:
        """Every model's stage, one after the other."""
        return [runner.model_stage(plan, inputs) for plan in plans]

    def defense_columns(self, runner: Runner, defenses: Mapping[str, Defense], inputs: ModelInputs) -> None:
        """Nothing ahead: the run's matrix computes each column in turn."""


@dataclass(frozen=True)
class ModelTask:
    """One Ray task's description: enough to rebuild a `Runner` and its inputs on any node;
    `plan` names the tuned model it runs, or the label of the attack whose trigger it learns (`attack_task`)."""

    config: str  # the config's JSON dump
    workdir: str  # the driver's working folder: the config's relative paths are taken against it
    out: str
    cache: str
    plan: str
    base: tuple[str, str]
    threads: int


class RayBackend:
    """Each inference attack's crafting, each learned trigger, each tuned model, then each defense's
    column, as a Ray task: on a local cluster of this machine's cores, or on the cluster at
    `address` (`ray start --head` / `ray start --address`; the run and cache folders on a shared file system). Each task uses `threads` CPUs and torch threads, and one GPU when
    the cluster has GPUs and the run is not told to stay on the CPU (ACCELERATE_USE_CPU)."""

    def __init__(self, address: str | None = None, threads: int | None = None, max_retries: int = 2,
                 task: Callable[[ModelTask, dict[str, Any]], ModelResult] | None = None) -> None:
        self.address = address
        self.threads = threads if threads is not None else 1
        self.max_retries = max_retries
        self.task = task if task is not None else model_task  # a test swaps in a task that dies once
        self._ray: Any = None  # the ray module, once a cluster is joined
        pin_threads(self.threads)

    def craft_inputs(self, runner: Runner, crafts: Crafts, deployed: tuple[Path, str], victim_name: str) -> None:
        """Each inference attack's crafting as a task that saves its inputs (`InferenceStage.craft`);
        a victim behind an API (a kind that does not train) crafts in the driver, which holds its request
        budget and cost counter."""
        if not crafts or not runner.kind.trains:
            return
        remote = self._remote(runner, craft_task)
        shared = self._ray.put({"crafts": dict(crafts), "victim": victim_name})
        console.print(f"ray: {len(crafts)} inference attacks crafted as tasks ({', '.join(crafts)})")
        self._ray.get([remote.remote(self._describe(runner, key, deployed), shared) for key in crafts])

    def prepare_attacks(self, runner: Runner, attacks: Mapping[str, Attack], base: tuple[Path, str]) -> None:
        """Each attack that learns its trigger (overrides `Attack.prepare`) as a task that caches it."""
        learned = [key for key, attack in attacks.items() if type(attack).prepare is not Attack.prepare]
        if not learned:
            return
        remote = self._remote(runner, attack_task)
        console.print(f"ray: {len(learned)} learned triggers as tasks ({', '.join(learned)})")
        self._ray.get([remote.remote(self._describe(runner, key, base)) for key in learned])

    def run_models(self, runner: Runner, plans: Sequence[ModelPlan], inputs: ModelInputs) -> list[ModelResult]:
        """Submit every model's task, wait for all, return their results in plan order."""
        if not plans:
            return []
        remote = self._remote(runner, self.task)
        # Every model's tuning set is the clean one but its poisoned samples: the frozen tower's features
        # of the clean set (computed as the serial run's clean model computes them), once, for every task.
        victim = runner.load_victim(inputs.base[0])
        if isinstance(getattr(victim, "features", None), FeatureCache):  # kinds that run their tower in every forward have none
            victim.prepare_training(inputs.splits.train, "ray: the tuning set's image features")
            runner.features.save(runner.features_path)
        del victim
        shared = self._shared(inputs)
        console.print(f"ray: {len(plans)} tuned models as tasks")
        results = self._ray.get([remote.remote(self._describe(runner, plan.name, inputs.base), shared) for plan in plans])
        runner.features.update(runner.features_path)  # the test images' features, as the serial run holds them after its models
        return list(results)

    def defense_columns(self, runner: Runner, defenses: Mapping[str, Defense], inputs: ModelInputs) -> None:
        """Each defense's column as a task (those that can run; the driver reports the others); a victim
        behind an API answers the driver's matrix, which holds its request budget and cost counter."""
        labels = [label for label, defense in defenses.items() if defense.unavailable() is None]
        if not labels or not runner.kind.trains:
            return
        remote = self._remote(runner, defense_task)
        shared = self._shared(inputs)
        console.print(f"ray: {len(labels)} defense columns as tasks ({', '.join(labels)})")
        self._ray.get([remote.remote(self._describe(runner, label, inputs.base), shared) for label in labels])

    def _shared(self, inputs: ModelInputs) -> Any:
        """What a model or defense task needs from the driver that the config does not give (in Ray's object store)."""
        return self._ray.put({"inference_results": inputs.inference_results, "safety_tests": inputs.safety_tests})

    def _remote(self, runner: Runner, function: Callable[..., Any]) -> Any:
        """`function` as a Ray remote function with this backend's resources, the cluster joined
        (or started) at the first call and left to Ray's own shutdown when the process exits."""
        if runner.state.num_processes > 1:
            raise VlmsecError("--backend ray: run the study without `accelerate launch` (each Ray task is one process)")
        import ray  # the `ray` extra: only this backend needs it

        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 and not _cpu_only() else 0
        console.print(f"ray: {self.threads} CPU(s){' and 1 GPU' if gpus else ''} per task, on {ray.cluster_resources().get('CPU', 0):g} CPUs")
        return ray.remote(function).options(num_cpus=self.threads, num_gpus=gpus, max_retries=self.max_retries)

    def _describe(self, runner: Runner, name: str, base: tuple[Path, str]) -> ModelTask:
        """The task that runs the model (or learns the attack's trigger, or crafts the inference attack's
        inputs against the victim in `base`) `name` of `runner`'s study."""
        config = json.dumps(runner.config.model_dump(mode="json"))
        folders = str(runner.out.resolve()), str(runner.cache.resolve())
        return ModelTask(config, os.getcwd(), *folders, name, (str(base[0].resolve()), base[1]), self.threads)


def _cpu_only() -> bool:
    """Whether the run is told to stay on the CPU (as `accelerate` reads ACCELERATE_USE_CPU)."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in {"1", "true", "yes"}


# The inputs a worker process rebuilt for the last run it served: Ray reuses a worker for many
# tasks, which then rebuild nothing (the splits of a large study take seconds to render).
_rebuilt: dict[tuple[str, str, str, tuple[str, str]], ModelInputs] = {}


def task_runner(task: ModelTask) -> Runner:
    """The task's runner, on its pinned threads; what killed attempts of tasks left is removed first
    (only temporaries of dead processes: those of running tasks stay)."""
    from vlmsec.experiments.runner import Runner  # the runner imports this module

    pin_threads(task.threads)
    config = parse_config(json.loads(task.config), f"ray task {task.plan!r}", base_dir=Path(task.workdir))
    runner = Runner(config, Path(task.out), Path(task.cache))
    remove_leftovers(runner.out, runner.cache)
    return runner


def attack_task(task: ModelTask) -> None:
    """Learn the trigger of the attack labelled `task.plan` into the cache, as the run prepares it."""
    runner = task_runner(task)
    base = (Path(task.base[0]), task.base[1])
    splits, victim = tuning_splits(runner, base)
    spec = next(a for a in runner.config.attacks if a.key == task.plan)
    runner.prepare_attacks({spec.key: create_attack(spec.name, **spec.params)}, splits, base, victim)


def craft_task(task: ModelTask, shared: dict[str, Any]) -> None:
    """Craft the inference attack labelled `task.plan` on the deployed victim (`task.base`) for its
    requests (`shared["crafts"]`) into the run folder, as the run's `run_attacks` crafts it."""
    runner = task_runner(task)
    c = runner.config
    spec = next(a for a in c.attacks if a.key == task.plan)
    requests, learn_on = shared["crafts"][task.plan]
    victim = runner.load_victim(Path(task.base[0]))
    stage = InferenceStage(runner.out, victim, shared["victim"], task.base[1], c.eval.model_dump(), c.seed)
    stage.craft(task.plan, create_attack(spec.name, **spec.params), requests, learn_on)


def model_task(task: ModelTask, shared: dict[str, Any]) -> ModelResult:
    """One tuned model's stage in a Ray worker: rebuild the runner and its inputs, run `model_stage`."""
    runner = task_runner(task)
    plan = next(p for p in plan_models(runner.config) if p.name == task.plan)
    return runner.model_stage(plan, worker_inputs(runner, task, shared))


def defense_task(task: ModelTask, shared: dict[str, Any]) -> None:
    """The column of the defense labelled `task.plan` in a Ray worker, into the run folder: rebuild the
    runner, its inputs and the matrix, then `DefenseMatrix.column`."""
    runner = task_runner(task)
    c = runner.config
    inputs = worker_inputs(runner, task, shared)
    spec = next(d for d in c.defenses if d.key == task.plan)
    matrix = runner.defense_matrix({spec.key: create_defense(spec.name, **spec.params)}, plan_models(c), inputs, runner.safety_split())
    matrix.column(spec.key)


def worker_inputs(runner: Runner, task: ModelTask, shared: dict[str, Any]) -> ModelInputs:
    """The run's `ModelInputs`, rebuilt once per worker process and run (`rebuild_inputs`), with what the
    driver handed this task (`shared`: the defense tasks' inference results hold the models' transfer
    too); the runner's safety test sets set."""
    run = (task.config, task.out, task.cache, task.base)
    if run not in _rebuilt:
        _rebuilt.clear()
        _rebuilt[run] = rebuild_inputs(runner, (Path(task.base[0]), task.base[1]), shared)
    inputs = replace(_rebuilt[run], inference_results=shared["inference_results"], safety_tests=shared["safety_tests"])
    runner.safety_tests = inputs.safety_tests
    return inputs


def rebuild_inputs(runner: Runner, base: tuple[Path, str], shared: dict[str, Any]) -> ModelInputs:
    """The driver's `ModelInputs`, rebuilt from the config as `Runner.run` builds them: the splits
    (the tuning answers cut to the base victim's length), every attack (training-stage ones
    prepared: learned triggers are read from the cache the driver filled), the test sets."""
    c = runner.config
    splits, victim = tuning_splits(runner, base)
    attacks = {a.key: create_attack(a.name, **a.params) for a in c.attacks}
    inference = inference_attacks(attacks)
    runner.prepare_attacks({key: a for key, a in attacks.items() if key not in inference}, splits, base, victim)
    del victim
    return ModelInputs(
        splits, attacks, TestSets.build(splits.tests, attacks), base, inference, shared["inference_results"], shared["safety_tests"]
    )


def tuning_splits(runner: Runner, base: tuple[Path, str]) -> tuple[Splits, Victim]:
    """The study's splits with the tuning answers cut to the base victim's length (`Runner.fit_tuning_set`), and that victim."""
    splits = build_splits(runner.config)
    victim = runner.load_victim(base[0])
    splits.train, _ = fit_answers(victim, splits.train)
    return splits, victim


def make_backend(name: str, address: str | None = None, threads: int | None = None) -> Backend:
    """The backend `vlmsec run --backend` names; --address only with ray."""
    if name == "serial":
        if address is not None:
            raise VlmsecError("--address: only with --backend ray")
        return SerialBackend(threads)
    if name == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise VlmsecError("--backend ray needs Ray: pip install 'vlmsec[ray]'") from None
        return RayBackend(address, threads)
    raise VlmsecError(f"--backend: {name!r} is not one of {', '.join(BACKENDS)}")
