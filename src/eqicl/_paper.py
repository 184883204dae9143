"""The paper's Table 1 (adjusted loss; d = 10, n = 20, one head, best of 5 seeds)."""

import csv
import functools
from importlib import resources

from ._config import Config, TaskConfig
from ._model import VARIANTS

# The one place for the methods' names: in the paper (Table 1's rows) and in our tables.
MODEL_ROWS: dict[str, str] = {kind: cls.label for kind, cls in VARIANTS.items()}
"""Every model kind's name in the paper, its Table 1 row ("gdpp": "GD++"), narrowest first."""
BASELINE_ROWS: dict[str, str] = {"constrr": "CONSTRR", "adarr": "ADARR", "tunedrr": "TUNEDRR"}
"""The tuned ridge baselines' Table 1 rows."""
BASELINE_NAMES: dict[str, str] = {
    "constrr": "ConstRR",
    "adarr": "AdaRR",
    "tunedrr": "TunedRR",
    "ols": "OLS",
}
"""The baselines' names in our tables and figures."""


@functools.cache
def paper_table() -> dict[tuple[str, int | None, str], float]:
    """{(method row, layers or None, noise column): value} from the paper's Table 1."""
    text = resources.files("eqicl").joinpath("data/paper_table1.csv").read_text()
    rows = [line for line in text.splitlines() if line and not line.startswith("#")]
    table = {}
    for row in csv.DictReader(rows):
        layers = int(row.pop("layers")) if row["layers"] else None
        row.pop("layers", None)
        method = row.pop("method")
        for column, value in row.items():
            table[(method, layers, column)] = float(value)
    return table


def paper_column(task: TaskConfig) -> str | None:
    """The Table 1 column of a task, or None if the paper has no such setting."""
    if task.d != 10 or task.n != 20 or task.noise == "fixed":
        return None
    return task.label


def paper_value(config: Config) -> float | None:
    """The paper's adjusted loss for this model, task and depth, if Table 1 has the cell."""
    column = paper_column(config.task)
    if column is None or config.model.heads != 1:
        return None
    row = MODEL_ROWS.get(config.model.kind)  # a registered layer class has no paper row
    return None if row is None else paper_table().get((row, config.model.layers, column))


def paper_baselines(task: TaskConfig) -> dict[str, float]:
    """The paper's ConstRR, AdaRR and TunedRR values for this task, where Table 1 has them."""
    column = paper_column(task)
    if column is None:
        return {}
    table = paper_table()
    return {
        name: table[(row, None, column)]
        for name, row in BASELINE_ROWS.items()
        if (row, None, column) in table
    }
