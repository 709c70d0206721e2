"""`python -m gtakit.finetune RECIPE [key=value ...] [--resume]`: the same as `gtakit finetune`, for
`accelerate launch -m gtakit.finetune ...`."""

import sys

from gtakit.cli.main import app

app(args=["finetune", *sys.argv[1:]], prog_name="gtakit")
