"""`ss-mlx <command> ...`: route to the command module's `main(argv)`.

Modules are imported lazily so `ss-mlx generate` never imports torch, and a missing optional
extra only fails the command that needs it.
"""

import importlib
import sys

# command -> (module, what to install when the import fails)
COMMANDS = {
    "generate": ("ss_mlx.generate", None),
    "init": ("ss_mlx.init_model", None),
    "models": ("ss_mlx.default_model", None),
    "import-gguf": ("ss_mlx.gguf_import", None),
    "bench": ("ss_mlx.bench", None),
    "tune": ("ss_mlx.tune", None),
    "compare": ("ss_mlx.compare", None),
    "train": ("ss_mlx_convert.train", "ss-mlx[train]"),
    "distill": ("ss_mlx_convert.distill", "ss-mlx[train]"),
    "convert": ("ss_mlx_convert.export", "ss-mlx[train]"),
    "export-hf": ("ss_mlx_convert.export_hf", "ss-mlx[train]"),
}

USAGE = "usage: ss-mlx {" + ",".join(COMMANDS) + "} [-h] ..."


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("Run `ss-mlx <command> --help` for a command's options.")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(f"ss-mlx: unknown command {command!r}. {USAGE}")
    module_name, extra = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if extra is None or e.name is None or e.name.startswith(("ss_mlx",)):
            raise
        sys.exit(f"ss-mlx {command}: needs {e.name!r}; install it with: pip install '{extra}'")
    module.main(rest)


if __name__ == "__main__":
    main()
