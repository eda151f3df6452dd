"""Parameter efficiency of every adapter family against full fine-tuning and peft, in one run.

    python benchmarks/efficiency.py --quick
    python benchmarks/efficiency.py --backbone gemma3-270m --corpus libreoffice-help --pair en-de --budget-steps 30

The same flags as `adaptkit bench efficiency` (see benchmarks/README.md); the work is done by
`adaptkit.bench`. Writes benchmarks/results/<name>.json, .md, -quality.png and -cost.png.
"""

import sys

from adaptkit.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["bench", "efficiency", *sys.argv[1:]]))
