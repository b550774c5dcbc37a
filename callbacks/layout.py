"""TensorBoard's "Custom Scalars" tab: the charts worth seeing side by side, on one page.

Each callback that logs scalars may declare charts with a ``tensorboard_charts(self) -> list[Chart]``
method; a chart is a title and regular expressions over metric names, one line per matching name
(TensorBoard matches them from the start of the name: ``re.match``). At train start the first of
the run's diagnostics callbacks to get there (``write_layout``) gathers the charts of every callback
the trainer has, adds the chart of reward and accuracy that every run logs, and writes the layout
once into each TensorBoard logger's event file (rank 0 only). Dropping a callback from the config
drops its charts and nothing else; a run without any diagnostics callback can list
``callbacks.TensorBoardLayout`` to get the layout all the same.

The standard callbacks give::

    clipping                clip/{low,high,total}, per step | the same per epoch (``_epoch``)
                            entropy_group/<k>/clip_frac, every group | entropy_group/<k>/epsilon_mean
                            (the clip range each group used), every group
    reward and accuracy     reward/{mean,accuracy} with val/accuracy (val/<set>/accuracy, avg@k)
    gradient utilization    grad_util/{token,sequence}
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import lightning as L

REWARD_AND_ACCURACY = "reward and accuracy"


class Chart(NamedTuple):
    """One multiline chart of the Custom Scalars tab: every scalar whose name matches one of ``tags``
    (regular expressions, matched from the start of the name) is one line."""

    category: str
    title: str
    tags: tuple[str, ...]


BASE_CHARTS = (
    Chart(REWARD_AND_ACCURACY, "rollout reward and accuracy, greedy validation accuracy",
          (r"^reward/(mean|accuracy)$", r"^val/(.+/)?(accuracy|avg@\d+)$")),
)

_written: "weakref.WeakSet" = weakref.WeakSet()  # the SummaryWriters that have the layout


def layout_charts(trainer) -> list[Chart]:
    """The charts of every callback of ``trainer`` that declares some, in the callbacks' order,
    then the reward and accuracy chart; a chart declared twice (two instances) once."""
    charts: list[Chart] = []
    for callback in trainer.callbacks:
        declare = getattr(callback, "tensorboard_charts", None)
        if callable(declare):
            charts += [c for c in declare() if c not in charts]
    return charts + [c for c in BASE_CHARTS if c not in charts]


def custom_scalars_layout(charts: list[Chart], prefix: str = "") -> dict[str, dict[str, list]]:
    """``charts`` as ``SummaryWriter.add_custom_scalars`` takes them: category -> title ->
    ``["Multiline", tags]``, categories in order of first appearance. ``prefix``: the logger's
    (``TensorBoardLogger(prefix=...)`` writes ``<prefix>-clip/low``)."""
    layout: dict[str, dict[str, list]] = {}
    for chart in charts:
        tags = [f"^{prefix}{tag[1:]}" if tag.startswith("^") else prefix + tag for tag in chart.tags] \
            if prefix else list(chart.tags)
        layout.setdefault(chart.category, {})[chart.title] = ["Multiline", tags]
    return layout


def write_layout(trainer) -> bool:
    """Write the layout of ``trainer``'s callbacks into every TensorBoard logger's events, once per
    logger (rank 0; a no-op elsewhere, without a TensorBoard logger, and when already written).
    Returns whether something was written."""
    if not trainer.is_global_zero:
        return False
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    pending = [lg for lg in loggers if lg.experiment not in _written]
    if not pending:
        return False
    charts = layout_charts(trainer)
    for logger in pending:
        prefix = logger._prefix + logger.LOGGER_JOIN_CHAR if logger._prefix else ""
        writer = logger.experiment
        writer.add_custom_scalars(custom_scalars_layout(charts, prefix))
        writer.flush()  # the layout is there from the first seconds of a run, not at the first flush
        _written.add(writer)
    return True


class TensorBoardLayout(L.Callback):
    """Writes TensorBoard's Custom Scalars layout at train start (see ``callbacks.layout``). The
    diagnostics callbacks already do; list this one for a run that has none of them, or to add charts.

    Args:
        charts: Extra charts, each ``{category, title, tags}`` (``tags``: regular expressions over
            metric names), e.g. ``{category: mine, title: advantages, tags: ["^adv/.*$"]}``.
    """

    def __init__(self, charts: list[dict] | None = None) -> None:
        super().__init__()
        self.charts = []
        for i, c in enumerate(charts or []):
            if not isinstance(c, dict) or set(c) != {"category", "title", "tags"} or isinstance(c["tags"], str):
                raise ValueError(f"TensorBoardLayout: charts[{i}] must be {{category, title, tags: [regex, ...]}}, "
                                 f"got {c!r}")
            self.charts.append(Chart(str(c["category"]), str(c["title"]), tuple(c["tags"])))

    def tensorboard_charts(self) -> list[Chart]:
        return list(self.charts)

    def on_train_start(self, trainer, pl_module) -> None:
        write_layout(trainer)
