"""`probe check`: rules and verdicts, bias gaps, baselines and the JUnit/Markdown/JSON outputs."""
