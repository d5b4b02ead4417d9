"""Active-learning curves on a fully labeled dataset: the protocol (`protocol`), its reports (`reports`)
and two learners, a closed-form toy (`toy`) and the configured detector (`detector`)."""

from magral_core.simulation.detector import DetectorLearner
from magral_core.simulation.parallel import plan_tasks, run_parallel
from magral_core.simulation.protocol import (
    Learner,
    Metrics,
    ProxyFn,
    RoundContext,
    RoundRecord,
    RoundStore,
    SimulationSettings,
    StrategyFactory,
    default_factory,
    initial_labeled,
    make_factory,
    run_curve,
    run_simulation,
    write_atomic,
)
from magral_core.simulation.reports import (
    labels_to_reach,
    markdown_table,
    plot_curves,
    summarise,
    write_reports,
)
from magral_core.simulation.toy import ToyLearner, ToyState

__all__ = [
    "DetectorLearner", "Learner", "Metrics", "ProxyFn", "RoundContext", "RoundRecord", "RoundStore",
    "SimulationSettings", "StrategyFactory", "ToyLearner", "ToyState", "default_factory", "initial_labeled",
    "labels_to_reach", "make_factory", "markdown_table", "plan_tasks", "plot_curves", "run_curve",
    "run_parallel", "run_simulation", "summarise", "write_atomic", "write_reports",
]
