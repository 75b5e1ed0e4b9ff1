"""Stage: the rule language and engine, alarm lifecycle, ground-truth join, notification delivery,
the alarm API and `aimass rules` / `aimass alerts`."""
