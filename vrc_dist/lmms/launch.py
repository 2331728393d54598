"""lmms-eval's own command line with the `vrc_llava` model registered: what `vrc lmms-eval ARGS...` runs."""
from __future__ import annotations

import inspect
import sys

MODEL_NAME = "vrc_llava"
MODEL_CLASS = "vrc_dist.lmms.model.VrcLlava"
NO_LMMS = ("lmms-eval is not installed in this Python ({python}); install the extra (pip install -e \".[lmms]\") "
           "or build the separate venv with `make lmms-venv` and run .venv-lmms/bin/vrc lmms-eval ...")


def register_model() -> None:
    """Make `--model vrc_llava` resolve in this process. lmms-eval 0.7 reads models from its registry (not from
    --include_path, which it reads for task YAMLs only); the package's `lmms_eval.models` entry point does the
    same for a plain `lmms-eval` command once vrc-dist is installed."""
    try:
        from lmms_eval.models import MODEL_REGISTRY_V2
        from lmms_eval.models.registry_v2 import ModelManifest
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "lmms_eval":
            raise ModuleNotFoundError(NO_LMMS.format(python=sys.executable)) from None
        raise
    MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS),
                                        overwrite=True)


def manifest():
    """The `lmms_eval.models` entry point's payload."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS)


def _flag(argv: list[str], *names: str) -> str | None:
    """The value of the last `--name V` or `--name=V` among argv (lmms-eval's own spelling)."""
    value = None
    for i, a in enumerate(argv):
        for name in names:
            if a == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif a.startswith(name + "="):
                value = a.split("=", 1)[1]
    return value


def precheck(argv: list[str]) -> None:
    """Check vrc_llava's model args as the model will see them, before lmms-eval starts (and reads data):
    lmms-eval itself logs a failed run's exception and still exits 0."""
    models = (_flag(argv, "--model") or "").split(",")
    if MODEL_NAME not in models:
        return
    from lmms_eval.utils import simple_parse_args_string

    from vrc_dist.lmms.args import check_model_args

    args = simple_parse_args_string(_flag(argv, "--model_args") or "")
    for key, flag in (("batch_size", "--batch_size"), ("device", "--device")):
        value = _flag(argv, flag, "-b") if key == "batch_size" else _flag(argv, flag)
        if value is not None and key not in args:
            args[key] = value
    args.pop("max_batch_size", None)
    known = set(inspect.signature(check_model_args).parameters) - {"unknown"}
    check_model_args(**{k: v for k, v in args.items() if k in known},
                     unknown={k: v for k, v in args.items() if k not in known})


def run_lmms_eval(argv: list[str]) -> int:
    """lmms-eval's command line with vrc_llava registered; non-zero when an evaluation raised."""
    register_model()
    import lmms_eval.__main__ as lmms_main_module
    from lmms_eval.cli.dispatch import main as lmms_main

    precheck(argv)
    failures = []
    single = lmms_main_module.cli_evaluate_single

    def recorded(*a, **kw):  # lmms-eval prints a failed evaluation's traceback and carries on to exit 0
        try:
            return single(*a, **kw)
        except Exception as e:
            failures.append(e)
            raise

    saved = sys.argv
    sys.argv = ["lmms-eval", *argv]
    lmms_main_module.cli_evaluate_single = recorded
    try:
        lmms_main()
    except SystemExit as e:  # lmms-eval ends some paths (--help, errors) with sys.exit
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
        lmms_main_module.cli_evaluate_single = single
    if failures:
        e = failures[0]
        print(f"vrc lmms-eval: error: the evaluation failed ({type(e).__name__}): {str(e).strip() or repr(e)}; "
              "lmms-eval's traceback is above", file=sys.stderr)
        return 1
    return 0
