"""A lasting rise within a series' first steps: the two-level fit both baselines use.

Each key's values (``_y``, in step order ``_i`` of ``_n``) are fitted with two levels, the
first up to a split and the second from it to the last value, at the split that leaves the
smallest sum of absolute residuals among the splits where the key rose, with at least
``first`` values before the split and ``persist`` from it. The key rose at a split when the
second level is above the first by its bar, at most one value before the split is that high
(a series that swings between two levels from its first values on has no "before"), and the
rise parts the values: at most one from the split on is at or below the highest but one
before it. A fault lifts every value after its onset above those before it; a machine's
load that comes and goes shifts a noisy series' two halves apart about as far by the split
picked for it, but leaves them mingled. The best fit of all splits may not be the one: a
burst just before a fault's onset and the onset's own half-slow step put two high values
before the split one step later. Used by the links' baseline (on the negated log bandwidth:
a fall) and the lateness detector's (on the delay).
"""

from __future__ import annotations

import polars as pl

MAD_SCALE = 1.4826  # the median absolute deviation's factor to a Gaussian's sigma


def lasting_shifts(df: pl.DataFrame, *, key: str, first: int, persist: int, bar: pl.Expr,
                   per_key: pl.DataFrame | None = None) -> pl.DataFrame:
    """``key``, ``_j`` (the index of the first value of the rise), ``_before``, ``_after``
    (the two levels), ``_spread`` (the residuals' robust spread) and ``_bar`` of the keys of
    ``df`` (``key``, ``_i``, ``_y``, ``_n``) that rose for good. ``bar`` is evaluated per key
    on those columns and ``per_key``'s."""
    splits = (df.select(key, pl.col("_n").cast(pl.Int64)).unique()
              .with_columns(pl.int_ranges(first, pl.col("_n") - persist + 1).alias("_j"))
              .explode("_j").drop_nulls("_j"))
    empty = pl.DataFrame(schema={key: df.schema[key], "_j": pl.Int64, "_before": pl.Float64,
                                 "_after": pl.Float64, "_spread": pl.Float64,
                                 "_bar": pl.Float64})
    if splits.is_empty():
        return empty
    fit = (splits.drop("_n").join(df.select(key, "_i", "_y"), on=key)
           .with_columns((pl.col("_i") >= pl.col("_j")).alias("_late")))
    fit = fit.with_columns(pl.col("_y").median().over(key, "_j", "_late").alias("_level"))
    fit = fit.with_columns((pl.col("_y") - pl.col("_level")).abs().alias("_res"))
    cand = fit.group_by(key, "_j").agg(
        pl.col("_res").sum().alias("_cost"),
        (pl.col("_res").median() * MAD_SCALE).alias("_spread"),
        pl.col("_level").filter(~pl.col("_late")).first().alias("_before"),
        pl.col("_level").filter(pl.col("_late")).first().alias("_after"))
    if per_key is not None:
        cand = cand.join(per_key, on=key)
    cand = cand.with_columns(bar.cast(pl.Float64).alias("_bar")).filter(
        pl.col("_after") - pl.col("_before") >= pl.col("_bar"))
    if cand.is_empty():
        return empty
    # per split, the values before it as high as the rise (at most one: a burst), and those
    # from it at or below the highest before it but one (at most one: the rise parts them);
    # of the splits that pass, the best fit (a burst just before the onset and the onset's
    # own half-slow step may leave the best fit of all one step late, where two values
    # before it are high)
    y, late = pl.col("_y"), pl.col("_late")
    top = y.filter(~late).sort(descending=True).get(1, null_on_oob=True)
    counts = (fit.select(key, "_j", "_y", "_late")
              .join(cand.select(key, "_j", "_before", "_bar"), on=[key, "_j"])
              .group_by(key, "_j").agg(
                  (y.filter(~late) >= pl.col("_before").first() + pl.col("_bar").first())
                  .sum().alias("_high"),
                  (y.filter(late) <= top).sum().alias("_low")))
    return (cand.join(counts, on=[key, "_j"])
            .filter((pl.col("_high") <= 1) & (pl.col("_low") <= 1))
            .sort(key, "_cost", "_j").group_by(key, maintain_order=True).first()
            .select(key, pl.col("_j").cast(pl.Int64), "_before", "_after", "_spread", "_bar"))


__all__ = ["MAD_SCALE", "lasting_shifts"]
