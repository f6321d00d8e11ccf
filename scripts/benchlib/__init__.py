"""Helpers for ``scripts/bench``, the cowfs benchmark (issue 3).

Modules:
  system      processes, timing, signals, mount table, the throw-away XFS image
  cowfs_cli   drives ``python -m cowfs`` as a black box
  trees       synthetic 10 KB-file trees, agent turns, shadow git, stdlib tarball
  results     Variant/Row records, medians, ratios, verdicts
  measures    measurements A-E and the export-git comparison
  turns       row T: whole agent turns, natively + shadow git vs through cowfs
  requests    row R: FUSE requests and daemon CPU per primitive operation
  report      terminal table, JSON, docs/benchmarks.md and its plot

Importing this package has no side effects.
"""
