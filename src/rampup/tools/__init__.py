"""The commands' tools, above the engine: plan, calibrate, probe, compare, report, export, longeval (``rampup
eval``), demo, resumecheck. Each module is imported when its command runs (``rampup --help`` stays fast)."""
