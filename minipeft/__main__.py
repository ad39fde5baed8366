"""python -m minipeft SUBCOMMAND ...: the `minipeft` command (command.py), where its script is not on PATH."""
from .command import main

main()
