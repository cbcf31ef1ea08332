"""The schema declaration and what is derived from it."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pytest

from ringwatch import _schema
from ringwatch._schema import (
    COLUMN_NAMES,
    COLUMNS,
    END_SOURCES,
    OPS,
    SCHEMA_VERSION,
    STATUSES,
    format_ranks,
    parse_ranks,
    polars_schema,
    schema_markdown,
)

REPO = Path(__file__).resolve().parents[2]


def test_column_names_are_unique_and_match_column_names():
    names = [c.name for c in COLUMNS]
    assert len(names) == len(set(names))
    assert tuple(names) == COLUMN_NAMES


def test_column_dtypes_are_polars_dtypes_and_docs_present():
    for c in COLUMNS:
        assert c.dtype in {"Int64", "Int32", "Utf8", "Boolean"}, c
        assert isinstance(c.nullable, bool)
        assert c.doc.strip(), c.name


def test_schema_version_is_major_dot_minor():
    major, minor = SCHEMA_VERSION.split(".")
    assert major.isdigit() and minor.isdigit()


def test_polars_schema_matches_columns_in_order():
    schema = polars_schema()
    assert list(schema) == list(COLUMN_NAMES)
    for c in COLUMNS:
        assert schema[c.name] == getattr(pl, c.dtype)
    # An empty frame built from it has exactly these columns and dtypes.
    df = pl.DataFrame(schema=schema)
    assert df.columns == list(COLUMN_NAMES)
    assert dict(df.schema) == schema


def test_vocabularies_have_no_duplicates():
    for vocab in (OPS, STATUSES, END_SOURCES):
        assert len(vocab) == len(set(vocab))
    assert "pending" in STATUSES and "ok" in STATUSES
    assert "none" in END_SOURCES


def test_op_names_used_by_the_agent_and_readers_are_schema_ops():
    from ringwatch._flight_recorder import _OPS
    from ringwatch.agent.capture._ops import OP_SPECS, OPTYPE_TO_OP

    assert set(OPTYPE_TO_OP.values()) <= set(OPS)
    assert {s.op for s in OP_SPECS.values()} <= set(OPS)
    assert set(_OPS.values()) <= set(OPS)


@pytest.mark.parametrize(("ranks", "spec"), [
    ([], ""),
    ([5], "5"),
    ([0, 1], "0-1"),
    ([0, 1, 2, 3, 8], "0-3,8"),
    ([8, 3, 2, 1, 0], "0-3,8"),
    ([0, 2, 4], "0,2,4"),
    ([0, 1, 2, 3, 8, 9, 10, 11], "0-3,8-11"),
    ([3, 3, 4], "3-4"),
    (range(0, 1024), "0-1023"),
])
def test_format_ranks(ranks, spec):
    assert format_ranks(ranks) == spec


@pytest.mark.parametrize(("spec", "ranks"), [
    ("", []),
    ("7", [7]),
    ("0-3,8", [0, 1, 2, 3, 8]),
    ("0,2,4", [0, 2, 4]),
    ("0-3,8-11", [0, 1, 2, 3, 8, 9, 10, 11]),
    ("4-4", [4]),
])
def test_parse_ranks(spec, ranks):
    assert parse_ranks(spec) == ranks


@pytest.mark.parametrize("bad", ["3-1", "a", "1,,2", "1-", "-", "0-x", "1;2"])
def test_parse_ranks_rejects_malformed(bad):
    with pytest.raises(ValueError):
        parse_ranks(bad)


def test_format_parse_round_trip_on_random_sets():
    rnd = random.Random(1234)
    for _ in range(300):
        ranks = rnd.sample(range(64), rnd.randint(0, 40))
        spec = format_ranks(ranks)
        assert parse_ranks(spec) == sorted(set(ranks))
        assert format_ranks(parse_ranks(spec)) == spec


def test_schema_markdown_lists_every_column_and_vocabulary():
    md = schema_markdown()
    assert md.startswith(f"# Collective event schema, version {SCHEMA_VERSION}")
    table = [line for line in md.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == list(COLUMN_NAMES)
    for c in COLUMNS:
        line = next(x for x in table if x.startswith(f"| `{c.name}` |"))
        assert f"| {c.dtype} | {'yes' if c.nullable else 'no'} |" in line
    for word in OPS + STATUSES + END_SOURCES:
        assert f"`{word}`" in md
    assert md.endswith("\n")


def test_docs_schema_md_is_generated_from_the_schema():
    path = REPO / "docs" / "schema.md"
    assert path.exists(), "regenerate with: ringwatch schema --markdown > docs/schema.md"
    assert path.read_text() == schema_markdown(), (
        "docs/schema.md is stale: ringwatch schema --markdown > docs/schema.md")


def test_cli_schema_markdown_prints_the_page(capsys):
    from ringwatch._cli import main

    assert main(["schema", "--markdown"]) == 0
    assert capsys.readouterr().out == _schema.schema_markdown()
