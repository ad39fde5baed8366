"""python -m minipeft SUBCOMMAND ...: the `minipeft` command (command.py), where its script is not on PATH."""
from minipeft.run.command import main

main()
