"""``python -m ham_rl.report``: see ham_rl.report.cli."""

from .cli import main

if __name__ == "__main__":
    main()
