"""`python -m cli`: the `swarmnode` command (`cli.launch.main`)."""

from cli.launch import main

main()
