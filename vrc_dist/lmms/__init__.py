"""vrc-dist inside lmms-eval: the `vrc_llava` model (model.py), the offline `vrc_toy` task (task.py) and the
`vrc lmms-eval` / `vrc lmms-task` commands (cli.py). lmms-eval itself is optional (`pip install -e ".[lmms]"`,
or `make lmms-venv`); only model.py imports it."""
