"""Bytes on disk per corpus token, stage by stage, of finished runs; and the projection to a larger corpus.

    python benchmarks/disk_bytes.py runs/demo runs/demo-light [--project-tokens 103000000 --project-dim 768]

Measured: each stage's files as its manifest records them (``disk_bytes``, or the sum of its file records for
runs built before that field), divided by the datastore's entries (one per corpus token of the split). Projected:
the per-entry sizes each mode stores, from the rules the stages follow, for a corpus of ``--project-tokens``
tokens and keys of width ``--project-dim`` (default: WikiText-103 train, GPT-2 small):
  stored keys  2d (fp16 keys) + 4 (values) + index + targets
  streamed     4 (values) + index + targets
targets: w·8 + 4 stored (int32 token and float32 prob per slot, int32 gold), 0 when searched per batch
with the index an IVF-PQ of m-byte codes plus an 8-byte id per entry (m from ``default_factory``). The
``(rule)`` column applies the rule to each run measured (its own d, index and width), as a check.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlpmem.artifacts import RunDir
from mlpmem.knn.index import default_factory

STAGES = ("datastore", "index", "targets", "train-memory")


def stage_bytes(run: RunDir, stage: str) -> int | None:
    manifest = run.read(stage)
    if manifest is None or not manifest.complete:
        return None
    return manifest.disk_bytes if manifest.disk_bytes is not None else sum(r.bytes for r in manifest.files.values())


def code_bytes(factory: str, d: int) -> int:
    """Bytes per entry of an IVF index's lists: its code plus an 8-byte id."""
    code = int(factory.split("PQ")[1].split(",")[0]) if "PQ" in factory else 4 * d  # PQm, else Flat float32
    return code + 8


def per_token(d: int, index_bytes: int, width: int | None, streamed: bool) -> float:
    """Bytes per entry by the rule in the module docstring (``width`` None: targets searched per batch)."""
    targets = 0 if width is None else width * 8 + 4
    return 4 + index_bytes + targets + (0 if streamed else 2 * d)


def measured_rows(run_dirs: list[Path]) -> list[str]:
    rows = [
        "| run | keys | targets | datastore | index | targets | memory | kNN bytes / token | (rule) | total |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in run_dirs:
        run = RunDir(path)
        datastore, index, targets = run.require("datastore"), run.require("index"), run.require("targets")
        sizes = {stage: stage_bytes(run, stage) for stage in STAGES}
        knn = sum(sizes[s] for s in ("datastore", "index", "targets"))
        total = knn + (sizes["train-memory"] or 0)
        streamed = datastore.config.keys == "streamed"
        width = targets.width if targets.stored else None
        rule = per_token(datastore.key_dim, code_bytes(index.factory, datastore.key_dim), width, streamed)
        cells = " | ".join(f"{sizes[s] / 1e6:,.2f} MB" if sizes[s] is not None else "-" for s in STAGES)
        rows.append(
            f"| {path} | {datastore.config.keys} | {'stored' if targets.stored else 'per batch'} | {cells} | "
            f"{knn / datastore.entries:,.1f} | {rule:,.1f} | {total / 1e6:,.2f} MB |"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", type=Path, help="finished runs to measure")
    p.add_argument(
        "--project-tokens", type=int, default=103_227_021, help="corpus tokens (default: WikiText-103 train words)"
    )
    p.add_argument("--project-dim", type=int, default=768, help="key width (GPT-2 small: 768)")
    p.add_argument("--project-width", type=int, default=64, help="target slots per entry (targets width, k = 64)")
    args = p.parse_args()
    if args.runs:
        print("\n".join(measured_rows(args.runs)))
    factory = default_factory(args.project_tokens, args.project_dim, 0, 262_144)
    index = code_bytes(factory, args.project_dim)
    d, w = args.project_dim, args.project_width
    print(f"\nprojection: {args.project_tokens:,} tokens, d = {d}, {factory}, width {w}")
    print("| keys | targets | bytes / token | total |\n|---|---|---:|---:|")
    for streamed, width in ((False, args.project_width), (True, args.project_width), (True, None)):
        b = per_token(args.project_dim, index, width, streamed)
        keys, targets = "streamed" if streamed else "stored", "per batch" if width is None else "stored"
        print(f"| {keys} | {targets} | {b:,.0f} | {b * args.project_tokens / 1e9:,.1f} GB |")


if __name__ == "__main__":
    main()
