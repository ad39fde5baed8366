"""The scripts the `minipeft` command runs: train.py, eval.py and export.py.

In a clone of the repository this package stays empty and the command runs the files at the
repository's top. pyproject.toml maps this package onto that top folder, so a wheel carries copies of
them here (minipeft/run/command.py finds either).
"""
