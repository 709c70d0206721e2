"""Markdown tables for the benchmarks (shared by `gtakit bench` and the scripts under benchmarks/)."""

from __future__ import annotations


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """`columns` = [(row key, column title)]; missing keys print as empty cells."""
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(row.get(key, "")) for key, _ in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])
