"""Run the `engine` command as `python -m engine`.

`engine run` starts its worker this way: multiprocessing then skips running
a package's `__main__` module again in each node process that the worker
starts, as it would run `engine.cli` for `python -m engine.cli`.
"""

from engine.cli import main

if __name__ == "__main__":
    main()
